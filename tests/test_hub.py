"""hubconf.py through torch.hub with source='local'."""
import importlib.util
from pathlib import Path

import pytest
import torch
import timm

from timm_internimage import checkpoint_filter_fn
from timm_internimage._manifest import load_manifest

from hub_server import hf_format, single_file_repo, tiny_case

REPO_ROOT = str(Path(__file__).resolve().parents[1])
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(2, 4, 8, 16))


def _hubconf():
    spec = importlib.util.spec_from_file_location('hubconf_under_test', Path(REPO_ROOT) / 'hubconf.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_entrypoint_per_model_with_docs():
    hubconf = _hubconf()
    models = {tag.split('.')[0] for tag in load_manifest()['models']}
    for name in models:
        entry = getattr(hubconf, name)
        tags = [t.split('.', 1)[1] for t in load_manifest()['models'] if t.split('.')[0] == name]
        # torch.hub.help returns exactly this docstring
        assert entry.__doc__ and 'pretrained' in entry.__doc__ and 'features_only' in entry.__doc__
        for tag in tags:
            assert tag in entry.__doc__
    assert {'torch', 'timm', 'huggingface_hub', 'safetensors'} <= set(hubconf.dependencies)


def test_hub_load_local_random_init_and_kwargs():
    model = torch.hub.load(REPO_ROOT, 'internimage_t', source='local', num_classes=5, **TINY)
    assert model.head.fc.out_features == 5 and model.stem.conv1.out_channels == 8
    features = torch.hub.load(REPO_ROOT, 'internimage_t', source='local', features_only=True, out_indices=(1, 3), **TINY)
    outs = features(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]


def test_hub_load_local_pretrained_tag(hf_env):
    kwargs, official = tiny_case('tiny_l')
    hf_env.hub.add_repo('OpenGVLab/internimage_l_22k_384', single_file_repo(hf_format(
        {k: v for k, v in tiny_case('tiny_l', num_classes=21841)[1].items()})))
    model = torch.hub.load(REPO_ROOT, 'internimage_l', source='local', pretrained=True, tag='in22k_384',
                           **dict(kwargs, num_classes=21841))
    assert model.pretrained_cfg['tag'] == 'in22k_384'
    reference = timm.create_model('internimage_l', **dict(kwargs, num_classes=21841))
    reference.load_state_dict(checkpoint_filter_fn(tiny_case('tiny_l', num_classes=21841)[1], reference))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert any(p.endswith('/OpenGVLab/internimage_l_22k_384/resolve/main/model.safetensors')
               for _, p in hf_env.hub.requests)


def test_hub_unknown_tag():
    with pytest.raises(ValueError, match='in1k'):
        torch.hub.load(REPO_ROOT, 'internimage_t', source='local', pretrained=True, tag='in21k', **TINY)
