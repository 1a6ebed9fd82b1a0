"""``python -m timm_internimage validate``: on small folders made from the bundled photo, weights from the loopback Hub.

The expected numbers are computed here with timm's own pipeline (``ImageDataset`` with a wnid class map,
``resolve_data_config`` + ``create_transform``, ``timm.utils.accuracy``, ``RealLabelsImagenet``) on a model loaded
without this package's loader. The labels are chosen from that model's own ranking of each photo (its top class,
its third class, a class far down), so top-1 and top-5 are neither 0 nor 100% and a wrong class mapping changes them.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.data import ImageDataset, ImageNetInfo, RealLabelsImagenet, create_transform, resolve_data_config

import timm_internimage.tools.validate as validate_module
from timm_internimage.cli import main
from timm_internimage.tools.images import sample_image_path
from timm_internimage.tools.validate import GAP_POINTS, compare_published, label_space

from conftest import REPO_ROOT, TINY, official_model, tiny_model
from hub_server import single_file_repo, tiny_case

T_TAG = 'internimage_t.in1k'
L22K_TAG, L22K_REPO = 'internimage_l.in22k_384', 'OpenGVLab/internimage_l_22k_384'
IN1K = ImageNetInfo('imagenet-1k').label_names()
IN22K = ImageNetInfo('imagenet-22k').label_names()
RANKS = (0, 2, 500)  # the label of photo k is the reference model's class of rank RANKS[k % 3]


def _tiny_args(kwargs):
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != 'num_classes'})


def _photos():
    """Nine variants of the bundled photo."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps
    with Image.open(sample_image_path()) as image:
        base = image.convert('RGB')
    return [base, ImageOps.mirror(base), base.crop((60, 20, 360, 280)), base.rotate(90, expand=True),
            ImageOps.grayscale(base), ImageEnhance.Color(base).enhance(2.5), base.filter(ImageFilter.GaussianBlur(3)),
            ImageOps.flip(base), base.resize((120, 80))]


def _with_cfg(model, tag):
    model.pretrained_cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    return model.eval()


def _scored(model, x, columns=None):
    with torch.no_grad():
        logits = model(x)
    return logits if columns is None else logits[:, columns]


def _labelled_photos(tmp_path, model, columns=None):
    """Save the photos as ILSVRC2012 val file names; returns ``[(file name, ImageNet-1k label)]`` chosen from the
    model's ranking of each photo (over ``columns``, the ImageNet-1k classes in order, if given)."""
    from PIL import Image
    transform = create_transform(**resolve_data_config(model=model))
    photos_dir = tmp_path / 'photos'
    photos_dir.mkdir()
    labelled = []
    for k, photo in enumerate(_photos()):
        name = f'ILSVRC2012_val_{k + 1:08d}.JPEG'
        photo.save(photos_dir / name, format='PNG' if k % 2 else 'JPEG')  # Pillow reads either by content
        with Image.open(photos_dir / name) as saved:
            x = transform(saved.convert('RGB')).unsqueeze(0)
        ranking = _scored(model, x, columns)[0].argsort(descending=True)
        label = int(ranking[RANKS[k % 3]])
        labelled.append((name, label if columns is None else IN1K.index(IN22K[columns[label]])))
    return photos_dir, labelled


def _class_folders(tmp_path, photos_dir, labelled, folder_name=lambda label: IN1K[label]):
    root = tmp_path / 'folders'
    for name, label in labelled:
        (root / folder_name(label)).mkdir(parents=True, exist_ok=True)
        (root / folder_name(label) / name).write_bytes((photos_dir / name).read_bytes())
    return root


def _expected(model, root, columns=None, classes=IN1K):
    """top-1 and top-5 counts, mean loss and logits of a wnid class-folder tree, through timm's ImageDataset, the
    targets being the wnids' places in ``classes``."""
    from timm.utils import accuracy
    class_map = {p.name: classes.index(p.name) for p in root.iterdir()}
    transform = create_transform(**resolve_data_config(model=model))
    dataset = ImageDataset(str(root), class_map=class_map, transform=transform)
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    logits = _scored(model, x, columns)
    top1, top5 = accuracy(logits, y, topk=(1, 5))
    n = len(dataset)
    return dict(images=n, top1=round(float(top1) * n / 100), top5=round(float(top5) * n / 100),
                loss=float(F.cross_entropy(logits, y)), logits=logits, targets=y,
                files=[Path(p).name for p, _ in dataset.reader.samples])


