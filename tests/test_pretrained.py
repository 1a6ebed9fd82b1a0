"""Pretrained loading through huggingface_hub against a local Hub-compatible server (no internet)."""
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch
import timm

import timm_internimage  # noqa: F401  (registers the models)
from timm_internimage import checkpoint_filter_fn
from timm_internimage._manifest import load_manifest
from timm_internimage.pretrained import ChecksumMismatchError, PretrainedWeightsError, WeightsNotCachedError

from hub_server import hf_format, sharded_repo, single_file_repo, tiny_case, safetensors_bytes

T_TAG, T_REPO = 'internimage_t.in1k', 'OpenGVLab/internimage_t_1k_224'
S_TAG, S_REPO = 'internimage_s.in1k', 'OpenGVLab/internimage_s_1k_224'
G_TAG, G_REPO = 'internimage_g.joint_in22k_ft_in1k_512', 'OpenGVLab/internimage_g_22kto1k_512'


def _reference(name, kwargs, official):
    model = timm.create_model(name, **kwargs).eval()
    state_dict = checkpoint_filter_fn(official, model)
    own = model.state_dict()
    head = [k for k in state_dict if k.startswith('head.fc.') and state_dict[k].shape != own[k].shape]
    for key in head:
        del state_dict[key]
    model.load_state_dict(state_dict, strict=not head)
    return model


def _assert_same_weights(model, reference, skip=()):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        if not key.startswith(skip):
            assert torch.equal(got[key], want[key]), key


def _resolve_requests(hub):
    return [r for r in hub.requests if '/resolve/' in r[1] or r[1].startswith('/api/models')]


@pytest.fixture
def manifest_entry(monkeypatch):
    """Edit a manifest entry for one test (revision pin, checksums) and restore it afterwards."""
    def edit(tag, **fields):
        entry = load_manifest()['models'][tag]
        for key, value in fields.items():
            monkeypatch.setitem(entry, key, value)
        return entry
    return edit


@pytest.fixture
def t_repo(hf_env):
    kwargs, official = tiny_case('tiny_t')
    repo = hf_env.hub.add_repo(T_REPO, single_file_repo(hf_format(official)))
    return kwargs, official, repo


def test_tag_loads_hf_format_single_file(t_repo):
    kwargs, official, _ = t_repo
    model = timm.create_model(T_TAG, pretrained=True, **kwargs).eval()
    reference = _reference('internimage_t', kwargs, official)
    _assert_same_weights(model, reference)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model.pretrained_cfg['hf_hub_id'] == T_REPO and 'state_dict' not in model.pretrained_cfg


def test_bare_name_uses_default_tag(t_repo):
    kwargs, official, _ = t_repo
    model = timm.create_model('internimage_t', pretrained=True, **kwargs)
    assert model.pretrained_cfg['tag'] == 'in1k'
    _assert_same_weights(model, _reference('internimage_t', kwargs, official))


def test_layer_scale_names_and_sharded_index(hf_env):
    """S-style layer_scale keys in a single file, G-style sharded checkpoint with an index."""
    s_kwargs, s_official = tiny_case('tiny_s')
    hf_env.hub.add_repo(S_REPO, single_file_repo(hf_format(s_official)))
    model = timm.create_model(S_TAG, pretrained=True, **s_kwargs)
    _assert_same_weights(model, _reference('internimage_s', s_kwargs, s_official))

    g_kwargs, g_official = tiny_case('tiny_g')
    hf_env.hub.add_repo(G_REPO, sharded_repo(hf_format(g_official), num_shards=3))
    model = timm.create_model(G_TAG, pretrained=True, **g_kwargs).eval()
    reference = _reference('internimage_g', g_kwargs, g_official)
    _assert_same_weights(model, reference)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    shards = {p for _, p in hf_env.hub.requests if p.startswith(f'/{G_REPO}/') and p.endswith('.safetensors')}
    assert len(shards) == 3


def test_num_classes_drops_head_with_warning(t_repo, caplog):
    kwargs, official, _ = t_repo
    with caplog.at_level(logging.WARNING):
        model = timm.create_model(T_TAG, pretrained=True, **dict(kwargs, num_classes=7))
    assert model.head.fc.out_features == 7
    assert any('num_classes=7' in r.getMessage() for r in caplog.records)
    _assert_same_weights(model, _reference('internimage_t', dict(kwargs, num_classes=7), official), skip=('head.fc',))


