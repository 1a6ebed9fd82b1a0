#!/usr/bin/env python3
"""Deployment runtimes side by side: eager PyTorch (the default DCNv3 backend: the compiled op when installed),
ONNX Runtime and OpenVINO on the ONNX file of ``python -m timm_internimage export``.

The model has random weights (speed does not depend on them). The ONNX export (dynamic batch and size) is timed,
then each runtime runs each batch size in a fresh process (thread pools of one runtime left spinning would slow
the next on a small machine); rounds interleave the runtimes and the table gives the median over rounds of each
process's mean time per batch. Threads: ``--threads`` for torch, ONNX Runtime (intra-op) and
OpenVINO (``INFERENCE_NUM_THREADS``). OpenVINO runs in float32 (``INFERENCE_PRECISION_HINT``); its default on
CPUs with bfloat16 instructions is bfloat16, timed as an extra row with ``--openvino-bf16``.

    python benchmarks/deploy_benchmark.py --model internimage_t --batch-size 1,8 --threads 2 --rounds 3
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from timm_internimage.tools.benchmarking import cpu_name


def _time(run: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters


def _worker(args: argparse.Namespace) -> None:
    """Time one runtime at one batch size in this (fresh) process; prints the mean seconds per batch."""
    runtime, batch = args.worker, args.worker_batch
    torch.set_num_threads(args.threads)
    x = torch.randn(batch, 3, args.img_size, args.img_size)
    if runtime == 'eager':
        import timm
        import timm_internimage  # noqa: F401  (registers the models)
        model = timm.create_model(args.model, pretrained=False).eval()

        def run():
            with torch.inference_mode():
                model(x)
    elif runtime == 'onnxruntime':
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(Path(args.artifacts) / 'model.onnx'), options,
                                               providers=['CPUExecutionProvider'])
        array = x.numpy()

        def run():
            session.run(None, {'image': array})
    else:
        import openvino
        compiled = openvino.Core().compile_model(str(Path(args.artifacts) / 'model.xml'), 'CPU', {
            'INFERENCE_NUM_THREADS': args.threads, 'INFERENCE_PRECISION_HINT': runtime.split('-')[1],
            'PERFORMANCE_HINT': 'LATENCY'})
        array = x.numpy()

        def run():
            compiled(array)
    run()  # warmup: the first call of a shape plans and allocates
    print(_time(run, args.iters))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='internimage_t')
    parser.add_argument('--batch-size', default='1,8', help='comma-separated batch sizes (default 1,8)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--iters', type=int, default=3, help='timed iterations per process (after one warmup)')
    parser.add_argument('--openvino-bf16', action='store_true', help='also time OpenVINO in its bfloat16 default')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--worker-batch', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--artifacts', help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
    if args.worker:
        _worker(args)
        return 0

    import onnxruntime
    import openvino
    import timm
    import timm_internimage  # noqa: F401  (registers the models)
    from timm_internimage.tools.export import export_model
    from timm_internimage.ops import compiled_backend_available

    batches = [int(b) for b in args.batch_size.split(',')]
    runtimes = ['eager', 'onnxruntime', 'openvino-f32'] + (['openvino-bf16'] if args.openvino_bf16 else [])
    names = {'eager': 'eager PyTorch (compiled op)' if compiled_backend_available() else 'eager PyTorch (torch op)',
             'onnxruntime': 'ONNX Runtime', 'openvino-f32': 'OpenVINO f32', 'openvino-bf16': 'OpenVINO bf16'}
    with tempfile.TemporaryDirectory() as tmp:
        model = timm.create_model(args.model, pretrained=False).eval()
        onnx_path = Path(tmp) / 'model.onnx'
        start = time.perf_counter()
        result = export_model(model, onnx_path, 'onnx', dynamic=True, img_size=args.img_size)
        export_seconds = time.perf_counter() - start
        del model
        start = time.perf_counter()
        openvino.save_model(openvino.convert_model(str(onnx_path)), str(Path(tmp) / 'model.xml'),
                            compress_to_fp16=False)
        convert_seconds = time.perf_counter() - start
        times: Dict[tuple, List[float]] = {}
        for _ in range(args.rounds):
            for batch in batches:
                for runtime in runtimes:
                    command = [sys.executable, __file__, '--worker', runtime, '--worker-batch', str(batch),
                               '--artifacts', tmp, '--model', args.model, '--img-size', str(args.img_size),
                               '--threads', str(args.threads), '--iters', str(args.iters)]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    times.setdefault((runtime, batch), []).append(float(output.split()[-1]))

    load = os.getloadavg()
    print(f'# {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads, load average {load[0]:.2f} / '
          f'{load[1]:.2f} / {load[2]:.2f} (1/5/15 min, after the run)')
    print(f'# python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, '
          f'openvino {openvino.__version__}')
    print(f'# {args.model}, random weights, {args.img_size}x{args.img_size}, float32; each runtime and batch in a '
          f'fresh process, {args.iters} iterations after a warmup; median of {args.rounds} interleaved rounds')
    print(f'# ONNX export (dynamic batch and size, with its ONNX Runtime check): {export_seconds:.1f} s '
          f'(export alone {result.export_seconds:.1f} s); OpenVINO conversion {convert_seconds:.1f} s')
    header = f'{"runtime":<30} {"batch":>5} {"ms/batch":>9} {"img/s":>7} {"vs eager":>8}'
    print(header)
    print('-' * len(header))
    for batch in batches:
        eager = statistics.median(times[('eager', batch)])
        for runtime in runtimes:
            median = statistics.median(times[(runtime, batch)])
            print(f'{names[runtime]:<30} {batch:>5} {1e3 * median:>9.1f} {batch / median:>7.2f} '
                  f'{eager / median:>7.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
