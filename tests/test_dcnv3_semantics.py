"""One DCNv3: the torch and compiled backends follow the official CUDA kernel, every backend validates its
arguments alike, and the backend setting is read in one place."""
import os
import subprocess
import sys

import pytest
import timm
import torch

from timm_internimage import set_backend

from timm_internimage.ops import DCNv3, Geometry, compiled_backend_available, dcnv3, dcnv3_core
from conftest import (
    ALL_BACKENDS, KERNEL_BACKENDS, NEEDS_COMPILED, REPO_ROOT, dcnv3_module, forward_backward, output_size, random_case, tiny_model)
from golden import cuda_semantics_args, cuda_semantics_cases, cuda_semantics_kwargs, load_cuda_semantics_case

GRADIENTS = ('grad_input', 'grad_offset', 'grad_mask')


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
@pytest.mark.parametrize('case', cuda_semantics_cases(), ids=lambda c: c['name'])
def test_official_cuda_semantics_float64(case, backend):
    """Integer positions (forward-difference offset gradients), positions at -1 and at the size (skipped),
    and NaN/inf offsets (skipped: no output, zero gradients) exactly as the official CUDA kernel."""
    data = load_cuda_semantics_case(case)
    got = forward_backward(dcnv3, [data[k] for k in ('input', 'offset', 'mask')], data['grad_output'],
                           backend=backend, **cuda_semantics_kwargs(case))
    for name, value in zip(('output',) + GRADIENTS, got):
        torch.testing.assert_close(value, data[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
@pytest.mark.parametrize('case', cuda_semantics_cases(), ids=lambda c: c['name'])
def test_official_cuda_semantics_float32(case, backend):
    """The same cases in float32. The inputs' integer and half-integer offsets are exact in float32, so only
    rounding differs: measured at most 2.9e-7 of each tensor's largest magnitude (about 2.5 float32 ulps, sums of
    up to 36 products), for both backends; the tolerance is 1e-6 of it."""
    data = load_cuda_semantics_case(case)
    got = forward_backward(dcnv3, [data[k].float() for k in ('input', 'offset', 'mask')],
                           data['grad_output'].float(), backend=backend, **cuda_semantics_kwargs(case))
    for name, value in zip(('output',) + GRADIENTS, got):
        expected = data[name]
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6 * expected.abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
@pytest.mark.parametrize('case', cuda_semantics_cases(), ids=lambda c: c['name'])
def test_official_cuda_semantics_with_mask_logits(case, backend):
    """The model's path: the mask given as logits, softmax inside the op (fused in the compiled kernel).
    log(mask) are logits whose softmax is the mask, so the expected values follow from the case."""
    data = load_cuda_semantics_case(case)
    group = case['group']
    leaves = [data[k].clone().requires_grad_() for k in ('input', 'offset')] + [data['mask'].log().requires_grad_()]
    output = dcnv3_core(*leaves, Geometry(*cuda_semantics_args(case, data['input'].shape[-1])), mask_is_logits=True,
                        backend=backend)
    output.backward(data['grad_output'])
    prob = data['mask'].unflatten(-1, (group, -1))
    grad_prob = data['grad_mask'].unflatten(-1, (group, -1))
    grad_logits = (prob * (grad_prob - (prob * grad_prob).sum(-1, keepdim=True))).flatten(-2)
    torch.testing.assert_close(output.detach(), data['output'], rtol=0, atol=1e-12)
    for leaf, expected in zip(leaves, (data['grad_input'], data['grad_offset'], grad_logits)):
        torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=1e-12)


def _case(batch=1, height=6, width=7, channels=8, group=2, kernel=3, stride=1, padding=1, dilation=1,
          remove_center=False, dtype=torch.float32):
    """Inputs whose offset and mask shapes match the geometry, whatever it is (even an invalid one)."""
    generator = torch.Generator().manual_seed(0)
    points = kernel * kernel - int(remove_center)
    if stride > 0:
        height_out = max(output_size(height, kernel, stride, padding, dilation), 0)
        width_out = max(output_size(width, kernel, stride, padding, dilation), 0)
    else:
        height_out, width_out = height, width
    input = torch.randn(batch, height, width, channels, generator=generator, dtype=dtype)
    offset = torch.randn(batch, height_out, width_out, group * points * 2, generator=generator, dtype=dtype)
    mask = torch.rand(batch, height_out, width_out, group * points, generator=generator, dtype=dtype)
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, group=group,
                  remove_center=remove_center)
    return (input, offset, mask), kwargs