def test_in_chans_adapts_stem(t_repo):
    kwargs, official, _ = t_repo
    model = timm.create_model(T_TAG, pretrained=True, **dict(kwargs, in_chans=1))
    torch.testing.assert_close(model.stem.conv1.weight, official['patch_embed.conv1.weight'].sum(1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_features_only_pretrained(t_repo):
    kwargs, official, _ = t_repo
    features = timm.create_model(T_TAG, pretrained=True, features_only=True, **kwargs).eval()
    reference = _reference('internimage_t', kwargs, official)
    x = torch.randn(1, 3, 64, 64)
    want = reference.forward_intermediates(x, intermediates_only=True)
    got = features(x)
    assert len(got) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert 'state_dict' not in features.pretrained_cfg


def test_warm_cache_pinned_and_offline_make_no_requests(t_repo, hf_env, manifest_entry):
    kwargs, official, repo = t_repo
    manifest_entry(T_TAG, revision=repo.commit)
    timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert any(p.endswith(f'/resolve/{repo.commit}/model.safetensors') for _, p in hf_env.hub.requests)
    hf_env.hub.clear_log()
    # pinned revision + warm cache: served from the snapshot without asking the server
    timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert _resolve_requests(hf_env.hub) == []
    # and offline
    hf_env.set_offline(True)
    model = timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert hf_env.hub.requests == []
    _assert_same_weights(model, _reference('internimage_t', kwargs, official))


def test_offline_warm_cache_unpinned(t_repo, hf_env):
    kwargs, official, _ = t_repo
    timm.create_model(T_TAG, pretrained=True, **kwargs)
    hf_env.set_offline(True)
    hf_env.hub.clear_log()
    model = timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert hf_env.hub.requests == []
    _assert_same_weights(model, _reference('internimage_t', kwargs, official))


def test_offline_cold_cache_names_missing_file(t_repo, hf_env):
    kwargs, _, _ = t_repo
    hf_env.set_offline(True)
    with pytest.raises(WeightsNotCachedError) as info:
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    message = str(info.value)
    assert f'{T_REPO}/model.safetensors' in message
    assert 'HF_HUB_OFFLINE' in message and 'hf download' in message
    assert str(hf_env.cache) in message
    assert hf_env.hub.requests == []


def _cached_blobs(cache: Path):
    return [p for p in cache.rglob('blobs/*') if p.is_file()]


def test_checksum_mismatch_is_reported_and_evicted(t_repo, hf_env, manifest_entry):
    kwargs, official, repo = t_repo
    good = repo.files['model.safetensors']
    manifest_entry(T_TAG, files={'model.safetensors': {'size': len(good), 'sha256': repo.sha256('model.safetensors')}})
    bad = bytearray(good)
    bad[-100] ^= 0xFF  # same size, flipped bits in the tensor data
    repo.tampered['model.safetensors'] = bytes(bad)
    with pytest.raises(ChecksumMismatchError) as info:
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    message = str(info.value)
    assert 'model.safetensors' in message and T_REPO in message
    assert repo.sha256('model.safetensors') in message
    assert hashlib.sha256(bytes(bad)).hexdigest() in message
    assert not _cached_blobs(hf_env.cache)
    assert not [p for p in hf_env.cache.rglob('snapshots/*/model.safetensors')]
    # offline, the evicted file must not come back as if valid
    hf_env.set_offline(True)
    with pytest.raises(WeightsNotCachedError):
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    # once the server is fixed, the next call downloads again and loads
    hf_env.set_offline(False)
    del repo.tampered['model.safetensors']
    model = timm.create_model(T_TAG, pretrained=True, **kwargs)
    _assert_same_weights(model, _reference('internimage_t', kwargs, official))


def test_checksum_mismatch_in_a_shard(hf_env, manifest_entry):
    kwargs, official = tiny_case('tiny_g')
    repo = hf_env.hub.add_repo(G_REPO, sharded_repo(hf_format(official), num_shards=3))
    shard = 'model-00002-of-00003.safetensors'
    files = {name: {'size': len(data), 'sha256': repo.sha256(name)}
             for name, data in repo.files.items() if name.endswith('.safetensors')}
    manifest_entry(G_TAG, files=files, revision=repo.commit)
    repo.tampered[shard] = repo.files[shard][:-8] + b'\0' * 8
    with pytest.raises(ChecksumMismatchError, match=shard):
        timm.create_model(G_TAG, pretrained=True, **kwargs)
    cached = {p.name for p in hf_env.cache.rglob('snapshots/*/*')}
    assert shard not in cached and 'model-00001-of-00003.safetensors' in cached


def test_missing_and_unexpected_keys_are_listed(hf_env):
    kwargs, official = tiny_case('tiny_t')
    broken = dict(official)
    del broken['levels.1.blocks.0.dcn.offset.weight']
    broken['levels.9.extra'] = torch.zeros(1)
    hf_env.hub.add_repo(T_REPO, single_file_repo(hf_format(broken)))
    with pytest.raises(KeyError) as info:
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert 'stages.1.blocks.0.dcn.offset.weight' in str(info.value)
    assert 'levels.9.extra' in str(info.value) or 'stages.9.extra' in str(info.value)


def test_repo_without_safetensors_is_refused(hf_env):
    kwargs, official = tiny_case('tiny_t')
    import io
    buffer = io.BytesIO()
    torch.save(official, buffer)
    hf_env.hub.add_repo('someone/pickled-only', {'pytorch_model.bin': buffer.getvalue(), 'config.json': b'{}'})
    with pytest.raises(PretrainedWeightsError, match='only safetensors'):
        timm.create_model('internimage_t', pretrained=True,
                          pretrained_cfg_overlay=dict(hf_hub_id='someone/pickled-only', hf_hub_filename=None), **kwargs)
    assert not [p for _, p in hf_env.hub.requests if p.endswith('.bin')]


# ---------------------------------------------------------------------------------------------------------------
# local files through pretrained_cfg_overlay=dict(file=...)


@pytest.mark.parametrize('layout', ['official', 'hf', 'timm'])
def test_overlay_local_safetensors(tmp_path, layout):
    kwargs, official = tiny_case('tiny_s')
    reference = _reference('internimage_s', kwargs, official)
    state_dict = {'official': official, 'hf': hf_format(official), 'timm': reference.state_dict()}[layout]
    path = tmp_path / 'weights.safetensors'
    path.write_bytes(safetensors_bytes(state_dict))
    model = timm.create_model('internimage_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    _assert_same_weights(model, reference)


def test_overlay_official_pth_weights_only(tmp_path):
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path / 'internimage_t_1k_224.pth'
    torch.save({'model': official}, path)
    model = timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    _assert_same_weights(model, _reference('internimage_t', kwargs, official))


class _NotATensor:
    pass


def test_overlay_pth_with_arbitrary_objects_is_refused(tmp_path):
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path / 'unsafe.pth'
    torch.save({'model': official, 'config': _NotATensor()}, path)
    with pytest.raises(PretrainedWeightsError, match='weights_only'):
        timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def test_overlay_missing_file(tmp_path):
    with pytest.raises(PretrainedWeightsError, match='not found'):
        timm.create_model('internimage_t', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.safetensors')))


def test_sharded_load_memory_maps_instead_of_copying(tmp_path):
    """Loading a sharded checkpoint must not materialise a second copy of the weights in anonymous memory."""
    from timm_internimage.pretrained import load_checkpoint
    big = {f'w{i}': torch.randn(1024, 1024) for i in range(24)}  # 96 MiB over 3 shards
    for name, data in sharded_repo(big, num_shards=3).items():
        (tmp_path / name).write_bytes(data)
    del big

    def rss_anon():
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('RssAnon')) * 1024
    if not os.path.exists('/proc/self/status'):
        pytest.skip('needs /proc')
    before = rss_anon()
    state_dict = load_checkpoint(tmp_path / 'model.safetensors.index.json')
    touched = sum(float(v[0, 0]) for v in state_dict.values())  # noqa: F841
    assert len(state_dict) == 24
    assert rss_anon() - before < 32 * 2 ** 20


_MEMORY_SCRIPT = r'''
import json, sys, threading, time
import torch, timm
import timm_internimage

def anon_mib():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('RssAnon')) / 1024

peak, done = [0.0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.001)

base = anon_mib()
thread = threading.Thread(target=sample)
thread.start()
model = timm.create_model('internimage_t', pretrained=True, channels=64, depths=(2, 2, 6, 2),
                          pretrained_cfg_overlay=dict(hf_hub_id=sys.argv[1], hf_hub_filename='model.safetensors.index.json'))
done[0] = True
thread.join()
params = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
print(json.dumps({'peak_increase_mib': peak[0] - base, 'weights_mib': params,
                  'checksum': float(sum(t.double().sum() for t in model.state_dict().values()))}))
'''


def test_sharded_hub_load_keeps_one_copy_in_memory(hf_env):
    """End to end (Hub download, shards, timm's load_pretrained): peak anonymous memory stays ~1x the weights."""
    import json
    import subprocess
    import sys
    if not os.path.exists('/proc/self/status'):
        pytest.skip('needs /proc')
    torch.manual_seed(0)
    model = timm.create_model('internimage_t', channels=64, depths=(2, 2, 6, 2))
    state_dict = model.state_dict()
    checksum = float(sum(t.double().sum() for t in state_dict.values()))
    hf_env.hub.add_repo('someone/medium-sharded', sharded_repo(state_dict, num_shards=3))
    del model, state_dict
    result = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, 'someone/medium-sharded'],
                            env=hf_env.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['checksum'] == pytest.approx(checksum, rel=1e-9)
    assert report['weights_mib'] > 50
    # the model itself is one copy; a loader holding the weights in memory would add a second one
    assert report["peak_increase_mib"] < 1.4 * report['weights_mib'], report


def test_private_repo_uses_hf_token(hf_env, monkeypatch):
    kwargs, official = tiny_case('tiny_t')
    repo = hf_env.hub.add_repo('someone/private-tiny', single_file_repo(hf_format(official)))
    repo.token = 'hf_test_token_123'
    overlay = dict(hf_hub_id='someone/private-tiny', hf_hub_filename='model.safetensors')
    with pytest.raises(Exception) as info:
        timm.create_model('internimage_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    assert 'someone/private-tiny' in str(info.value)
    monkeypatch.setenv('HF_TOKEN', repo.token)
    model = timm.create_model('internimage_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    _assert_same_weights(model, _reference('internimage_t', kwargs, official))
    assert f'Bearer {repo.token}' in hf_env.hub.auth_headers


def test_unverified_layout_probes_single_file_then_index(hf_env):
    """H's layout is unverified in the manifest: the loader tries model.safetensors, then the shard index."""
    tag, repo_id = 'internimage_h.joint_in22k_ft_in1k_640', 'OpenGVLab/internimage_h_22kto1k_640'
    assert timm.models.get_pretrained_cfg(tag).hf_hub_filename is None
    kwargs, official = tiny_case('tiny_h')
    hf_env.hub.add_repo(repo_id, sharded_repo(hf_format(official), num_shards=2))
    model = timm.create_model(tag, pretrained=True, **kwargs)
    _assert_same_weights(model, _reference('internimage_h', kwargs, official))
    paths = [p for _, p in hf_env.hub.requests if '/resolve/' in p]
    assert paths[0].endswith('/model.safetensors') and any(p.endswith('.index.json') for p in paths)
    hf_env.set_offline(True)
    model = timm.create_model(tag, pretrained=True, **kwargs)
    _assert_same_weights(model, _reference('internimage_h', kwargs, official))


def test_cache_dir_argument(t_repo, hf_env, tmp_path):
    kwargs, official, _ = t_repo
    cache = tmp_path / 'custom_cache'
    timm.create_model(T_TAG, pretrained=True, cache_dir=cache, **kwargs)
    assert list(cache.rglob('snapshots/*/model.safetensors'))
    assert not hf_env.cache.exists() or not list(hf_env.cache.rglob('*.safetensors'))


def test_size_mismatch_is_reported_and_evicted(t_repo, hf_env, manifest_entry):
    kwargs, _, repo = t_repo
    good = repo.files['model.safetensors']
    manifest_entry(T_TAG, files={'model.safetensors': {'size': len(good), 'sha256': repo.sha256('model.safetensors')}})
    repo.tampered['model.safetensors'] = good[:-1000]  # a truncated transfer the server also reports as complete
    with pytest.raises(ChecksumMismatchError, match=f'expected {len(good)} bytes, got {len(good) - 1000} bytes'):
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert not _cached_blobs(hf_env.cache)
