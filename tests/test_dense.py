"""Detection and segmentation backbones: official mmdet / mmseg checkpoints (mmcv 1.x layout) load into
``features_only`` InternImage exactly, by tag or by file, and a checkpoint that does not hold the backbone is an
error, never a silently random backbone."""
import json
import logging
import math

import numpy as np
import pytest
import torch
import timm

from timm_internimage import set_backend
from timm_internimage.models.internimage import DENSE_REPO, DENSE_TAGS, dense_scores
from timm_internimage.pretrained import PretrainedWeightsError

from conftest import ALL_BACKENDS, KERNEL_BACKENDS, REPO_ROOT, import_file, tiny_model
from golden import DENSE_CASES, dense_model_kwargs, load_dense_case
from hub_server import tiny_case

HEADS = {'mmdet': ('neck.', 'rpn_head.', 'roi_head.'), 'mmseg': ('decode_head.', 'auxiliary_head.')}
MASK_RCNN_T = 'internimage_t.coco_mask_rcnn_1x'


class _NotData:
    pass


def save_mmcv_checkpoint(path, backbone, framework='mmdet', meta_extra=None):
    """``backbone`` (keys ``backbone.*``) saved as mmcv 1.x's ``save_checkpoint`` writes a detector or segmentor:
    ``meta`` (versions, config text, ``CLASSES`` tuple, ``hook_msgs`` with a numpy best score), the whole model's
    ``state_dict`` (neck and heads beside the backbone) and the ``optimizer`` state."""
    state_dict = dict(backbone)
    for prefix in HEADS[framework]:
        state_dict[prefix + 'conv.weight'] = torch.randn(8, 4, 1, 1)
        state_dict[prefix + 'conv.bias'] = torch.randn(8)
    meta = {f'{framework}_version': '2.28.2', 'mmcv_version': '1.7.1', 'env_info': 'sys.platform: linux',
            'config': "model = dict(type='MaskRCNN', backbone=dict(type='InternImage'))", 'seed': 42,
            'exp_name': 'mask_rcnn_internimage_t_fpn_1x_coco.py', 'CLASSES': ('person', 'bicycle', 'car'),
            'epoch': 12, 'iter': 87960, 'time': 'Thu Nov 17 20:50:41 2022',
            'hook_msgs': {'last_ckpt': 'work_dirs/epoch_12.pth', 'best_score': np.float64(0.472), 'best_ckpt': 'a'}}
    meta.update(meta_extra or {})
    optimizer = {'state': {0: {'step': torch.tensor(5.0), 'exp_avg': torch.zeros(3), 'exp_avg_sq': torch.zeros(3)}},
                 'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.999), 'weight_decay': 0.05, 'params': [0]}]}
    torch.save({'meta': meta, 'state_dict': state_dict, 'optimizer': optimizer}, path)
    return path


def _golden_file(tmp_path, name, framework='mmdet', filename=None):
    case, backbone, tensors = load_dense_case(name)
    path = save_mmcv_checkpoint(tmp_path / (filename or f'{name}.pth'), backbone, framework)
    return case, path, tensors


def _assert_taps(features, case, tensors, output_fmt='NCHW'):
    with torch.no_grad():
        taps = features(tensors['input'])
    assert len(taps) == len(case['out_indices'])
    for tap, index in zip(taps, case['out_indices']):
        expected = tensors[f'out{index}']
        if output_fmt == 'NHWC':
            expected = expected.permute(0, 2, 3, 1)
        assert tap.dtype == torch.float32 and tap.shape == expected.shape, index
        torch.testing.assert_close(tap, expected, rtol=0, atol=1e-4, msg=f'out{index}')


# ---- equal to the official backbone ----------------------------------------------------------------------------


@pytest.mark.parametrize('backend', ALL_BACKENDS)
@pytest.mark.parametrize('name', DENSE_CASES)
def test_official_backbone_from_an_mmcv_checkpoint(name, backend, tmp_path, monkeypatch):
    """The three golden backbones (Mask R-CNN T, DINO L, UperNet H configs), saved as mmdet / mmseg checkpoints
    and loaded by file with their config's arguments, give the official taps within 1e-4 on every backend."""
    set_backend(backend)
    case, path, tensors = _golden_file(tmp_path, name, 'mmseg' if 'upernet' in name else 'mmdet')
    features = timm.create_model('internimage_t', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **dense_model_kwargs(case)).eval()
    assert features.feature_info.out_indices == tuple(case['out_indices'])
    _assert_taps(features, case, tensors)


def test_neck_and_head_keys_are_dropped_with_one_log_line(tmp_path, caplog):
    case, path, tensors = _golden_file(tmp_path, 'tiny_mask_rcnn_t')
    with caplog.at_level(logging.INFO, logger='timm_internimage'):
        features = timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(path)), **case['overrides']).eval()
    lines = [r.getMessage() for r in caplog.records if 'neck/head keys' in r.getMessage()]
    assert lines == ['Loading the backbone of a detection/segmentation checkpoint: dropped 6 neck/head keys '
                     '(neck., rpn_head., roi_head.)']
    _assert_taps(features, case, tensors)


