"""The DCNv4 CUDA kernels, run on the host (no GPU): dcnv3/tools/cuda_emulation.

The same emulation as tests/test_cuda_emulation.py (one binary holds both ops): the exact kernel bodies of
dcnv3/csrc/cuda/dcnv4_kernels.cuh, launched like dcnv3_kernel.cu launches them, in the optimised and the
ASan/UBSan builds. Checked against the DCNv4 golden cases (float64, 1e-10) and against the compiled CPU op
(``timm_internimage::dcnv4_forward/backward``) in every dtype with test_cuda_emulation's tolerances, on both
kernel variants: 16-byte vector channel accesses, and the masked scalar accesses that serve any group width.
"""
from __future__ import annotations

import json

import pytest
import torch

from golden import DCNV4_DIR
# The emulation binaries and their fixtures are the DCNv3 tests' (one build serves both).
from test_cuda_emulation import (  # noqa: F401  (binaries, emulator, opt, sanitized: fixtures)
    DTYPE_IDS, DTYPES, TOLERANCE, binaries, emulation, emulator, make_case, opt, sanitized)

FIELDS = ('output', 'grad_input', 'grad_offset_mask')
GOLDEN_CASES = {name: case for name, case in json.loads((DCNV4_DIR / 'cases.json').read_text()).items()
                if name.startswith('op_')}


@pytest.fixture(scope='session')
def ops():
    """The compiled op's DCNv4 kernels (CI installs the wheel; a missing wheel is an error here, not a skip)."""
    import timm_internimage_dcnv3  # noqa: F401  (loads the library)
    return torch.ops.timm_internimage


def _golden_args(case: dict) -> tuple:
    return (*(case[k] for k in ('kernel_h', 'kernel_w', 'stride_h', 'stride_w', 'pad_h', 'pad_w', 'dilation_h',
                                'dilation_w', 'group', 'group_channels')),
            float(case['offset_scale']), bool(case['remove_center']))


def test_golden_cases_present():
    assert len(GOLDEN_CASES) >= 5


@pytest.mark.parametrize('scalar_loads,blocks,threads', [(False, 0, 0), (True, 2, 3)],
                         ids=['vector', 'scalar_tiny_grid'])
@pytest.mark.parametrize('name', sorted(GOLDEN_CASES))
def test_golden(emulator, name, scalar_loads, blocks, threads):
    """The DCNv4 golden cases (float64, padded offset_mask): output and both gradients within 1e-10."""
    from safetensors.torch import load_file
    case, data = GOLDEN_CASES[name], load_file(str(DCNV4_DIR / f'{name}.safetensors'))
    got = emulator.packed(data['input'], data['offset_mask'], data['grad_output'], *_golden_args(case),
                          blocks=blocks, threads=threads, seed=3, scalar_loads=scalar_loads)
    # Every golden group width is even: the vector kernels run unless the scalar ones are forced.
    assert got.vectorized == (not scalar_loads)
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), data[field], rtol=0, atol=1e-10,
                                   msg=lambda m, field=field: f'{name} {field}: {m}')


def pack(offset: torch.Tensor, mask: torch.Tensor, group: int, padding: int, seed: int) -> torch.Tensor:
    """DCNv4's offset_mask from DCNv3's offset and mask: per group 2P offsets then P weights, then ``padding``
    channels of NaN and random junk (never read)."""
    n, ho, wo, _ = mask.shape
    packed = torch.cat([offset.unflatten(-1, (group, -1)), mask.unflatten(-1, (group, -1))], -1).flatten(-2)
    junk = torch.randn(n, ho, wo, padding, generator=torch.Generator().manual_seed(seed)).to(mask.dtype)
    junk[..., ::2] = float('nan')
    return torch.cat([packed, junk], -1)


# name: (make_case arguments, (blocks, threads) of every launch, offset_mask padding channels)
RANDOM_CASES = {
    'c16': (dict(n=2, h=7, w=8), (0, 0), 2),
    'c32_tiny_grid': (dict(h=6, w=7, gc=32), (2, 3), 2),
    'c12_unpadded': (dict(h=5, w=6, group=3, gc=12), (0, 0), 0),
    'odd_c5_g3': (dict(n=2, h=5, w=6, group=3, gc=5), (0, 0), 7),
    'k5_remove_center_c7_softmax': (dict(h=7, w=6, group=3, gc=7, k=5, pad=2, remove_center=True, logits=True),
                                    (2, 1), 0),
    'border_dil2_remove_center_c3': (dict(h=7, w=5, group=2, gc=3, dil=2, pad=2, remove_center=True, border=True,
                                          scale=2.0), (1, 1), 0),
    'border_stride2_pad0': (dict(h=8, w=9, stride=2, pad=0, border=True), (0, 0), 2),
    'nonfinite_border_softmax': (dict(h=6, w=6, border=True, nonfinite=True, logits=True), (2, 5), 2),
}
SANITIZED_CASES = ('c16', 'odd_c5_g3', 'k5_remove_center_c7_softmax', 'nonfinite_border_softmax')


def _check_against_cpu(emulator, ops, dtype, name, seed):
    kwargs, (blocks, threads), padding = RANDOM_CASES[name]
    x, off, mask, grad_out, args, softmax = make_case(dtype, seed=seed, **kwargs)
    group, used = args[8], off.shape[-1] + mask.shape[-1]
    offset_mask = pack(off, mask, group, padding, seed)
    expected = dict(zip(FIELDS, (ops.dcnv4_forward(x, offset_mask, *args, softmax),
                                 *ops.dcnv4_backward(grad_out, x, offset_mask, *args, softmax))))
    got = emulator.packed(x, offset_mask, grad_out, *args, softmax, blocks=blocks, threads=threads, seed=seed)
    assert got.vectorized == (args[9] % (16 // x.element_size()) == 0)
    for field in FIELDS:
        ref = expected[field].double()
        scale = 1.0 if dtype == torch.float64 else max(1.0, ref[..., :used].nan_to_num().abs().max().item())
        torch.testing.assert_close(
            getattr(got, field).double(), ref, rtol=0, atol=TOLERANCE[dtype] * scale, equal_nan=True,
            msg=lambda m, field=field: f'{name} {field} (scale {scale:.3g}): {m}')
    # The padding channels are not read (their NaN reaches nothing) and get a zero gradient on both sides.
    assert (got.grad_offset_mask[..., used:] == 0).all() and (expected['grad_offset_mask'][..., used:] == 0).all()
    assert not expected['output'].isnan().any() or kwargs.get('nonfinite')


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('name', RANDOM_CASES)
@pytest.mark.parametrize('dtype', DTYPES, ids=DTYPE_IDS.get)
def test_matches_cpu_op(opt, ops, dtype, name, seed):
    """Optimised build vs the compiled CPU op, two shuffle seeds (and random draws) per case."""
    _check_against_cpu(opt, ops, dtype, name, seed)


@pytest.mark.parametrize('name', SANITIZED_CASES)
@pytest.mark.parametrize('dtype', DTYPES, ids=DTYPE_IDS.get)
def test_sanitized_matches_cpu_op(sanitized, ops, dtype, name):
    """ASan/UBSan build (any report, a misaligned vector access included) vs the compiled CPU op."""
    _check_against_cpu(sanitized, ops, dtype, name, seed=7)