def _assert_matches(summary, want):
    n = want['images']
    assert summary['images'] == n
    assert round(summary['top1'] * n / 100) == want['top1'] and summary['top1'] == pytest.approx(100 * want['top1'] / n)
    assert round(summary['top5'] * n / 100) == want['top5'] and summary['top5'] == pytest.approx(100 * want['top5'] / n)
    assert summary['loss'] == pytest.approx(want['loss'], abs=1e-5)


@pytest.fixture(scope='module')
def t_reference(tmp_path_factory):
    """The ``tiny_t`` weights of the T tag's loopback Hub repo in an independently loaded model, the photos labelled
    from its ranking, their wnid class-folder tree and its expected numbers (once per module)."""
    kwargs, official = tiny_case('tiny_t')
    reference = _with_cfg(official_model('internimage_t', kwargs, official), T_TAG)
    tmp_path = tmp_path_factory.mktemp('validate')
    photos_dir, labelled = _labelled_photos(tmp_path, reference)
    root = _class_folders(tmp_path, photos_dir, labelled)
    want = _expected(reference, root)
    assert 0 < want['top1'] < want['top5'] < want['images'], want  # the labels discriminate
    return dict(args=_tiny_args(kwargs), reference=reference, photos=photos_dir, labelled=labelled, root=root,
                want=want, official=official)


@pytest.fixture
def t_case(t_repo, t_reference):
    """``t_reference``, its weights served as the T tag's repo on the loopback Hub."""
    _, official, _ = t_repo
    assert all(torch.equal(official[k], t_reference['official'][k]) for k in official)
    return t_reference


