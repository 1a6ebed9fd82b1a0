"""The DCNv4 op: golden cases (official kernel semantics, float64), the packed layout, errors, dtypes, autograd.

DCNv4 runs on DCNv3's backends. ``torch`` and ``compiled`` follow the CUDA kernel's rules everywhere;
``reference`` mirrors the official ``grid_sample`` fallback, which takes other corners at exact integer sampling
positions (reference README, cuda_semantics), so its offset gradients are only checked on the cases without them.
"""
import json
import math

import pytest
import torch

from timm_internimage import set_backend

from conftest import KERNEL_BACKENDS, NEEDS_COMPILED
from golden import GOLDEN_DIR
from timm_internimage.ops import Geometry, compiled_backend_available, dcnv3_core, dcnv4, dcnv4_core
from timm_internimage.tools.benchmarking import OpRecorder

DCNV4_DIR = GOLDEN_DIR / 'dcnv4'
CASES = {name: case for name, case in json.loads((DCNV4_DIR / 'cases.json').read_text()).items()
         if name.startswith('op_')}
# Cases whose sampling positions fall on exact integers (integer offsets, scale-2 grids on zero offsets).
INTEGER_POSITION_CASES = ('op_integer_offsets', 'op_scale2_borders')
GOLDEN_ATOL = 1e-10


def _kwargs(case):
    pair = lambda name: (case[f'{name}_h'], case[f'{name}_w'])  # noqa: E731
    return dict(kernel_size=pair('kernel'), stride=pair('stride'), padding=pair('pad'), dilation=pair('dilation'),
                group=case['group'], offset_scale=case['offset_scale'], remove_center=bool(case['remove_center']))


def _run(tensors, offset_mask, kwargs, backend):
    """(output, grad_input, grad_offset_mask) for the case's upstream gradient."""
    input = tensors['input'].clone().requires_grad_()
    offset_mask = offset_mask.clone().requires_grad_()
    output = dcnv4(input, offset_mask, backend=backend, **kwargs)
    output.backward(tensors['grad_output'])
    return output, input.grad, offset_mask.grad


def _load(name):
    from safetensors.torch import load_file
    return load_file(str(DCNV4_DIR / f'{name}.safetensors'))


def _used_channels(case):
    return 3 * case['group'] * (case['kernel_h'] * case['kernel_w'] - case['remove_center'])


@pytest.mark.parametrize('backend', KERNEL_BACKENDS + ['reference'])
@pytest.mark.parametrize('name', sorted(CASES))
def test_golden_cases(name, backend):
    case, tensors = CASES[name], _load(name)
    assert tensors['offset_mask'].shape[-1] == case['padded_offset_dim']
    output, grad_input, grad_offset_mask = _run(tensors, tensors['offset_mask'], _kwargs(case), backend)
    torch.testing.assert_close(output, tensors['output'], rtol=0, atol=GOLDEN_ATOL)
    torch.testing.assert_close(grad_input, tensors['grad_input'], rtol=0, atol=GOLDEN_ATOL)
    if backend == 'reference' and name in INTEGER_POSITION_CASES:
        return  # grid_sample's corners at integer positions: see the module docstring
    torch.testing.assert_close(grad_offset_mask, tensors['grad_offset_mask'], rtol=0, atol=GOLDEN_ATOL)
    assert torch.all(grad_offset_mask[..., _used_channels(case):] == 0)  # the padding is never read


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_unpadded_offset_mask_is_the_same_op(backend):
    """The padding is optional: dropping it changes neither the output nor the gradients of the used channels."""
    name = 'op_odd_groups'
    case, tensors = CASES[name], _load(name)
    used = _used_channels(case)
    assert used < case['padded_offset_dim']
    output, grad_input, grad_offset_mask = _run(tensors, tensors['offset_mask'][..., :used], _kwargs(case), backend)
    torch.testing.assert_close(output, tensors['output'], rtol=0, atol=GOLDEN_ATOL)
    torch.testing.assert_close(grad_input, tensors['grad_input'], rtol=0, atol=GOLDEN_ATOL)
    torch.testing.assert_close(grad_offset_mask, tensors['grad_offset_mask'][..., :used], rtol=0, atol=GOLDEN_ATOL)


