"""``python -m timm_internimage`` predict / convert / list / manifest-refresh, against the local fake Hub."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm

from timm_internimage import FlashInternImage
from timm_internimage.cli import main
from timm_internimage.tools.convert import convert, infer_model
from timm_internimage.tools.images import sample_image_path
from timm_internimage._manifest import dump_manifest, hub_source, load_manifest
from timm_internimage.models import pretrained_cfgs

from conftest import REPO_ROOT, TINY, assert_same_weights, official_model, tiny_model
from hub_server import hf_format, safetensors_bytes, sharded_repo, single_file_repo, tiny_case

T_TAG, T_REPO = 'internimage_t.in1k', 'OpenGVLab/internimage_t_1k_224'
G_REPO = 'OpenGVLab/internimage_g_22kto1k_512'


def _tiny_args(kwargs):
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != 'num_classes'})


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable, '-m', 'timm_internimage', *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _expected_top(kwargs, official, image_path, k):
    """What predict must print, computed independently with timm's data pipeline and ImageNet labels."""
    return _expected_top_of(official_model('internimage_t', kwargs, official), T_TAG, image_path, k)


def _expected_top_of(model, tag, image_path, k):
    """The top ``k`` of ``model`` (eval mode) on an image, with timm's data pipeline for the cfg of ``tag``."""
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    model.pretrained_cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    transform = create_transform(**resolve_data_config(model=model))
    x = transform(Image.open(image_path).convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    values, indices = probs.topk(k)
    info = ImageNetInfo('imagenet-1k')
    return [(int(i), info.index_to_description(int(i)), float(v)) for v, i in zip(values, indices)]


def test_predict_generated_image_json_subprocess(t_repo, hf_env, tmp_path):
    """End to end in a fresh process configured only through HF_* environment variables."""
    from PIL import Image
    kwargs, official, _ = t_repo
    image = tmp_path / 'noise.png'
    torch.manual_seed(0)
    Image.fromarray((torch.rand(90, 120, 3) * 255).byte().numpy()).save(image)
    result = _run(['predict', str(image), '--model', T_TAG, '--top-k', '3', '--json',
                   '--model-args', _tiny_args(kwargs)], hf_env.subprocess_env())
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    predictions = payload['results'][0]['predictions']
    want = _expected_top(kwargs, official, image, 3)
    assert [(p['index'], p['label']) for p in predictions] == [(i, label) for i, label, _ in want]
    for p, (_, _, prob) in zip(predictions, want):
        assert p['probability'] == pytest.approx(prob, abs=1e-5)
    assert any(p.endswith(f'{T_REPO}/resolve/main/model.safetensors') for _, p in hf_env.hub.requests)
    # warm cache, offline: works without the server
    hf_env.set_offline(True)
    hf_env.hub.clear_log()
    again = _run(['predict', str(image), '--model', T_TAG, '--top-k', '3', '--json',
                  '--model-args', _tiny_args(kwargs)], hf_env.subprocess_env())
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == payload
    assert hf_env.hub.requests == []


def test_predict_shipped_photo_text_output(t_repo, hf_env, capsys):
    kwargs, official, _ = t_repo
    assert main(['predict', '--model-args', _tiny_args(kwargs), '--top-k', '2']) == 0
    out, err = capsys.readouterr()
    assert 'CC0' in err and 'chelsea' in out
    want = _expected_top(kwargs, official, sample_image_path(), 2)
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for line, (index, label, prob) in zip(lines[1:], want):
        assert label in line and f'(class {index})' in line and f'{100 * prob:6.2f}%' in line


def test_shipped_photo_is_small_and_real():
    from PIL import Image
    path = sample_image_path()
    assert path.stat().st_size < 100_000
    with Image.open(path) as image:
        assert image.size == (451, 300) and image.mode == 'RGB'


def test_predict_unreadable_image_fails_before_download(t_repo, hf_env, tmp_path, capsys):
    kwargs, _, _ = t_repo
    bad = tmp_path / 'not_an_image.jpg'
    bad.write_text('hello')
    code = main(['predict', str(bad), str(tmp_path / 'missing.png'), '--model-args', _tiny_args(kwargs)])
    err = capsys.readouterr().err
    assert code == 2
    assert 'not_an_image.jpg' in err and 'missing.png: no such file' in err
    assert [r for r in hf_env.hub.requests if '/resolve/' in r[1]] == []


def test_predict_offline_cold_cache_message(hf_env, capsys):
    hf_env.set_offline(True)
    assert main(['predict']) == 1
    err = capsys.readouterr().err
    assert f'{T_REPO}/model.safetensors' in err and 'HF_HUB_OFFLINE' in err and 'hf download' in err


def test_list_shows_every_tag(capsys):
    assert main(['list']) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[:4] for line in lines] == [
        [name, cfg.hf_hub_id, str(cfg.num_classes), str(cfg.input_size[1])] for name, cfg in pretrained_cfgs().items()]


