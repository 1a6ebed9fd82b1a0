"""FlashInternImage (DCNv4): golden equality with the official model, official configs and keys, the timm API."""
import pytest
import timm
import torch
from timm.models import group_parameters

from conftest import ALL_BACKENDS, TINY
from golden import DCNV4_MODEL_CASES, DCNV4_OUTPUTS, flash_golden_model
from timm_internimage import FlashInternImage, checkpoint_filter_fn, set_backend
from timm_internimage.ops import DCNv4

VARIANTS = ('flash_internimage_t', 'flash_internimage_s', 'flash_internimage_b', 'flash_internimage_l')  # expected
# The reference README's float32 agreement (outputs are O(1)). Measured on the two cases (2-core AMD EPYC VM),
# largest error of any logit or stage output: torch 5.5e-6, compiled 5.0e-6, reference 6.9e-6.
GOLDEN_ATOL = 1e-4

# OpenGVLab/DCNv4 classification/configs/flash_intern_image_*.yaml, as the official builder passes them.
OFFICIAL_CONFIGS = {
    'flash_internimage_t': dict(core_op='DCNv4', channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32],
                                offset_scale=1.0, mlp_ratio=4.0, layer_scale=None, post_norm=False,
                                dw_kernel_size=None, mlp_fc2_bias=False, dcn_output_bias=False),
    'flash_internimage_s': dict(core_op='DCNv4', channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40],
                                layer_scale=1e-5, offset_scale=1.0, mlp_ratio=4.0, post_norm=True, dw_kernel_size=3,
                                mlp_fc2_bias=False, dcn_output_bias=False),
    'flash_internimage_b': dict(core_op='DCNv4', channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56],
                                layer_scale=1e-5, offset_scale=0.5, mlp_ratio=4.0, post_norm=True, dw_kernel_size=3,
                                mlp_fc2_bias=False, dcn_output_bias=False),
    'flash_internimage_l': dict(core_op='DCNv4', channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80],
                                layer_scale=1e-5, offset_scale=2.0, mlp_ratio=4.0, post_norm=True, dw_kernel_size=3,
                                dcn_output_bias=True, mlp_fc2_bias=True),
}


def tiny_flash(name='flash_internimage_t', **kwargs):
    return timm.create_model(name, **dict(TINY, **kwargs))


@pytest.mark.parametrize('backend', ALL_BACKENDS)
@pytest.mark.parametrize('name', DCNV4_MODEL_CASES)
def test_golden_float32(name, backend, monkeypatch):
    """Every logit and stage output of the tiny official FlashInternImage cases within 1e-4, on every backend."""
    set_backend(backend)
    model, case, tensors = flash_golden_model(name)
    assert case['weight_rule'] == 'calm_dcnv4'
    x = tensors['input']
    assert list(x.shape) == case['input']
    with torch.no_grad():
        outputs = [model(x)] + model.forward_intermediates(x, intermediates_only=True)
    for output, label in zip(outputs, DCNV4_OUTPUTS):
        torch.testing.assert_close(output, tensors[label], rtol=0, atol=GOLDEN_ATOL, msg=lambda m: f'{label}: {m}')


@pytest.mark.parametrize('name', DCNV4_MODEL_CASES)
def test_official_keys_map_one_to_one(name):
    """Every official key (cases.json) has one model tensor of its shape, and every model tensor one key."""
    model, case, _ = flash_golden_model(name)
    official = {key: torch.zeros(shape) for key, shape in case['state_dict_keys'].items()}
    mapped = checkpoint_filter_fn(official, model)
    own = model.state_dict()
    assert len(mapped) == len(official) and mapped.keys() == own.keys()
    assert all(mapped[key].shape == own[key].shape for key in own)


@pytest.mark.parametrize('name', VARIANTS)
def test_official_config_builds_the_registered_variant(name):
    official = FlashInternImage(**OFFICIAL_CONFIGS[name], device='meta')
    registered = timm.create_model(name, device='meta')
    assert repr(official) == repr(registered)
    assert ({k: v.shape for k, v in official.state_dict().items()}
            == {k: v.shape for k, v in registered.state_dict().items()})