def _random(batch=2, height=5, width=6, group=3, group_channels=5, points=9, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(batch, height, width, group * group_channels, generator=generator, dtype=dtype)
    offset_mask = torch.randn(batch, height, width, 3 * group * points, generator=generator, dtype=dtype)
    return input, offset_mask


def _unpack(offset_mask, group, points):
    packed = offset_mask.unflatten(-1, (group, 3 * points))
    return packed[..., :2 * points].flatten(-2), packed[..., 2 * points:].flatten(-2)


@pytest.mark.parametrize('softmax', [False, True])
def test_is_dcnv3_on_the_unpacked_layout(softmax):
    """Any group width (5 channels here); ``softmax`` normalises the weights per group as DCNv3's mask logits."""
    input, offset_mask = _random()
    offset, mask = _unpack(offset_mask, 3, 9)
    expected = dcnv3_core(input, offset, mask, Geometry(3, 3, 1, 1, 1, 1, 1, 1, 3, 5, 1.0, False), mask_is_logits=softmax)
    got = dcnv4(input, offset_mask, group=3, softmax=softmax)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rectangular_kernel_and_per_axis_arguments():
    input, _ = _random(height=7, width=8)
    points = 3 * 5
    offset_mask = torch.randn(2, 4, 2, 3 * 3 * points, dtype=torch.float64)
    offset, mask = _unpack(offset_mask, 3, points)
    geometry = Geometry(3, 5, 2, 3, 1, 2, 1, 2, 3, 5, 0.5, False)
    expected = dcnv3_core(input, offset, mask, geometry)
    got = dcnv4_core(input, offset_mask, geometry)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        dcnv4(input, offset_mask, (3, 5), (2, 3), (1, 2), (1, 2), group=3, offset_scale=0.5), expected, rtol=0, atol=0)


@pytest.mark.parametrize('channels, message', [
    (3 * 3 * 9 - 1, r'needs 3 \* group \* points = 3 \* 3 \* 9 = 81 channels, optionally padded to 88'),
    (89, 'got 89'),
])
def test_offset_mask_channel_count_is_checked(channels, message):
    input, _ = _random()
    with pytest.raises(ValueError, match=message):
        dcnv4(input, torch.zeros(2, 5, 6, channels, dtype=torch.float64), group=3)


def test_offset_mask_shape_errors():
    input, offset_mask = _random()
    with pytest.raises(ValueError, match=r'offset_mask must be \(N, H_out, W_out, channels\) = \(2, 5, 6'):
        dcnv4(input, offset_mask[:, :4], group=3)
    with pytest.raises(ValueError, match='4-D channels-last'):
        dcnv4(input, offset_mask[0], group=3)
    # Everything else is DCNv3's validation, with its messages.
    with pytest.raises(ValueError, match='must be divisible by group'):
        dcnv4(input, offset_mask, group=4)
    with pytest.raises(ValueError, match='one floating dtype'):
        dcnv4(input, offset_mask.float(), group=3)
    with pytest.raises(ValueError, match='unknown backend'):
        dcnv4(input, offset_mask, group=3, backend='cuda')


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
@pytest.mark.parametrize(
    'dtype, tolerance', [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)], ids=['float16', 'bfloat16'])
def test_half_precision_forward_and_backward(dtype, tolerance, backend):
    """float16/bfloat16 run forward and backward, close to float64 (relative to the largest value); the offset
    gradient only finite: bilinear sampling's offset gradient jumps where a position crosses an integer, and
    rounding the positions moves some across."""
    if backend == 'compiled' and not compiled_backend_available(dtype=dtype):
        pytest.skip(f'the compiled op does not run {dtype} on CPU')
    input, offset_mask = _random()
    results = []
    for run_dtype in (torch.float64, dtype):
        leaves = [t.detach().to(run_dtype).requires_grad_() for t in (input, offset_mask)]
        out = dcnv4(leaves[0], leaves[1], group=3, backend=backend)
        out.backward(torch.ones_like(out))
        assert out.dtype == leaves[0].grad.dtype == leaves[1].grad.dtype == run_dtype
        results.append([t.double() for t in (out, leaves[0].grad, leaves[1].grad)])
    (out, grad_input, grad_offset_mask), (out64, grad_input64, _) = results[1], results[0]
    for got, expected in ((out, out64), (grad_input, grad_input64)):
        assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    assert torch.isfinite(grad_offset_mask).all()