INVALID = {
    'zero_height_with_padding': (dict(height=0, padding=2), 'height and width must be at least 1'),
    'zero_width': (dict(width=0), 'height and width must be at least 1'),
    'no_points': (dict(kernel=1, padding=0, remove_center=True), 'no sampling point'),
    'even_kernel_remove_center': (dict(kernel=2, remove_center=True), 'odd number of points'),
    'kernel_0': (dict(kernel=0), 'kernel_size must be at least 1'),
    'stride_0': (dict(stride=0), 'stride must be at least 1'),
    'stride_negative': (dict(stride=-1), 'stride must be at least 1'),
    'padding_negative': (dict(padding=-1), 'padding must be at least 0'),
    'dilation_0': (dict(dilation=0), 'dilation must be at least 1'),
    'dilation_negative': (dict(dilation=-1), 'dilation must be at least 1'),
    'output_too_small': (dict(height=1, width=1, kernel=5, padding=0), 'too small'),
    'channels_not_divisible': (dict(channels=9, group=2), 'divisible by group'),
}


@pytest.mark.parametrize('backend', ALL_BACKENDS)
@pytest.mark.parametrize('name', sorted(INVALID))
def test_invalid_geometry_is_the_same_clear_error_on_every_backend(name, backend):
    """Checked once before any backend runs: no segfault (compiled), no silent result (torch), no bare
    ZeroDivisionError, the same ValueError everywhere."""
    overrides, message = INVALID[name]
    tensors, kwargs = _case(**overrides)
    with pytest.raises(ValueError, match=message):
        dcnv3(*tensors, backend=backend, **kwargs)


@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_invalid_tensors_are_the_same_clear_error_on_every_backend(backend):
    (input, offset, mask), kwargs = _case()
    calls = [
        ((input, offset[..., :-2], mask), 'expected offset'),
        ((input, offset, mask[:, :-1]), 'expected offset'),
        ((input, offset.double(), mask), 'one floating dtype'),
        ((input, offset, mask.half()), 'one floating dtype'),
        ((input.int(), offset.int(), mask.int()), 'one floating dtype'),
        ((input, offset.to('meta'), mask), 'one device'),
        ((input[0], offset, mask), '4-D'),
    ]
    for tensors, message in calls:
        with pytest.raises(ValueError, match=message):
            dcnv3(*tensors, backend=backend, **kwargs)


def test_module_rejects_geometry_that_changes_the_size():
    """The module predicts offsets at the input resolution: a stride or padding that changes the output size
    cannot work, so it is an error when the module is built, not a silently wrong output."""
    with pytest.raises(ValueError, match='stride 1'):
        DCNv3(16, stride=2)
    with pytest.raises(ValueError, match='2 \\* pad'):
        DCNv3(16, pad=0)
    DCNv3(16, kernel_size=5, pad=4, dilation=2)


@NEEDS_COMPILED
def test_compiled_op_called_directly_rejects_without_crashing():
    """The kernels' own checks, for callers of torch.ops directly: no read before the tensor (H = 0 with
    padding), no empty softmax (P = 0), no 32-bit row or column overflow."""
    ops = torch.ops.timm_internimage
    (input, offset, mask), _ = _case(height=0, padding=2)
    with pytest.raises(RuntimeError, match='height and width'):
        ops.dcnv3_forward(input, offset, mask, 3, 3, 1, 1, 2, 2, 1, 1, 2, 4, 1.0, False)
    (input, offset, mask), _ = _case(kernel=1, padding=0, remove_center=True)
    with pytest.raises(RuntimeError, match='no points'):
        ops.dcnv3_softmax_forward(input, offset, mask, 1, 1, 1, 1, 0, 0, 1, 1, 2, 4, 1.0, True)
    huge = torch.empty(0, 2 ** 31, 1, 2)
    with pytest.raises(RuntimeError, match='2\\^31'):
        ops.dcnv3_forward(huge, torch.empty(0, 2 ** 31, 1, 18), torch.empty(0, 2 ** 31, 1, 9),
                          3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 1.0, False)


