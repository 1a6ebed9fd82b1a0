#!/usr/bin/env python3
"""The DCNv4 op against the DCNv3 op, forward and backward, at InternImage-T's stage shapes.

DCNv4 as FlashInternImage calls it (one packed, padded ``offset_mask``, no softmax) and DCNv3 as InternImage calls
it (offsets and mask logits, the softmax fused into the op), on the same input and offsets, the two interleaved
call by call (``timm_internimage.tools.benchmarking.time_dcnv4_against_dcnv3``). Prints a markdown table of
median milliseconds.

Examples::

    python benchmarks/dcnv4_op.py                                  # compiled, CPU, batch 8
    python benchmarks/dcnv4_op.py --threads 1 --clock cpu          # process CPU time: robust on a shared machine
    python benchmarks/dcnv4_op.py --device cuda --batch-size 64 --dtype float16
"""
import argparse
import importlib.util
import os
import sys

import torch

if importlib.util.find_spec('timm_internimage') is None:  # a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_internimage.tools import benchmarking as measure  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-size', '-b', type=int, default=8)
    p.add_argument('--backend', default='compiled', choices=('compiled', 'torch', 'auto'))
    p.add_argument('--dtype', default='float32', choices=('float32', 'float16', 'bfloat16', 'float64'))
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: torch default)')
    p.add_argument('--clock', choices=tuple(measure.CLOCKS), default='wall')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=9, help='timed calls of each op (the median is reported)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = measure.cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)
    print(f'{args.backend} backend, {device.type} ({machine}), {args.dtype}, batch {args.batch_size}, '
          f'{torch.get_num_threads()} threads, {args.clock} clock, median of {args.iters} interleaved calls\n')
    print('| stage shape (H=W, C, G) | DCNv4 fwd ms | DCNv3 fwd ms | DCNv3/DCNv4 | DCNv4 bwd ms | DCNv3 bwd ms '
          '| DCNv3/DCNv4 |')
    print('|---|---|---|---|---|---|---|')
    for shape in measure.OP_SHAPES:
        t = measure.time_dcnv4_against_dcnv3(args.batch_size, shape, dtype, device, args.warmup, args.iters,
                                             measure.CLOCKS[args.clock], backend=args.backend)
        v4, v3 = t['dcnv4'], t['dcnv3']
        print(f'| {shape[0]}, {shape[1]}, {shape[2]} | {v4["fwd_ms"]:.2f} | {v3["fwd_ms"]:.2f} | '
              f'{v3["fwd_ms"] / v4["fwd_ms"]:.2f}x | {v4["bwd_ms"]:.2f} | {v3["bwd_ms"]:.2f} | '
              f'{v3["bwd_ms"] / v4["bwd_ms"]:.2f}x |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
