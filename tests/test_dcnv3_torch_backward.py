"""The torch backend's hand-written backward against autograd of its plain formulation (the path exporters and
TorchScript take), in float64: every geometry, each subset of inputs that needs a gradient, both ways of
computing the corner dot products (chunked on one CPU thread, ATen's per-sample-weights backward otherwise)."""
import importlib
import math

import pytest
import torch

from timm_internimage.ops import Geometry
from conftest import forward_backward, leaves, random_case

dcnv3_torch_module = importlib.import_module('timm_internimage.ops.dcn_v3_torch')

CASES = {
    'basic': dict(),
    'stride2_group3': dict(stride=2, group=3),
    'k5_dil2_scale2': dict(kernel=5, pad=2, dilation=2, offset_scale=2.0),
    'remove_center': dict(remove_center=True, group=1, pad=0),
    'rect_kernel_wide_map': dict(kernel=(1, 3), height=3, width=11, pad=1),
    'large_offsets': dict(spread=40.0, batch=3),
}


@pytest.fixture(params=['chunked', 'aten'])
def dots_path(request, monkeypatch):
    """One thread takes the chunked corner dots (with chunks small enough to need several and a partial last
    one); more threads take ATen's per-sample-weights backward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if request.param == 'chunked' else 2)
    monkeypatch.setattr(dcnv3_torch_module, '_CHUNK_ELEMENTS', 700)
    yield request.param
    torch.set_num_threads(threads)


def _plain(monkeypatch):
    monkeypatch.setattr(dcnv3_torch_module, '_use_custom_backward', lambda *tensors: False)


def _with_non_finite_offsets(offset):
    offset = offset.clone()
    flat = offset.view(-1)
    flat[::7] = float('nan')
    flat[3::11] = float('inf')
    flat[5::13] = -float('inf')
    flat[1::17] = 1e9
    return offset


@pytest.mark.parametrize('name', sorted(CASES))
def test_custom_backward_matches_autograd_of_the_plain_formulation(name, dots_path, monkeypatch):
    input, offset, mask, args = random_case(**CASES[name])
    if name == 'large_offsets':
        offset = _with_non_finite_offsets(offset)
    grad_output = torch.randn(input.shape[:1] + offset.shape[1:3] + input.shape[3:], dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
    got = forward_backward(dcnv3_torch_module.dcnv3_torch, (input, offset, mask), grad_output, Geometry(*args))
    _plain(monkeypatch)
    expected = forward_backward(dcnv3_torch_module.dcnv3_torch, (input, offset, mask), grad_output, Geometry(*args))
    for value, reference, what in zip(got, expected, ('output', 'grad_input', 'grad_offset', 'grad_mask')):
        assert torch.isfinite(value).all(), what
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-12, msg=what)


@pytest.mark.parametrize('needs', [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=['input', 'offset', 'mask', 'offset_mask'])
def test_only_the_gradients_asked_for(needs, dots_path, monkeypatch):
    input, offset, mask, args = random_case(stride=2, group=3)
    grads = []
    for plain in (False, True):
        if plain:
            _plain(monkeypatch)
        tensors = [t.detach().clone().requires_grad_(need) for t, need in zip((input, offset, mask), needs)]
        output = dcnv3_torch_module.dcnv3_torch(*tensors, Geometry(*args))
        output.backward(torch.ones_like(output))
        grads.append([t.grad for t in tensors])
    for got, expected, need in zip(*grads, needs):
        assert (got is not None) == need
        if need:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_float32_close_to_float64(dots_path):
    """float32 gradients of the custom backward within float32 rounding of the float64 ones (outputs about 1)."""
    input, offset, mask, args = random_case(batch=3, height=11, width=6, group=4, group_channels=16)
    grad_output = torch.randn(3, 11, 6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = forward_backward(dcnv3_torch_module.dcnv3_torch, (input, offset, mask), grad_output, Geometry(*args))
    got = forward_backward(dcnv3_torch_module.dcnv3_torch, [t.float() for t in (input, offset, mask)],
                           grad_output.float(), Geometry(*args))
    for value, reference in zip(got, expected):
        assert value.dtype == torch.float32
        scale = max(1.0, reference.abs().max().item())
        torch.testing.assert_close(value.double(), reference, rtol=0, atol=2e-5 * scale)


def test_empty_output_and_empty_batch(dots_path):
    input, offset, mask, args = random_case(batch=1, height=4, width=5, kernel=5, pad=0, group=2)
    inputs = leaves(input[:0], offset[:0], mask[:0])
    output = dcnv3_torch_module.dcnv3_torch(*inputs, Geometry(*args))
    output.sum().backward()
    assert output.shape[0] == 0 and all(t.grad is not None and t.grad.numel() == 0 for t in inputs)
    assert not math.isnan(sum(t.grad.sum().item() for t in inputs))
