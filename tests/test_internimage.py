"""InternImage models: golden equality with the official implementation, weight formats, the timm API."""
import pytest
import timm
import torch
from timm.models import group_parameters

from timm_internimage import InternImage, checkpoint_filter_fn, set_backend, set_fused_linear
from conftest import ALL_BACKENDS, KERNEL_BACKENDS, TINY, tiny_kwargs, tiny_model
from golden import MODEL_CASES, MODEL_OUTPUTS, golden_expected, golden_model, golden_outputs, load_model_case

VARIANTS = ('internimage_t', 'internimage_s', 'internimage_b', 'internimage_l', 'internimage_xl', 'internimage_h',
            'internimage_g')  # expected: test_registry_lists_all_variants_and_tags holds the registry to it

# The reference README's float32 agreement with the official model (outputs are O(1)). Measured on the calm cases
# (AVX2 EPYC), largest error of any logit or stage output: reference 3.8e-6, torch 5.5e-6, compiled 5.0e-6.
GOLDEN_ATOL = 1e-4

# The large-offset cases are chaotic: the official float32 outputs themselves are off the exact function by their
# own rounding, amplified. Largest |official - float64 reference backend| of any output, measured per case (it
# depends on no CPU: the official values are fixed and float64 is exact to ~1e-11 here): tiny_t 1.0e-5,
# tiny_s 1.2e-4, tiny_l 7.4e-3 (stage 3), tiny_h 1.3e-5, tiny_g 1.2e-5. A sampling or border mistake moves
# these O(5) outputs by O(1).
LARGE_OFFSET_ATOL = {'tiny_t': 4e-5, 'tiny_s': 5e-4, 'tiny_l': 3e-2, 'tiny_h': 5e-5, 'tiny_g': 5e-5}


def _assert_outputs(outputs, expected, atol, what):
    assert len(outputs) == len(expected) == len(MODEL_OUTPUTS), what
    for output, target, label in zip(outputs, expected, MODEL_OUTPUTS):
        assert output.dtype == target.dtype, f'{what} {label}'
        torch.testing.assert_close(output, target, rtol=0, atol=atol, msg=lambda m: f'{what} {label}: {m}')


@pytest.mark.parametrize('backend', ALL_BACKENDS)
@pytest.mark.parametrize('name', MODEL_CASES)
def test_golden_float32(name, backend, monkeypatch):
    """Every logit and every stage output of the calm golden cases (trained-like weights, well conditioned) within
    1e-4 of the official model, in float32, on every backend."""
    set_backend(backend)
    model, case, tensors = golden_model(name, calm=True)
    assert case['weight_rule'] == 'calm'
    for index in range(len(case['inputs'])):
        outputs = golden_outputs(model, tensors[f'input.{index}'])
        _assert_outputs(outputs, golden_expected(tensors, index), GOLDEN_ATOL, f'{name} input {index}')


@pytest.mark.parametrize('name', MODEL_CASES)
def test_large_offset_cases_match_official_in_float64(name, golden_float64):
    """The large-offset cases (samples far outside the map and between pixels), every output in float64: the
    reference backend within the official float32 values' own measured error (LARGE_OFFSET_ATOL)."""
    _, case, tensors, reference = golden_float64(name)
    assert 'weight_rule' not in case and len(reference) == len(case['inputs'])
    for index, outputs in enumerate(reference):
        expected = [target.double() for target in golden_expected(tensors, index)]
        _assert_outputs(outputs, expected, LARGE_OFFSET_ATOL[name], f'{name} input {index}')


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
@pytest.mark.parametrize('name', MODEL_CASES)
def test_backend_is_the_same_function_in_float64(name, backend, golden_float64, monkeypatch):
    """In float64, rounding no longer matters: every output of every large-offset case equals the reference
    backend's to 1e-10."""
    model, case, tensors, reference = golden_float64(name)
    set_backend(backend)
    for index, expected in enumerate(reference):
        outputs = golden_outputs(model, tensors[f'input.{index}'].double())
        _assert_outputs(outputs, expected, 1e-10, f'{name} input {index}')


# ---- weight formats -------------------------------------------------------------------------------------------