# ---------------------------------------------------------------------------------------------------------------
# convert


def test_convert_pth_round_trip_local_dir_and_hf_hub(hf_env, tmp_path):
    kwargs, official = tiny_case('tiny_s')
    reference = official_model('internimage_s', kwargs, official)
    pth = tmp_path / 'internimage_s_1k_224.pth'
    torch.save({'model': official}, pth)
    out = tmp_path / 'converted'
    result = _run(['convert', str(pth), str(out), '--model', 'internimage_s', '--model-args', _tiny_args(kwargs)],
                  hf_env.subprocess_env())
    assert result.returncode == 0, result.stderr
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'internimage_s' and config['num_classes'] == 1000
    from safetensors.torch import load_file
    assert set(load_file(str(out / 'model.safetensors'))) == set(reference.state_dict())

    assert_same_weights(timm.create_model(f'local-dir:{out}', pretrained=True), reference)
    assert_same_weights(timm.create_model('internimage_s', pretrained=True,
                                         pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')), **kwargs),
                       reference)
    hf_env.hub.add_repo('someone/internimage-s-tiny', {p.name: p.read_bytes() for p in out.iterdir()})
    model = timm.create_model('hf-hub:someone/internimage-s-tiny', pretrained=True)
    assert_same_weights(model, reference)
    assert model.pretrained_cfg['crop_pct'] == 1.0 and model.pretrained_cfg['interpolation'] == 'bicubic'


def test_convert_hub_repo_id_sharded(hf_env, tmp_path):
    kwargs, official = tiny_case('tiny_g')
    hf_env.hub.add_repo(G_REPO, sharded_repo(hf_format(official), num_shards=2))
    out = convert(G_REPO, str(tmp_path / 'g'), model_kwargs=kwargs)
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert_same_weights(model, official_model('internimage_g', kwargs, official))
    assert model.pretrained_cfg['tag'] == 'joint_in22k_ft_in1k_512'


def test_convert_local_hf_folder(tmp_path):
    kwargs, official = tiny_case('tiny_s')
    folder = tmp_path / 'hf_repo'
    folder.mkdir()
    for name, data in sharded_repo(hf_format(official), num_shards=2).items():
        (folder / name).write_bytes(data)
    out = convert(str(folder), str(tmp_path / 'out'), 'internimage_s', kwargs)
    assert_same_weights(timm.create_model(f'local-dir:{out}', pretrained=True),
                       official_model('internimage_s', kwargs, official))


@pytest.mark.parametrize('name,classes', [('internimage_t', 1000), ('internimage_xl', 21841), ('internimage_g', 1000),
                                          ('flash_internimage_t', 1000), ('flash_internimage_l', 1000)])
def test_convert_infers_released_variant(name, classes):
    """The variant from the stem width, within the family that the core op's keys tell (T and FlashInternImage-T
    are both 64 channels wide)."""
    state_dict = timm.create_model(name, device='meta', num_classes=classes).state_dict()
    assert infer_model(state_dict) == {'model': name, 'num_classes': classes}
    official_style = {'model.patch_embed.conv1.weight': state_dict['stem.conv1.weight'],
                      'model.head.weight': state_dict['head.fc.weight']}
    dcn = 'offset_mask' if name.startswith('flash_') else 'offset'
    official_style[f'model.levels.0.blocks.0.dcn.{dcn}.weight'] = state_dict[f'stages.0.blocks.0.dcn.{dcn}.weight']
    assert infer_model(official_style) == {'model': name, 'num_classes': classes}


def test_convert_rejects_wrong_architecture(tmp_path, capsys):
    kwargs, official = tiny_case('tiny_t')
    pth = tmp_path / 't.pth'
    torch.save({'model': official}, pth)
    code = main(['convert', str(pth), str(tmp_path / 'out'), '--model', 'internimage_s',
                 '--model-args', _tiny_args(kwargs)])
    err = capsys.readouterr().err
    assert code == 1
    assert 'does not fit internimage_s' in err and 'Missing key(s)' in err
    assert not (tmp_path / 'out' / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------------------------
# manifest-refresh


def test_manifest_refresh_pins_and_verifies(hf_env, tmp_path, manifest_entry):
    t_kwargs, t_official = tiny_case('tiny_t')
    t_repo = hf_env.hub.add_repo(T_REPO, single_file_repo(hf_format(t_official)))
    g_kwargs, g_official = tiny_case('tiny_g')
    g_repo = hf_env.hub.add_repo(G_REPO, sharded_repo(hf_format(g_official), num_shards=3))
    manifest = json.loads(json.dumps(load_manifest()))
    path = tmp_path / 'weights_manifest.json'
    path.write_text(dump_manifest(manifest))
    assert main(['manifest-refresh', '--manifest', str(path), '--tags', T_TAG,
                 'internimage_g.joint_in22k_ft_in1k_512']) == 0
    refreshed = json.loads(path.read_text())
    t = refreshed['repos'][T_REPO]
    assert t['revision'] == t_repo.commit and t['file'] == 'model.safetensors'
    assert t['files'] == {'model.safetensors': {'size': len(t_repo.files['model.safetensors']),
                                                'sha256': t_repo.sha256('model.safetensors')}}
    assert 'revision' not in t['unverified'] and 'files' not in t['unverified']
    g = refreshed['repos'][G_REPO]
    assert g['revision'] == g_repo.commit and g['index_file'] == 'model.safetensors.index.json'
    assert set(g['files']) == {n for n in g_repo.files if n.startswith('model')}
    for name, meta in g['files'].items():
        assert meta == {'size': len(g_repo.files[name]), 'sha256': g_repo.sha256(name)}
    untouched = refreshed['repos']['OpenGVLab/internimage_b_1k_224']
    assert untouched['revision'] == 'main' and 'revision' in untouched['unverified']
    assert refreshed['refreshed']['endpoint'] == hf_env.hub.endpoint
    # the cfgs read the refreshed entries: pinned, with their layout
    for repo_id, repo in ((T_REPO, t_repo), (G_REPO, g_repo)):
        manifest_entry(repo_id, **refreshed['repos'][repo_id])
        assert hub_source(repo_id)['hf_hub_id'] == f'{repo_id}@{repo.commit}'


def test_predict_with_local_checkpoint(tmp_path, capsys):
    from PIL import Image
    kwargs, official = tiny_case('tiny_t')
    weights = tmp_path / 'tiny.safetensors'
    weights.write_bytes(safetensors_bytes(official))
    image = tmp_path / 'gradient.jpg'
    Image.fromarray((torch.linspace(0, 255, 64 * 80 * 3).reshape(64, 80, 3)).byte().numpy()).save(image)
    assert main(['predict', str(image), '--model', 'internimage_t', '--checkpoint', str(weights), '--json',
                 '--top-k', '4', '--model-args', _tiny_args(kwargs)]) == 0
    predictions = json.loads(capsys.readouterr().out)['results'][0]['predictions']
    want = _expected_top(kwargs, official, image, 4)
    assert [(p['index'], p['label']) for p in predictions] == [(i, label) for i, label, _ in want]


def test_manifest_refresh_unknown_repo_is_a_clear_error(hf_env, tmp_path, capsys):
    manifest = json.loads(json.dumps(load_manifest()))
    path = tmp_path / 'weights_manifest.json'
    path.write_text(dump_manifest(manifest))
    assert main(['manifest-refresh', '--manifest', str(path), '--tags', 'internimage_b.in1k']) == 1
    assert 'internimage_b_1k_224' in capsys.readouterr().err
    assert path.read_text() == dump_manifest(manifest)  # nothing written on failure


# ---------------------------------------------------------------------------------------------------------------
# off the happy path (issue 10)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """``(model args JSON, safetensors path)`` of the ``tiny_t`` case, for ``predict --checkpoint`` without a Hub."""
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path_factory.mktemp('weights') / 'tiny.safetensors'
    path.write_bytes(safetensors_bytes(official))
    return _tiny_args(kwargs), path


def _predict_args(tiny_checkpoint, *extra):
    model_args, weights = tiny_checkpoint
    return ['predict', '--model', 'internimage_t', '--checkpoint', str(weights), '--model-args', model_args,
            '--device', 'cpu', *extra]


def _png_header_only(path, width, height):
    """A PNG file that declares ``width`` x ``height`` pixels and holds none: enough for Pillow's size checks."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IEND', b''))
    return path


def test_predict_scales_high_bit_depth_and_applies_exif_orientation_subprocess(tiny_checkpoint, hf_env, tmp_path):
    """A 16-bit PNG and float TIFFs classify like the 8-bit image; an orientation-6 photo like the upright one."""
    import numpy as np
    from PIL import Image
    with Image.open(sample_image_path()) as photo:
        photo = photo.convert('RGB')
    gray = np.asarray(photo.convert('L'))
    images = {'rgb.png': photo, 'gray8.png': Image.fromarray(gray),
              'gray16.png': Image.fromarray(gray.astype(np.uint16) * 257),
              'unit_float.tiff': Image.fromarray(gray.astype(np.float32) / 255),
              'wide_float.tiff': Image.fromarray(gray.astype(np.float32) * 257)}
    for name, image in images.items():
        image.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'rotated.png', exif=exif)
    with Image.open(tmp_path / 'gray16.png') as image16, Image.open(tmp_path / 'unit_float.tiff') as image_float:
        assert (image16.mode, image_float.mode) == ('I;16', 'F')
    names = [*images, 'rotated.png']
    result = _run(_predict_args(tiny_checkpoint, *[str(tmp_path / name) for name in names], '--json', '-k', '5'),
                  hf_env.subprocess_env())
    assert result.returncode == 0, result.stderr
    by_name = {Path(r['image']).name: r['predictions'] for r in json.loads(result.stdout)['results']}
    for name, reference in (('gray16.png', 'gray8.png'), ('unit_float.tiff', 'gray8.png'),
                            ('wide_float.tiff', 'gray8.png'), ('rotated.png', 'rgb.png')):
        got, want = by_name[name], by_name[reference]
        assert [p['index'] for p in got] == [p['index'] for p in want], name
        assert [p['probability'] for p in got] == pytest.approx([p['probability'] for p in want], abs=1e-5), name


def test_predict_decodes_each_image_once_one_batch_at_a_time(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from PIL import Image, ImageFile
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.new('RGB', (40 + i, 30), (50 * i, 0, 0)).save(paths[-1])
    decodes = []
    load = ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:  # pixel data not decoded yet
            decodes.append(Path(image.filename).name)
        return load(image)
    monkeypatch.setattr(ImageFile.ImageFile, 'load', counting_load)
    assert main(_predict_args(tiny_checkpoint, *paths, '--batch-size', '2', '--json', '-k', '5000')) == 0
    results = json.loads(capsys.readouterr().out)['results']
    assert sorted(decodes) == sorted(Path(p).name for p in paths)
    assert [len(r['predictions']) for r in results] == [1000] * 5  # --top-k is capped at the class count
    from timm_internimage.tools.images import image_batches
    decodes.clear()
    batches = image_batches(paths, lambda image: torch.zeros(3, 4, 4), batch_size=2)
    assert decodes == []
    assert next(batches)[0] == paths[:2] and len(decodes) == 2
    assert [chunk for chunk, _, _ in batches] == [paths[2:4], paths[4:]] and len(decodes) == 5


@pytest.mark.parametrize('extra,message', [
    (['-k', '0'], 'argument --top-k/-k: must be at least 1, got 0'),
    (['--top-k', '-1'], 'argument --top-k/-k: must be at least 1, got -1'),
    (['--batch-size', '0'], 'argument --batch-size: must be at least 1, got 0'),
    (['--batch-size', '-1'], 'argument --batch-size: must be at least 1, got -1'),
])
def test_predict_rejects_non_positive_counts(tiny_checkpoint, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(_predict_args(tiny_checkpoint, str(sample_image_path()), *extra))
    assert exit_info.value.code == 2
    assert f'error: {message}' in capsys.readouterr().err


@pytest.mark.parametrize('case', ['unknown model', 'unknown tag', 'bad device', 'absent device', 'unknown model arg',
                                  'decompression bomb', 'NaN weights', 'corrupt safetensors',
                                  'truncated safetensors'])
def test_predict_failures_are_one_error_line(tiny_checkpoint, tmp_path, capsys, monkeypatch, case):
    """Each ends as ``error: ...`` naming the input, with a non-zero status and nothing on stdout (not NaN JSON)."""
    from safetensors.torch import load_file, save_file
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    model_args, weights = tiny_checkpoint
    image = str(sample_image_path())
    images = [image]
    if case == 'unknown model':
        extra, message = ['--model', 'internimage_q'], "unknown model 'internimage_q'"
    elif case == 'unknown tag':
        extra, message = ['--model', 'internimage_t.in99k'], "unknown tag 'in99k' for internimage_t; its tags: internimage_t.in1k"
    elif case == 'bad device':
        extra, message = ['--device', 'gpu0'], "--device 'gpu0' is not a torch device"
    elif case == 'absent device':
        extra, message = ['--device', 'cuda'], '--device cuda: no cuda device is available here'
    elif case == 'unknown model arg':
        extra, message = ['--model-args', json.dumps(dict(json.loads(model_args), colour='red'))], "'colour'"
    elif case == 'decompression bomb':
        bomb = str(_png_header_only(tmp_path / 'bomb.png', 30000, 30000))
        images.append(bomb)
        extra, message = [], f'{bomb}: refused as a possible decompression bomb'
    else:
        broken = tmp_path / 'broken.safetensors'
        if case == 'NaN weights':
            tensors = load_file(str(weights))
            save_file({k: v.fill_(float('nan')) if k.startswith('head') else v for k, v in tensors.items()},
                      str(broken))
            message = f'internimage_t gave NaN or infinite outputs for {image}'
        else:
            data = weights.read_bytes()
            broken.write_bytes(data[:len(data) // 2] if case == 'truncated safetensors' else data[:8] + b'{"x"')
            message = f'{broken}: corrupt or truncated safetensors file'
        extra = ['--checkpoint', str(broken)]
    code = main(_predict_args(tiny_checkpoint, *images, '--json', *extra))
    out, err = capsys.readouterr()
    assert code != 0 and out == ''
    assert err.startswith('error: ') and message in err, err


def test_predict_device_defaults_to_auto_cuda_then_mps_then_cpu(monkeypatch):
    from timm_internimage.cli import build_parser
    from timm_internimage.tools.loading import resolve_device
    assert build_parser().parse_args(['predict']).device == 'auto'
    for cuda, mps, want in ((True, True, 'cuda'), (False, True, 'mps'), (False, False, 'cpu')):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: mps)
        assert resolve_device('auto') == torch.device(want)


def test_predict_22k_tag_prints_imagenet22k_names(hf_env, capsys):
    """A 21841-class tag's labels are the ImageNet-22k names in sorted-wnid order (timm's imagenet22k_synsets.txt)."""
    from timm.data import ImageNetInfo
    torch.manual_seed(0)
    weights = tiny_model('internimage_l', num_classes=21841).state_dict()
    hf_env.hub.add_repo('OpenGVLab/internimage_l_22k_384', single_file_repo(weights))
    assert main(['predict', '--model', 'internimage_l.in22k_384', '--model-args', _tiny_args(TINY),
                 '--json', '-k', '3']) == 0
    predictions = json.loads(capsys.readouterr().out)['results'][0]['predictions']
    info = ImageNetInfo('imagenet-22k')
    synsets = info.label_names()
    assert len(synsets) == 21841 and synsets == sorted(synsets)
    assert [p['label'] for p in predictions] == [info.index_to_description(p['index']) for p in predictions]
    assert {p['label'] for p in predictions}.isdisjoint(ImageNetInfo('imagenet-1k').label_descriptions())


# ---------------------------------------------------------------------------------------------------------------
# messages that must not mislead (issue 18)


def test_predict_new_head_without_checkpoint_is_refused_before_download(t_repo, hf_env, capsys):
    """num_classes other than the weights' would leave a random classifier: no percentages from it."""
    kwargs, _, _ = t_repo
    model_args = json.dumps(dict(json.loads(_tiny_args(kwargs)), num_classes=10))
    code = main(['predict', '--model-args', model_args, '--device', 'cpu'])
    out, err = capsys.readouterr()
    assert code == 2 and out == ''
    assert 'num_classes=10' in err and 'untrained' in err and '--checkpoint' in err, err
    assert [r for r in hf_env.hub.requests if '/resolve/' in r[1]] == []


def test_predict_new_head_on_a_hub_model_is_refused_after_loading(tiny_pth, hf_env, tmp_path, capsys):
    """An hf-hub: model's class count is known only once its config is read: refused then, before predicting."""
    model_args, pth = tiny_pth
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(model_args).items()}
    out = convert(str(pth), str(tmp_path / 'converted'), 'internimage_t', kwargs)
    hf_env.hub.add_repo('someone/internimage-t-tiny', {p.name: p.read_bytes() for p in out.iterdir()})
    code = main(['predict', '--model', 'hf-hub:someone/internimage-t-tiny', '--model-args', '{"num_classes": 10}',
                 '--device', 'cpu'])
    out, err = capsys.readouterr()
    assert code == 2 and out == ''
    assert 'num_classes=10' in err and '1000-class classifier' in err and 'untrained' in err, err


