#!/usr/bin/env python3
"""Acceptance checks of timm-internimage and its compiled DCNv3 and DCNv4 ops on a GPU.

Run it through ``scripts/gpu_check.sh``, which first installs the op wheel and the package where they are
missing. ``--device cpu`` runs the same checks as a small CPU smoke test: the CUDA-only ones (streams,
graphs, cuda:1, the >2^31-element input) report SKIP, the sizes shrink. Progress goes to stderr; one
markdown table (check | result | notes) is printed at the end; the exit status is 1 if any check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from timm_internimage.tools import benchmarking as measure

REPO = Path(__file__).resolve().parents[1]
SEMANTICS_DIR = REPO / 'tests' / 'data' / 'golden' / 'cuda_semantics'
DCNV4_DIR = REPO / 'tests' / 'data' / 'golden' / 'dcnv4'
PASS, FAIL, SKIP = 'PASS', 'FAIL', 'SKIP'
OUTPUT_NAMES = ('output', 'grad_input', 'grad_offset', 'grad_mask')


@dataclass
class Row:
    check: str
    result: str  # PASS, FAIL or SKIP
    notes: str = ''


def render_table(rows: Sequence[Row]) -> str:
    lines = ['| check | result | notes |', '|---|---|---|']
    lines += [f"| {r.check} | {r.result} | {r.notes.replace('|', '/')} |" for r in rows]
    return '\n'.join(lines)


def exit_code(rows: Sequence[Row]) -> int:
    """1 if any row is not PASS or SKIP (a FAIL, or a malformed result), else 0."""
    return int(any(r.result not in (PASS, SKIP) for r in rows))


def log(message: str) -> None:
    print(f'[gpu_check] {message}', file=sys.stderr, flush=True)


@dataclass
class Context:
    device: torch.device
    quick: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == 'cuda'


Check = Callable[[Context], Union[Row, List[Row]]]


def run_checks(checks: Sequence[Tuple[str, Check]], ctx: Context) -> List[Row]:
    """Run each check; an exception becomes a FAIL row named after the check (traceback on stderr)."""
    rows: List[Row] = []
    for name, check in checks:
        log(f'{name} ...')
        start = time.perf_counter()
        try:
            out = check(ctx)
            rows.extend([out] if isinstance(out, Row) else out)
        except Exception as error:  # noqa: BLE001  any failure is a result to report
            traceback.print_exc()
            message = (str(error).strip().splitlines() or [''])[0][:300]
            rows.append(Row(name, FAIL, f'{type(error).__name__}: {message}'))
        gc.collect()
        try:
            if ctx.cuda and torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001  a sticky CUDA error: later checks report it themselves
            log(f'empty_cache after {name}: {type(error).__name__}: {error}')
        log(f'{name}: {time.perf_counter() - start:.1f} s')
    return rows


def finish(rows: Sequence[Row], json_path: Optional[str] = None, meta: Optional[dict] = None) -> int:
    """Print the table, write the JSON report if asked, return the exit status."""
    code = exit_code(rows)
    print(render_table(rows), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps({**(meta or {}), 'rows': [asdict(r) for r in rows],
                                               'exit_code': code}, indent=2) + '\n')
    return code


# ----------------------------------------------------------------------------------------------------
# helpers


def dcnv3(*args, **kwargs):
    from timm_internimage.ops import dcnv3 as op
    kwargs.setdefault('backend', 'compiled')
    return op(*args, **kwargs)


def fwd_bwd(x, offset, mask, grad_output=None, **kwargs):
    """Output and the three gradients of ``dcnv3`` (fresh leaves cloned from the inputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, **kwargs)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def max_abs_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected|, matching non-finite values counting as equal."""
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    diff = (got - expected).abs()
    diff[(got == expected) | (got.isnan() & expected.isnan())] = 0
    return float(diff.nan_to_num(nan=float('inf')).max()) if diff.numel() else 0.0


def small_inputs(device, dtype=torch.float32, n=2, size=24, channels=64, group=4, seed=0):
    return measure.op_inputs(n, size, channels, group, dtype, device, torch.Generator().manual_seed(seed))


def needs_cuda(ctx: Context, name: str, what: str) -> Optional[Row]:
    return None if ctx.cuda else Row(name, SKIP, f'needs CUDA ({what}); --device {ctx.device.type}')


# ----------------------------------------------------------------------------------------------------
# checks


def check_setup(ctx: Context) -> Row:
    name = 'compiled op wheel'
    import timm_internimage_dcnv3 as ext
    from timm_internimage.ops import compiled_backend_available
    notes = (f'timm_internimage_dcnv3 {ext.__version__}, torch {torch.__version__}, '
             f'built_with_cuda={ext.built_with_cuda()}, cuda_loaded={ext.cuda_loaded()}')
    if ctx.cuda and torch.cuda.is_available():
        notes += f', {torch.cuda.get_device_name(ctx.device)} x{torch.cuda.device_count()}'
    setup = os.environ.get('GPU_CHECK_SETUP_NOTES')
    if setup:
        notes += f'; {setup}'
    if not compiled_backend_available(ctx.device, torch.float32):
        reason = ext.cuda_load_error() or ('no CUDA kernels in this wheel' if not ext.built_with_cuda() else '')
        return Row(name, FAIL, f'compiled op cannot run on {ctx.device}: {reason}; {notes}')
    return Row(name, PASS, notes)


def check_pytest(ctx: Context) -> Row:
    name = 'pytest tests/test_compiled_op.py -k cuda'
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / 'junit.xml'
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING='1')
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_compiled_op.py',
               '-k', 'cuda', f'--junitxml={report}']
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=150 if ctx.quick else 300)
        except subprocess.TimeoutExpired as error:
            return Row(name, FAIL, f'timed out after {error.timeout} s')
        if not report.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            return Row(name, FAIL, f'pytest exit {proc.returncode}, no report: '
                                   f'{(proc.stderr.strip().splitlines() or ["?"])[-1][:200]}')
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
        tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped'))
    passed = tests - failures - errors - skipped
    notes = f'{passed} passed, {failures} failed, {errors} errors, {skipped} skipped (exit {proc.returncode})'
    if failures or errors or proc.returncode not in (0, 5):
        sys.stderr.write(proc.stdout[-6000:])
        return Row(name, FAIL, notes)
    if ctx.cuda:
        return Row(name, PASS if passed else FAIL, notes + ('' if passed else '; no CUDA test ran'))
    return Row(name, PASS if passed else SKIP, notes + '; no GPU')


def check_semantics(ctx: Context) -> Row:
    name = 'cuda_semantics cases (compiled, float64)'
    from safetensors.torch import load_file
    cases = json.loads((SEMANTICS_DIR / 'cases.json').read_text())
    worst, failed = 0.0, []
    for case in cases:
        data = {k: v.to(ctx.device) for k, v in load_file(str(SEMANTICS_DIR / case['file'])).items()}
        kwargs = {k: case[k] for k in ('kernel_size', 'stride', 'padding', 'dilation', 'group', 'offset_scale',
                                       'remove_center')}
        got = fwd_bwd(data['input'], data['offset'], data['mask'], data['grad_output'], **kwargs)
        errors = [max_abs_error(g, data[k]) for g, k in zip(got, OUTPUT_NAMES)]
        worst = max(worst, *errors)
        if max(errors) > 1e-12:
            failed.append(f"{case['name']} ({', '.join(f'{k} {e:.1e}' for k, e in zip(OUTPUT_NAMES, errors))})")
    notes = f'{len(cases)} cases on {ctx.device.type}, output + 3 gradients, max abs error {worst:.1e} (limit 1e-12)'
    if not cases:
        return Row(name, FAIL, 'no cases found')
    return Row(name, FAIL, notes + '; failed: ' + '; '.join(failed)) if failed else Row(name, PASS, notes)


def check_stream(ctx: Context) -> Row:
    name = 'non-default stream'
    if row := needs_cuda(ctx, name, 'streams'):
        return row
    x, offset, mask = small_inputs(ctx.device)
    kwargs = dict(group=4)
    expected = fwd_bwd(x, offset, mask, **kwargs)
    late_x = torch.zeros_like(x)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream(ctx.device)
    with torch.cuda.stream(stream):
        # Keep the stream busy before it writes the input: an op launched on any other stream reads zeros.
        torch.cuda._sleep(50_000_000)
        late_x.copy_(x)
        got = fwd_bwd(late_x, offset, mask, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    errors = [max_abs_error(g, e) for g, e in zip(got, expected)]
    ok = errors[0] == 0 and max(errors[1:]) <= 1e-5
    return Row(name, PASS if ok else FAIL,
               f'forward + backward on torch.cuda.Stream() vs default stream: output diff {errors[0]:.1e} '
               f'(must be 0), gradients {max(errors[1:]):.1e} (limit 1e-5, atomics)')


def check_graph(ctx: Context) -> Row:
    name = 'CUDA graph replay'
    if row := needs_cuda(ctx, name, 'CUDA graphs'):
        return row
    static = [t.clone() for t in small_inputs(ctx.device)]
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            dcnv3(*static, group=4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = dcnv3(*static, group=4)
    worst = 0.0
    for seed in (1, 2):
        fresh = small_inputs(ctx.device, seed=seed)
        for target, source in zip(static, fresh):
            target.copy_(source)
        graph.replay()
        with torch.no_grad():
            eager = dcnv3(*fresh, group=4)
        torch.cuda.synchronize()
        worst = max(worst, max_abs_error(static_out, eager))
    return Row(name, PASS if worst == 0 else FAIL,
               f'forward captured with torch.cuda.graph, 2 replays on new inputs vs eager: max diff {worst:.1e} '
               '(must be 0)')


def check_compile(ctx: Context) -> Row:
    name = 'torch.compile reduce-overhead'
    from timm_internimage.ops import DCNv3, compiled_backend_available
    torch.manual_seed(0)
    module = DCNv3(channels=64, group=4).to(ctx.device)
    with torch.no_grad():  # non-zero offsets and mask logits (the initialisation zeroes them)
        for p in (*module.offset.parameters(), *module.mask.parameters()):
            p.normal_(0, 0.5)
    x = torch.randn(2, 16, 16, 64, device=ctx.device)
    grad_output = torch.randn_like(x)

    def run(fn):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad_output)
        return out.detach().clone(), leaf.grad.clone(), module.offset.weight.grad.clone()

    eager = run(module)
    torch._dynamo.reset()
    compiled = torch.compile(module, mode='reduce-overhead')
    for _ in range(3):  # cudagraphs are recorded after a warmup call
        torch.compiler.cudagraph_mark_step_begin()
        got = run(compiled)
    errors = [max_abs_error(g, e) / max(1.0, e.abs().max().item()) for g, e in zip(got, eager)]
    skips = 0
    try:
        from torch._dynamo.utils import counters
        skips = counters['inductor'].get('cudagraph_skips', 0)
    except Exception:  # noqa: BLE001  a private counter; only informative
        pass
    torch._dynamo.reset()
    backend = 'compiled' if compiled_backend_available(ctx.device, torch.float32) else 'torch'
    notes = (f'DCNv3 module (op backend {backend}), 3 steps fwd+bwd vs eager: rel. error output {errors[0]:.1e}, '
             f'input grad {errors[1]:.1e}, offset weight grad {errors[2]:.1e} (limit 1e-4)')
    if ctx.cuda:
        notes += f', cudagraph skips {skips}'
    return Row(name, PASS if max(errors) <= 1e-4 else FAIL, notes)


def last_rows_case(device, height: int, width: int, channels: int, group: int, crop: int = 16):
    """bf16 DCNv3 whose second output row samples the input's last rows, vs the op on a CPU crop of them.

    Stride ``height - 3`` puts output row 1 at the bottom (row 0 stays at the top), so only a tiny output
    is computed while the samples read the highest input indices. On the crop of the last ``crop`` rows,
    stride ``crop - 3`` gives the same relative positions. Offsets are multiples of 1/64, exact in bf16
    and in the float positions on both sides. Returns relative errors and the largest stray input gradient.
    """
    gen = torch.Generator().manual_seed(0)
    points = 9
    x = torch.empty(1, height, width, channels, device=device, dtype=torch.bfloat16).normal_()
    offset = torch.rand(1, 2, width, group, points, 2, generator=gen)
    offset[..., 0] = offset[..., 0] * 5 - 2.5  # x: across the columns, some outside left/right
    offset[..., 1] = offset[..., 1] * 5 - 1.5  # y: towards the bottom, some below the last row
    offset = ((offset * 64).round() / 64).reshape(1, 2, width, -1).to(torch.bfloat16)
    mask = torch.randn(1, 2, width, group, points, generator=gen).softmax(-1).reshape(1, 2, width, -1)
    mask = mask.to(torch.bfloat16)
    grad_output = torch.randn(1, 2, width, channels, generator=gen).to(torch.bfloat16)
    kwargs = dict(kernel_size=3, padding=1, group=group)

    x.requires_grad_()
    offset_d, mask_d = (t.to(device).requires_grad_() for t in (offset, mask))
    out = dcnv3(x, offset_d, mask_d, stride=(height - 3, 1), **kwargs)
    out.backward(grad_output.to(device))
    stray = x.grad[:, 8:height - 8].abs().max().item()  # rows neither output row samples
    got = (out[:, 1], x.grad[:, -8:], offset_d.grad[:, 1], mask_d.grad[:, 1])
    got = [t.detach().float().cpu() for t in got]
    x_cpu = x.detach()[:, -crop:].cpu()
    del x, out
    expected = fwd_bwd(x_cpu, offset, mask, grad_output, stride=(crop - 3, 1), **kwargs)
    expected = (expected[0][:, 1], expected[1][:, -8:], expected[2][:, 1], expected[3][:, 1])
    errors = [max_abs_error(g, e) / max(1.0, e.float().abs().max().item()) for g, e in zip(got, expected)]
    return errors, stray


def check_huge(ctx: Context) -> Row:
    name = 'bf16 input > 2^31 elements'
    height, width, channels, group = (16448, 2048, 64, 4) if ctx.cuda else (40, 24, 16, 2)
    errors, stray = last_rows_case(ctx.device, height, width, channels, group)
    ok = max(errors) <= 2e-2 and stray == 0
    detail = (f"rel. error output {errors[0]:.1e}, grad_input {errors[1]:.1e}, grad_offset {errors[2]:.1e}, "
              f"grad_mask {errors[3]:.1e} (limit 2e-2), stray grad_input {stray:.1e} (must be 0)")
    if not ctx.cuda:
        return Row(name, SKIP if ok else FAIL,
                   f'needs CUDA (4.3 GB input); the same comparison at 1x{height}x{width}x{channels} on '
                   f'{ctx.device.type}: {detail}')
    numel = height * width * channels
    return Row(name, PASS if ok else FAIL,
               f'1x{height}x{width}x{channels} ({numel / 2 ** 31:.3f} x 2^31), last rows vs CPU crop: {detail}')


def check_cuda1(ctx: Context) -> Row:
    name = 'cuda:1'
    if row := needs_cuda(ctx, name, 'a second GPU'):
        return row
    if torch.cuda.device_count() < 2:
        return Row(name, SKIP, f'{torch.cuda.device_count()} GPU visible')
    x, offset, mask = small_inputs('cpu')
    expected = fwd_bwd(*(t.to('cuda:0') for t in (x, offset, mask)), group=4)
    with torch.cuda.device(0):  # current device 0, tensors on 1: the op must switch devices itself
        got = fwd_bwd(*(t.to('cuda:1') for t in (x, offset, mask)), group=4)
        torch.cuda.synchronize(1)
    on_device = all(t.device == torch.device('cuda:1') for t in got)
    worst = max(max_abs_error(g, e) for g, e in zip(got, expected))
    return Row(name, PASS if on_device and worst <= 1e-5 else FAIL,
               f'forward + backward on cuda:1 vs cuda:0: max diff {worst:.1e} (limit 1e-5), '
               f'results on cuda:1: {on_device}')


def check_op_timings(ctx: Context) -> List[Row]:
    from timm_internimage.ops import dcnv3 as op
    warmup, iters = (1, 1) if not ctx.cuda else ((2, 5) if ctx.quick else (5, 20))
    rows = []
    for n in ((1, 32) if ctx.cuda else (1,)):
        timings = {backend: [measure.time_op_shape(measure.dcnv3_3x3(backend), n, shape, torch.float32, ctx.device,
                                                   warmup, iters, time.perf_counter)[0]
                             for shape in measure.OP_SHAPES]
                   for backend in ('compiled', 'torch')}
        for (size, channels, group), fast, slow in zip(measure.OP_SHAPES, timings['compiled'], timings['torch']):
            x, offset, mask = small_inputs(ctx.device, n=n, size=size, channels=channels, group=group)
            with torch.no_grad():
                diff = max_abs_error(op(x, offset, mask, group=group, backend='compiled'),
                                     op(x, offset, mask, group=group, backend='torch'))
            notes = (f"fwd {fast['fwd_ms']:.3f} vs {slow['fwd_ms']:.3f} ms ({slow['fwd_ms'] / fast['fwd_ms']:.1f}x), "
                     f"bwd {fast['bwd_ms']:.3f} vs {slow['bwd_ms']:.3f} ms ({slow['bwd_ms'] / fast['bwd_ms']:.1f}x) "
                     f"compiled vs torch, float32; max diff {diff:.1e} (limit 1e-4)")
            rows.append(Row(f'op N={n} {size}x{size} C={channels} G={group}', PASS if diff <= 1e-4 else FAIL, notes))
    if not ctx.cuda:
        rows.append(Row('op N=32', SKIP, 'CPU smoke: N=1 only'))
    return rows


def dcnv4_fwd_bwd(x, offset_mask, grad_output, backend, record=None, **kwargs):
    """Output and the two gradients of ``dcnv4`` on ``backend`` (fresh leaves cloned from the inputs)."""
    from timm_internimage.ops import dcnv4
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset_mask)]
    with record or contextlib.nullcontext():
        out = dcnv4(*leaves, backend=backend, **kwargs)
        out.backward(grad_output)
    return [out.detach()] + [leaf.grad for leaf in leaves]


# Largest max|compiled - torch in float64| of the DCNv4 results, relative to max(1, max|torch|): the kernels
# compute in the dtype (float accumulation for the half types) and round once.
DCNV4_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
# (group, group_channels, softmax): a vector-access width, a width only float32/float64 vectorise (12), an odd
# width (scalar accesses everywhere), and the softmax variant.
DCNV4_CASES = ((4, 16, False), (3, 12, False), (3, 5, False), (4, 16, True))


def check_dcnv4(ctx: Context) -> List[Row]:
    """The compiled DCNv4 kernels: the golden cases (float64, 1e-10) and random cases in every dtype against the
    torch backend in float64, output and both gradients; the kernels must run (not DCNv3's on a copy)."""
    from safetensors.torch import load_file
    rows = []
    cases = {k: v for k, v in json.loads((DCNV4_DIR / 'cases.json').read_text()).items() if k.startswith('op_')}
    worst, failed, ran = 0.0, [], set()
    for name, case in cases.items():
        data = {k: v.to(ctx.device) for k, v in load_file(str(DCNV4_DIR / f'{name}.safetensors')).items()}
        kwargs = dict(kernel_size=(case['kernel_h'], case['kernel_w']), stride=(case['stride_h'], case['stride_w']),
                      padding=(case['pad_h'], case['pad_w']), dilation=(case['dilation_h'], case['dilation_w']),
                      group=case['group'], offset_scale=case['offset_scale'], remove_center=bool(case['remove_center']))
        record = measure.OpRecorder()
        got = dcnv4_fwd_bwd(data['input'], data['offset_mask'], data['grad_output'], 'compiled', record, **kwargs)
        ran |= record.names
        errors = [max_abs_error(g, data[k]) for g, k in zip(got, ('output', 'grad_input', 'grad_offset_mask'))]
        worst = max(worst, *errors)
        if max(errors) > 1e-10:
            failed.append(f'{name} ({max(errors):.1e})')
    kernels = 'timm_internimage::dcnv4_backward' in ran
    notes = (f'{len(cases)} cases on {ctx.device.type}, output + 2 gradients, max abs error {worst:.1e} (limit 1e-10)'
             f', DCNv4 kernels ran: {kernels}')
    ok = cases and not failed and kernels
    rows.append(Row('dcnv4 golden cases (compiled, float64)', PASS if ok else FAIL,
                    notes + ('; failed: ' + '; '.join(failed) if failed else '')))
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        errors, kernels, padding_zero = [], True, True
        for group, group_channels, softmax in DCNV4_CASES:
            x = torch.randn(2, 9, 11, group * group_channels, generator=gen)
            offset_mask = torch.randn(2, 9, 11, 3 * group * 9 + 4, generator=gen)  # 4 padding channels
            offset_mask[..., :3 * group * 9].unflatten(-1, (group, 27))[..., :18].mul_(2)
            grad_output = torch.randn(2, 9, 11, group * group_channels, generator=gen)
            inputs = [t.to(ctx.device, dtype) for t in (x, offset_mask, grad_output)]
            record = measure.OpRecorder()
            got = dcnv4_fwd_bwd(*inputs[:2], inputs[2], 'compiled', record, group=group, softmax=softmax)
            kernels = kernels and 'timm_internimage::dcnv4_backward' in record.names
            padding_zero = padding_zero and bool((got[2][..., -4:] == 0).all())
            expected = dcnv4_fwd_bwd(*(t.double() for t in inputs[:2]), inputs[2].double(), 'torch', group=group,
                                     softmax=softmax)
            errors.append(max(max_abs_error(g, e) / max(1.0, e.abs().max().item()) for g, e in zip(got, expected)))
        ok = max(errors) <= DCNV4_TOLERANCE[dtype] and kernels and padding_zero
        rows.append(Row(f'dcnv4 compiled vs torch {str(dtype).replace("torch.", "")}', PASS if ok else FAIL,
                        f'{len(DCNV4_CASES)} cases (group widths 16, 12, 5, softmax) on {ctx.device.type}, output + 2 '
                        f'gradients vs torch in float64: max rel. error {max(errors):.1e} (limit '
                        f'{DCNV4_TOLERANCE[dtype]:.0e}), DCNv4 kernels ran: {kernels}, padding gradient 0: '
                        f'{padding_zero}'))
    return rows


def check_dcnv4_timings(ctx: Context) -> List[Row]:
    """The DCNv4 op (FlashInternImage's call) against the DCNv3 op (InternImage's call, mask logits), both
    compiled, forward and backward, at InternImage-T's stage shapes, interleaved call by call."""
    batch = 64 if ctx.cuda else 1
    warmup, iters = (1, 1) if not ctx.cuda else ((2, 5) if ctx.quick else (5, 20))
    rows = []
    for dtype in ((torch.float32, torch.float16) if ctx.cuda else (torch.float32,)):
        for size, channels, group in measure.OP_SHAPES:
            t = measure.time_dcnv4_against_dcnv3(
                batch, (size, channels, group), dtype, ctx.device, warmup, iters, time.perf_counter)
            v4, v3 = t['dcnv4'], t['dcnv3']
            notes = (f"fwd {v4['fwd_ms']:.3f} vs {v3['fwd_ms']:.3f} ms ({v3['fwd_ms'] / v4['fwd_ms']:.2f}x), "
                     f"bwd {v4['bwd_ms']:.3f} vs {v3['bwd_ms']:.3f} ms ({v3['bwd_ms'] / v4['bwd_ms']:.2f}x) "
                     f"dcnv4 vs dcnv3, compiled, {str(dtype).replace('torch.', '')}")
            rows.append(Row(f'dcnv4 vs dcnv3 N={batch} {size}x{size} C={channels} G={group} '
                            f'{str(dtype).replace("torch.", "")}', PASS, notes))
    return rows


def _peak(memory, device: torch.device) -> str:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        return f'peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
    peak = memory.stop()
    return 'peak RSS ?' if peak is None else f'peak RSS +{peak:.0f} MiB'


def check_models(ctx: Context) -> List[Row]:
    import timm
    import timm_internimage  # noqa: F401  registers the models
    from timm_internimage.ops import compiled_backend_available
    device = ctx.device
    if ctx.cuda:
        names, batch, size = (('internimage_t',) if ctx.quick else ('internimage_t', 'internimage_b')), 64, 224
        warmup, iters = (1, 2) if ctx.quick else (2, 5)
    else:
        names, batch, size, warmup, iters = ('internimage_t',), 2, 64, 0, 1
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        target = torch.randint(0, model.num_classes, (batch,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
        for label, dtype in (('fp32', None), ('fp16 autocast', torch.float16), ('bf16 autocast', torch.bfloat16)):
            autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
            outputs = []

            def infer():
                with autocast:
                    outputs.append(model(x))
                del outputs[:-1]

            model.eval()
            memory = measure.PeakMemory(device)
            with torch.inference_mode():
                infer_s = measure.summary(
                    measure.time_it(infer, device, warmup, iters, time.perf_counter, after_warmup=memory.start))
                infer_peak = _peak(memory, device)
            finite = bool(torch.isfinite(outputs[-1]).all())
            losses = []

            def train_step():
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = F.cross_entropy(model(x).float(), target)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())

            notes = f"batch {batch} @ {size}px: infer {batch / infer_s['median_ms'] * 1e3:.1f} img/s, {infer_peak}; "
            if ctx.cuda or dtype is not torch.float16:
                model.train()
                memory = measure.PeakMemory(device)
                train_s = measure.summary(
                    measure.time_it(train_step, device, warmup, iters, time.perf_counter, after_warmup=memory.start))
                finite = finite and all(bool(torch.isfinite(loss)) for loss in losses)
                notes += (f"train step (SGD) {train_s['median_ms']:.1f} ms = "
                          f"{batch / train_s['median_ms'] * 1e3:.1f} img/s, {_peak(memory, device)}; ")
            else:
                notes += 'train step skipped on CPU (float16 GEMMs are slow there); '
            backend = 'compiled' if compiled_backend_available(device, dtype or torch.float32) else 'torch'
            notes += f'dcnv3 {backend}' + ('' if finite else '; NON-FINITE logits or loss')
            rows.append(Row(f'{name} {label}', PASS if finite else FAIL, notes))
        del model, optimizer, x
    if not ctx.cuda:
        rows.append(Row('internimage_b', SKIP, 'CPU smoke: internimage_t only'))
    elif ctx.quick:
        rows.append(Row('internimage_b', SKIP, '--quick: internimage_t only'))
    return rows


# key (for --only): (row name used when the check raises, check)
CHECKS = {
    'setup': ('compiled op wheel', check_setup),
    'pytest': ('pytest tests/test_compiled_op.py -k cuda', check_pytest),
    'semantics': ('cuda_semantics cases (compiled, float64)', check_semantics),
    'stream': ('non-default stream', check_stream),
    'graph': ('CUDA graph replay', check_graph),
    'compile': ('torch.compile reduce-overhead', check_compile),
    'cuda1': ('cuda:1', check_cuda1),
    'op': ('op timings', check_op_timings),
    'dcnv4': ('dcnv4 compiled kernels', check_dcnv4),
    'dcnv4_op': ('dcnv4 op timings', check_dcnv4_timings),
    'model': ('model throughput', check_models),
    # last: an illegal memory access here would poison the CUDA context for the checks after it
    'huge': ('bf16 input > 2^31 elements', check_huge),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    parser.add_argument('--quick', action='store_true', help='fewer timing iterations, internimage_t only')
    parser.add_argument('--only', default='', help=f'comma-separated subset of: {", ".join(CHECKS)}')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    args = parser.parse_args(argv)
    selected = [c.strip() for c in args.only.split(',') if c.strip()] or list(CHECKS)
    unknown = sorted(set(selected) - set(CHECKS))
    if unknown:
        parser.error(f'--only: unknown checks {unknown}')
    ctx = Context(torch.device(args.device), quick=args.quick)
    rows = run_checks([CHECKS[key] for key in CHECKS if key in selected], ctx)
    meta = {'device': args.device, 'quick': args.quick, 'torch': torch.__version__, 'python': sys.version.split()[0]}
    return finish(rows, args.json, meta)


if __name__ == '__main__':
    sys.exit(main())