def test_dense_tag_applies_the_checkpoint_model_args(tmp_path):
    """T's detection config has layer_scale=1.0 (the classification T has no layer scale): the tag builds it, the
    plain model refuses the checkpoint's gamma keys instead of ignoring them."""
    case, path, tensors = _golden_file(tmp_path, 'tiny_mask_rcnn_t')
    tiny = case['overrides']
    features = timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **tiny).eval()
    _assert_taps(features, case, tensors)
    with pytest.raises(PretrainedWeightsError, match=rf'{path}.*Unexpected key\(s\) that look like a backbone\'s.*'
                                                     r'"levels\.0\.blocks\.0\.gamma1"'):
        timm.create_model('internimage_t', features_only=True, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **tiny)


def test_dino_tag_taps_its_config_out_indices(tmp_path):
    case, path, tensors = _golden_file(tmp_path, 'tiny_dino_l')
    overlay = dict(file=str(path))
    features = timm.create_model('internimage_l.coco_dino_1x', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=overlay, **case['overrides']).eval()
    assert features.feature_info.out_indices == (1, 2, 3)
    _assert_taps(features, case, tensors)
    features = timm.create_model('internimage_l.coco_dino_1x', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=overlay, out_indices=(3,), **case['overrides']).eval()
    with torch.no_grad():
        (tap,) = features(tensors['input'])
    torch.testing.assert_close(tap, tensors['out3'], rtol=0, atol=1e-4)


def test_upernet_h_tag_is_a_plain_backbone(tmp_path):
    """The H segmentation backbone has no clip projector; its tag builds it without one."""
    case, path, tensors = _golden_file(tmp_path, 'tiny_upernet_h', 'mmseg')
    tiny = {k: v for k, v in case['overrides'].items()}
    features = timm.create_model('internimage_h.ade20k_upernet_896', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **tiny).eval()
    _assert_taps(features, case, tensors)


# ---- never a silently random backbone --------------------------------------------------------------------------


def _resnet_backbone():
    import torchvision
    return {f'backbone.{k}': v for k, v in torchvision.models.resnet18().state_dict().items()}


@pytest.mark.parametrize('features_only', [True, False])
@pytest.mark.parametrize('problem', ['resnet', 'resnet_plain', 'missing_tensor', 'unknown_backbone_key'])
def test_a_checkpoint_without_the_backbone_is_an_error(problem, features_only, tmp_path):
    case, backbone, _ = load_dense_case('tiny_mask_rcnn_t')
    if problem == 'resnet':
        backbone = _resnet_backbone()
    elif problem == 'missing_tensor':
        del backbone['backbone.levels.2.blocks.1.dcn.offset.weight']
    elif problem == 'unknown_backbone_key':
        backbone['backbone.levels.4.blocks.0.norm1.0.weight'] = torch.ones(16)
    path = tmp_path / f'{problem}.pth'
    if problem == 'resnet_plain':  # a torchvision classification checkpoint, no wrapper
        torch.save({k[len('backbone.'):]: v for k, v in _resnet_backbone().items()}, path)
    else:
        save_mmcv_checkpoint(path, backbone)
    expected = {
        'resnet': r'Missing key\(s\) in the backbone \(\d+ of \d+\): "stem\.conv1\.weight"',
        'resnet_plain': r'Missing key\(s\) in the backbone \(\d+ of \d+\): "stem\.conv1\.weight"',
        'missing_tensor':
            r'Missing key\(s\) in the backbone \(1 of \d+\): "stages\.2\.blocks\.1\.dcn\.offset\.weight"\.',
        'unknown_backbone_key': r'Unexpected key\(s\) .*"levels\.4\.blocks\.0\.norm1\.0\.weight"',
    }[problem]
    with pytest.raises(PretrainedWeightsError, match=rf'^{path} does not hold the backbone .*{expected}'):
        timm.create_model(MASK_RCNN_T, features_only=features_only, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **case['overrides'])


def test_meta_with_other_objects_is_refused(tmp_path):
    _, backbone, _ = load_dense_case('tiny_mask_rcnn_t')
    path = save_mmcv_checkpoint(tmp_path / 'unsafe.pth', backbone, meta_extra={'runner': _NotData()})
    with pytest.raises(RuntimeError, match=r'weights_only=True blocked .*test_dense\._NotData'):
        timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), channels=16, depths=(1, 1, 2, 1))


