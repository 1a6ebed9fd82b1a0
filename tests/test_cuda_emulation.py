"""The DCNv3 CUDA kernels, run on the host (no GPU): dcnv3/tools/cuda_emulation.

emulate.cpp compiles the exact kernel bodies of dcnv3/csrc/cuda/dcnv3_kernels.cuh with a small CUDA shim and
launches them like dcnv3_kernel.cu does, every (block, thread) pair of a launch in a seeded shuffled order.
Its results are compared with the golden vectors and with the compiled CPU op, in an optimised build and in an
ASan/UBSan build (any sanitizer report fails). Skipped only where g++ is missing.
"""
from __future__ import annotations


import pytest
import torch

from conftest import forward_backward, import_file, output_size
from golden import (
    cuda_semantics_args, cuda_semantics_cases, load_cuda_semantics_case, load_op_case, op_args, op_cases)



def _load_driver():
    return import_file('dcnv3/tools/cuda_emulation/driver.py')


emulation = _load_driver()
if emulation.compiler() is None:
    pytest.skip('g++ not found: the CUDA kernel emulation needs it', allow_module_level=True)

FIELDS = ('output', 'grad_input', 'grad_offset', 'grad_mask')
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float64: 'f64', torch.float32: 'f32', torch.float16: 'f16', torch.bfloat16: 'bf16'}

# Largest allowed max|emulated - CPU op| of each result tensor, as a multiple of that tensor's scale
# max(1, max|CPU op|) (inputs and grad_output ~ N(0, 1)); float64: absolute 1e-12.
# Measured max over RANDOM_CASES x 6 seeds (g++ 12; CPU op on its AVX-512, AVX2 and baseline paths alike),
# output / grad_input / grad_offset / grad_mask:
#   float64:  1.3e-15 / 2.7e-15 / 8.9e-15 / 5.3e-15 (absolute)
#   float32:  2.0e-7 / 3.5e-7 / 3.2e-7 / 3.2e-7, i.e. <= 3 float ulps of the scale: the CPU op contracts into
#             FMAs, sums grad_input in another order and has its own vectorised exp for the logits, the
#             emulation adds grad_input in shuffled order. Tolerance 1.5e-6 (about 4x the worst).
#   float16:  2.4e-4 / 2.4e-4 / 1.3e-4 / 3.1e-4; bfloat16: 5.4e-5 / 3.2e-3 / 8.1e-7 / 1.7e-7. Both sides
#             compute in float and round once, so they differ by at most one rounding flip: one ulp of the
#             scale's binade, 2^-10 (half) and 2^-7 (bfloat16) of the scale, which are the tolerances.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1.5e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='session')
def binaries():
    """Both flavours of the emulation binary, built once (in parallel) and cached by source hash."""
    return emulation.build(('opt', 'sanitized'))


@pytest.fixture(scope='session', params=['opt', 'sanitized'])
def emulator(request, binaries):
    return emulation.Emulator(binaries[request.param])


@pytest.fixture(scope='session')
def opt(binaries):
    return emulation.Emulator(binaries['opt'])


@pytest.fixture(scope='session')
def sanitized(binaries):
    return emulation.Emulator(binaries['sanitized'])


@pytest.fixture(scope='session')
def ext():
    """The compiled CPU op (CI installs it; a missing wheel is an error here, not a skip)."""
    import timm_internimage_dcnv3
    return timm_internimage_dcnv3


# --------------------------------------------------------------------------- golden
def _assert_results(got, expected: dict, atol: float, what: str = ''):
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), expected[name], rtol=0, atol=atol,
                                   msg=lambda m, name=name: f'{what} {name}: {m}')


def test_golden_cases_present():
    assert len(op_cases()) >= 8 and len(cuda_semantics_cases()) >= 7


@pytest.mark.parametrize('blocks,threads,seed', [(0, 0, 0), (2, 3, 1)], ids=['grid', 'tiny_grid'])
@pytest.mark.parametrize('case', op_cases(), ids=lambda c: c['file'].split('.')[0])
def test_golden_op(emulator, case, blocks, threads, seed):
    """The official op's golden vectors (float64), every kernel output and gradient within 1e-10."""
    data = load_op_case(case)
    got = emulator(data['input'], data['offset'], data['mask'], data['grad_output'], *op_args(case),
                   blocks=blocks, threads=threads, seed=seed)
    _assert_results(got, data, 1e-10, case['file'])