@NEEDS_COMPILED
def test_sides_beyond_32_bits_go_to_the_torch_backend():
    """auto takes the torch backend for a side the compiled kernels cannot address; forcing compiled says so."""
    tensors = (torch.empty(0, 2 ** 31, 1, 2), torch.empty(0, 2 ** 31, 1, 18), torch.empty(0, 2 ** 31, 1, 9))
    assert dcnv3(*tensors, backend='auto').shape == (0, 2 ** 31, 1, 2)
    with pytest.raises(RuntimeError, match='rows and columns'):
        dcnv3(*tensors, backend='compiled')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_empty_batch(backend, dtype):
    """N = 0 works on every backend, with zero (empty) gradients of the right shapes."""
    tensors, kwargs = _case(batch=0, dtype=dtype)
    output, *grads = forward_backward(dcnv3, tensors, torch.zeros(0, 6, 7, 8, dtype=dtype), backend=backend,
                                      **kwargs)
    assert output.shape == (0, 6, 7, 8) and output.dtype == dtype
    for grad, tensor in zip(grads, tensors):
        assert grad.shape == tensor.shape and grad.dtype == dtype


@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_model_empty_batch(backend, monkeypatch):
    set_backend(backend)
    model = tiny_model('internimage_t', num_classes=5)
    logits = model(torch.randn(0, 3, 64, 64))
    assert logits.shape == (0, 5)
    logits.sum().backward()


def _nan_pixel_run(backend, monkeypatch):
    set_backend(backend)
    torch.manual_seed(0)
    model = timm.create_model('internimage_s', channels=20, depths=(1, 1, 1, 1), groups=(5, 10, 20, 40),
                              num_classes=7).eval()
    for block in model.modules():  # random, not zero, offsets and masks
        if isinstance(block, DCNv3):
            torch.nn.init.normal_(block.offset.weight, std=0.3)
            torch.nn.init.normal_(block.mask.weight, std=0.3)
    x = torch.randn(2, 3, 65, 67)
    x[0, 1, 30, 31] = float('nan')
    x.requires_grad_()
    logits = model(x)
    (grad,) = torch.autograd.grad(logits[1].sum(), x)
    return logits.detach(), grad


def test_model_with_a_nan_pixel_is_the_same_on_every_backend(monkeypatch):
    """A NaN pixel in one image (groups of 5, a 65x67 image): no index error, NaN logits for that image only,
    the other image's logits and input gradient finite and equal on every backend: no NaN sample index wraps
    into another image's pixels. (The NaN image's own gradient is NaN through LayerNorm's backward, whatever
    the backend.) Measured against the reference backend (AVX2 EPYC), torch and compiled alike: logits (about
    0.1) 3.7e-8, input gradient (about 8e-3) 4.9e-9; the tolerances are 1.5e-7 and 2e-8."""
    backends = ['torch', 'reference'] + (['compiled'] if compiled_backend_available() else [])
    results = {backend: _nan_pixel_run(backend, monkeypatch) for backend in backends}
    for backend, (logits, grad) in results.items():
        assert not torch.isfinite(logits[0]).any(), backend
        assert torch.isfinite(logits[1]).all(), backend
        assert torch.isfinite(grad[1]).all(), backend
        torch.testing.assert_close(logits[1], results['reference'][0][1], rtol=0, atol=1.5e-7, msg=backend)
        torch.testing.assert_close(grad[1], results['reference'][1][1], rtol=0, atol=2e-8, msg=backend)


@pytest.mark.parametrize('backend', ['auto', pytest.param('compiled', marks=NEEDS_COMPILED)])
def test_many_kernel_points_run_on_every_backend(backend, monkeypatch):
    """A 9x9 kernel (81 points, more than the fused softmax keeps) runs: the softmax goes outside the kernel.
    Measured against the torch backend (outputs up to 0.36, AVX2 EPYC): 1.8e-7."""
    module = dcnv3_module(channels=8, kernel_size=9, pad=4)
    x = torch.randn(1, 10, 11, 8)
    set_backend('torch')
    expected = module(x)
    set_backend(backend)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=8e-7)


