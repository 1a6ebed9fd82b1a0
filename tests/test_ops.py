"""The pure-PyTorch DCNv3 backends: golden cases, gradients, dtypes, dispatch, tracing and export."""
import pytest
import torch

from timm_internimage import set_backend

from timm_internimage.ops import Geometry, dcnv3, dcnv3_reference, dcnv3_torch
from conftest import KERNEL_BACKENDS, dcnv3_module, forward_backward, random_case
from golden import load_op_case, op_args, op_cases

PURE_BACKENDS = {'torch': dcnv3_torch, 'reference': dcnv3_reference}


@pytest.mark.parametrize('backend', sorted(PURE_BACKENDS))
@pytest.mark.parametrize('case', op_cases(), ids=lambda c: c['file'].split('.')[0])
def test_golden_op_forward_and_gradients(backend, case):
    tensors = load_op_case(case)
    got = forward_backward(PURE_BACKENDS[backend], [tensors[k] for k in ('input', 'offset', 'mask')],
                           tensors['grad_output'], Geometry(*op_args(case)))
    for value, name in zip(got, ('output', 'grad_input', 'grad_offset', 'grad_mask')):
        torch.testing.assert_close(value, tensors[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize('case_kwargs', [
    dict(),
    dict(stride=2, group=3),
    dict(kernel=5, pad=2, dilation=2, offset_scale=2.0),
    dict(remove_center=True, group=1, pad=0),
], ids=['basic', 'stride2', 'k5_dil2_scale2', 'remove_center'])
def test_gradcheck(case_kwargs):
    input, offset, mask, args = random_case(batch=1, height=4, width=5, group_channels=2, **case_kwargs)
    inputs = [t.requires_grad_() for t in (input, offset, mask)]
    assert torch.autograd.gradcheck(lambda *t: dcnv3_torch(*t, Geometry(*args)), inputs)


# Largest |torch backend - float64 reference| of the case below (outputs up to 1.6), measured on an AVX2 EPYC:
# float32 9.8e-7, float16 5.6e-4, bfloat16 6.4e-3.
@pytest.mark.parametrize('dtype,atol', [(torch.float32, 4e-6), (torch.float16, 2.5e-3), (torch.bfloat16, 2.5e-2)])
def test_fast_matches_reference_in_low_precision(dtype, atol):
    input, offset, mask, args = random_case(batch=3, height=11, width=6, group=4, group_channels=8, dtype=dtype)
    expected = dcnv3_reference(input.double(), offset.double(), mask.double(), Geometry(*args))
    output = dcnv3_torch(input, offset, mask, Geometry(*args))
    assert output.dtype == dtype
    torch.testing.assert_close(output.double(), expected, rtol=0, atol=atol)


def test_large_offsets_and_any_batch_size():
    input, offset, mask, args = random_case(batch=300, height=3, width=2, group=1, group_channels=2, spread=40.0)
    torch.testing.assert_close(dcnv3_torch(input, offset, mask, Geometry(*args)), dcnv3_reference(input, offset, mask, Geometry(*args)))


def test_functional_api_pairs_and_ints_agree():
    input, offset, mask, _ = random_case(height=8, width=10, stride=2, group=2)
    by_int = dcnv3(input, offset, mask, kernel_size=3, stride=2, padding=1, group=2, backend='torch')
    by_pair = dcnv3(
        input, offset, mask, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), group=2, backend='torch')
    direct = dcnv3_torch(input, offset, mask, Geometry(3, 3, 2, 2, 1, 1, 1, 1, 2, 4, 1.0, False))
    assert torch.equal(by_int, by_pair) and torch.equal(by_int, direct)


def test_rectangular_kernel_matches_reference():
    generator = torch.Generator().manual_seed(1)
    # kernel (3, 5), padding (1, 2): a 6x5 input keeps a 6x5 output; 2 groups of 3 channels, 15 points.
    input = torch.randn(2, 6, 5, 6, generator=generator, dtype=torch.float64)
    offset = 3 * torch.randn(2, 6, 5, 2 * 15 * 2, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 6, 5, 2 * 15, generator=generator, dtype=torch.float64)
    args = (3, 5, 1, 1, 1, 2, 1, 1, 2, 3, 1.5, False)
    expected = dcnv3_reference(input, offset, mask, Geometry(*args))
    torch.testing.assert_close(dcnv3_torch(input, offset, mask, Geometry(*args)), expected, rtol=0, atol=1e-12)
    by_pairs = dcnv3(input, offset, mask, kernel_size=(3, 5), padding=(1, 2), group=2, offset_scale=1.5, backend='torch')
    torch.testing.assert_close(by_pairs, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('backend', sorted(PURE_BACKENDS))
def test_backend_selection_by_argument_and_environment(backend, monkeypatch):
    input, offset, mask, args = random_case(dtype=torch.float32, spread=5.0)
    expected = PURE_BACKENDS[backend](input, offset, mask, Geometry(*args))
    by_argument = dcnv3(input, offset, mask, group=2, backend=backend)
    set_backend(backend)
    by_environment = dcnv3(input, offset, mask, group=2)
    assert torch.equal(by_argument, expected) and torch.equal(by_environment, expected)


def test_fast_and_reference_differ_only_by_rounding_in_float32():
    # Different float operation orders: equal to float32 precision, not bit for bit (measured 3.5e-6 on outputs up
    # to 2, AVX2 EPYC).
    input, offset, mask, args = random_case(dtype=torch.float32, batch=4, height=12, width=12, group=4, group_channels=16)
    fast, reference = dcnv3_torch(input, offset, mask, Geometry(*args)), dcnv3_reference(input, offset, mask, Geometry(*args))
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize('call,message', [
    (lambda i, o, m: dcnv3(i[0], o, m, group=2), '4-D'),
    (lambda i, o, m: dcnv3(i, o, m, group=3), 'divisible by group'),
    (lambda i, o, m: dcnv3(i, o[..., :-2], m, group=2), 'expected offset'),
    (lambda i, o, m: dcnv3(i, o, m, group=2, backend='cuda-magic'), 'unknown backend'),
    (lambda i, o, m: dcnv3(i, o, m, kernel_size=(1, 2, 3), group=2), 'pair of ints'),
    (lambda i, o, m: dcnv3(i, o, m, kernel_size=2, group=2, remove_center=True), 'odd number'),
    (lambda i, o, m: dcnv3(i[:, :1, :1], o, m, kernel_size=5, padding=0, group=2), 'too small'),
])
def test_bad_arguments_raise_clear_errors(call, message):
    input, offset, mask, _ = random_case(dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        call(input, offset, mask)


def test_forcing_compiled_backend_where_it_cannot_run_is_an_error():
    input, offset, mask, _ = random_case(dtype=torch.float32)
    with pytest.raises(RuntimeError, match='compiled'):
        dcnv3(input.to('meta'), offset.to('meta'), mask.to('meta'), group=2, backend='compiled')


@pytest.mark.parametrize('backend', sorted(PURE_BACKENDS))
def test_meta_device_shapes(backend):
    input, offset, mask, _ = random_case(dtype=torch.float32, stride=2, height=9, width=9)
    output = dcnv3(input.to('meta'), offset.to('meta'), mask.to('meta'), stride=2, group=2, backend=backend)
    assert output.shape == (2, 5, 5, 8) and output.device.type == 'meta'


# The module in half precision next to float32 (outputs up to 2). Largest error measured on an AVX2 EPYC, torch /
# compiled backend: float16 1.6e-3 / 1.3e-3, bfloat16 1.15e-2 / 1.14e-2, bfloat16 autocast 2.05e-2 / 1.9e-2; the
# same with ATen, oneDNN and MKL held to their baseline ISA (the AVX-512 figures for the compiled backend:
# 1.3e-3, 1.1e-2, 1.9e-2). Not tested here: the official reference backend, whose sampling grid (normalised
# coordinates) is itself in the low-precision dtype: 3.7e-3, 3.8e-2, 4.5e-2.
@pytest.mark.parametrize('dtype,atol', [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_module_runs_in_half_precision(backend, dtype, atol, monkeypatch):
    set_backend(backend)
    module = dcnv3_module(dtype=dtype, center_feature_scale=True)
    x = torch.randn(2, 6, 7, 16)
    output = module(x.to(dtype))
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), module.float()(x), rtol=0, atol=atol)


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_module_under_autocast(backend, monkeypatch):
    set_backend(backend)
    module = dcnv3_module()
    x = torch.randn(2, 6, 7, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        output = module(x)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), module(x), rtol=0, atol=6e-2)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    module = dcnv3_module(center_feature_scale=True).eval()
    x = torch.randn(1, 6, 7, 16)
    path = tmp_path / 'dcnv3.onnx'
    torch.onnx.export(module, (x,), str(path), input_names=['x'], output_names=['y'], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (result,) = session.run(None, {'x': x.numpy()})
    # measured 2.7e-7 (outputs up to 1.9, AVX2 EPYC)
    torch.testing.assert_close(torch.from_numpy(result), module(x).detach(), rtol=0, atol=1.2e-6)


def test_legacy_onnx_exporter_on_a_non_square_map(tmp_path):
    """The TorchScript-based exporter (dynamo=False) handles every operation of the torch backend (it lacked
    aten::frac), and a map whose height and width differ takes the same computation as a square one."""
    import onnxruntime

    module = dcnv3_module().eval()
    x = torch.randn(1, 5, 8, 16)
    path = tmp_path / 'dcnv3_legacy.onnx'
    torch.onnx.export(module, (x,), str(path), input_names=['x'], output_names=['y'], dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (result,) = session.run(None, {'x': x.numpy()})
    torch.testing.assert_close(torch.from_numpy(result), module(x).detach(), rtol=0, atol=1.2e-6)


def test_torchscript_module_matches_eager():
    module = dcnv3_module().eval()
    x = torch.randn(1, 5, 5, 16)
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))