def test_validate_class_folders_subprocess_json(t_case, hf_env):
    """End to end in a fresh process, with DataLoader workers: the numbers are timm's, and the published top-1 of
    the tag is reported next to them."""
    result = subprocess.run(
        [sys.executable, '-m', 'timm_internimage', 'validate', str(t_case['root']), '--model', T_TAG, '--json',
         '--model-args', t_case['args'], '--batch-size', '4', '--workers', '2', '--device', 'cpu'],
        cwd=REPO_ROOT, env=hf_env.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    _assert_matches(summary, t_case['want'])
    assert summary['labels'] == 'ImageNet-1k' and summary['layout'] == 'class folders'
    assert summary['published_top1'] == 83.5
    assert summary['top1_gap'] == pytest.approx(summary['top1'] - 83.5)
    assert summary['full_val'] is False and summary['gap_flagged'] is False
    assert summary['input_size'] == [3, 224, 224] and summary['img_per_s'] > 0


def test_validate_text_output_and_options(t_case, hf_env, capsys):
    args = ['validate', str(t_case['root']), '--model', T_TAG, '--model-args', t_case['args'], '--workers', '0']
    assert main(args + ['--batch-size', '2']) == 0
    out = capsys.readouterr().out
    want = t_case['want']
    top1 = 100 * want['top1'] / want['images']
    assert f'{want["images"]} images' in out and f'top-1 {top1:7.3f}%' in out
    assert f'published top-1 83.5%, measured {top1:.2f}% ({top1 - 83.5:+.2f} points)' in out
    assert 'not the full 50,000-image' in out and 'WARNING' not in out

    # channels-last gives the same numbers; bf16 autocast runs and scores every image
    assert main(args + ['--channels-last', '--json']) == 0
    _assert_matches(json.loads(capsys.readouterr().out), want)
    assert main(args + ['--amp', 'bf16', '--json']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['amp'] == 'bf16' and summary['images'] == want['images'] and 0 <= summary['top1'] <= 100


def test_validate_limit_takes_an_even_spread(t_case, hf_env, capsys):
    assert main(['validate', str(t_case['root']), '--model', T_TAG, '--model-args', t_case['args'],
                 '--workers', '0', '--limit', '4', '--json']) == 0
    summary = json.loads(capsys.readouterr().out)
    want = t_case['want']
    picked = [i * want['images'] // 4 for i in range(4)]  # of the samples in timm's (sorted) order
    logits, targets = want['logits'][picked], want['targets'][picked]
    assert summary['images'] == 4
    assert summary['top1'] == pytest.approx(100 * float((logits.argmax(1) == targets).float().mean()))
    assert summary['loss'] == pytest.approx(float(F.cross_entropy(logits, targets)), abs=1e-5)


@pytest.mark.parametrize('layout', ['v2 folders', 'csv wnids', 'csv indices, no extensions', 'caffe val.txt',
                                    'kaggle LOC_val_solution.csv'])
def test_validate_other_layouts_give_the_same_numbers(t_case, hf_env, tmp_path, capsys, layout):
    labelled, photos = t_case['labelled'], t_case['photos']
    extra = []
    if layout == 'v2 folders':
        data = _class_folders(tmp_path / 'v2', photos, labelled, folder_name=str)
    else:
        data = photos
        labels = tmp_path / 'labels.txt'
        if layout == 'csv wnids':
            lines = ['filename,label'] + [f'{name},{IN1K[label]}' for name, label in labelled]
        elif layout == 'csv indices, no extensions':
            lines = [f'{name.rsplit(".", 1)[0]},{label}' for name, label in labelled]
        elif layout == 'caffe val.txt':
            lines = [f'{name} {label}' for name, label in labelled]
        else:
            lines = ['ImageId,PredictionString'] + [
                f'{name.rsplit(".", 1)[0]},{IN1K[label]} 1 2 30 40 {IN1K[label]} 5 6 70 80' for name, label in labelled]
        labels.write_text('\n'.join(lines) + '\n')
        extra = ['--labels', str(labels)]
    assert main(['validate', str(data), '--model', T_TAG, '--model-args', t_case['args'], '--workers', '0',
                 '--json', *extra]) == 0
    _assert_matches(json.loads(capsys.readouterr().out), t_case['want'])


def test_validate_imagenet_real_labels(t_case, hf_env, tmp_path, capsys):
    """ReaL top-1 / top-5 as timm's RealLabelsImagenet computes them (an empty set excludes an image)."""
    want = t_case['want']
    files = sorted(want['files'])
    order = [want['files'].index(name) for name in files]
    logits = want['logits'][order]
    # per image: its own label, the reference's top class, nothing, or two classes it ranks low
    ranking = logits.argsort(dim=1, descending=True)
    by_name = dict(t_case['labelled'])
    sets = {name: [[by_name[name]], [int(ranking[i, 0])], [], [int(ranking[i, 7]), int(ranking[i, 900])]][i % 4]
            for i, name in enumerate(files)}
    real_json = tmp_path / 'real.json'
    real_json.write_text(json.dumps([sets[f'ILSVRC2012_val_{k + 1:08d}.JPEG'] for k in range(len(files))]))
    real = RealLabelsImagenet(files, real_json=str(real_json))
    real.add_result(logits)
    expected = real.get_accuracy()
    assert 0 < expected[1] < 100

    assert main(['validate', str(t_case['root']), '--model', T_TAG, '--model-args', t_case['args'],
                 '--workers', '0', '--json', '--real-labels', str(real_json)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['real_images'] == sum(1 for s in sets.values() if s)
    assert summary['real_top1'] == pytest.approx(expected[1]) and summary['real_top5'] == pytest.approx(expected[5])
    _assert_matches(summary, want)


def test_validate_22k_tag_scores_the_1k_classes_of_a_1k_folder(hf_env, tmp_path, capsys):
    """A 21841-class head on a 1000-class wnid folder: the ImageNet-1k outputs, found by wnid, are scored. ImageNet-22k
    (fall 2011) lacks one ImageNet-1k class, n04399382: its images are skipped."""
    torch.manual_seed(0)
    reference = _with_cfg(tiny_model('internimage_l', num_classes=21841), L22K_TAG)
    hf_env.hub.add_repo(L22K_REPO, single_file_repo(reference.state_dict()))
    scored = [wnid for wnid in IN1K if wnid in set(IN22K)]
    assert len(scored) == 999
    columns = [IN22K.index(wnid) for wnid in scored]
    photos_dir, labelled = _labelled_photos(tmp_path, reference, columns)
    root = _class_folders(tmp_path, photos_dir, labelled)
    want = _expected(reference, root, columns, classes=scored)
    want_all = _expected(reference, root, classes=IN22K)  # --all-classes: every output, targets at 22k indices
    assert 0 < want['top1'] < want['top5'] < want['images']
    (root / 'n04399382').mkdir()
    _photos()[0].save(root / 'n04399382' / 'teddy.jpg')
    args = ['validate', str(root), '--model', L22K_TAG, '--model-args', _tiny_args(TINY), '--workers', '0', '--json']
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    _assert_matches(summary, want)
    assert summary['skipped_images'] == 1
    assert summary['published_top1'] is None and summary['labels'].startswith('ImageNet-1k')

    assert main(args + ['--all-classes']) == 0
    summary = json.loads(capsys.readouterr().out)
    _assert_matches(summary, want_all)
    assert summary['skipped_images'] == 1 and summary['labels'].startswith('ImageNet-22k')


def test_validate_22k_folder_with_a_1k_tag_is_an_error(t_repo, hf_env, tmp_path, capsys):
    kwargs, _, _ = t_repo
    only_22k = next(w for w in ImageNetInfo('imagenet-22k').label_names() if w not in set(IN1K))
    (tmp_path / 'data' / only_22k).mkdir(parents=True)
    _photos()[0].save(tmp_path / 'data' / only_22k / 'a.jpg')
    assert main(['validate', str(tmp_path / 'data'), '--model', T_TAG, '--model-args', _tiny_args(kwargs),
                 '--workers', '0']) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith('error: ') and only_22k in error and '21841-class' in error


@pytest.mark.parametrize('case, message', [
    ('devkit ground truth', 'devkit'),
    ('no class folders', 'no images in class folders'),
    ('unreadable image', 'bad.jpg: cannot be read'),
])
def test_validate_bad_data_is_one_error_line(t_repo, hf_env, tmp_path, capsys, case, message):
    kwargs, _, _ = t_repo
    data = tmp_path / 'data'
    data.mkdir()
    extra = []
    if case == 'devkit ground truth':
        _photos()[0].save(data / 'ILSVRC2012_val_00000001.JPEG')
        (tmp_path / 'gt.txt').write_text('490\n361\n')
        extra = ['--labels', str(tmp_path / 'gt.txt')]
    elif case == 'no class folders':
        _photos()[0].save(data / 'a.jpg')
    else:
        (data / IN1K[3]).mkdir()
        (data / IN1K[3] / 'bad.jpg').write_text('not an image')
        extra = ['--workers', '1']
    assert main(['validate', str(data), '--model', T_TAG, '--model-args', _tiny_args(kwargs), *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith('error: ') and message in lines[-1], lines
    assert [line for line in lines if 'rror' in line or 'Traceback' in line] == lines[-1:], lines


def test_gap_is_flagged_only_on_the_full_val_set():
    published = 83.5
    for top1, images, imagenet_1k, flagged in [
            (83.5 - GAP_POINTS - 0.01, 50_000, True, True), (83.5 + GAP_POINTS + 0.01, 50_000, True, True),
            (83.5 - GAP_POINTS + 0.01, 50_000, True, False), (80.0, 49_999, True, False),
            (80.0, 50_000, False, False)]:
        result = compare_published(top1, published, images, imagenet_1k)
        assert result['gap_flagged'] is flagged, (top1, images, imagenet_1k)
        assert result['top1_gap'] == pytest.approx(top1 - published)
    assert compare_published(80.0, None, 50_000, True)['gap_flagged'] is False


def test_validate_flags_the_gap_on_a_full_val_set(t_case, hf_env, capsys, monkeypatch):
    """With the data counted as the full val set, the tiny weights' gap to 83.5 is flagged: exit status 1."""
    monkeypatch.setattr(validate_module, 'FULL_VAL_IMAGES', t_case['want']['images'])
    assert main(['validate', str(t_case['root']), '--model', T_TAG, '--model-args', t_case['args'],
                 '--workers', '0']) == 1
    assert 'WARNING: more than 0.3 points from the published top-1' in capsys.readouterr().out


def test_label_space_maps_wnids_by_name():
    """A subset of ImageNet-1k folders keeps the ImageNet-1k indices (not the folder order); integers are ImageNet-1k
    indices; other names are classes in natural order; a 1k folder on a 21841-class head scores the 1k outputs."""
    wnids = [IN1K[281], IN1K[7], IN1K[999]]
    assert label_space(wnids, 1000).targets == {IN1K[281]: 281, IN1K[7]: 7, IN1K[999]: 999}
    assert label_space([5, 17], 1000).targets == {5: 5, 17: 17}
    assert label_space(['cat', 'dog10', 'dog9'], 3).targets == {'cat': 0, 'dog9': 1, 'dog10': 2}
    space = label_space(wnids, 21841)
    scored = [IN22K[c] for c in space.columns]
    assert scored == [w for w in IN1K if w != 'n04399382']
    assert space.targets == {w: scored.index(w) for w in wnids}
    assert label_space([2], 21841).targets == {2: 2}
    assert label_space(wnids, 21841, all_classes=True).targets == {w: IN22K.index(w) for w in wnids}


def test_real_defaults_to_timms_bundled_labels():
    """``--real`` without a file reads timm's ImageNet-ReaL labels; a 21841-class head gets them at its 1k places."""
    import pkgutil
    from timm_internimage.tools.validate import _real_label_sets
    bundled = json.loads(pkgutil.get_data('timm.data', '_info/imagenet_real_labels.json'))
    paths = ['val/ILSVRC2012_val_00000001.JPEG', 'ILSVRC2012_val_00050000.JPEG']
    assert _real_label_sets(paths, None, label_space([0], 1000)) == [bundled[0], bundled[49999]]
    space = label_space([0], 21841)
    scored = [IN22K[c] for c in space.columns]
    assert _real_label_sets(paths, None, space) == [[scored.index(IN1K[i]) for i in bundled[j]] for j in (0, 49999)]
