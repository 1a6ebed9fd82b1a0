"""hubconf.py through torch.hub with source='local'."""

import pytest
import torch
import timm

from conftest import REPO_ROOT, TINY, assert_same_weights, import_file, official_model
from hub_server import hf_format, single_file_repo, tiny_case



def _hubconf():
    return import_file('hubconf.py')


def test_one_documented_entrypoint_per_model():
    hubconf = _hubconf()
    models = timm.list_models(['internimage_*', 'flash_internimage_*'])
    assert sorted(name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith('_')) \
        == sorted(models)
    for name in models:
        doc = getattr(hubconf, name).__doc__  # what torch.hub.help returns
        assert 'pretrained' in doc and 'features_only' in doc
        tags = [tag.split('.', 1)[1] for tag in timm.models.get_arch_pretrained_cfgs(name)]
        assert f'one of {tags} (default {tags[0]!r})' in doc
    assert {'torch', 'timm', 'huggingface_hub', 'safetensors'} <= set(hubconf.dependencies)


def test_hub_load_local_random_init_and_kwargs():
    model = torch.hub.load(str(REPO_ROOT), 'internimage_t', source='local', num_classes=5, **TINY)
    assert model.head.fc.out_features == 5 and model.stem.conv1.out_channels == 8
    features = torch.hub.load(str(REPO_ROOT), 'internimage_t', source='local', features_only=True, out_indices=(1, 3),
                              **TINY)
    outs = features(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]


def test_hub_load_local_pretrained_tag(hf_env):
    kwargs, official = tiny_case('tiny_l', num_classes=21841)
    hf_env.hub.add_repo('OpenGVLab/internimage_l_22k_384', single_file_repo(hf_format(official)))
    model = torch.hub.load(str(REPO_ROOT), 'internimage_l', source='local', pretrained=True, tag='in22k_384', **kwargs)
    assert model.pretrained_cfg['tag'] == 'in22k_384'
    assert_same_weights(model, official_model('internimage_l', kwargs, official))
    assert any(p.endswith('/OpenGVLab/internimage_l_22k_384/resolve/main/model.safetensors')
               for _, p in hf_env.hub.requests)


def test_hub_unknown_tag():
    with pytest.raises(ValueError, match=r"internimage_t has no pretrained tag 'in21k'; choose one of \['in1k', "
                                         r"'coco_mask_rcnn_1x', "):
        torch.hub.load(str(REPO_ROOT), 'internimage_t', source='local', pretrained=True, tag='in21k', **TINY)
