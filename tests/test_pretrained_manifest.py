"""The pretrained cfgs of both families (models/) and the file facts they read (weights_manifest.json) agree, as do
the docs."""
import json
import re

import pytest
import torch
import timm

from timm_internimage._manifest import (
    dump_manifest, hub_source, load_manifest, manifest_path, published_results, weight_filename)
from timm_internimage.models import dense_tags, pretrained_cfgs
from timm_internimage.models.flash_internimage import DENSE_REPO as FLASH_REPO
from timm_internimage.models.internimage import DENSE_REPO

MODELS = timm.list_models(module=['internimage', 'flash_internimage'])

from conftest import REPO_ROOT, tiny_model



def _classification_cfgs():
    """InternImage's classification tags, each the weights of one Hub repo."""
    return {name: cfg for name, cfg in pretrained_cfgs().items()
            if name not in dense_tags() and cfg.hf_hub_id.partition('@')[0] != FLASH_REPO}


def test_cfgs_read_the_manifest():
    cfgs = pretrained_cfgs()
    assert set(timm.list_pretrained('internimage_*') + timm.list_pretrained('flash_internimage_*')) == set(cfgs)
    assert {name.partition('.')[0] for name in cfgs} == set(MODELS)  # every registered model has tags
    repos = [cfg.hf_hub_id.partition('@')[0] for cfg in _classification_cfgs().values()]
    # each classification repo the manifest lists is one tag's weights; the detection / segmentation tags share one,
    # and the FlashInternImage tags another (official .pth files only)
    assert sorted(repos + [DENSE_REPO, FLASH_REPO]) == sorted(load_manifest()['repos'])
    flash = {name: cfg for name, cfg in cfgs.items() if name.startswith('flash_internimage_')}
    checkpoints = load_manifest()['repos'][FLASH_REPO]['checkpoints']
    assert sorted(cfg.hf_hub_filename for cfg in flash.values()) == sorted(checkpoints)  # one tag per file
    for name, cfg in flash.items():
        assert cfg.hf_hub_id == FLASH_REPO, name
        if name in dense_tags():
            continue  # test_dense.py checks their scores
        assert cfg.description == f'ImageNet-1k top-1 {checkpoints[cfg.hf_hub_filename]["top1"]}% (published)', name
    for (name, cfg), repo_id in zip(_classification_cfgs().items(), repos):
        source = dict(hf_hub_id=cfg.hf_hub_id, hf_hub_filename=cfg.hf_hub_filename, custom_load=cfg.custom_load)
        assert source == hub_source(repo_id), name
    for name in dense_tags():
        repo_id = FLASH_REPO if name.startswith('flash_') else DENSE_REPO
        assert cfgs[name].hf_hub_id == hub_source(repo_id)['hf_hub_id'], name
    for model in MODELS:  # the first tag of each model is its default
        default = f'{model}.{timm.models.get_pretrained_cfg(model).tag}'
        assert default == next(name for name in cfgs if name.startswith(model + '.'))


def test_pinned_entries_pin_the_cfg(manifest_entry):
    repo_id = 'OpenGVLab/internimage_g_22kto1k_512'
    manifest_entry(repo_id, revision='a' * 40)
    assert hub_source(repo_id) == dict(hf_hub_id=f'{repo_id}@{"a" * 40}',
                                       hf_hub_filename='model.safetensors.index.json', custom_load='hf')
    assert hub_source('OpenGVLab/internimage_t_1k_224') == dict(
        hf_hub_id='OpenGVLab/internimage_t_1k_224', hf_hub_filename='model.safetensors', custom_load=False)


@pytest.mark.parametrize('model', MODELS)
def test_pool_size_is_the_feature_map_size(model):
    for name, cfg in timm.models.get_arch_pretrained_cfgs(model).items():
        tag_args = dense_tags()[name].model_args if name in dense_tags() else {}
        stride = 64 // tiny_model(model, **tag_args).forward_features(torch.randn(1, 3, 64, 64)).shape[-1]
        assert cfg.pool_size == (cfg.input_size[1] // stride, cfg.input_size[2] // stride), name


def test_manifest_entries_are_well_formed():
    for repo_id, entry in load_manifest()['repos'].items():
        if 'checkpoints' in entry:  # the official .pth, one per tag: InternImage's det/seg ones, FlashInternImage
            assert repo_id in (DENSE_REPO, FLASH_REPO) and 'file' not in entry and 'index_file' not in entry
            assert set(entry['files']) <= set(entry['checkpoints'])
            assert all(name.endswith('.pth') for name in entry['checkpoints'])
            continue
        assert entry['original_pth']['repo'] == 'OpenGVLab/InternImage'
        assert entry['original_pth']['filename'].endswith('.pth')
        assert not ('file' in entry and 'index_file' in entry)
        pinned = re.fullmatch(r'[0-9a-f]{40}', entry['revision']) is not None
        # whatever has not been checked against the Hub says so
        assert pinned == ('revision' not in entry['unverified']), repo_id
        assert bool(entry['files']) == ('files' not in entry['unverified']), repo_id
        assert (weight_filename(entry) is None) == ('layout' in entry['unverified']), repo_id
        for name, meta in entry['files'].items():
            assert re.fullmatch(r'[0-9a-f]{64}', meta['sha256']) and meta['size'] > 0, (repo_id, name)
        if entry['files']:
            assert weight_filename(entry) in entry['files']
    for name, cfg in pretrained_cfgs().items():  # a published top-1 is an ImageNet-1k one
        published = published_results(cfg.hf_hub_id.partition('@')[0], cfg.hf_hub_filename)
        assert published and (published.get('top1') is None) == (cfg.num_classes != 1000), name
        assert ('scores' in published) == (cfg.num_classes == 0), name


def test_checked_in_file_is_canonical_and_shipped():
    text = (REPO_ROOT / 'weights_manifest.json').read_text()
    assert dump_manifest(json.loads(text)) == text
    assert manifest_path().read_text() == text  # the package ships this very file


def test_weights_doc_table_matches_the_cfgs():
    rows = re.findall(r'^\| `([\w.]+)` \| \[([\w/]+)\]\(https://huggingface.co/([\w/]+)\) \| (\d+) \| (\d+) \| '
                      r'([\d.–]+) \| ([^|]+) \|$', (REPO_ROOT / 'docs' / 'weights.md').read_text(), re.MULTILINE)
    repos = load_manifest()['repos']
    documented = {}
    for name, repo_id, link, classes, side, top1, size in rows:
        assert repo_id == link
        entry = repos[repo_id]
        documented[name] = (repo_id, int(classes), int(side))
        assert top1 == ('–' if entry['top1'] is None else str(entry['top1'])), name
        assert size.strip().startswith(entry['approx_size']), name
    assert documented == {name: (cfg.hf_hub_id.partition('@')[0], cfg.num_classes, cfg.input_size[1])
                          for name, cfg in _classification_cfgs().items()}
    assert list(documented) == list(_classification_cfgs())