def test_checkpoint_filter_accepts_every_format():
    model, _, _ = golden_model('tiny_s')  # has layer scale: gamma1/gamma2 vs layer_scale1/2
    _, official, _ = load_model_case('tiny_s')
    expected = checkpoint_filter_fn(official, model)
    hf_format = {'model.' + k.replace('gamma1', 'layer_scale1').replace('gamma2', 'layer_scale2'): v
                 for k, v in official.items()}
    for state_dict in ({'model': official}, hf_format, model.state_dict()):
        converted = checkpoint_filter_fn(state_dict, model)
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_checkpoint_filter_maps_stage2_post_norms_to_their_blocks():
    model, _, _ = golden_model('tiny_g')
    _, official, _ = load_model_case('tiny_g')
    converted = checkpoint_filter_fn(official, model)
    for index, block in enumerate((1, 3, 5)):
        assert torch.equal(converted[f'stages.2.blocks.{block}.out_norm.weight'],
                           official[f'levels.2.post_norms.{index}.0.weight'])


# ---- the timm API ---------------------------------------------------------------------------------------------


def test_registry_lists_all_variants_and_tags():
    assert timm.list_models(module='internimage') == sorted(VARIANTS) == timm.list_models('internimage*')
    pretrained = timm.list_models('internimage*', pretrained=True)
    assert 'internimage_t.in1k' in pretrained and len(pretrained) == 11 + 26  # classification + detection/segmentation


@pytest.mark.parametrize('name', VARIANTS)
def test_full_size_parameter_counts_match_official(name):
    import json
    from pathlib import Path
    reference = Path(__file__).parent / 'data' / 'variants.json'
    expected = json.loads(reference.read_text())[name]
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == expected['params']
    assert len(model.state_dict()) == expected['num_keys']


def test_issue_example_and_overrides():
    model = timm.create_model('internimage_t', num_classes=10, drop_path_rate=0.1, in_chans=1, **TINY)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    features = timm.create_model('internimage_b', features_only=True, out_indices=(1, 2, 3))
    assert features.feature_info.channels() == [224, 448, 896]
    assert features.feature_info.reduction() == [8, 16, 32]


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_features_only_returns_nchw_stage_outputs(name):
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    torch.manual_seed(0)
    features = tiny_model(name, features_only=True, out_indices=(0, 2, 3)).eval()
    x = torch.randn(2, 3, 64, 96)
    outputs = features(x)
    expected = model.forward_intermediates(x, indices=[0, 2, 3], intermediates_only=True)
    assert [o.shape[1] for o in outputs] == features.feature_info.channels()
    for output, target, reduction in zip(outputs, expected, features.feature_info.reduction()):
        assert output.shape[-2:] == (64 // reduction, 96 // reduction)
        torch.testing.assert_close(output, target)


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_fx_feature_extraction_returns_nchw_stage_outputs(name):
    """``feature_cls='fx'`` and timm's ``create_feature_extractor`` on the stages give the NCHW intermediates."""
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    x = torch.randn(1, 3, 64, 96)
    expected = model.forward_intermediates(x, intermediates_only=True)
    torch.manual_seed(0)
    features = tiny_model(name, features_only=True, feature_cls='fx').eval()
    extractor = create_feature_extractor(model, return_nodes={f'stages.{i}': str(i) for i in range(4)})
    for outputs in (features(x), list(extractor(x).values())):
        assert [o.shape for o in outputs] == [e.shape for e in expected]
        for output, target in zip(outputs, expected):
            torch.testing.assert_close(output, target)


@pytest.mark.parametrize('size', [(80, 80), (720, 1280)])
def test_hg_stage_outputs_take_any_size(size):
    """The even ``ceil(side / 16)`` rule is the fused stride-16 neck's: stage outputs take any size."""
    model = tiny_model('internimage_h', depths=(1, 1, 1, 1), level2_post_norm_block_ids=()).eval()
    x = torch.randn(1, 3, *size)
    intermediates = model.forward_intermediates(x, intermediates_only=True)
    features = tiny_model('internimage_h', depths=(1, 1, 1, 1), level2_post_norm_block_ids=(), features_only=True)
    for outputs in (intermediates, features.eval()(x)):
        assert [o.shape[-2:] for o in outputs] == [
            (-(-size[0] // 2 ** (i + 2)), -(-size[1] // 2 ** (i + 2))) for i in range(4)]
    with pytest.raises(ValueError, match='multiple of 32'):
        model.forward_intermediates(torch.randn(1, 3, 80, 80))


@pytest.mark.parametrize('num_classes', [-1, -1000])
def test_negative_num_classes_is_an_error(num_classes):
    with pytest.raises(ValueError, match=f'num_classes={num_classes} is negative'):
        tiny_model('internimage_t', num_classes=num_classes)
    model = tiny_model('internimage_t')
    with pytest.raises(ValueError, match=f'num_classes={num_classes} is negative'):
        model.reset_classifier(num_classes)


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_forward_intermediates_and_heads(name):
    model = tiny_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, features)
    assert [t.shape[1] for t in intermediates] == [16, 32, 64, 128]
    assert features.shape[1] == model.num_features
    assert features.shape[-2:] == ((4, 4) if name == 'internimage_h' else (2, 2))
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.get_classifier().out_features == 1000


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_reset_classifier(name):
    model = tiny_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre_logits)
    model.reset_classifier(0, '')
    unpooled = model(x)
    assert unpooled.dim() == 4 and unpooled.shape[-2:] == model.forward_features(x).shape[-2:]
    unpooled = tiny_model(name, num_classes=0, global_pool='').eval()
    assert unpooled(x).dim() == 4
    model.reset_classifier(3)  # keeps the (removed) pooling: classifying unpooled maps is a clear error
    with pytest.raises(ValueError, match='no global pooling'):
        model(x)


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_reset_classifier_keeps_device_dtype_and_mode(name):
    model = tiny_model(name).eval().to(device='meta', dtype=torch.float64)
    model.reset_classifier(0, '')
    model.reset_classifier(7, 'attn' if name == 'internimage_h' else 'avg')
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in model.head.parameters())
    assert not any(module.training for module in model.modules())


def test_reset_classifier_keeps_attention_pool_weights():
    model = tiny_model('internimage_g').eval()
    pool_weights = {k: v.clone() for k, v in model.head.attn_pool.state_dict().items()}
    model.reset_classifier(10, 'attn')
    model.reset_classifier(3)
    assert all(torch.equal(model.head.attn_pool.state_dict()[k], v) for k, v in pool_weights.items())


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_g'])
def test_prune_intermediate_layers(name):
    model = tiny_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.stages) == 2
    for output, target in zip(model.forward_intermediates(x, indices=[0, 1], intermediates_only=True), expected):
        torch.testing.assert_close(output, target)


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = tiny_model('internimage_s').train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_every_parameter_gets_a_gradient_and_drop_path_is_active():
    model = tiny_model('internimage_h', drop_path_rate=0.5, num_classes=7).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    first = model(x)
    first.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x))
    assert len(model.no_weight_decay()) > 0 and all(n.endswith(('.gamma', '_bias')) for n in model.no_weight_decay())