def test_variant_structure():
    """L has the DCNv4 output bias and the MLP fc2 bias, S/B/L the depthwise conv, T none of them."""
    t, l_ = (timm.create_model(name, device='meta').state_dict()
             for name in ('flash_internimage_t', 'flash_internimage_l'))
    assert not any(k.endswith(('dcn.output_proj.bias', 'mlp.fc2.bias')) or 'offset_mask_dw' in k for k in t)
    assert {'stages.0.blocks.0.dcn.output_proj.bias', 'stages.0.blocks.0.mlp.fc2.bias',
            'stages.0.blocks.0.dcn.offset_mask_dw.weight'} <= l_.keys()
    assert l_['stages.0.blocks.0.dcn.offset_mask.weight'].shape == (8 * (3 * 10 * 9 // 8 + 1), 160)  # 270 -> 272


def test_registry_and_pretrained_cfgs():
    assert timm.list_models(module='flash_internimage') == sorted(VARIANTS) == timm.list_models('flash_internimage*')
    assert len(timm.list_models('flash_internimage*', pretrained=True)) == 4 + 16  # classification + det/seg
    expected = {'flash_internimage_t': ('flash_intern_image_t_1k_224.pth', 83.6, 224),
                'flash_internimage_s': ('flash_intern_image_s_1k_224.pth', 84.4, 224),
                'flash_internimage_b': ('flash_intern_image_b_1k_224.pth', 84.9, 224),
                'flash_internimage_l': ('flash_internimage_l_22kto1k_384.pth', 88.1, 384)}
    for name, (filename, top1, size) in expected.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ('OpenGVLab/DCNv4', filename)
        assert cfg.input_size == (3, size, size) and f'{top1}%' in cfg.description


def test_bad_core_op():
    with pytest.raises(ValueError, match="core_op='DCNv3' is not supported; FlashInternImage implements"):
        FlashInternImage(core_op='DCNv3', **TINY, device='meta')


def test_initialisation_is_official():
    """DCNv4's own reset after the truncated-normal linears: zero offset/weight branch, zero projection biases."""
    model = tiny_flash()
    dcns = [m for m in model.modules() if isinstance(m, DCNv4)]
    assert len(dcns) == sum(TINY['depths'])
    for dcn in dcns:
        assert not dcn.offset_mask.weight.any() and not dcn.offset_mask.bias.any()
        assert not dcn.value_proj.bias.any()


@pytest.mark.parametrize('kwargs', [dict(), dict(post_norm=True, layer_scale=1e-5, dw_kernel_size=3)])
def test_features_only_and_intermediates(kwargs):
    torch.manual_seed(0)
    model = tiny_flash(**kwargs).eval()
    torch.manual_seed(0)
    features = tiny_flash(features_only=True, out_indices=(0, 2, 3), **kwargs).eval()
    x = torch.randn(2, 3, 64, 96)
    expected = model.forward_intermediates(x, indices=[0, 2, 3], intermediates_only=True)
    outputs = features(x)
    assert [o.shape[1] for o in outputs] == features.feature_info.channels() == [16, 64, 128]
    for output, target, reduction in zip(outputs, expected, features.feature_info.reduction()):
        assert output.shape[-2:] == (64 // reduction, 96 // reduction)
        torch.testing.assert_close(output, target)
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape[1] for t in intermediates] == [16, 32, 64, 128]


def test_prune_and_reset_classifier():
    model = tiny_flash().eval()
    x = torch.randn(1, 3, 64, 64)
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre_logits)
    expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1] and len(model.stages) == 2
    for output, target in zip(model.forward_intermediates(x, indices=[0, 1], intermediates_only=True), expected):
        torch.testing.assert_close(output, target)