# ---- tags ------------------------------------------------------------------------------------------------------


def test_every_published_plain_backbone_checkpoint_has_a_tag():
    from timm_internimage._manifest import repo_entry
    published = set(repo_entry(DENSE_REPO)['checkpoints'])
    assert {tag.filename for tag in DENSE_TAGS.values()} == published and len(published) == len(DENSE_TAGS) == 26
    for name, tag in DENSE_TAGS.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id.partition('@')[0] == DENSE_REPO, name
        assert cfg.hf_hub_filename == tag.filename and cfg.num_classes == 0, name
        assert cfg.input_size == (3, *tag.input_size) and cfg.license == 'mit' and cfg.paper_ids, name
        for metric, value in dense_scores(tag.filename).items():
            assert f'{metric} {value}' in cfg.description, name
        assert not name.split('.')[1].startswith('cb'), name  # no CB-InternImage (composite backbone)
        default = timm.models.get_pretrained_cfg(name.split('.')[0])
        assert default.num_classes != 0  # a classification tag stays each model's default


def test_hub_tag_loads_the_official_pth_end_to_end(hf_env):
    """``timm.create_model('<det tag>', features_only=True, pretrained=True)`` alone: the official mmdet ``.pth``
    from OpenGVLab/InternImage on the (fake) Hub, loaded weights_only, equal to the official backbone; then
    offline from the cache."""
    import io
    case, backbone, tensors = load_dense_case('tiny_mask_rcnn_t')
    data = io.BytesIO()
    save_mmcv_checkpoint(data, backbone)
    filename = DENSE_TAGS[MASK_RCNN_T].filename
    hf_env.hub.add_repo(DENSE_REPO, {filename: data.getvalue(), 'README.md': b'InternImage'})
    features = timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True, **case['overrides']).eval()
    _assert_taps(features, case, tensors)
    assert any(path.endswith('/' + filename) for _, path in hf_env.hub.requests)
    hf_env.set_offline(True)
    features = timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True, **case['overrides']).eval()
    _assert_taps(features, case, tensors)


def test_pickled_files_the_manifest_does_not_list_are_not_fetched(hf_env):
    hf_env.hub.add_repo(DENSE_REPO, {'other.pth': b'not fetched'})
    with pytest.raises(PretrainedWeightsError, match='refusing to load OpenGVLab/InternImage/other.pth'):
        timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True, channels=16, depths=(1, 1, 2, 1),
                          pretrained_cfg_overlay=dict(hf_hub_filename='other.pth'))
    assert not [path for _, path in hf_env.hub.requests if path.endswith('other.pth')]


