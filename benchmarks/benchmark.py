#!/usr/bin/env python3
"""Throughput and peak-memory benchmark for timm-internimage models and the DCNv3 op.

Model mode (default) times whole-model inference or a training step (forward, backward and an SGD step) and
reports images/s and peak memory; ``--op`` times the DCNv3 op alone, forward and backward, on the shapes of
InternImage-T's four stages. Every configuration runs in a fresh subprocess so that its peak memory is
its own. Results print as a table, or as JSON with ``--json``.

Examples::

    python benchmarks/benchmark.py --model internimage_t --batch-size 8 --img-size 224 --backend torch,reference
    python benchmarks/benchmark.py --mode train --dtype bfloat16 --json
    python benchmarks/benchmark.py --op --backend torch,reference,compiled --compile
    python benchmarks/benchmark.py --backend reference,compiled --rounds 5   # interleaved, with speedups
    python benchmarks/benchmark.py --backend reference,torch,compiled --peers --compile eager,default,freezing
    python benchmarks/benchmark.py --backend compiled --fused-linear on,off --rounds 5
    python benchmarks/benchmark.py --model internimage_t,internimage_b --batch-size 1,8,32 --img-size 224,384,512

``--peers`` adds timm's ``convnext_tiny``, ``swin_tiny_patch4_window7_224`` and ``resnet50`` (their own layers,
no DCNv3 backend). ``--compile`` takes ``eager`` (no compile), ``default`` (inductor) and ``freezing`` (inductor
with ``torch._inductor.config.freezing``, inference only).

Peak memory is that of the timed iterations (after warmup), as ``timm_internimage.tools.benchmarking.PeakMemory``
measures it: allocated CUDA memory, or the CPU process's peak resident set size, above the level before them.
Where the kernel does not allow resetting the CPU high-water mark, the number is an upper bound, flagged
``peak_mem_exact: false``. ``--clock cpu`` times with the process CPU time instead of the wall clock: with
``--threads 1`` it is barely disturbed by other load on a shared machine.

Each configuration sets its own clock, thread count, DCNv3 settings and inductor ``freezing`` flag, and
``--in-process`` runs restore the process's settings after each one.
"""
import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch

if importlib.util.find_spec('timm_internimage') is None:  # a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm_internimage  # noqa: E402  registers the models
from timm_internimage.tools import benchmarking as measure  # noqa: E402

BACKEND_ENV = 'TIMM_INTERNIMAGE_DCNV3_BACKEND'
BACKEND_CHOICES = ('auto', 'torch', 'reference', 'compiled')
FUSED_LINEAR_ENV = 'TIMM_INTERNIMAGE_FUSED_LINEAR'
COMPILE_CHOICES = ('eager', 'default', 'freezing')
PEERS = ('convnext_tiny', 'swin_tiny_patch4_window7_224', 'resnet50')
DTYPE_CHOICES = ('float32', 'bfloat16', 'float16', 'float64')
_WORKER_FLAG = '--_worker'
OUR_MODELS = frozenset(timm.list_models(module='internimage') + timm.list_models(module='flash_internimage'))


# ----------------------------------------------------------------------------------------------------
# helpers (run inside the worker process)


def _environment(device: torch.device) -> Dict[str, Any]:
    info = {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'device': device.type,
        'threads': torch.get_num_threads(),
        'cpu_count': os.cpu_count(),
        'timm_internimage': timm_internimage.__version__,
    }
    if device.type == 'cuda':
        info['device_name'] = torch.cuda.get_device_name(device)
    else:
        info['device_name'] = measure.cpu_name()
    return info


def _resolve_device(name: str) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(name)