def test_grad_checkpointing_group_matcher_and_gradients():
    torch.manual_seed(0)
    model = tiny_flash(post_norm=True, layer_scale=1e-5, dw_kernel_size=3, mlp_fc2_bias=True,
                       dcn_output_bias=True).train()
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(names) for names in groups.values()) == len(list(model.parameters()))
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_center_feature_scale_module():
    """DCNv4's centre feature scale (official names via checkpoint_filter_fn) blends sampled and projected values;
    a zero scale projection gives the plain 0.5/0.5 blend."""
    torch.manual_seed(0)
    module = DCNv4(16, group=2, center_feature_scale=True).double()
    plain = DCNv4(16, group=2).double()
    plain.load_state_dict({k: v for k, v in module.state_dict().items() if 'center' not in k})
    with torch.no_grad():
        module.offset_mask.weight.normal_(0, 0.1)
        plain.offset_mask.weight.copy_(module.offset_mask.weight)
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    projected = torch.nn.functional.linear(x, module.value_proj.weight, module.value_proj.bias)
    plain_sampled = torch.nn.functional.linear(
        plain(x) - plain.output_proj.bias, torch.linalg.inv(plain.output_proj.weight))
    expected = torch.nn.functional.linear(0.5 * plain_sampled + 0.5 * projected, module.output_proj.weight,
                                          module.output_proj.bias)
    torch.testing.assert_close(module(x), expected)


def test_any_group_width_runs():
    """Group widths that are no multiple of 16 (the official CUDA op's limit) and no power of two."""
    model = tiny_flash(channels=20, groups=(4, 8, 8, 16)).eval()  # widths 5, 5, 10, 10
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def _official_pth(extra=None):
    """The tiny golden model's weights as an official training checkpoint (``{'model': ..., ...}``), as bytes."""
    import io
    model, case, _ = flash_golden_model('model_flash_tiny')
    from golden import official_weight
    official = {key: official_weight(key, shape, case['weight_seed'], case['weight_rule'])
                for key, shape in case['state_dict_keys'].items()}
    buffer = io.BytesIO()
    torch.save(dict({'model': official, 'epoch': 299, 'max_accuracy': 83.6}, **(extra or {})), buffer)
    return model, case, buffer.getvalue()


class _NotATensor:
    pass


def test_pretrained_tag_loads_the_official_pth_from_the_hub(hf_env):
    """``flash_internimage_t.in1k`` fetches its official ``.pth`` from OpenGVLab/DCNv4 and loads it with
    ``weights_only``; an object other than tensors and plain data in such a file is refused."""
    from timm.models import get_pretrained_cfg
    reference, case, payload = _official_pth()
    filename = get_pretrained_cfg('flash_internimage_t').hf_hub_filename
    hf_env.hub.add_repo('OpenGVLab/DCNv4', {filename: payload})
    model = timm.create_model('flash_internimage_t', pretrained=True, **case['config']).eval()
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(path.endswith(f'/OpenGVLab/DCNv4/resolve/main/{filename}') for _, path in hf_env.hub.requests)

    _, _, unsafe = _official_pth({'config': _NotATensor()})
    hf_env.hub.add_repo('OpenGVLab/DCNv4', {filename: unsafe})
    with pytest.raises(Exception, match='weights_only'):
        timm.create_model('flash_internimage_t', pretrained=True, **case['config'])


def test_parameter_counts_match_the_published_ones():
    """OpenGVLab/DCNv4's README: 30M, 50M, 97M, 223M (rounded to millions)."""
    published = {'flash_internimage_t': 30, 'flash_internimage_s': 50, 'flash_internimage_b': 97,
                 'flash_internimage_l': 223}
    for name, millions in published.items():
        model = timm.create_model(name, device='meta')
        assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions, name


def test_torchscript_fx_and_compile_match_eager():
    """Scripted, FX-traced and compiled (aot_eager, fullgraph) models compute the eager function."""
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    model = tiny_flash(post_norm=True, layer_scale=1e-5, dw_kernel_size=3).eval()
    for dcn in (m for m in model.modules() if isinstance(m, DCNv4)):
        torch.nn.init.normal_(dcn.offset_mask.weight, std=0.1)  # away from the zero init: real sampling
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=0, atol=5e-6)
    extractor = create_feature_extractor(model, return_nodes={'head.fc': 'logits'})
    torch.testing.assert_close(extractor(x)['logits'], expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend='aot_eager')(x), expected,
                               rtol=0, atol=5e-6)