_SWITCH_SCRIPT = """
import sys, torch
import timm_internimage
from timm_internimage.ops import dcnv3
assert 'timm_internimage_dcnv3' not in sys.modules, 'the compiled op was imported before it was needed'
g = torch.Generator().manual_seed(0)
x, off, mask = torch.randn(1, 5, 6, 8, generator=g), 3 * torch.randn(1, 5, 6, 36, generator=g), torch.rand(1, 5, 6, 18, generator=g)
by_env = dcnv3(x, off, mask, group=2)  # the environment says torch
assert 'timm_internimage_dcnv3' not in sys.modules, 'the torch backend imported the compiled op'
compiled = dcnv3(x, off, mask, group=2, backend='compiled')
# measured: compiled vs torch 4.8e-7, reference vs compiled 7.2e-7 (outputs up to 2.8; AVX2 EPYC)
torch.testing.assert_close(compiled, by_env, rtol=0, atol=2e-6)
import os
os.environ['TIMM_INTERNIMAGE_DCNV3_BACKEND'] = 'compiled'  # read at import only: no effect now
assert timm_internimage.get_backend() == 'torch'
timm_internimage.set_backend('reference')
assert timm_internimage.get_backend() == 'reference'
torch.testing.assert_close(dcnv3(x, off, mask, group=2), compiled, rtol=0, atol=2e-6)
with timm_internimage.backend('compiled'):
    assert timm_internimage.get_backend() == 'compiled'
assert timm_internimage.get_backend() == 'reference'
"""


@NEEDS_COMPILED
def test_backend_switches_in_one_process_whatever_the_environment_said_at_import():
    env = dict(os.environ, TIMM_INTERNIMAGE_DCNV3_BACKEND='torch')
    subprocess.run([sys.executable, '-c', _SWITCH_SCRIPT], env=env, check=True, cwd=REPO_ROOT, timeout=300)