def _parse_kwargs(items: List[str]) -> Dict[str, Any]:
    """``key=value`` pairs, values parsed as Python literals where possible (``channels=32``, ``layer_scale=None``)."""
    import ast
    out = {}
    for item in items:
        if '=' not in item:
            raise SystemExit(f'--model-kwargs: expected key=value, got {item!r}')
        key, value = item.split('=', 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------
# workers: one configuration each, result as a dict


def _setup(cfg: Dict[str, Any]) -> measure.Clock:
    """Apply the configuration's thread count; return its clock."""
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    return measure.CLOCKS[cfg['clock']]


def run_model_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Benchmark one model configuration in this process."""
    clock = _setup(cfg)
    device = _resolve_device(cfg['device'])
    dtype = getattr(torch, cfg['dtype'])
    torch.manual_seed(0)

    try:  # models with a fixed input size (Swin) are built for the benchmark's resolution
        model = timm.create_model(cfg['model'], in_chans=cfg['in_chans'], img_size=cfg['img_size'],
                                  **cfg['model_kwargs'])
    except TypeError:  # the others take any size and no img_size argument
        model = timm.create_model(cfg['model'], in_chans=cfg['in_chans'], **cfg['model_kwargs'])
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if not cfg['amp']:
        model.to(dtype)
    train = cfg['mode'] == 'train'
    model.train(train)
    compile_settings = contextlib.nullcontext()
    if cfg['compile']:
        from torch._inductor import config as inductor_config
        # read when the model compiles, at its first call: set for this configuration's runs only
        compile_settings = inductor_config.patch(freezing=cfg['compile'] == 'freezing')
        model = torch.compile(model)

    x = torch.randn(cfg['batch_size'], cfg['in_chans'], cfg['img_size'], cfg['img_size'], device=device)
    if not cfg['amp']:
        x = x.to(dtype)
    if cfg['channels_last']:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=cfg['amp'])

    if train:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step() -> None:
            with autocast:
                out = model(x)
            out.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        grad_ctx = torch.enable_grad
    else:
        def step() -> None:
            with autocast:
                model(x)
        grad_ctx = torch.inference_mode

    memory = measure.PeakMemory(device)
    with compile_settings, grad_ctx():
        # steady state: the memory window opens after warmup (first-call caches, torch.compile)
        times = measure.time_it(step, device, cfg['warmup'], cfg['iters'], clock, after_warmup=memory.start)
        peak = memory.stop()
    stats = measure.summary(times)
    return {
        'kind': 'model',
        'config': cfg,
        'params_m': num_params / 1e6,
        'img_per_s': cfg['batch_size'] / (stats['median_ms'] / 1e3),
        **stats,
        'peak_mem_mib': peak,
        'peak_mem_exact': memory.exact,
        'env': _environment(device),
    }


def run_op_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Benchmark the DCNv3 op for one backend on all InternImage-T stage shapes, in this process."""
    clock = _setup(cfg)
    device = _resolve_device(cfg['device'])
    dtype = getattr(torch, cfg['dtype'])
    op = measure.dcnv3_3x3(cfg['backend'])
    if cfg['compile']:
        op = torch.compile(op, fullgraph=True, dynamic=False)
    rows, exact = [], True
    for index in cfg['shapes']:
        row, exact = measure.time_op_shape(op, cfg['batch_size'], measure.OP_SHAPES[index], dtype, device,
                                           cfg['warmup'], cfg['iters'], clock)
        rows.append(row)
    return {'kind': 'op', 'config': cfg, 'shapes': rows, 'peak_mem_exact': exact, 'env': _environment(device)}


# ----------------------------------------------------------------------------------------------------
# driver


def _run_in_subprocess(cfg: Dict[str, Any]) -> Dict[str, Any]:
    env = dict(os.environ)
    _apply_settings(cfg, env)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), _WORKER_FLAG, json.dumps(cfg)],
        env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = '\n'.join(proc.stderr.strip().splitlines()[-6:])
        return {'kind': 'op' if cfg['op'] else 'model', 'config': cfg, 'error': tail or f'exit {proc.returncode}'}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _apply_settings(cfg: Dict[str, Any], env: Any) -> None:
    """A worker process gets the DCNv3 backend and the fused-linear switch through the package's environment
    variables, which it reads when it imports the package."""
    for name, value in ((BACKEND_ENV, cfg.get('backend', 'auto')), (FUSED_LINEAR_ENV, cfg.get('fused_linear', 'on'))):
        if value in ('auto', 'on', 'none'):
            env.pop(name, None)
        else:
            env[name] = '0' if value == 'off' else value


def _run_in_process(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One configuration in this process, under the package's settings API; the settings it changes (backend,
    fused linear layers, thread count) are restored after it, like a subprocess leaves its parent's alone."""
    previous_threads = torch.get_num_threads()
    backend = cfg.get('backend', 'auto')
    try:
        with timm_internimage.backend('auto' if backend == 'none' else backend), \
                timm_internimage.fused_linear(cfg.get('fused_linear', 'on') != 'off'):
            return run_op_config(cfg) if cfg['op'] else run_model_config(cfg)
    except Exception as error:  # reported like a failed subprocess, the other configurations still run
        return {'kind': 'op' if cfg['op'] else 'model', 'config': cfg, 'error': f'{type(error).__name__}: {error}'}
    finally:
        torch.set_num_threads(previous_threads)


def _worker_main(cfg_json: str) -> None:
    cfg = json.loads(cfg_json)
    result = run_op_config(cfg) if cfg['op'] else run_model_config(cfg)
    sys.stdout.write(json.dumps(result) + '\n')