def test_group_matcher_covers_all_parameters():
    model = tiny_model('internimage_g')
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(names) for names in groups.values()) == len(list(model.parameters()))


def test_pretrained_cfg_matches_manifest():
    model = tiny_model('internimage_h')
    assert model.pretrained_cfg['tag'] == 'joint_in22k_ft_in1k_640'
    assert model.pretrained_cfg['pool_size'] == (40, 40)
    assert model.default_cfg['first_conv'] == 'stem.conv1' and model.default_cfg['classifier'] == 'head.fc'


@pytest.mark.parametrize('make_input,model_name,message', [
    (lambda: torch.randn(1, 1, 64, 64), 'internimage_t', 'in_chans=1'),
    (lambda: torch.randn(1, 224, 224, 3), 'internimage_t', r'channels last \(N, H, W, C\).*permute\(0, 3, 1, 2\)'),
    (lambda: torch.randn(3, 64, 64), 'internimage_t', '4-D'),
    (lambda: torch.randn(1, 3, 16, 64), 'internimage_t', 'at least 32x32'),
    (lambda: torch.randn(1, 3, 80, 64), 'internimage_h', 'multiple of 32'),
])
def test_bad_inputs_raise_clear_errors(make_input, model_name, message):
    model = tiny_model(model_name).eval()
    with pytest.raises(ValueError, match=message):
        model(make_input())


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match='not divisible by groups'):
        timm.create_model('internimage_t', channels=16, groups=(3, 4, 8, 16))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('internimage_q')
    with pytest.raises(RuntimeError, match='Invalid pretrained tag'):
        timm.create_model('internimage_t.bogus')


