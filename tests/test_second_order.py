"""Second-order gradients through DCNv3 (gradient penalties, Hessian-vector products, MAML).

Every backend differentiates its backward: ``torch`` and ``compiled`` through autograd of the twice-differentiable
gather formulation, ``reference`` through ``grid_sample``. Checked by ``gradgradcheck`` of the op in float64, by
an input-gradient penalty on a golden model (parameter gradients equal to the reference backend's), and for the
compiled wheel alone: without timm_internimage's formulation registered, such a backward is an error, never a
silently wrong result.
"""
import pytest
import torch

from timm_internimage import set_backend

from conftest import ALL_BACKENDS, NEEDS_COMPILED, leaves, random_case
from golden import golden_model


CASES = {
    'basic': dict(),
    'stride2_remove_center': dict(stride=2, group=1, pad=0, remove_center=True),
    'k5_dil2_scale2': dict(kernel=5, pad=4, dilation=2, offset_scale=2.0, group=1, height=3, width=3),
}


def _op(backend, args):
    from timm_internimage.ops import Geometry, dcnv3_core
    return lambda input, offset, mask: dcnv3_core(input, offset, mask, Geometry(*args), backend=backend)


@pytest.mark.parametrize('backend', ALL_BACKENDS)
@pytest.mark.parametrize('name', sorted(CASES))
def test_gradgradcheck(backend, name):
    input, offset, mask, args = random_case(**dict(dict(batch=1, height=3, width=4, group_channels=2), **CASES[name]))
    assert torch.autograd.gradgradcheck(_op(backend, args), leaves(input, offset, mask), fast_mode=True)


@pytest.mark.parametrize('backend', ['torch', pytest.param('compiled', marks=NEEDS_COMPILED)])
def test_mask_logits_gradgradcheck(backend):
    """The compiled op's fused softmax (mask given as logits) differentiates twice too."""
    from timm_internimage.ops import Geometry, dcnv3_core
    input, offset, logits, args = random_case(batch=1, height=3, width=4, group_channels=2)
    op = lambda *tensors: dcnv3_core(*tensors, Geometry(*args), mask_is_logits=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(op, leaves(input, offset, logits.log()), fast_mode=True)


def _penalty_grads(model, x, backend, monkeypatch):
    """Parameter gradients of an R1-style penalty: the squared norm of the input gradient of the logits' sum."""
    set_backend(backend)
    model.zero_grad()
    x = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    (grad_x ** 2).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('backend', ['torch', pytest.param('compiled', marks=NEEDS_COMPILED)])
def test_gradient_penalty_equals_reference(backend, monkeypatch):
    model, case, tensors = golden_model('tiny_s', torch.float64, calm=True)
    model.train()
    for module in model.modules():  # deterministic: no dropout / drop path, BatchNorm on running statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    x = tensors['input.0'].double()
    expected = _penalty_grads(model, x, 'reference', monkeypatch)
    got = _penalty_grads(model, x, backend, monkeypatch)
    assert got.keys() == expected.keys()
    offset_keys = [k for k in expected if '.offset.' in k]
    assert offset_keys and all(expected[k].abs().sum() > 0 for k in offset_keys)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-8, msg=key)


@NEEDS_COMPILED
def test_compiled_wheel_alone_refuses_second_order(monkeypatch):
    """Without a registered formulation, the wheel's backward under create_graph is an error naming DCNv3."""
    import timm_internimage_dcnv3
    from timm_internimage_dcnv3 import _ops
    input, offset, mask, args = random_case(batch=1, height=4, width=4)
    monkeypatch.setattr(_ops, '_create_graph_backward', None)
    input, offset, mask = leaves(input, offset, mask)
    out = timm_internimage_dcnv3.dcnv3(input, offset, mask, *args)
    with pytest.raises(RuntimeError, match='DCNv3.*second-order'):
        torch.autograd.grad(out.sum(), offset, create_graph=True)
    # First-order gradients are unaffected.
    assert torch.isfinite(torch.autograd.grad(out.sum(), offset)[0]).all()