def _choices(value: str, option: str, allowed: Tuple[str, ...]) -> List[str]:
    items = [v.strip() for v in value.split(',') if v.strip()]
    for item in items:
        if item not in allowed:
            raise SystemExit(f'{option}: unknown value {item!r}; choose from {", ".join(allowed)}')
    return items


def _positive_ints(value: str, option: str) -> List[int]:
    try:
        items = [int(v) for v in value.split(',') if v.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise SystemExit(f'{option}: expected positive integers separated by commas, got {value!r}')
    return items


def _configs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every configuration, in the order they run: dtype, batch, resolution, mode, then model, backend,
    fused linear and compile mode vary fastest (so that ``--rounds`` compares neighbours)."""
    backends = _choices(args.backend, '--backend', BACKEND_CHOICES)
    dtypes = _choices(args.dtype, '--dtype', DTYPE_CHOICES)
    modes = _choices(args.mode, '--mode', ('infer', 'train'))
    compiles = _choices(args.compile or 'eager', '--compile', COMPILE_CHOICES)
    fused_linear = _choices(args.fused_linear, '--fused-linear', ('on', 'off'))
    batch_sizes = _positive_ints(args.batch_size, '--batch-size')
    img_sizes = _positive_ints(args.img_size, '--img-size')
    models = [m.strip() for m in args.model.split(',') if m.strip()] + (list(PEERS) if args.peers else [])
    if args.op and 'freezing' in compiles:
        raise SystemExit('--compile freezing applies to models (it freezes their weights), not to --op')
    common = {'op': args.op, 'device': args.device, 'threads': args.threads, 'warmup': args.warmup,
              'iters': args.iters, 'clock': args.clock}
    configs = []
    if args.op:
        # one shape per worker: a fresh process per shape keeps the peak memory of each its own
        all_shapes = list(range(len(measure.OP_SHAPES)))
        shape_groups = [all_shapes] if args.in_process else [[i] for i in all_shapes]
        for dtype, batch_size, backend, compile_mode, shapes in itertools.product(
                dtypes, batch_sizes, backends, compiles, shape_groups):
            configs.append({**common, 'dtype': dtype, 'batch_size': batch_size, 'backend': backend,
                            'compile': False if compile_mode == 'eager' else compile_mode, 'shapes': shapes})
        return configs
    for dtype, batch_size, img_size, mode, model in itertools.product(dtypes, batch_sizes, img_sizes, modes, models):
        # timm's own models have no DCNv3 / DCNv4 and no fused linear layers: one configuration each
        ours = model in OUR_MODELS
        for backend, linear, compile_mode in itertools.product(
                backends if ours else ['none'], fused_linear if ours else ['on'], compiles):
            if compile_mode == 'freezing' and mode == 'train':
                continue  # freezing is for inference
            configs.append({
                **common, 'dtype': dtype, 'batch_size': batch_size, 'img_size': img_size, 'mode': mode,
                'model': model, 'backend': backend, 'fused_linear': linear,
                'compile': False if compile_mode == 'eager' else compile_mode,
                'in_chans': args.in_chans, 'channels_last': args.channels_last, 'amp': args.amp,
                'model_kwargs': _parse_kwargs(args.model_kwargs) if ours else {},
            })
    return configs


def _merge_op_results(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One op result per (dtype, batch, backend, compile), its shapes in order, whatever the workers were."""
    merged: List[Dict[str, Any]] = []
    by_key: Dict[Tuple, Dict[str, Any]] = {}
    for r in results:
        if r['kind'] != 'op':
            merged.append(r)
            continue
        c = r['config']
        key = (c['dtype'], c['batch_size'], c['backend'], c['compile'])
        if key not in by_key:
            first = dict(r, config={k: v for k, v in c.items() if k != 'shapes'}, shapes=list(r.get('shapes', [])))
            by_key[key] = first
            merged.append(first)
            continue
        target = by_key[key]
        if 'error' in r:
            target.setdefault('error', r['error'])
        target['shapes'].extend(r.get('shapes', []))
        target['peak_mem_exact'] = target.get('peak_mem_exact', True) and r.get('peak_mem_exact', True)
    return merged


def _comparable(cfg: Dict[str, Any]) -> Tuple:
    return cfg['mode'], cfg['dtype'], cfg['batch_size'], cfg['img_size']


def _combine_rounds(rounds: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One model result per configuration from several interleaved rounds: the median over rounds, and
    ``speedup``, the median over rounds of each round's throughput ratio to the first configuration with the
    same mode, dtype, batch and resolution (so that slow drifts of a shared machine cancel out)."""
    combined = []
    for index, runs in enumerate(zip(*rounds)):
        errors = [r for r in runs if 'error' in r]
        if errors:
            combined.append(errors[0])
            continue
        times = [r['median_ms'] for r in runs]
        row = dict(runs[0], median_ms=statistics.median(times), round_ms=times)
        row['img_per_s'] = row['config']['batch_size'] / (row['median_ms'] / 1e3)
        peaks = [r['peak_mem_mib'] for r in runs if r['peak_mem_mib'] is not None]
        row['peak_mem_mib'] = max(peaks) if peaks else None
        first = next(i for i, r in enumerate(rounds[0]) if _comparable(r['config']) == _comparable(row['config']))
        if all('error' not in round_results[first] for round_results in rounds):
            row['speedup'] = statistics.median(
                round_results[first]['median_ms'] / round_results[index]['median_ms'] for round_results in rounds)
        combined.append(row)
    return combined


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def _print_table(results: List[Dict[str, Any]]) -> None:
    env = next((r['env'] for r in results if 'env' in r), None)
    if env:
        clock = next((r['config'].get('clock', 'wall') for r in results), 'wall')
        print(f"# {env['device_name']} ({env['device']}, {env['threads']} threads, {clock} clock), "
              f"python {env['python']}, torch {env['torch']}, timm {env['timm']}")
    model_rows = [r for r in results if r['kind'] == 'model']
    op_rows = [r for r in results if r['kind'] == 'op']
    if model_rows:
        # The fused-linear switch as set ('-' for timm's models): whether oneDNN runs also depends on the mode,
        # dtype and backend (ops.linear.use_fused_linear), so the table does not claim it.
        header = ('model', 'mode', 'dtype', 'backend', 'fused linear', 'compile', 'batch', 'res', 'img/s',
                  'ms/iter', 'peak MiB')
        with_speedup = any('speedup' in r for r in model_rows)
        if with_speedup:
            header += ('speedup',)
        lines = []
        for r in model_rows:
            c = r['config']
            base = (c['model'], c['mode'], c['dtype'] + ('+amp' if c['amp'] else ''), c['backend'],
                    '-' if c['backend'] == 'none' else c.get('fused_linear', 'on'), c['compile'] or 'eager',
                    str(c['batch_size']), str(c['img_size']))
            if 'error' in r:
                lines.append(base + ('error', '', '') + (('',) if with_speedup else ()))
            else:
                line = base + (f"{r['img_per_s']:.2f}", f"{r['median_ms']:.1f}", _fmt(r['peak_mem_mib'], '.0f'))
                lines.append(line + ((f"{r['speedup']:.2f}x" if 'speedup' in r else '-',) if with_speedup else ()))
        _print_rows(header, lines)
    if op_rows:
        header = ('backend', 'dtype', 'compile', 'N', 'HxW', 'C', 'G', 'fwd ms', 'bwd ms', 'fwd MiB', 'fwd+bwd MiB')
        lines = []
        for r in op_rows:
            c = r['config']
            base = (c['backend'], c['dtype'], c['compile'] or 'eager')
            if 'error' in r and not r['shapes']:
                lines.append(base + ('error',) + ('',) * 7)
                continue
            for s in r['shapes']:
                sh = s['shape']
                lines.append(base + (str(sh['N']), f"{sh['H']}x{sh['W']}", str(sh['C']), str(sh['G']),
                                     f"{s['fwd_ms']:.2f}", f"{s['bwd_ms']:.2f}",
                                     _fmt(s['fwd_peak_mem_mib'], '.0f'), _fmt(s['fwd_bwd_peak_mem_mib'], '.0f')))
        if model_rows:
            print()
        _print_rows(header, lines)
    for r in results:
        if 'error' in r:
            c = r['config']
            print(f"\nerror ({c.get('model', 'op')}, backend {c['backend']}, {c['dtype']}):\n{r['error']}")
    if any(not r.get('peak_mem_exact', True) for r in results):
        print('\nnote: the peak-RSS reset was not allowed here; CPU peak memory is an upper bound.')


def _print_rows(header: Tuple[str, ...], lines: List[Tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print('  '.join(h.ljust(w) for h, w in zip(header, widths)))
    print('  '.join('-' * w for w in widths))
    for line in lines:
        print('  '.join(v.ljust(w) for v, w in zip(line, widths)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Images/s and peak memory of timm-internimage models, or DCNv3 op timings (--op).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='internimage_t', help='comma-separated timm model names')
    p.add_argument('--peers', action='store_true', help=f'also run timm\'s {", ".join(PEERS)}')
    p.add_argument('--batch-size', '-b', default='8', help='comma-separated batch sizes (model) or N (--op)')
    p.add_argument('--img-size', default='224', help='comma-separated input resolutions (square)')
    p.add_argument('--in-chans', type=int, default=3, help='input channels')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra create_model keyword arguments, e.g. channels=32 depths="[2,2,2,2]"')
    p.add_argument('--dtype', default='float32',
                   help=f'comma-separated list of: {", ".join(DTYPE_CHOICES)}')
    p.add_argument('--amp', action='store_true',
                   help='keep float32 weights and run under torch.autocast(dtype) instead of converting the model')
    p.add_argument('--mode', default='infer', help='comma-separated list of: infer (inference_mode, eval), '
                                                   'train (forward, backward and SGD step, train mode)')
    p.add_argument('--backend', default='auto',
                   help=f'comma-separated DCNv3 backends: {", ".join(BACKEND_CHOICES)} (sets {BACKEND_ENV})')
    p.add_argument('--compile', nargs='?', const='eager,default', default='eager', metavar='MODES',
                   help='comma-separated list of: eager, default (torch.compile with inductor), freezing (inductor '
                        'with freezing, inference only); the bare flag means eager,default')
    p.add_argument('--fused-linear', default='on',
                   help=f'comma-separated list of: on, off (sets {FUSED_LINEAR_ENV}=0: ATen\'s linear layers)')
    p.add_argument('--channels-last', action='store_true', help='channels_last input and model memory format')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1, ...')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: torch default)')
    p.add_argument('--clock', choices=tuple(measure.CLOCKS), default='wall',
                   help='wall: elapsed time; cpu: CPU time of the process (with --threads 1 a measure that other '
                        'load on a shared machine barely disturbs; with more threads it sums their time)')
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations')
    p.add_argument('--iters', type=int, default=5, help='timed iterations (the median is reported)')
    p.add_argument('--rounds', type=int, default=1,
                   help='model mode: run all configurations this many times, interleaved, and report medians over '
                        'rounds plus each configuration\'s speedup over the first (median of per-round ratios)')
    p.add_argument('--op', action='store_true',
                   help='time the DCNv3 op (forward, backward) on InternImage-T stage shapes instead of a model')
    p.add_argument('--macs', action='store_true',
                   help='print each model\'s parameters and multiply-adds per image (GMACs, the unit of the '
                        'published InternImage FLOPs) at each --img-size instead of timing')
    p.add_argument('--json', action='store_true', help='print one JSON document instead of the table')
    p.add_argument('--in-process', action='store_true',
                   help='run the configurations in this process instead of one fresh subprocess each (faster '
                        'start; peak memory and backend selection are then less isolated)')
    return p


def _print_macs(args: argparse.Namespace) -> int:
    rows = []
    for name, size in itertools.product(args.model.split(','), _positive_ints(args.img_size, '--img-size')):
        model = timm.create_model(name.strip(), in_chans=args.in_chans, **_parse_kwargs(args.model_kwargs)).eval()
        macs = measure.model_macs(model, torch.zeros(1, args.in_chans, size, size))
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append({'model': name.strip(), 'img_size': size, 'params_m': params_m,
                     **{f'{k}_gmacs': v / 1e9 for k, v in macs.items()}})
    if args.json:
        print(json.dumps({'results': rows}, indent=2))
        return 0
    print(f'{"model":<24} {"img":>4} {"params (M)":>10} {"GMACs":>7} {"dense":>7} {"sampling":>8}')
    for r in rows:
        print(f'{r["model"]:<24} {r["img_size"]:>4} {r["params_m"]:>10.2f} {r["total_gmacs"]:>7.3f} '
              f'{r["dense_gmacs"]:>7.3f} {r["sampling_gmacs"]:>8.3f}')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_WORKER_FLAG]:
        _worker_main(argv[1])
        return 0
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit('--iters and --rounds must be >= 1, --warmup >= 0')
    if args.op and args.rounds > 1:
        raise SystemExit('--rounds applies to model benchmarks, not --op')
    if args.macs:
        return _print_macs(args)
    configs = _configs(args)
    rounds = [[_run_in_process(cfg) if args.in_process else _run_in_subprocess(cfg) for cfg in configs]
              for _ in range(args.rounds)]
    results = _merge_op_results(rounds[0]) if args.rounds == 1 else _combine_rounds(rounds)
    if args.json:
        print(json.dumps({'results': results}, indent=2))
    else:
        _print_table(results)
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