@pytest.mark.parametrize('backend', KERNEL_BACKENDS + ['reference'])
def test_gradgradcheck(backend):
    """Second-order gradients on every backend (DCNv3's rule: autograd of the twice-differentiable formulation)."""
    input, offset_mask = _random(batch=1, height=3, width=4, group=2, group_channels=2)
    padded = torch.cat([offset_mask, torch.zeros(1, 3, 4, 2, dtype=torch.float64)], -1)  # 54 -> 56 channels
    leaves = [t.requires_grad_() for t in (input, padded)]
    op = lambda x, om: dcnv4(x, om, group=2, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(op, leaves, fast_mode=True)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    input, offset_mask = _random(dtype=torch.float32)
    expected = dcnv4(input, offset_mask, group=3, backend='torch')
    compiled = torch.compile(lambda x, om: dcnv4(x, om, group=3, backend=backend), fullgraph=True, backend='eager')
    torch.testing.assert_close(compiled(input, offset_mask), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('softmax', [False, True])
@NEEDS_COMPILED
def test_compiled_backend_runs_the_dcnv4_kernels(softmax):
    """``compiled`` (and ``auto`` with the wheel) run the wheel's DCNv4 kernels on the packed offset_mask, forward
    and backward, not DCNv3's on an unpacked copy."""
    input, offset_mask = _random(dtype=torch.float32)
    for backend in ('compiled', 'auto'):
        leaves = [t.clone().requires_grad_() for t in (input, offset_mask)]
        with OpRecorder() as recorded:
            dcnv4(*leaves, group=3, softmax=softmax, backend=backend).sum().backward()
        assert {'timm_internimage::dcnv4_forward', 'timm_internimage::dcnv4_backward'} <= recorded.names
        assert not any(name.startswith('timm_internimage::dcnv3') for name in recorded.names)


def test_offset_mask_channels_is_the_official_padding():
    from timm_internimage.ops.dcn_v4 import offset_mask_channels
    for group, points in [(4, 9), (5, 9), (3, 8), (1, 1)]:
        assert offset_mask_channels(group, points) == math.ceil(3 * group * points / 8) * 8
        assert offset_mask_channels(group, points) % 8 == 0


@pytest.mark.parametrize('kwargs, message', [
    (dict(kernel_size=0), 'kernel_size must be at least 1'),
    (dict(kernel_size=2, remove_center=True), 'remove_center needs a kernel with an odd number of points'),
    (dict(padding=-1), 'padding must be at least 0'),
    (dict(group=0), 'must be divisible by group'),
])
def test_bad_arguments_get_dcnv3_messages(kwargs, message):
    input, offset_mask = _random()
    with pytest.raises(ValueError, match=message):
        dcnv4(input, offset_mask, **dict(dict(group=3), **kwargs))


def _dcnv4_module():
    from timm_internimage.ops import DCNv4
    torch.manual_seed(0)
    module = DCNv4(15, group=3, dw_kernel_size=3, center_feature_scale=True).eval()
    with torch.no_grad():
        module.offset_mask.weight.normal_(std=0.3)  # real sampling, not the zero-offset init
        module.center_feature_scale_proj.weight.normal_(std=0.3)
    return module


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime
    module = _dcnv4_module()
    x = torch.randn(1, 5, 8, 15)
    path = tmp_path / 'dcnv4.onnx'
    torch.onnx.export(module, (x,), str(path), input_names=['x'], output_names=['y'], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (result,) = session.run(None, {'x': x.numpy()})
    torch.testing.assert_close(torch.from_numpy(result), module(x).detach(), rtol=0, atol=1.2e-6)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_torch_export(backend, monkeypatch):
    set_backend(backend)
    module = _dcnv4_module()
    x = torch.randn(2, 5, 8, 15)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), module(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_module_under_autocast(backend, monkeypatch):
    """CPU autocast (bfloat16): the linear layers run in bfloat16, so does the op; forward and backward run."""
    set_backend(backend)
    module = _dcnv4_module()
    x = torch.randn(2, 5, 8, 15)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        output = module(x)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), module(x), rtol=0, atol=6e-2)
    output.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_module_without_pointwise_is_the_op_on_its_input():
    """``without_pointwise``: no value/output projections (official names otherwise: offset_mask[_dw])."""
    from timm_internimage.ops import DCNv4
    torch.manual_seed(0)
    module = DCNv4(15, group=3, without_pointwise=True).double()
    assert sorted(module.state_dict()) == ['offset_mask.bias', 'offset_mask.weight']
    assert module.offset_mask.out_features == 88  # 3 * 3 * 9 = 81, padded to a multiple of 8
    with torch.no_grad():
        module.offset_mask.weight.normal_(std=0.3)
    x = torch.randn(2, 5, 6, 15, dtype=torch.float64)
    expected = dcnv4(x, module.offset_mask(x), group=3)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)


