"""weights_manifest.json is the single source of truth: timm's registered cfgs must agree with it."""
import json
import re
from pathlib import Path

import timm

import timm_internimage  # noqa: F401
from timm_internimage._manifest import dump_manifest, load_manifest, manifest_path, weight_filename

REPO_ROOT = Path(__file__).resolve().parents[1]
ISSUE_TABLE = {  # model.tag -> (Hub repo, classes, input side), as specified in issue 3
    'internimage_t.in1k': ('OpenGVLab/internimage_t_1k_224', 1000, 224),
    'internimage_s.in1k': ('OpenGVLab/internimage_s_1k_224', 1000, 224),
    'internimage_b.in1k': ('OpenGVLab/internimage_b_1k_224', 1000, 224),
    'internimage_l.in22k_ft_in1k_384': ('OpenGVLab/internimage_l_22kto1k_384', 1000, 384),
    'internimage_l.in22k_384': ('OpenGVLab/internimage_l_22k_384', 21841, 384),
    'internimage_xl.in22k_ft_in1k_384': ('OpenGVLab/internimage_xl_22kto1k_384', 1000, 384),
    'internimage_xl.in22k_384': ('OpenGVLab/internimage_xl_22k_384', 21841, 384),
    'internimage_h.joint_in22k_ft_in1k_640': ('OpenGVLab/internimage_h_22kto1k_640', 1000, 640),
    'internimage_h.joint_in22k_384': ('OpenGVLab/internimage_h_jointto22k_384', 21841, 384),
    'internimage_g.joint_in22k_ft_in1k_512': ('OpenGVLab/internimage_g_22kto1k_512', 1000, 512),
    'internimage_g.joint_in22k_384': ('OpenGVLab/internimage_g_jointto22k_384', 21841, 384),
}


def test_manifest_lists_the_issue_tags_in_order():
    models = load_manifest()['models']
    assert list(models) == list(ISSUE_TABLE)
    for tag, (repo, classes, side) in ISSUE_TABLE.items():
        entry = models[tag]
        assert (entry['hf_hub_id'], entry['num_classes'], entry['input_size']) == (repo, classes, [3, side, side])


def test_registered_cfgs_match_manifest():
    models = load_manifest()['models']
    assert set(timm.list_pretrained('internimage_*')) == set(models)
    for tag, entry in models.items():
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert cfg['hf_hub_id'] == entry['hf_hub_id']
        assert cfg.get('hf_hub_filename') == weight_filename(entry)
        assert cfg['num_classes'] == entry['num_classes']
        assert list(cfg['input_size']) == entry['input_size']
        for key in ('crop_pct', 'crop_mode', 'interpolation', 'license'):
            assert cfg[key] == entry[key], (tag, key)
        assert list(cfg['mean']) == entry['mean'] and list(cfg['std']) == entry['std']
        assert cfg['first_conv'] == 'stem.conv1' and cfg['classifier'] == 'head.fc'
    # the first tag of each model is its default
    for name in {t.split('.')[0] for t in models}:
        default = next(t for t in models if t.split('.')[0] == name)
        assert timm.models.get_pretrained_cfg(name).tag == default.split('.', 1)[1]


def test_manifest_entries_are_well_formed():
    for tag, entry in load_manifest()['models'].items():
        assert entry['crop_pct'] == 1.0 and entry['crop_mode'] == 'center' and entry['interpolation'] == 'bicubic'
        assert entry['mean'] == [0.485, 0.456, 0.406] and entry['std'] == [0.229, 0.224, 0.225]
        assert not ('file' in entry and 'index_file' in entry)
        assert entry['original_pth']['repo'] == 'OpenGVLab/InternImage'
        assert entry['original_pth']['filename'].endswith('.pth')
        assert (entry['top1'] is None) == (entry['num_classes'] == 21841)
        pinned = re.fullmatch(r'[0-9a-f]{40}', entry['revision']) is not None
        # whatever has not been checked against the Hub says so
        assert pinned == ('revision' not in entry['unverified']), tag
        assert bool(entry['files']) == ('files' not in entry['unverified']), tag
        assert (weight_filename(entry) is None) == ('layout' in entry['unverified']), tag
        for name, meta in entry['files'].items():
            assert re.fullmatch(r'[0-9a-f]{64}', meta['sha256']) and meta['size'] > 0, (tag, name)
        if entry['files']:
            assert weight_filename(entry) in entry['files']


def test_checked_in_file_is_canonical_and_shipped():
    path = REPO_ROOT / 'weights_manifest.json'
    text = path.read_text()
    assert dump_manifest(json.loads(text)) == text
    assert manifest_path().read_text() == text  # the package ships this very file
