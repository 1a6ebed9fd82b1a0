"""``python -m timm_internimage`` predict / convert / list / manifest-refresh, against the local fake Hub."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm

from timm_internimage.cli import _infer_model, convert, main, sample_image_path
from timm_internimage._manifest import dump_manifest, hub_source, load_manifest
from timm_internimage.internimage import pretrained_cfgs

from conftest import assert_same_weights, official_model
from hub_server import hf_format, safetensors_bytes, sharded_repo, single_file_repo, tiny_case

REPO_ROOT = Path(__file__).resolve().parents[1]
T_TAG, T_REPO = 'internimage_t.in1k', 'OpenGVLab/internimage_t_1k_224'
G_REPO = 'OpenGVLab/internimage_g_22kto1k_512'


def _tiny_args(kwargs):
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != 'num_classes'})


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable, '-m', 'timm_internimage', *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _expected_top(kwargs, official, image_path, k):
    """What predict must print, computed independently with timm's data pipeline and ImageNet labels."""
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    model = official_model('internimage_t', kwargs, official)
    model.pretrained_cfg = timm.models.get_pretrained_cfg(T_TAG).to_dict()
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


@pytest.mark.parametrize('name,classes', [('internimage_t', 1000), ('internimage_xl', 21841), ('internimage_g', 1000)])
def test_convert_infers_released_variant(name, classes):
    state_dict = timm.create_model(name, device='meta', num_classes=classes).state_dict()
    assert _infer_model(state_dict) == {'model': name, 'num_classes': classes}
    official_style = {'model.patch_embed.conv1.weight': state_dict['stem.conv1.weight'],
                      'model.head.weight': state_dict['head.fc.weight']}
    assert _infer_model(official_style) == {'model': name, 'num_classes': classes}


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