@NEEDS_COMPILED
def test_compiled_kernels_check_the_packed_layout():
    """The C++ entry points validate offset_mask themselves (for callers of torch.ops without the Python op)."""
    import timm_internimage_dcnv3  # noqa: F401  (loads the library)
    input, _ = _random(dtype=torch.float32)  # group 3 of 5 channels, 9 points: 81 channels, padded 88
    args = (3, 3, 1, 1, 1, 1, 1, 1, 3, 5, 1.0, False, False)
    for channels in (80, 89):
        offset_mask = torch.randn(2, 5, 6, channels)
        with pytest.raises(RuntimeError, match=r'offset_mask must have shape \(2, 5, 6, M\) with 81 <= M <= 88'):
            torch.ops.timm_internimage.dcnv4_forward(input, offset_mask, *args)
        with pytest.raises(RuntimeError, match=r'offset_mask must have shape'):
            torch.ops.timm_internimage.dcnv4_backward(torch.randn_like(input), input, offset_mask, *args)
    with pytest.raises(RuntimeError, match='input and offset_mask must have the same dtype'):
        torch.ops.timm_internimage.dcnv4_forward(input, torch.randn(2, 5, 6, 88, dtype=torch.float64), *args)


@NEEDS_COMPILED
def test_compiled_softmax_beyond_the_fused_limit_and_an_older_wheel(monkeypatch):
    """Where the DCNv4 kernels do not serve a call, ``compiled`` still runs it, on DCNv3's kernels: a softmax over
    more than 64 points (9x9 kernel), and a wheel built before the DCNv4 kernels."""
    from timm_internimage.ops import backends as backend
    input, offset_mask = _random(batch=1, height=9, width=9, group=2, group_channels=4, points=81)
    kwargs = dict(kernel_size=9, padding=4, group=2, softmax=True)
    expected = dcnv4(input, offset_mask, backend='torch', **kwargs)
    with OpRecorder() as recorded:
        got = dcnv4(input, offset_mask, backend='compiled', **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert 'timm_internimage::dcnv3_forward' in recorded.names
    compiled_backend_available()  # loads the wheel
    monkeypatch.setattr(backend, '_compiled_dcnv4', None)
    input, offset_mask = _random()
    with OpRecorder() as recorded:
        got = dcnv4(input, offset_mask, group=3, backend='compiled')
    torch.testing.assert_close(got, dcnv4(input, offset_mask, group=3, backend='torch'), rtol=0, atol=1e-12)
    assert 'timm_internimage::dcnv3_forward' in recorded.names and not any('dcnv4' in n for n in recorded.names)