def test_list_shows_dense_tags_with_task_and_score(capsys):
    from timm_internimage.cli import main
    assert main(['list']) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert 'detection' in lines[MASK_RCNN_T] and 'box AP 47.2' in lines[MASK_RCNN_T]
    assert 'segmentation' in lines['internimage_h.ade20k_upernet_896']
    assert 'mIoU (ss) 59.9' in lines['internimage_h.ade20k_upernet_896']
    assert 'classification' in lines['internimage_t.in1k'] and 'top-1 83.5' in lines['internimage_t.in1k']
    assert main(['list', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[MASK_RCNN_T]['task'] == 'detection' and rows[MASK_RCNN_T]['scores'] == {'box AP': 47.2, 'mask AP': 42.5}


# ---- convert ---------------------------------------------------------------------------------------------------


def test_convert_an_mmcv_checkpoint(tmp_path):
    """``convert`` recognises an official detection file by name, applies its tag and writes the backbone, which
    loads back as the official backbone."""
    from timm_internimage.tools.convert import convert
    case, path, tensors = _golden_file(tmp_path, 'tiny_mask_rcnn_t', filename=DENSE_TAGS[MASK_RCNN_T].filename)
    out = convert(str(path), str(tmp_path / 'converted'), model_kwargs=dict(case['overrides']))
    features = timm.create_model(f'local-dir:{out}', features_only=True, pretrained=True).eval()
    _assert_taps(features, case, tensors)


# ---- NHWC taps -------------------------------------------------------------------------------------------------


def test_nhwc_intermediates_and_features(tmp_path):
    case, path, tensors = _golden_file(tmp_path, 'tiny_mask_rcnn_t')
    overlay = dict(file=str(path))
    features = timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True, pretrained_cfg_overlay=overlay,
                                 output_fmt='NHWC', **case['overrides']).eval()
    _assert_taps(features, case, tensors, output_fmt='NHWC')
    model = features.model
    x = tensors['input']
    with torch.no_grad():
        nchw = model.forward_intermediates(x, intermediates_only=True)
        nhwc = model.forward_intermediates(x, intermediates_only=True, output_fmt='NHWC')
    for a, b in zip(nchw, nhwc):
        assert b.is_contiguous()  # the blocks' own channels-last maps, no copy
        torch.testing.assert_close(b, a.permute(0, 2, 3, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC'"):
        model.forward_intermediates(x, output_fmt='NLC')
    with pytest.raises(ValueError, match='output_fmt applies to features_only models'):
        timm.create_model('internimage_t', output_fmt='NHWC', **case['overrides'])


def test_classification_checkpoint_still_loads_by_file(tmp_path):
    """The classification layouts keep loading (``model`` wrapper), through the same checks."""
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path / 'internimage_t_1k_224.pth'
    torch.save({'model': official}, path)
    features = timm.create_model('internimage_t', features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert len(features(torch.randn(1, 3, 64, 64))) == 4


# ---- examples: a real detector and a segmenter, end to end -----------------------------------------------------



def _example(name):
    """``examples/<name>.py`` imported as a module (the examples are scripts, not a package)."""
    return import_file(f'examples/{name}.py')


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_detection_example_trains_and_detects(backend, tmp_path, monkeypatch):
    """torchvision Mask R-CNN over the Mask R-CNN T backbone (loaded from an mmdet checkpoint): one training step
    on the generated COCO dataset, then inference on the bundled photo."""
    set_backend(backend)
    detection = _example('detection')
    case, path, _ = _golden_file(tmp_path, 'tiny_mask_rcnn_t')
    torch.manual_seed(0)
    small = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                 rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)  # a small, fast detector
    detector = detection.build_detector(MASK_RCNN_T, min_size=96, max_size=128, fpn_channels=32, detector_kwargs=small,
                                        pretrained_cfg_overlay=dict(file=str(path)), **case['overrides'])
    stem_before = detector.backbone.body.model.stem.conv1.weight.detach().clone()
    dataset = detection.CocoInstances(detection.make_coco_dataset(tmp_path / 'coco', num_images=2, size=(96, 128)))
    image, target = dataset[0]
    assert image.shape == (3, 96, 128) and target['boxes'].shape[1] == 4
    assert target['masks'].shape[1:] == (96, 128) and int(target['masks'][0].sum()) > 0
    groups = detection.optimizer_param_groups(detector, lr=1e-3)
    assert min(g['lr'] for g in groups) < 1e-3 == max(g['lr'] for g in groups)  # layer-wise decay on the backbone
    (loss,) = detection.train(detector, dataset, steps=1, lr=1e-3, log_every=0)
    assert math.isfinite(loss)
    assert not torch.equal(detector.backbone.body.model.stem.conv1.weight, stem_before)  # the backbone trains
    from timm_internimage.tools.images import sample_image_path
    detections = detection.detect(detector, sample_image_path(), score_threshold=0.0)
    for label, score, box in detections:
        assert 1 <= label <= len(detection.COLOURS) and 0 <= score <= 1 and len(box) == 4


@pytest.mark.parametrize('backend', KERNEL_BACKENDS)
def test_segmentation_example_trains_and_segments(backend, tmp_path, monkeypatch):
    set_backend(backend)
    segmentation = _example('segmentation')
    case, path, _ = _golden_file(tmp_path, 'tiny_mask_rcnn_t', 'mmseg')
    torch.manual_seed(0)
    model = segmentation.FPNSegmenter('internimage_t.ade20k_upernet_512', head_channels=16,
                                      pretrained_cfg_overlay=dict(file=str(path)), **case['overrides'])
    (loss,) = segmentation.train(model, steps=1, size=(64, 64), log_every=0)
    assert math.isfinite(loss)
    from timm_internimage.tools.images import sample_image_path
    classes = segmentation.segment(model, sample_image_path(), side=64)
    assert classes.shape == (64, 64) and 0 <= int(classes.min()) and int(classes.max()) < len(segmentation.CLASSES)


def test_cli_predict_with_a_detection_checkpoint_says_it_has_no_classifier(tmp_path, capsys):
    from timm_internimage.cli import main
    case, path, _ = _golden_file(tmp_path, 'tiny_mask_rcnn_t')
    model_args = json.dumps(dict(case['overrides'], layer_scale=1.0))
    assert main(['predict', '--checkpoint', str(path), '--model', 'internimage_t', '--model-args', model_args]) == 1
    assert f'{path} holds a backbone without a classifier head' in capsys.readouterr().err


def test_readme_table_lists_every_dense_tag_with_its_published_scores():
    rows = {}
    for line in (REPO_ROOT / 'README.md').read_text().splitlines():
        if line.startswith('| `internimage_') and ('box ' in line or 'mIoU ' in line):
            name, published, size, taps = [cell.strip() for cell in line.strip('|').split('|')]
            rows[name.strip('`')] = (published, size, taps)
    assert list(rows) == list(DENSE_TAGS)
    for name, (published, size, taps) in rows.items():
        tag = DENSE_TAGS[name]
        numbers = [float(n) for n in published.replace('/', ' ').split() if n[0].isdigit()]
        assert numbers == list(dense_scores(tag.filename).values()), name
        assert size == ('x'.join(map(str, tag.input_size)) if tag.input_size[0] != tag.input_size[1]
                        else str(tag.input_size[0])), name
        assert taps == ','.join(map(str, tag.out_indices)), name


def test_manifest_refresh_records_the_dense_files_and_downloads_are_checked(hf_env, tmp_path, manifest_entry):
    """``manifest-refresh`` pins OpenGVLab/InternImage and records every listed .pth; a download that does not
    match its recorded sha256 is refused before anything unpickles it."""
    import io
    from timm_internimage._manifest import dump_manifest, load_manifest, repo_entry
    from timm_internimage.cli import main
    from timm_internimage.pretrained import ChecksumMismatchError
    case, backbone, tensors = load_dense_case('tiny_mask_rcnn_t')
    data = io.BytesIO()
    save_mmcv_checkpoint(data, backbone)
    filename = DENSE_TAGS[MASK_RCNN_T].filename
    files = {name: name.encode() for name in repo_entry(DENSE_REPO)['checkpoints']}
    files[filename] = data.getvalue()
    repo = hf_env.hub.add_repo(DENSE_REPO, files)
    path = tmp_path / 'weights_manifest.json'
    path.write_text(dump_manifest(load_manifest()))
    assert main(['manifest-refresh', '--manifest', str(path), '--tags', MASK_RCNN_T]) == 0
    entry = json.loads(path.read_text())['repos'][DENSE_REPO]
    assert entry['revision'] == repo.commit and entry['unverified'] == []
    assert entry['files'] == {name: {'size': len(data), 'sha256': repo.sha256(name)} for name, data in files.items()}
    manifest_entry(DENSE_REPO, files=entry['files'])  # unpinned (main), with the checksums
    bad = bytearray(files[filename])
    bad[-200] ^= 0xFF
    repo.tampered[filename] = bytes(bad)
    with pytest.raises(ChecksumMismatchError, match=f'{DENSE_REPO}/{filename}'):
        timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True, **case['overrides'])
    del repo.tampered[filename]
    features = timm.create_model(MASK_RCNN_T, features_only=True, pretrained=True, **case['overrides']).eval()
    _assert_taps(features, case, tensors)


# ---- FlashInternImage (OpenGVLab/DCNv4) ------------------------------------------------------------------------

FLASH_REPO = 'OpenGVLab/DCNv4'
# The backbone dicts of OpenGVLab/DCNv4's detection/configs/coco and segmentation/configs/ade20k (commit
# 4b848f7dd7da), without the training-only drop_path_rate and with_cp: one per size in every config.
_FLASH_T = dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), layer_scale=1.0, offset_scale=1.0,
                post_norm=False)