@pytest.mark.slow
def test_torchscript_and_fx_and_compile_match_eager():
    """Scripted, FX-traced and compiled (aot_eager) models compute the eager function. Measured (AVX2 EPYC, logits
    of about 1.7): scripted 1.3e-6 (TorchScript runs the layers unfused), FX and compiled bit-identical; the
    tolerance is 5e-6 for both."""
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    model = tiny_model('internimage_h').eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=0, atol=5e-6)
    extractor = create_feature_extractor(model, return_nodes={'head.fc': 'logits'})
    torch.testing.assert_close(extractor(x)['logits'], expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend='aot_eager')(x), expected,
                               rtol=0, atol=5e-6)


def test_importing_registers_quietly_and_lazily():
    import subprocess
    import sys
    code = ('import sys, timm, timm_internimage; '
            'assert "internimage_t" in timm.list_models(); '
            'assert "timm_internimage.pretrained" not in sys.modules')  # the weights code loads on demand
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''


# ---- the fused CPU path -----------------------------------------------------------------------------------------


def _randomised(model):
    """Nonzero offsets, masks and biases everywhere, so every fused term matters."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)
    return model


def _onednn_linear_calls(model, x):
    """How many oneDNN linear calls ``model(x)`` makes (from the profiler), and its output."""
    from torch.profiler import profile
    with torch.inference_mode(), profile() as prof:
        output = model(x)
    calls = sum(event.count for event in prof.key_averages() if event.key == 'mkldnn::_linear_pointwise')
    return calls, output


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_s', 'internimage_h'])
@pytest.mark.parametrize('backend', ['torch', 'compiled'])
def test_fused_linear_runs_on_onednn_and_computes_the_same_function(name, backend, monkeypatch):
    """float32 CPU inference runs the 6 linear layers of every block (with fc1's GELU) as oneDNN calls;
    switched off with set_fused_linear(False) they are ATen's. Both are the float64 model's function to
    float32 rounding: the logits and the four stage outputs, measured at most 2.2e-6 of each tensor's maximum
    with oneDNN and 1.3e-6 with ATen (AVX-512 AMD EPYC, the H case); the tolerance is 1e-5."""
    set_backend(backend)
    torch.manual_seed(0)
    model = _randomised(tiny_model(name)).eval()
    x = torch.randn(2, 3, 64, 64)

    def outputs(images):
        return [*model.forward_intermediates(images, intermediates_only=True), model(images)]

    model.double()
    with torch.inference_mode():
        expected = outputs(x.double())  # float64 runs ATen's linear
    model.float()  # exact: the weights are float32 values
    blocks = sum(len(stage.blocks) for stage in model.stages)
    for enabled, calls in ((False, 0), (True, 6 * blocks)):
        set_fused_linear(enabled)
        assert _onednn_linear_calls(model, x)[0] == calls
        with torch.inference_mode():
            got = outputs(x)
        for value, reference in zip(got, expected):
            scale = reference.abs().max().item()
            torch.testing.assert_close(value.double(), reference, rtol=0, atol=1e-5 * scale)


def test_fused_linear_applies_only_where_it_should(monkeypatch):
    from timm_internimage.ops.linear import use_fused_linear
    x, weight = torch.randn(2, 3), torch.randn(4, 3, requires_grad=True)
    set_backend('torch')
    with torch.no_grad():
        assert use_fused_linear(x, weight)
        assert not use_fused_linear(x.double(), weight.double())
        assert not use_fused_linear(x.to('meta'), weight.to('meta'))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not use_fused_linear(x, weight)
        with torch.backends.mkldnn.flags(enabled=False):
            assert not use_fused_linear(x, weight)
        set_fused_linear(False)
        assert not use_fused_linear(x, weight)
        set_fused_linear(True)
        set_backend('reference')
        assert not use_fused_linear(x, weight)
    set_backend('torch')
    assert not use_fused_linear(x, weight)  # autograd needs ATen's linear
    assert use_fused_linear(x, weight.detach())


@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_model_under_cpu_autocast(backend, monkeypatch):
    """bfloat16 autocast logits (about 0.3 here) next to float32. Largest error measured (AVX2 EPYC, this seed;
    over seeds 0-3): reference 2.8e-3 (3.4e-3), torch 2.0e-3 (2.2e-3), compiled 2.3e-3 (2.5e-3), the same with
    ATen, oneDNN and MKL held to their baseline ISA; the tolerance is 1e-2. Absolute only: logits near 0 make
    relative errors meaningless."""
    set_backend(backend)
    torch.manual_seed(0)
    model = tiny_model('internimage_t').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            output = model(x)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=0, atol=1e-2)


# ---- the official constructor arguments -------------------------------------------------------------------------

# MODEL.INTERN_IMAGE of the official classification configs (classification/configs/internimage_*.yaml of
# OpenGVLab/InternImage), keys lower-cased: the constructor arguments the official build_model passes.
OFFICIAL_CONFIGS = {
    'internimage_t': dict(core_op='DCNv3', depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], channels=64,
                          offset_scale=1.0, mlp_ratio=4.0),
    'internimage_s': dict(core_op='DCNv3', depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], channels=80,
                          layer_scale=1e-5, offset_scale=1.0, mlp_ratio=4.0, post_norm=True),
    'internimage_b': dict(core_op='DCNv3', depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], channels=112,
                          layer_scale=1e-5, offset_scale=1.0, mlp_ratio=4.0, post_norm=True),
    'internimage_l': dict(core_op='DCNv3', depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], channels=160,
                          layer_scale=1e-5, offset_scale=2.0, mlp_ratio=4.0, post_norm=True),
    'internimage_xl': dict(core_op='DCNv3', depths=[5, 5, 24, 5], groups=[12, 24, 48, 96], channels=192,
                           layer_scale=1e-5, offset_scale=2.0, mlp_ratio=4.0, post_norm=True),
    'internimage_h': dict(core_op='DCNv3', depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], channels=320,
                          dw_kernel_size=5, layer_scale=None, offset_scale=1.0, mlp_ratio=4.0, post_norm=False,
                          res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=[5, 11, 17, 23, 29],
                          center_feature_scale=True, use_clip_projector=True),
    'internimage_g': dict(core_op='DCNv3', depths=[2, 2, 48, 4], groups=[16, 32, 64, 128], channels=512,
                          dw_kernel_size=5, layer_scale=None, offset_scale=1.0, mlp_ratio=4.0, post_norm=True,
                          level2_post_norm=True, level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47],
                          center_feature_scale=True, use_clip_projector=True),
}


def official_model(name, **kwargs):
    """``InternImage`` from the official config of ``name``, ``kwargs`` added or overriding."""
    return InternImage(**dict(OFFICIAL_CONFIGS[name], **kwargs))


@pytest.mark.parametrize('name', VARIANTS)
def test_official_config_builds_the_registered_variant(name):
    official = official_model(name, device='meta')
    registered = timm.create_model(name, device='meta')
    assert repr(official) == repr(registered)  # module types and their settings (eps, kernels, drop rates)
    assert ({k: v.shape for k, v in official.state_dict().items()}
            == {k: v.shape for k, v in registered.state_dict().items()})


@pytest.mark.parametrize('name', VARIANTS)
def test_official_config_computes_the_registered_variant(name):
    """Official spelling (with the official act_layer/norm_layer defaults written out) and the registered
    variant, both shrunk alike: the same initialisation, and the same weights give the same outputs."""
    torch.manual_seed(0)
    official = official_model(name, act_layer='GELU', norm_layer='LN', **tiny_kwargs(name)).eval()
    torch.manual_seed(0)
    registered = tiny_model(name).eval()
    official_state, registered_state = official.state_dict(), registered.state_dict()
    assert official_state.keys() == registered_state.keys()
    assert all(torch.equal(official_state[k], registered_state[k]) for k in official_state)
    _randomised(official)
    _randomised(registered)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(official(x), registered(x))


@pytest.mark.parametrize('argument,message', [
    (dict(core_op='DCNv4'), r"core_op='DCNv4' is not supported; InternImage implements core_op='DCNv3'"),
    (dict(act_layer='Swish2'), r"act_layer='Swish2' is not supported; use an official name \['GELU', 'ReLU', 'SiLU'\]"),
    (dict(norm_layer='GN'), r"norm_layer='GN' is not supported; use an official name \['LN', 'BN'\]"),
    (dict(norm_layer=None), r"norm_layer=None is not supported"),
    (dict(drop_path_type='fixed'), r"drop_path_type must be 'linear' or 'uniform', got 'fixed'"),
])
def test_unsupported_official_arguments_raise_clear_errors(argument, message):
    with pytest.raises(ValueError, match=message):
        InternImage(**TINY, **argument, device='meta')


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_act_and_norm_layer_reach_the_official_layers(name):
    """As officially, norm_layer is the norm of the stem, the downsamples, DCNv3's offset/mask branch and the
    H/G head; the blocks keep LayerNorm (eps 1e-6) and the T-XL head its BatchNorm. act_layer is every activation."""
    from timm_internimage.models.internimage import ChannelsLastBatchNorm
    model = tiny_model(name, act_layer='ReLU', norm_layer='BN', device='meta')
    expected = {'stem.norm1', 'stem.norm2', 'stages.1.downsample.norm', 'stages.2.downsample.norm',
                'stages.3.downsample.norm'}
    expected |= {f'stages.{i}.blocks.{j}.dcn.dw_norm' for i, stage in enumerate(model.stages)
                 for j in range(len(stage.blocks))}
    if name == 'internimage_h':
        expected |= {'head.attn_pool.norm_q', 'head.attn_pool.norm_k', 'head.attn_pool.norm_v', 'head.norm'}
    else:
        assert type(model.head.norm) is torch.nn.BatchNorm2d
    assert {n for n, m in model.named_modules() if isinstance(m, ChannelsLastBatchNorm)} == expected
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(layer_norms) > 10 and all(m.eps == 1e-6 for m in layer_norms)
    activations = [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU))]
    blocks = sum(len(stage.blocks) for stage in model.stages)
    has_conv_head = name != 'internimage_h'
    assert len(activations) == 1 + 2 * blocks + has_conv_head  # stem, DCNv3 and MLP per block, T-XL head
    assert all(isinstance(m, torch.nn.ReLU) for m in activations)


@pytest.mark.parametrize('act_layer,norm_layer,act_class,norm_class,eps', [
    ('GELU', 'LN', torch.nn.GELU, torch.nn.LayerNorm, 1e-6),
    ('SiLU', torch.nn.LayerNorm, torch.nn.SiLU, torch.nn.LayerNorm, 1e-6),  # a bare LayerNorm class: official eps
    ('gelu_tanh', timm.layers.LayerNorm, timm.layers.GELUTanh, timm.layers.LayerNorm, 1e-6),
    (timm.layers.QuickGELU, timm.layers.RmsNorm, timm.layers.QuickGELU, timm.layers.RmsNorm, 1e-6),
])
def test_act_and_norm_layer_as_official_names_or_layers(act_layer, norm_layer, act_class, norm_class, eps):
    model = tiny_model('internimage_t', act_layer=act_layer, norm_layer=norm_layer, device='meta')
    block = model.stages[0].blocks[0]
    assert all(type(act) is act_class for act in (model.stem.act, block.dcn.dw_act, block.mlp.act, model.head.act))
    for norm in (model.stem.norm1, model.stem.norm2, model.stages[1].downsample.norm, block.dcn.dw_norm):
        assert type(norm) is norm_class and norm.eps == eps
    assert type(block.norm1) is torch.nn.LayerNorm and block.norm1.eps == 1e-6


def test_norm_layer_partial_keeps_its_eps():
    from functools import partial
    model = tiny_model('internimage_t', norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), device='meta')
    assert model.stem.norm1.eps == 1e-5 and model.stages[0].blocks[0].dcn.dw_norm.eps == 1e-5
    assert model.stages[0].blocks[0].norm1.eps == 1e-6


def test_official_names_keep_the_fused_gelu_and_bn_is_batchnorm_over_channels():
    """'GELU' is torch's GELU (fused into fc1's oneDNN call on CPU); 'BN' is BatchNorm over the last dimension,
    with BatchNorm's state-dict keys, and trains in both heads."""
    from timm_internimage.models.internimage import ChannelsLastBatchNorm
    assert tiny_model('internimage_t', act_layer='GELU').stages[0].blocks[0].mlp.gelu_approximate == 'none'
    channels_last, reference = ChannelsLastBatchNorm(8), torch.nn.BatchNorm2d(8)
    x = torch.randn(4, 5, 6, 8)
    torch.testing.assert_close(channels_last(x), reference(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(channels_last.running_var, reference.running_var)
    assert channels_last.state_dict().keys() == reference.state_dict().keys()
    for name in ('internimage_t', 'internimage_h'):
        model = tiny_model(name, norm_layer='BN').train()
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('drop_path_type', ['linear', 'uniform'])
def test_drop_path_type_sets_the_official_block_rates(drop_path_type):
    """'linear': torch.linspace(0, drop_path_rate, blocks), as officially; 'uniform': drop_path_rate everywhere."""
    model = InternImage(**TINY, drop_path_rate=0.3, drop_path_type=drop_path_type, device='meta')
    blocks = [block for stage in model.stages for block in stage.blocks]
    official = torch.linspace(0, 0.3, len(blocks)).tolist() if drop_path_type == 'linear' else [0.3] * len(blocks)
    for block, rate in zip(blocks, official, strict=True):
        for branch in (block.drop_path1, block.drop_path2):
            assert getattr(branch, 'drop_prob', 0.0) == pytest.approx(rate)  # rate 0: nn.Identity


def test_with_cp_is_gradient_checkpointing(monkeypatch):
    """with_cp=True is set_grad_checkpointing(): every block runs again in backward, and outputs and gradients
    equal the plain model's in float64, with stochastic depth active."""
    from timm_internimage.models.internimage import InternImageBlock
    block_forward, block_calls = InternImageBlock.forward, []

    def counted_block_forward(block, x):
        block_calls.append(block)
        return block_forward(block, x)

    monkeypatch.setattr(InternImageBlock, 'forward', counted_block_forward)
    config = dict(OFFICIAL_CONFIGS['internimage_s'], **TINY, drop_path_rate=0.2)
    plain = InternImage(**config).double().train()
    checkpointed = InternImage(**config, with_cp=True).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.grad_checkpointing and all(stage.grad_checkpointing for stage in checkpointed.stages)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = []
    for model in (plain, checkpointed):
        block_calls.clear()
        torch.manual_seed(1)
        output = model(x)
        gradients = torch.autograd.grad(output.square().sum(), list(model.parameters()))
        results.append((len(block_calls), [output, *gradients]))
    (plain_calls, expected), (checkpointed_calls, actual) = results
    num_blocks = sum(TINY['depths'])
    assert (plain_calls, checkpointed_calls) == (num_blocks, 2 * num_blocks)
    for value, target in zip(actual, expected, strict=True):
        torch.testing.assert_close(value, target, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_compile_dynamic_fullgraph_does_not_recompile_across_batch_sizes(backend, monkeypatch):
    """One graph serves every batch size under ``torch.compile(dynamic=True, fullgraph=True)``: no guard in the
    model or in the op's dispatch and validation specialises on the batch."""
    set_backend(backend)
    torch._dynamo.reset()
    model = tiny_model('internimage_t').eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend='eager')
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 64, 64)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('freezing', [False, True])
def test_inductor_compiles_the_inference_model_with_its_onednn_linear_layers(freezing, monkeypatch):
    """torch.compile with inductor (the default, and with freezing, as users turn it on for CPU inference)
    traces the whole model in one graph, keeps the oneDNN linear layers as calls of their custom op and
    computes the eager function (float32 rounding: measured at most 3e-7 of the logits' maximum)."""
    import torch._inductor.config
    set_backend('auto')
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _randomised(tiny_model('internimage_t')).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), torch._inductor.config.patch(freezing=freezing):
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        _, code = torch._inductor.utils.run_and_get_code(compiled, x)
        output = compiled(x)
    assert 'timm_internimage_cpu.linear' in ''.join(code)
    torch.testing.assert_close(output, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
@pytest.mark.parametrize('indices', [2, [0, 1]])
def test_pruned_head_returns_unpooled_features(name, indices):
    """After prune_intermediate_layers(prune_head=True), model(x) and forward_head return the unpooled features
    of what is kept, as timm's ConvNeXt does; resetting the classifier is a clear error."""
    model = tiny_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model.forward_features(x) if indices == 2 else model.forward_intermediates(
        x, indices=indices, intermediates_only=True)[-1]
    model.prune_intermediate_layers(indices, prune_head=True)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected)
    assert model.num_classes == 0 and model.num_features == expected.shape[1]
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    with pytest.raises(RuntimeError, match='prune_intermediate_layers'):
        model.reset_classifier(5)


def test_trace_passes_the_default_check_and_matches_eager():
    """torch.jit.trace's own check (two traces must agree) passes, the trace holds only ATen ops (no compiled
    op, no oneDNN custom linear), and it matches eager on another input of the same shape."""
    from golden import golden_model
    model, _, tensors = golden_model('tiny_t', torch.float32, calm=True)
    x = tensors['input.0']
    traced = torch.jit.trace(model, x)  # as users call it: grad mode on, parameters that require grad
    assert not [n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith('timm_internimage')]
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(traced(other), model(other), rtol=0, atol=1e-5)