@pytest.mark.parametrize('blocks,threads,seed', [(0, 0, 0), (3, 2, 5)], ids=['grid', 'tiny_grid'])
@pytest.mark.parametrize('case', cuda_semantics_cases(), ids=lambda c: c['name'])
def test_golden_cuda_semantics(emulator, case, blocks, threads, seed):
    """The official CUDA kernel's semantics (NaN/inf offsets, integer and border positions), within 1e-12."""
    data = load_cuda_semantics_case(case)
    args = cuda_semantics_args(case, data['input'].shape[-1])
    got = emulator(data['input'], data['offset'], data['mask'], data['grad_output'], *args,
                   blocks=blocks, threads=threads, seed=seed)
    _assert_results(got, data, 1e-12, case['name'])


# --------------------------------------------------------------------------- random cases vs the CPU op
# Offset of a "just inside / just outside" border position, exactly representable in each dtype at the
# magnitudes used here (|offset| < 16).
BORDER_EPS = {torch.float64: 2.0 ** -30, torch.float32: 2.0 ** -12, torch.float16: 2.0 ** -6,
              torch.bfloat16: 2.0 ** -3}


def make_case(dtype, n=1, h=6, w=7, group=2, gc=16, k=3, stride=1, pad=1, dil=1, scale=1.0, remove_center=False,
              logits=False, border=False, nonfinite=False, seed=0):
    """(input, offset, mask, grad_output, op args, mask_is_logits) of a random case in ``dtype``.

    ``border`` moves about half of the sampling coordinates exactly onto -1, 0, size-1, size, eps inside or
    outside those, or onto a random integer pixel; ``nonfinite`` sprinkles NaN and +-inf offsets.
    offset_scale must be a power of two, so that border positions stay exact whatever the rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, k, stride, pad, dil), output_size(w, k, stride, pad, dil)
    points = [(i, j) for i in range(k) for j in range(k) if not (remove_center and i == k // 2 and j == k // 2)]
    p = len(points)
    x = torch.randn(n, h, w, group * gc, generator=gen, dtype=torch.float64)
    off = (torch.randn(n, ho, wo, group, p, 2, generator=gen, dtype=torch.float64) * 2).to(dtype).double()
    if border:
        half = dil * (k - 1) // 2
        eps = BORDER_EPS[dtype]
        kx = torch.tensor([i * dil - half for i, _ in points], dtype=torch.float64).view(1, 1, 1, 1, p)
        ky = torch.tensor([j * dil - half for _, j in points], dtype=torch.float64).view(1, 1, 1, 1, p)
        base_x = (torch.arange(wo, dtype=torch.float64) * stride - pad + half).view(1, 1, wo, 1, 1)
        base_y = (torch.arange(ho, dtype=torch.float64) * stride - pad + half).view(1, ho, 1, 1, 1)
        for axis, size, base, kk in ((0, w, base_x, kx), (1, h, base_y, ky)):
            targets = torch.tensor([-1 - eps, -1, -1 + eps, -eps, 0, eps, size - 1 - eps, size - 1, size - 1 + eps,
                                    size - eps, size, size + eps], dtype=torch.float64)
            shape = (n, ho, wo, group, p)
            pick = targets[torch.randint(len(targets), shape, generator=gen)]
            pick = torch.where(torch.rand(shape, generator=gen) < 0.2,
                               torch.randint(size, shape, generator=gen).double(), pick)
            on_border = torch.rand(shape, generator=gen) < 0.5
            # px = base + (k + off) * scale = target  <=>  off = (target - base) / scale - k
            off[..., axis] = torch.where(on_border, (pick - base) / scale - kk, off[..., axis])
        assert (off.to(dtype).double() == off).all(), 'border offsets not exact in the dtype'
    if nonfinite:
        special = torch.tensor([float('nan'), float('inf'), -float('inf')], dtype=torch.float64)
        hit = torch.rand(off.shape, generator=gen) < 0.1
        off = torch.where(hit, special[torch.randint(3, off.shape, generator=gen)], off)
    off = off.reshape(n, ho, wo, group * p * 2)
    if logits:
        mask = torch.randn(n, ho, wo, group * p, generator=gen, dtype=torch.float64) * 2
    else:
        mask = torch.rand(n, ho, wo, group * p, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(n, ho, wo, group * gc, generator=gen, dtype=torch.float64)
    args = (k, k, stride, stride, pad, pad, dil, dil, group, gc, scale, remove_center)
    return (*(t.to(dtype) for t in (x, off, mask, grad_out)), args, logits)


# name: (make_case arguments, (blocks, threads) of every launch; (0, 0) is the launchers' grid)
RANDOM_CASES = {
    'c16': (dict(n=2, h=7, w=8), (0, 0)),
    'c32_tiny_grid': (dict(h=6, w=7, gc=32), (2, 3)),
    'odd_c5_g3': (dict(n=2, h=5, w=6, group=3, gc=5), (0, 0)),
    'stride2': (dict(h=9, w=8, stride=2), (3, 5)),
    'dil2_pad2_scale2': (dict(h=8, w=7, dil=2, pad=2, scale=2.0), (0, 0)),
    'pad0_c32_g1': (dict(h=7, w=9, group=1, gc=32, pad=0), (1, 7)),
    'remove_center': (dict(h=6, w=6, remove_center=True, scale=0.5), (0, 0)),
    'logits': (dict(n=2, h=5, w=7, logits=True), (0, 0)),
    'logits_k5_remove_center_c7': (dict(h=7, w=6, group=3, gc=7, k=5, pad=2, remove_center=True, logits=True),
                                   (2, 1)),
    'logits_c32_stride2_pad0': (dict(h=9, w=10, gc=32, stride=2, pad=0, logits=True), (0, 0)),
    'border': (dict(h=6, w=7, border=True), (0, 0)),
    'border_logits_tiny_grid': (dict(h=5, w=6, gc=32, border=True, logits=True), (3, 2)),
    'border_dil2_remove_center_c3': (dict(h=7, w=5, group=2, gc=3, dil=2, pad=2, remove_center=True, border=True,
                                          scale=2.0), (1, 1)),
    'border_stride2_pad0': (dict(h=8, w=9, stride=2, pad=0, border=True), (0, 0)),
    'nonfinite_border_logits': (dict(h=6, w=6, border=True, nonfinite=True, logits=True), (2, 5)),
}
SANITIZED_CASES = ('odd_c5_g3', 'logits_k5_remove_center_c7', 'border_dil2_remove_center_c3',
                   'nonfinite_border_logits')


def _check_against_cpu(emulator, ext, dtype, name, seed):
    kwargs, (blocks, threads) = RANDOM_CASES[name]
    x, off, mask, grad_out, args, logits = make_case(dtype, seed=seed, **kwargs)
    expected = dict(zip(FIELDS, forward_backward(ext.dcnv3, (x, off, mask), grad_out, *args, mask_is_logits=logits)))
    got = emulator(x, off, mask, grad_out, *args, mask_is_logits=logits, blocks=blocks, threads=threads,
                   seed=seed)
    for field in FIELDS:
        ref = expected[field].double()
        scale = 1.0 if dtype == torch.float64 else max(1.0, ref.abs().max().item())
        torch.testing.assert_close(getattr(got, field).double(), ref, rtol=0, atol=TOLERANCE[dtype] * scale,
                                   msg=lambda m, field=field: f'{name} {field} (scale {scale:.3g}): {m}')


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('name', RANDOM_CASES)
@pytest.mark.parametrize('dtype', DTYPES, ids=DTYPE_IDS.get)
def test_matches_cpu_op(opt, ext, dtype, name, seed):
    """Optimised build vs the compiled CPU op, three shuffle seeds (and random draws) per case."""
    _check_against_cpu(opt, ext, dtype, name, seed)


@pytest.mark.parametrize('name', SANITIZED_CASES)
@pytest.mark.parametrize('dtype', DTYPES, ids=DTYPE_IDS.get)
def test_sanitized_matches_cpu_op(sanitized, ext, dtype, name):
    """ASan/UBSan build (any report fails) vs the compiled CPU op."""
    _check_against_cpu(sanitized, ext, dtype, name, seed=7)