_FLASH_S = dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1.0, offset_scale=1.0,
                post_norm=True, dw_kernel_size=3)
_FLASH_B = dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1.0, offset_scale=0.5,
                post_norm=True, dw_kernel_size=3)
_FLASH_L = dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), layer_scale=1.0, offset_scale=2.0,
                post_norm=True, dw_kernel_size=3, dcn_output_bias=True, mlp_fc2_bias=True)
_ALL, _DINO = (0, 1, 2, 3), (1, 2, 3)
# tag -> (checkpoint on OpenGVLab/DCNv4, official backbone, out_indices, published scores: the repo's README)
FLASH_DENSE = {
    'flash_internimage_t.coco_mask_rcnn_1x': ('mask_rcnn_flash_internimage_t_fpn_1x_coco.pth', _FLASH_T, _ALL,
                                              {'box AP': 48.0, 'mask AP': 43.1}),
    'flash_internimage_t.coco_mask_rcnn_3x': ('mask_rcnn_flash_internimage_t_fpn_3x_coco.pth', _FLASH_T, _ALL,
                                              {'box AP': 49.5, 'mask AP': 44.0}),
    'flash_internimage_s.coco_mask_rcnn_1x': ('mask_rcnn_flash_internimage_s_fpn_1x_coco.pth', _FLASH_S, _ALL,
                                              {'box AP': 49.2, 'mask AP': 44.0}),
    'flash_internimage_s.coco_mask_rcnn_3x': ('mask_rcnn_flash_internimage_s_fpn_3x_coco.pth', _FLASH_S, _ALL,
                                              {'box AP': 50.5, 'mask AP': 44.9}),
    'flash_internimage_b.coco_mask_rcnn_1x': ('mask_rcnn_flash_internimage_b_fpn_1x_coco.pth', _FLASH_B, _ALL,
                                              {'box AP': 50.1, 'mask AP': 44.5}),
    'flash_internimage_b.coco_mask_rcnn_3x': ('mask_rcnn_flash_internimage_b_fpn_3x_coco.pth', _FLASH_B, _ALL,
                                              {'box AP': 50.6, 'mask AP': 45.4}),
    'flash_internimage_l.coco_cascade_1x': ('cascade_flash_internimage_l_fpn_1x_coco.pth', _FLASH_L, _ALL,
                                            {'box AP': 55.6, 'mask AP': 48.2}),
    'flash_internimage_l.coco_cascade_3x': ('cascade_flash_internimage_l_fpn_3x_coco.pth', _FLASH_L, _ALL,
                                            {'box AP': 56.7, 'mask AP': 48.9}),
    'flash_internimage_t.coco_dino_1x': ('dino_4scale_flash_internimage_t_1x_coco.pth', _FLASH_T, _DINO,
                                         {'box AP': 54.7}),
    'flash_internimage_s.coco_dino_1x': ('dino_4scale_flash_internimage_s_1x_coco.pth', _FLASH_S, _DINO,
                                         {'box AP': 55.3}),
    'flash_internimage_b.coco_dino_1x': ('dino_4scale_flash_internimage_b_1x_coco.pth', _FLASH_B, _DINO,
                                         {'box AP': 56.0}),
    'flash_internimage_l.coco_dino_1x': ('dino_4scale_flash_internimage_l_1x_coco.pth', _FLASH_L, _DINO,
                                         {'box AP': 58.8}),
    'flash_internimage_t.ade20k_upernet_512': ('upernet_flash_internimage_t_512_160k_ade20k.pth', _FLASH_T, _ALL,
                                               {'mIoU (ss)': 49.3, 'mIoU (ms)': 50.3}),
    'flash_internimage_s.ade20k_upernet_512': ('upernet_flash_internimage_s_512_160k_ade20k.pth', _FLASH_S, _ALL,
                                               {'mIoU (ss)': 50.6, 'mIoU (ms)': 51.6}),
    'flash_internimage_b.ade20k_upernet_512': ('upernet_flash_internimage_b_512_160k_ade20k.pth', _FLASH_B, _ALL,
                                               {'mIoU (ss)': 52.0, 'mIoU (ms)': 52.6}),
    'flash_internimage_l.ade20k_upernet_640': ('upernet_flash_internimage_l_640_160k_ade20k.pth', _FLASH_L, _ALL,
                                               {'mIoU (ss)': 55.6, 'mIoU (ms)': 56.0}),
}
FLASH_CASCADE_L = 'flash_internimage_l.coco_cascade_1x'