@pytest.mark.parametrize('backend', ['auto', 'torch', pytest.param('compiled', marks=NEEDS_COMPILED)])
def test_compile_fullgraph_traces_through_dispatch(backend, monkeypatch):
    """Backend resolution, validation and the lazy compiled-op check all trace with fullgraph=True; the compiled
    module computes the eager function, forward and backward."""
    set_backend(backend)
    module = dcnv3_module(dw_kernel_size=5, center_feature_scale=True)
    x = torch.randn(2, 6, 7, 16, requires_grad=True)
    eager = module(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend='aot_eager')(x)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_a_skipped_sample_ignores_its_nan_weight(backend):
    """The official kernel skips a sample outside -1 < position < size before reading its mask weight: a NaN
    weight there changes nothing and gets no gradient; a NaN weight of a sample that counts is NaN output."""
    (input, offset, mask), kwargs = _case(batch=1, height=4, width=5, channels=4, group=1, dtype=torch.float64)
    offset[0, 1, 2, :2] = float('nan')  # point 0 of pixel (1, 2) does not count
    offset[0, 2, 3, 2:4] = 1e9  # nor point 1 of pixel (2, 3)
    grad_output = torch.ones(1, 4, 5, 4, dtype=torch.float64)
    expected = forward_backward(dcnv3, (input, offset, mask), grad_output, backend=backend, **kwargs)
    mask[0, 1, 2, 0] = mask[0, 2, 3, 1] = float('nan')
    got = forward_backward(dcnv3, (input, offset, mask), grad_output, backend=backend, **kwargs)
    for name, value, reference in zip(('output',) + GRADIENTS, got, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-12, msg=name)
    mask[0, 0, 0, 4] = float('nan')  # the centre point of pixel (0, 0) counts
    output = dcnv3(input, offset, mask, backend=backend, **kwargs)
    assert torch.isnan(output[0, 0, 0]).all() and torch.isfinite(output[0, 1:]).all()


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_a_single_bag_trains_on_any_number_of_threads(backend, threads):
    """N * H_out * W_out * group == 1: one sampled vector. The gradients equal the reference backend's."""
    input, offset, mask, args = random_case(batch=1, height=1, width=1, group=1, group_channels=3)
    grad_output = torch.randn(1, 1, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = forward_backward(dcnv3_core, (input, offset, mask), grad_output, Geometry(*args), backend=backend)
    finally:
        torch.set_num_threads(previous)
    expected = forward_backward(dcnv3_core, (input, offset, mask), grad_output, Geometry(*args), backend='reference')
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_strided_views_are_accepted_on_every_backend(backend):
    """An H/W-transposed mask and W-sliced offsets and input give the results of their contiguous copies."""
    input, offset, mask, args = random_case(batch=2, height=6, width=6, spread=1.5)
    wide = offset.repeat_interleave(2, dim=2)[:, :, ::2]  # every other column of a wider tensor
    transposed = mask.transpose(1, 2).contiguous().transpose(1, 2)
    sliced_input = input.repeat_interleave(2, dim=2)[:, :, 1::2]
    assert not (wide.is_contiguous() or transposed.is_contiguous() or sliced_input.is_contiguous())
    grad_output = torch.randn(2, 6, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = forward_backward(dcnv3_core, (sliced_input, wide, transposed), grad_output, Geometry(*args), backend=backend)
    expected = forward_backward(dcnv3_core, (input, offset, mask), grad_output, Geometry(*args), backend=backend)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-12)


def test_settings_api():
    """set_backend / backend() and set_fused_linear / fused_linear(): validated, process-wide, and the context
    managers restore the previous setting even when the block raises."""
    import timm_internimage as ti
    from timm_internimage.ops.linear import use_fused_linear
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ti.set_backend('cuda')
    ti.set_backend('TORCH')
    assert ti.get_backend() == 'torch'
    with pytest.raises(RuntimeError, match='inside'):
        with ti.backend('reference'):
            assert ti.get_backend() == 'reference'
            raise RuntimeError('inside')
    assert ti.get_backend() == 'torch'
    x, weight = torch.randn(2, 3), torch.randn(4, 3)
    with torch.no_grad():
        with ti.fused_linear(False):
            assert not ti.fused_linear_enabled() and not use_fused_linear(x, weight)
        assert ti.fused_linear_enabled() == use_fused_linear(x, weight) == torch.backends.mkldnn.is_available()
    # a backend= argument wins over the setting
    input, offset, mask, args = random_case(batch=1, height=4, width=4)
    ti.set_backend('reference')
    torch.testing.assert_close(dcnv3_core(input, offset, mask, Geometry(*args), backend='torch'),
                               dcnv3_core(input, offset, mask, Geometry(*args)), rtol=0, atol=1e-12)


def test_settings_threads_see_one_setting():
    """The setting is process-wide: a thread started after set_backend runs that backend."""
    import threading
    import timm_internimage as ti
    from timm_internimage.ops.backends import requested_backend
    seen = []
    ti.set_backend('reference')
    thread = threading.Thread(target=lambda: seen.append(requested_backend()))
    thread.start()
    thread.join()
    assert seen == ['reference']


@NEEDS_COMPILED
def test_a_wheel_of_another_version_is_a_clear_error(monkeypatch):
    """The op checks the wheel against the installed package's metadata (it never imports the package root)."""
    import timm_internimage_dcnv3
    from timm_internimage.ops import backends as backend
    monkeypatch.setattr(timm_internimage_dcnv3, '__version__', '0.0.0')
    backend._extension.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'timm_internimage_dcnv3 0\.0\.0 does not match timm-internimage'):
            backend._extension()
    finally:
        monkeypatch.undo()
        backend._extension.cache_clear()
    assert backend._extension() is timm_internimage_dcnv3


@NEEDS_COMPILED
def test_geometry_is_the_compiled_schemas_scalar_arguments_in_order():
    """The compiled backend flattens a Geometry into the ops' scalar arguments, and its create-graph backward builds
    one back from them, by position: the fields must be the schemas' arguments in order."""
    assert compiled_backend_available()  # the wheel is loaded: its ops are registered
    ops = torch.ops.timm_internimage
    for op in (ops.dcnv3_forward, ops.dcnv3_softmax_forward, ops.dcnv3_backward, ops.dcnv3_softmax_backward):
        names = tuple(argument.name for argument in op.default._schema.arguments)
        assert names[-len(Geometry._fields):] == Geometry._fields