def test_predict_with_checkpoint_says_where_the_weights_come_from(tiny_checkpoint, capsys):
    _, weights = tiny_checkpoint
    assert main(_predict_args(tiny_checkpoint, str(sample_image_path()), '-k', '1')) == 0
    err = capsys.readouterr().err
    assert f'weights in {weights}' in err and 'Hugging Face' not in err and 'downloaded' not in err, err


@pytest.mark.parametrize('image,message', [
    ('https://example.com/cat.jpg', 'https://example.com/cat.jpg: URLs are not supported; download the image first'),
    ('-', '-: reading images from standard input is not supported'),
])
def test_predict_url_or_stdin_is_named_not_a_missing_file(tiny_checkpoint, capsys, image, message):
    code = main(_predict_args(tiny_checkpoint, image))
    err = capsys.readouterr().err
    assert code == 2 and message in err and 'no such file' not in err, err


def test_predict_truncated_image_is_reported_and_the_others_classified(tiny_checkpoint, tmp_path, capsys):
    """The header check passes, decoding fails: that image gets an error, the others their results, status 1."""
    from PIL import Image
    with Image.open(sample_image_path()) as photo:
        photo.save(tmp_path / 'whole.jpg')
    data = (tmp_path / 'whole.jpg').read_bytes()
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(data[:len(data) // 2])
    good = [str(tmp_path / 'whole.jpg'), str(sample_image_path())]
    images = [good[0], str(truncated), good[1]]
    assert main(_predict_args(tiny_checkpoint, *good, '--json', '-k', '3')) == 0
    expected = json.loads(capsys.readouterr().out)['results']

    code = main(_predict_args(tiny_checkpoint, *images, '--json', '-k', '3', '--batch-size', '2'))
    out, err = capsys.readouterr()
    results = json.loads(out)['results']
    assert code == 1
    assert [r['image'] for r in results] == images
    for got, want in zip([results[0], results[2]], expected):  # batch composition changes float rounding only
        assert [p['index'] for p in got['predictions']] == [p['index'] for p in want['predictions']]
        assert [p['probability'] for p in got['predictions']] == pytest.approx(
            [p['probability'] for p in want['predictions']], abs=1e-6)
    assert results[1]['predictions'] == [] and 'cannot be decoded' in results[1]['error']
    assert f'error: {truncated}: cannot be decoded' in err and '1 of 3 image(s) could not be classified' in err

    code = main(_predict_args(tiny_checkpoint, *images, '-k', '1'))
    out, err = capsys.readouterr()
    assert code == 1
    assert [line for line in out.splitlines() if not line.startswith(' ')] == good
    assert f'error: {truncated}: cannot be decoded' in err


@pytest.fixture
def tiny_pth(tmp_path):
    """``(model args JSON, path)`` of the ``tiny_t`` case as an official ``.pth``."""
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path / 'tiny_t.pth'
    torch.save({'model': official}, path)
    return _tiny_args(kwargs), path


@pytest.mark.parametrize('case,message', [
    ('text file', 'not a checkpoint (neither safetensors nor a PyTorch .pth archive or pickle)'),
    ('random bytes .pth', 'not a checkpoint (neither safetensors nor a PyTorch .pth archive or pickle)'),
    ('corrupt safetensors', 'corrupt or truncated safetensors file'),
    ('truncated safetensors', 'corrupt or truncated safetensors file'),
    ('truncated .pth', 'cannot be read as a checkpoint'),
    ('/dev/zero', 'not a regular file (a device, FIFO or socket)'),
    ('FIFO', 'not a regular file (a device, FIFO or socket)'),
    ('empty folder', 'no model.safetensors or model.safetensors.index.json in this folder'),
])
def test_convert_unreadable_sources_name_the_file(tmp_path, tiny_pth, capsys, case, message):
    import os
    weights = tmp_path / 'tiny.safetensors'
    weights.write_bytes(safetensors_bytes(tiny_case('tiny_t')[1]))
    src = {'text file': tmp_path / 'notes.txt', 'random bytes .pth': tmp_path / 'random.pth',
           'corrupt safetensors': tmp_path / 'corrupt.safetensors',
           'truncated safetensors': tmp_path / 'truncated.safetensors', 'truncated .pth': tmp_path / 'truncated.pth',
           '/dev/zero': Path('/dev/zero'), 'FIFO': tmp_path / 'fifo', 'empty folder': tmp_path / 'empty'}[case]
    if case == 'text file':
        src.write_text('hello, not weights\n')
    elif case == 'random bytes .pth':
        src.write_bytes(bytes(range(7, 256)) * 40)
    elif case == 'corrupt safetensors':
        src.write_bytes(weights.read_bytes()[:8] + b'{"x"' + bytes(100))
    elif case == 'truncated safetensors':
        src.write_bytes(weights.read_bytes()[:-100])
    elif case == 'truncated .pth':
        src.write_bytes(tiny_pth[1].read_bytes()[:3000])
    elif case == 'FIFO':
        os.mkfifo(src)
    elif case == 'empty folder':
        src.mkdir()
    out = tmp_path / 'out'
    assert main(['convert', str(src), str(out), '--model', 'internimage_t', '--model-args', tiny_pth[0]]) != 0
    err = capsys.readouterr().err
    assert err.startswith('error: ') and str(src) in err and message in err, err
    assert not out.exists()


def test_convert_refuses_to_overwrite_without_force(tmp_path, tiny_pth, capsys):
    model_args, pth = tiny_pth
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'config.json').write_text('{"mine": true}')
    args = ['convert', str(pth), str(out), '--model', 'internimage_t', '--model-args', model_args]
    assert main(args) == 2
    assert f'{out / "config.json"} already exist(s); pass --force' in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ['config.json'] and (out / 'config.json').read_text() == '{"mine": true}'
    assert main(args + ['--force']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'internimage_t'


@pytest.mark.parametrize('failing', ['model.safetensors', 'config.json'])
def test_convert_writes_temporaries_and_cleans_up_on_failure(tmp_path, tiny_pth, monkeypatch, capsys, failing):
    """Each output is written under a temporary name in OUT_DIR, then renamed; a failed write removes everything
    convert created, folders included."""
    import safetensors.torch
    import timm.models._hub  # private: convert imports save_config_for_hf from here (see tools/convert.py)
    written = []

    def failing_writer(original):
        def write(*args, **kwargs):
            path = Path(args[1])
            written.append(path)
            path.write_bytes(b'partial')
            if failing in ('model.safetensors' if original is save_file else 'config.json'):
                raise OSError(28, 'No space left on device')
            return original(*args, **kwargs)
        return write
    save_file, save_config = safetensors.torch.save_file, timm.models._hub.save_config_for_hf
    monkeypatch.setattr(safetensors.torch, 'save_file', failing_writer(save_file))
    monkeypatch.setattr(timm.models._hub, 'save_config_for_hf', failing_writer(save_config))
    out = tmp_path / 'new' / 'out'
    assert main(['convert', str(tiny_pth[1]), str(out), '--model', 'internimage_t',
                 '--model-args', tiny_pth[0]]) == 1
    assert 'No space left on device' in capsys.readouterr().err
    assert not (tmp_path / 'new').exists()
    assert written and all(p.parent == out and p.name not in ('model.safetensors', 'config.json') for p in written)


# ---------------------------------------------------------------------------------------------------------------
# FlashInternImage: the official .pth format, by --checkpoint


@pytest.fixture(scope='module')
def flash_pth(tmp_path_factory):
    """``(model args JSON, official .pth path, reference model, golden tensors)`` of the tiny official
    FlashInternImage (``model_flash_tiny``), saved as the official training checkpoint (``{'model': ...}``)."""
    from golden import flash_golden_model, official_weight
    model, case, tensors = flash_golden_model('model_flash_tiny')
    official = {key: official_weight(key, shape, case['weight_seed'], case['weight_rule'])
                for key, shape in case['state_dict_keys'].items()}
    path = tmp_path_factory.mktemp('flash') / 'flash_intern_image_t_1k_224.pth'
    torch.save({'model': official, 'epoch': 299}, path)
    return json.dumps(case['config']), path, model, tensors


def _image(path, seed, size=(72, 88)):
    from PIL import Image
    torch.manual_seed(seed)
    Image.fromarray((torch.rand(*size, 3) * 255).byte().numpy()).save(path)
    return path


def test_flash_predict_with_official_pth(flash_pth, tmp_path, capsys):
    model_args, path, reference, _ = flash_pth
    image = _image(tmp_path / 'noise.png', 0)
    assert main(['predict', str(image), '--model', 'flash_internimage_t', '--checkpoint', str(path), '--json',
                 '--top-k', '3', '--model-args', model_args, '--device', 'cpu']) == 0
    predictions = json.loads(capsys.readouterr().out)['results'][0]['predictions']
    want = _expected_top_of(reference, 'flash_internimage_t.in1k', image, 3)
    assert [(p['index'], p['label']) for p in predictions] == [(i, label) for i, label, _ in want]


def test_flash_validate_with_official_pth_against_its_published_top1(flash_pth, tmp_path, capsys):
    """Two images in class folders (ImageNet-1k indices): one in the class the model predicts for it (by timm's
    pipeline, computed here), one elsewhere, so top-1 is 50%; the published top-1 is the file's, 83.6."""
    model_args, path, reference, _ = flash_pth
    images = [_image(tmp_path / f'{i}.png', i) for i in range(2)]
    predicted = [_expected_top_of(reference, 'flash_internimage_t.in1k', image, 1)[0][0] for image in images]
    for image, label in zip(images, (predicted[0], (predicted[1] + 1) % 1000)):
        folder = tmp_path / 'data' / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.rename(folder / image.name)
    assert main(['validate', str(tmp_path / 'data'), '--model', 'flash_internimage_t', '--checkpoint', str(path),
                 '--model-args', model_args, '--workers', '0', '--device', 'cpu', '--json']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary['images'], summary['top1'], summary['published_top1']) == (2, 50.0, 83.6)


def test_flash_export_with_official_pth(flash_pth, tmp_path, capsys):
    model_args, path, _, _ = flash_pth
    out = tmp_path / 'flash.pt2'
    assert main(['export', '--model', 'flash_internimage_t', '--checkpoint', str(path), '--model-args', model_args,
                 '--format', 'torch-export', '--img-size', '64', '64', str(out)]) == 0
    assert f'torch-export {out}: max abs difference from eager PyTorch' in capsys.readouterr().out


def test_flash_convert_official_pth_round_trip(flash_pth, tmp_path, capsys):
    """An official FlashInternImage .pth converts to a timm folder that loads back with local-dir: equal logits; a
    width no released FlashInternImage has asks for --model."""
    model_args, path, _, tensors = flash_pth
    out = convert(str(path), str(tmp_path / 'converted'), 'flash_internimage_t', json.loads(model_args))
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert isinstance(model, FlashInternImage) and model.pretrained_cfg['tag'] == 'in1k'
    with torch.no_grad():
        torch.testing.assert_close(model(tensors['input']), tensors['logits'], rtol=0, atol=1e-4)
    assert main(['convert', str(path), str(tmp_path / 'inferred')]) == 2
    assert 'no released FlashInternImage has 32 channels; pass --model' in capsys.readouterr().err
