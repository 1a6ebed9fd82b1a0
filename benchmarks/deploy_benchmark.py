#!/usr/bin/env python3
"""Deployment runtimes side by side: eager PyTorch (the default DCNv3 backend: the compiled op when installed),
ONNX Runtime and OpenVINO on the ONNX file of ``python -m timm_internimage export``, in one process.

The model has random weights (speed does not depend on them). The ONNX export (dynamic batch and size) is timed,
then each runtime runs every batch size; rounds interleave the runtimes and the table gives the median over
rounds of each round's mean time per batch. Threads: ``--threads`` for torch, ONNX Runtime (intra-op) and
OpenVINO (``INFERENCE_NUM_THREADS``). OpenVINO runs in float32 (``INFERENCE_PRECISION_HINT``); its default on
CPUs with bfloat16 instructions is bfloat16, timed as an extra row with ``--openvino-bf16``.

    python benchmarks/deploy_benchmark.py --model internimage_t --batch-size 1,8 --threads 2 --rounds 3
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch


def _cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def _time(run: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='internimage_t')
    parser.add_argument('--batch-size', default='1,8', help='comma-separated batch sizes (default 1,8)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--iters', type=int, default=3, help='timed iterations per round (after one warmup)')
    parser.add_argument('--openvino-bf16', action='store_true', help='also time OpenVINO in its bfloat16 default')
    args = parser.parse_args()

    import onnxruntime
    import openvino
    import timm
    import timm_internimage  # noqa: F401  (registers the models)
    from timm_internimage.export import export_model
    from timm_internimage.ops import compiled_backend_available

    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False).eval()
    batches = [int(b) for b in args.batch_size.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / 'model.onnx'
        start = time.perf_counter()
        result = export_model(model, onnx_path, 'onnx', dynamic=True, img_size=args.img_size)
        export_seconds = time.perf_counter() - start
        ir_path = Path(tmp) / 'model.xml'
        start = time.perf_counter()
        openvino.save_model(openvino.convert_model(str(onnx_path)), str(ir_path), compress_to_fp16=False)
        convert_seconds = time.perf_counter() - start

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=['CPUExecutionProvider'])
        core = openvino.Core()
        precisions = ['f32'] + (['bf16'] if args.openvino_bf16 else [])
        compiled = {p: core.compile_model(str(ir_path), 'CPU', {
            'INFERENCE_NUM_THREADS': args.threads, 'INFERENCE_PRECISION_HINT': p, 'PERFORMANCE_HINT': 'LATENCY'})
            for p in precisions}

        eager_name = 'eager PyTorch (compiled op)' if compiled_backend_available() else 'eager PyTorch (torch op)'
        runners: Dict[str, Callable[[np.ndarray], object]] = {eager_name: None}
        runners['ONNX Runtime'] = lambda x: session.run(None, {'image': x})
        for p in precisions:
            runners[f'OpenVINO {p}'] = (lambda c: lambda x: c(x))(compiled[p])
        times: Dict[tuple, List[float]] = {}
        for _ in range(args.rounds):
            for batch in batches:
                x = torch.randn(batch, 3, args.img_size, args.img_size)
                inputs = {name: x.numpy() for name in runners}
                for name, runner in runners.items():
                    if runner is None:
                        def run():
                            with torch.inference_mode():
                                model(x)
                    else:
                        def run(runner=runner, array=inputs[name]):
                            runner(array)
                    run()  # warmup (first calls of a new shape plan and allocate)
                    times.setdefault((name, batch), []).append(_time(run, args.iters))

    load = os.getloadavg()
    print(f'# {_cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads, load average {load[0]:.2f} / '
          f'{load[1]:.2f} / {load[2]:.2f} (1/5/15 min, after the run)')
    print(f'# python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, '
          f'openvino {openvino.__version__}')
    print(f'# {args.model}, random weights, {args.img_size}x{args.img_size}, float32; median of {args.rounds} '
          f'interleaved rounds of {args.iters} iterations')
    print(f'# ONNX export (dynamic batch and size, with its ONNX Runtime check): {export_seconds:.1f} s '
          f'(export alone {result.export_seconds:.1f} s); OpenVINO conversion {convert_seconds:.1f} s')
    header = f'{"runtime":<30} {"batch":>5} {"ms/batch":>9} {"img/s":>7} {"vs eager":>8}'
    print(header)
    print('-' * len(header))
    for batch in batches:
        eager = statistics.median(times[(eager_name, batch)])
        for name in runners:
            median = statistics.median(times[(name, batch)])
            print(f'{name:<30} {batch:>5} {1e3 * median:>9.1f} {batch / median:>7.2f} {eager / median:>7.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