def flash_backbone(name='model_flash_tiny_flags'):
    """(case, official backbone weights keyed ``backbone.<official key>`` as in an mmdet / mmseg checkpoint, golden
    tensors) of a tiny FlashInternImage case (``data/golden/dcnv4``): the classifier's official weights less its
    head (a detector's backbone has none), so its golden ``stage<i>`` outputs are the backbone's taps. The
    ``flags`` case has L's flags (layer scale, post norm, depthwise conv, both biases, offset scale 2)."""
    from golden import DCNV4_DIR, dcnv4_cases, official_weight
    from safetensors.torch import load_file
    case = dcnv4_cases()[name]
    backbone = {f'backbone.{key}': official_weight(key, shape, case['weight_seed'], case['weight_rule'])
                for key, shape in case['state_dict_keys'].items() if not key.startswith(('head.', 'conv_head.'))}
    return case, backbone, load_file(str(DCNV4_DIR / f'{name}.safetensors'))


def _tiny_flash_args(case):
    """The tiny case's size, as overrides of a full-size tag."""
    return {key: tuple(case['config'][key]) if key != 'channels' else case['config'][key]
            for key in ('channels', 'depths', 'groups')}


def _assert_flash_taps(features, tensors, out_indices):
    with torch.no_grad():
        taps = features(tensors['input'])
    assert len(taps) == len(out_indices)
    for tap, index in zip(taps, out_indices):
        torch.testing.assert_close(tap, tensors[f'stage{index}'], rtol=0, atol=1e-4, msg=f'stage{index}')


def test_flash_dense_tags_are_the_official_checkpoints():
    """Every FlashInternImage detection / segmentation checkpoint has its tag: the file on OpenGVLab/DCNv4, the
    published scores, the config's out_indices; its model (meta device) is the config's official backbone."""
    from timm_internimage import FlashInternImage
    from timm_internimage.models import dense_tags
    from timm_internimage.models.flash_internimage import DENSE_TAGS as FLASH_TAGS
    from timm_internimage._manifest import repo_entry
    assert {name: tag.filename for name, tag in FLASH_TAGS.items()} == {
        name: filename for name, (filename, *_) in FLASH_DENSE.items()}
    assert dense_tags() == {**DENSE_TAGS, **FLASH_TAGS}
    checkpoints = repo_entry(FLASH_REPO)['checkpoints']
    for name, (filename, backbone, out_indices, scores) in FLASH_DENSE.items():
        assert checkpoints[filename] == {'scores': scores}, name
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.num_classes) == (FLASH_REPO, filename, 0), name
        assert all(f'{metric} {value}' in cfg.description for metric, value in scores.items()), name
        assert cfg.paper_ids == 'arXiv:2401.06197' and cfg.origin_url.endswith(FLASH_TAGS[name].config), name
        model = timm.create_model(name, device='meta')
        official = FlashInternImage(**backbone, num_classes=0, device='meta')
        assert repr(model) == repr(official), name
        features = timm.create_model(name, features_only=True, device='meta')
        assert features.feature_info.out_indices == out_indices, name
        default = timm.models.get_pretrained_cfg(name.split('.')[0])
        assert default.num_classes == 1000  # the classification tag stays each model's default


@pytest.mark.parametrize('name,framework', [(FLASH_CASCADE_L, 'mmdet'), ('flash_internimage_l.coco_dino_1x', 'mmdet'),
                                            ('flash_internimage_l.ade20k_upernet_640', 'mmseg')])
def test_flash_backbone_from_an_mmcv_checkpoint(name, framework, tmp_path):
    """The tiny official FlashInternImage (L's flags), saved as an mmdet / mmseg checkpoint, loads by file into the
    tag's features_only backbone: its config's taps are the official stage outputs, as the plain model's are."""
    from golden import flash_golden_model
    case, backbone, tensors = flash_backbone()
    path = save_mmcv_checkpoint(tmp_path / 'flash.pth', backbone, framework)
    features = timm.create_model(name, features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **_tiny_flash_args(case)).eval()
    out_indices = FLASH_DENSE[name][2]
    _assert_flash_taps(features, tensors, out_indices)
    plain, _, _ = flash_golden_model('model_flash_tiny_flags')
    with torch.no_grad():
        expected = plain.forward_intermediates(tensors['input'], indices=list(out_indices), intermediates_only=True)
        for tap, want in zip(features(tensors['input']), expected):
            torch.testing.assert_close(tap, want, rtol=0, atol=1e-5)


def test_flash_hub_tag_loads_the_official_pth_end_to_end(hf_env):
    """``timm.create_model('<flash det tag>', features_only=True, pretrained=True)``: the mmdet ``.pth`` from
    OpenGVLab/DCNv4 on the (fake) Hub, loaded weights_only, equal to the official backbone."""
    import io
    case, backbone, tensors = flash_backbone()
    data = io.BytesIO()
    save_mmcv_checkpoint(data, backbone)
    filename = FLASH_DENSE[FLASH_CASCADE_L][0]
    hf_env.hub.add_repo(FLASH_REPO, {filename: data.getvalue(), 'README.md': b'DCNv4'})
    features = timm.create_model(FLASH_CASCADE_L, features_only=True, pretrained=True,
                                 **_tiny_flash_args(case)).eval()
    _assert_flash_taps(features, tensors, _ALL)
    assert any(path.endswith(f'/{FLASH_REPO}/resolve/main/{filename}') for _, path in hf_env.hub.requests)


@pytest.mark.parametrize('problem', ['missing_tensor', 'no_layer_scale'])
def test_flash_checkpoint_without_the_backbone_is_an_error(problem, tmp_path):
    """A missing backbone tensor is an error naming it; so is a checkpoint without the layer scales that every
    FlashInternImage det/seg config has (here: the T classifier's, loaded by a T detection tag)."""
    if problem == 'missing_tensor':
        name, (case, backbone, _) = FLASH_CASCADE_L, flash_backbone()
        del backbone['backbone.levels.2.blocks.1.dcn.offset_mask.weight']
        expected = r'Missing key\(s\) in the backbone \(1 of \d+\): "stages\.2\.blocks\.1\.dcn\.offset_mask\.weight"'
    else:
        name, (case, backbone, _) = 'flash_internimage_t.coco_mask_rcnn_1x', flash_backbone('model_flash_tiny')
        expected = r'Missing key\(s\) in the backbone .*"stages\.0\.blocks\.0\.ls1\.gamma"'
    path = save_mmcv_checkpoint(tmp_path / f'{problem}.pth', backbone)
    with pytest.raises(PretrainedWeightsError, match=rf'^{path} does not hold the backbone .*{expected}'):
        timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **_tiny_flash_args(case))


def test_convert_a_flash_mmcv_checkpoint(tmp_path):
    """``convert`` recognises an official FlashInternImage detection file by name and writes the backbone, which
    loads back as the official backbone; unnamed, the file's family and layer scales are read off its keys."""
    from timm_internimage.tools.convert import convert, infer_model
    case, backbone, tensors = flash_backbone()
    path = save_mmcv_checkpoint(tmp_path / FLASH_DENSE[FLASH_CASCADE_L][0], backbone)
    out = convert(str(path), str(tmp_path / 'converted'), model_kwargs=_tiny_flash_args(case))
    features = timm.create_model(f'local-dir:{out}', features_only=True, pretrained=True).eval()
    _assert_flash_taps(features, tensors, _ALL)
    full_t = {f'backbone.{k}': v for k, v in timm.create_model('flash_internimage_t.coco_mask_rcnn_1x',
                                                               device='meta').state_dict().items()}
    assert infer_model(full_t) == {'model': 'flash_internimage_t', 'layer_scale': 1.0}


def test_list_shows_flash_tags_with_task_and_score(capsys):
    from timm_internimage.cli import main
    assert main(['list', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    for name, (filename, _, _, scores) in FLASH_DENSE.items():
        task = 'segmentation' if 'mIoU (ss)' in scores else 'detection'
        assert (rows[name]['hf_hub_filename'], rows[name]['task'], rows[name]['scores']) == (filename, task, scores)
    assert rows['flash_internimage_l.in22k_ft_in1k_384']['task'] == 'classification'
    assert rows['flash_internimage_l.in22k_ft_in1k_384']['scores'] == {'top-1': 88.1}
    assert main(['list']) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert 'segmentation' in lines['flash_internimage_t.ade20k_upernet_512']
    assert 'mIoU (ss) 49.3' in lines['flash_internimage_t.ade20k_upernet_512']
    assert 'top-1 83.6' in lines['flash_internimage_t.in1k']


def test_manifest_refresh_records_the_flash_files(hf_env, tmp_path):
    """``manifest-refresh`` of a FlashInternImage tag pins OpenGVLab/DCNv4 and records every listed .pth."""
    from timm_internimage._manifest import dump_manifest, load_manifest, repo_entry
    from timm_internimage.cli import main
    files = {name: name.encode() for name in repo_entry(FLASH_REPO)['checkpoints']}
    repo = hf_env.hub.add_repo(FLASH_REPO, files)
    path = tmp_path / 'weights_manifest.json'
    path.write_text(dump_manifest(load_manifest()))
    assert main(['manifest-refresh', '--manifest', str(path), '--tags', 'flash_internimage_t.in1k']) == 0
    entry = json.loads(path.read_text())['repos'][FLASH_REPO]
    assert entry['revision'] == repo.commit and entry['unverified'] == []
    assert entry['files'] == {name: {'size': len(data), 'sha256': repo.sha256(name)} for name, data in files.items()}
    assert len(entry['files']) == 4 + len(FLASH_DENSE)


def test_dense_doc_lists_every_flash_tag_with_its_published_scores():
    rows = {}
    for line in (REPO_ROOT / 'docs' / 'dense.md').read_text().splitlines():
        if line.startswith('| `flash_internimage_'):
            name, published, size, taps = [cell.strip() for cell in line.strip('|').split('|')]
            rows[name.strip('`')] = (published, size, taps)
    assert list(rows) == list(FLASH_DENSE)
    for name, (published, size, taps) in rows.items():
        _, _, out_indices, scores = FLASH_DENSE[name]
        assert [float(n) for n in published.replace('/', ' ').split() if n[0].isdigit()] == list(scores.values())
        height, width = timm.models.get_pretrained_cfg(name).input_size[1:]
        assert size == (f'{height}x{width}' if height != width else str(height)), name
        assert taps == ','.join(map(str, out_indices)), name


def test_tag_arguments_apply_over_the_variant_and_under_explicit_ones():
    """A dense tag's model arguments override its variant's (entrypoint ``model_args``); explicit keyword
    arguments override both."""
    def layer_scale(name, **kwargs):
        gamma = tiny_model(name, **kwargs).state_dict().get('stages.0.blocks.0.ls1.gamma')
        return None if gamma is None else gamma[0].item()
    assert layer_scale('flash_internimage_t') is None
    assert layer_scale('flash_internimage_t.coco_mask_rcnn_1x') == 1.0
    assert layer_scale('flash_internimage_t.coco_mask_rcnn_1x', layer_scale=0.5) == 0.5
    assert timm.create_model('internimage_h', device='meta').neck is not None
    assert timm.create_model('internimage_h.ade20k_upernet_896', device='meta').neck is None
    assert timm.create_model('internimage_h.ade20k_upernet_896', device='meta', use_clip_projector=True).neck \
        is not None
