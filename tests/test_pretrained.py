"""Pretrained loading through timm and huggingface_hub, against a local Hub-compatible server (no internet)."""
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
from collections import OrderedDict

import pytest
import torch
import timm

from timm_internimage.pretrained import (
    ChecksumMismatchError, PretrainedWeightsError, WeightsNotCachedError, load_checkpoint, official_checkpoint_globals)

from conftest import assert_same_weights, official_model, tiny_model
from hub_server import hf_format, safetensors_bytes, sharded_repo, single_file_repo, tiny_case

T_TAG, T_REPO = 'internimage_t.in1k', 'OpenGVLab/internimage_t_1k_224'
S_TAG, S_REPO = 'internimage_s.in1k', 'OpenGVLab/internimage_s_1k_224'
H_TAG, H_REPO = 'internimage_h.joint_in22k_ft_in1k_640', 'OpenGVLab/internimage_h_22kto1k_640'
G_TAG, G_REPO = 'internimage_g.joint_in22k_ft_in1k_512', 'OpenGVLab/internimage_g_22kto1k_512'


def _hub_requests(hub):
    return [path for _, path in hub.requests if '/resolve/' in path or path.startswith('/api/models')]


def _cached_blobs(cache):
    return [path for path in cache.rglob('blobs/*') if path.is_file()]


def _loads_official_weights(tag, kwargs, official):
    """``tag`` built pretrained; asserts it has the official weights and computes the official model's outputs."""
    model = timm.create_model(tag, pretrained=True, **kwargs).eval()
    reference = official_model(tag.split('.')[0], kwargs, official)
    assert_same_weights(model, reference)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    return model


@pytest.fixture
def g_repo(hf_env):
    """G's first tag's repo on the fake Hub: the ``tiny_g`` golden case as three safetensors shards."""
    kwargs, official = tiny_case('tiny_g')
    repo = hf_env.hub.add_repo(G_REPO, sharded_repo(hf_format(official), num_shards=3))
    return kwargs, official, repo


# ---- single-file tags: timm's own Hub loader -------------------------------------------------------------------


def test_tag_loads_hf_format_single_file(t_repo):
    kwargs, official, _ = t_repo
    cfg = _loads_official_weights(T_TAG, kwargs, official).pretrained_cfg
    assert (cfg['hf_hub_id'], cfg['hf_hub_filename'], cfg['custom_load']) == (T_REPO, 'model.safetensors', False)
    assert 'state_dict' not in cfg


def test_bare_name_uses_default_tag(t_repo):
    kwargs, official, _ = t_repo
    model = timm.create_model('internimage_t', pretrained=True, **kwargs)
    assert model.pretrained_cfg['tag'] == 'in1k'
    assert_same_weights(model, official_model('internimage_t', kwargs, official))


def test_layer_scale_names(hf_env):
    kwargs, official = tiny_case('tiny_s')  # gamma1/2, layer_scale1/2 in the Hugging Face format
    hf_env.hub.add_repo(S_REPO, single_file_repo(hf_format(official)))
    model = timm.create_model(S_TAG, pretrained=True, **kwargs)
    assert_same_weights(model, official_model('internimage_s', kwargs, official))


def test_missing_and_unexpected_keys_are_listed(hf_env):
    kwargs, official = tiny_case('tiny_t')
    broken = dict(official)
    del broken['levels.1.blocks.0.dcn.offset.weight']
    broken['levels.9.extra'] = torch.zeros(1)
    hf_env.hub.add_repo(T_REPO, single_file_repo(hf_format(broken)))
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\).*"stages\.1\.blocks\.0\.dcn\.offset\.weight".*'
                                           r'Unexpected key\(s\).*"levels\.9\.extra"'):
        timm.create_model(T_TAG, pretrained=True, **kwargs)


def test_pretrained_strict_false_loads_a_partial_checkpoint(hf_env, caplog):
    kwargs, official = tiny_case('tiny_t')
    partial = {k: v for k, v in official.items() if not k.startswith('levels.3.')}
    hf_env.hub.add_repo(T_REPO, single_file_repo(hf_format(partial)))
    with caplog.at_level(logging.INFO, logger='timm'):
        model = timm.create_model(T_TAG, pretrained=True, pretrained_strict=False, **kwargs)
    assert_same_weights(model, official_model('internimage_t', kwargs, official), skip=('stages.3.',))
    missing = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Missing keys (')]
    assert len(missing) == 1
    listed = missing[0][len('Missing keys ('):].split(')')[0].split(', ')
    assert 'stages.3.blocks.0.dcn.offset.weight' in listed and all(k.startswith('stages.3.') for k in listed)


# ---- sharded checkpoints: the custom_load extension ------------------------------------------------------------


def test_sharded_index(g_repo, hf_env):
    kwargs, official, _ = g_repo
    model = _loads_official_weights(G_TAG, kwargs, official)
    shards = {p for _, p in hf_env.hub.requests if p.startswith(f'/{G_REPO}/') and p.endswith('.safetensors')}
    assert len(shards) == 3
    assert model.pretrained_cfg['custom_load'] == 'hf'


@pytest.mark.parametrize('change', ['num_classes', 'in_chans', 'features_only', 'headless'])
@pytest.mark.parametrize('layout', ['single file', 'sharded'])
def test_timm_semantics(layout, change, request, caplog):
    """timm's num_classes, in_chans and features_only, on timm's own loader and on the sharded extension."""
    kwargs, official, _ = request.getfixturevalue('t_repo' if layout == 'single file' else 'g_repo')
    tag = T_TAG if layout == 'single file' else G_TAG
    name = tag.split('.')[0]
    reference = official_model(name, kwargs, official)
    x = torch.randn(1, 3, 64, 64)
    if change == 'num_classes':
        with caplog.at_level(logging.INFO, logger='timm'):
            model = timm.create_model(tag, pretrained=True, **dict(kwargs, num_classes=7))
        assert model.head.fc.out_features == 7
        assert_same_weights(model, official_model(name, dict(kwargs, num_classes=7), official), skip=('head.fc',))
        assert any('Missing keys (head.fc.weight, head.fc.bias)' in r.getMessage() for r in caplog.records)
    elif change == 'in_chans':
        model = timm.create_model(tag, pretrained=True, **dict(kwargs, in_chans=1))
        torch.testing.assert_close(model.stem.conv1.weight, reference.stem.conv1.weight.sum(1, keepdim=True))
        assert_same_weights(model, reference, skip=('stem.conv1.weight',))
    elif change == 'features_only':
        features = timm.create_model(tag, pretrained=True, features_only=True, **kwargs).eval()
        outputs, expected = features(x), reference.forward_intermediates(x, intermediates_only=True)
        assert len(outputs) == len(expected) == 4
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # no pooling or classifier: the checkpoint's head stays out
        model = timm.create_model(tag, pretrained=True, **dict(kwargs, num_classes=0, global_pool='')).eval()
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), rtol=0, atol=0)


def test_unverified_layout_probes_single_file_then_index(hf_env):
    """H's layout is unverified in the manifest: the loader tries model.safetensors, then the shard index."""
    assert timm.models.get_pretrained_cfg(H_TAG).hf_hub_filename is None
    kwargs, official = tiny_case('tiny_h')
    hf_env.hub.add_repo(H_REPO, sharded_repo(hf_format(official), num_shards=2))
    model = timm.create_model(H_TAG, pretrained=True, **kwargs)
    assert_same_weights(model, official_model('internimage_h', kwargs, official))
    paths = [p for _, p in hf_env.hub.requests if '/resolve/' in p]
    assert paths[0].endswith('/model.safetensors') and any(p.endswith('.index.json') for p in paths)
    assert model.pretrained_cfg['hf_hub_filename'] == 'model.safetensors.index.json'
    hf_env.set_offline(True)
    model = timm.create_model(H_TAG, pretrained=True, **kwargs)
    assert_same_weights(model, official_model('internimage_h', kwargs, official))


def test_sharded_load_memory_maps_instead_of_copying(tmp_path):
    """Reading a sharded checkpoint must not materialise a second copy of the weights in anonymous memory."""
    if not os.path.exists('/proc/self/status'):
        pytest.skip('needs /proc')
    big = {f'w{i}': torch.randn(1024, 1024) for i in range(24)}  # 96 MiB over 3 shards
    for name, data in sharded_repo(big, num_shards=3).items():
        (tmp_path / name).write_bytes(data)
    del big

    def rss_anon():
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('RssAnon')) * 1024
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
overlay = dict(hf_hub_id=sys.argv[1], hf_hub_filename='model.safetensors.index.json')
model = timm.create_model('internimage_t', pretrained=True, channels=64, depths=(2, 2, 6, 2), pretrained_cfg_overlay=overlay)
done[0] = True
thread.join()
params = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
print(json.dumps({'peak_increase_mib': peak[0] - base, 'weights_mib': params,
                  'checksum': float(sum(t.double().sum() for t in model.state_dict().values()))}))
'''


def test_sharded_hub_load_keeps_one_copy_in_memory(hf_env):
    """End to end (Hub download, shards, timm's load_pretrained): peak anonymous memory stays ~1x the weights."""
    if not os.path.exists('/proc/self/status'):
        pytest.skip('needs /proc')
    torch.manual_seed(0)
    state_dict = timm.create_model('internimage_t', channels=64, depths=(2, 2, 6, 2)).state_dict()
    checksum = float(sum(t.double().sum() for t in state_dict.values()))
    hf_env.hub.add_repo('someone/medium-sharded', sharded_repo(state_dict, num_shards=3))
    del state_dict
    result = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, 'someone/medium-sharded'],
                            env=hf_env.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['checksum'] == pytest.approx(checksum, rel=1e-9)
    assert report['weights_mib'] > 50
    # the model itself is one copy; a loader holding the weights in memory would add a second one
    assert report['peak_increase_mib'] < 1.4 * report['weights_mib'], report


# ---- pinning, checksums, offline -------------------------------------------------------------------------------


def test_warm_cache_pinned_and_offline_make_no_requests(t_repo, hf_env, manifest_entry):
    kwargs, official, repo = t_repo
    weights = repo.files['model.safetensors']
    manifest_entry(T_REPO, revision=repo.commit,
                   files={'model.safetensors': {'size': len(weights), 'sha256': repo.sha256('model.safetensors')}})
    pinned = dict(hf_hub_id=f'{T_REPO}@{repo.commit}')  # what the cfg of a pinned manifest entry says
    timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=pinned, **kwargs)
    assert any(p.endswith(f'/resolve/{repo.commit}/model.safetensors') for _, p in hf_env.hub.requests)
    hf_env.hub.clear_log()
    # pinned revision + warm cache: served from the snapshot without asking the server
    timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=pinned, **kwargs)
    assert _hub_requests(hf_env.hub) == []
    hf_env.set_offline(True)
    model = timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=pinned, **kwargs)
    assert hf_env.hub.requests == []
    assert_same_weights(model, official_model('internimage_t', kwargs, official))


def test_offline_warm_cache_unpinned(t_repo, hf_env):
    kwargs, official, _ = t_repo
    timm.create_model(T_TAG, pretrained=True, **kwargs)
    hf_env.set_offline(True)
    hf_env.hub.clear_log()
    model = timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert hf_env.hub.requests == []
    assert_same_weights(model, official_model('internimage_t', kwargs, official))


def test_offline_cold_cache_names_missing_file(t_repo, hf_env):
    kwargs, _, _ = t_repo
    hf_env.set_offline(True)
    with pytest.raises(WeightsNotCachedError) as info:
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    message = str(info.value)
    assert f'{T_REPO}/model.safetensors (revision main)' in message
    assert 'HF_HUB_OFFLINE' in message and f'hf download {T_REPO} model.safetensors' in message
    assert str(hf_env.cache) in message
    assert hf_env.hub.requests == []


def test_checksum_mismatch_is_reported_and_evicted(t_repo, hf_env, manifest_entry):
    kwargs, official, repo = t_repo
    good = repo.files['model.safetensors']
    manifest_entry(T_REPO, files={'model.safetensors': {'size': len(good), 'sha256': repo.sha256('model.safetensors')}})
    bad = bytearray(good)
    bad[-100] ^= 0xFF  # same size, flipped bits in the tensor data
    repo.tampered['model.safetensors'] = bytes(bad)
    with pytest.raises(ChecksumMismatchError) as info:
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    message = str(info.value)
    assert f'{T_REPO}/model.safetensors' in message
    assert f'expected {repo.sha256("model.safetensors")}, got {hashlib.sha256(bytes(bad)).hexdigest()}' in message
    assert not _cached_blobs(hf_env.cache)
    assert not list(hf_env.cache.rglob('snapshots/*/model.safetensors'))
    # offline, the evicted file must not come back as if valid
    hf_env.set_offline(True)
    with pytest.raises(WeightsNotCachedError):
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    # once the server is fixed, the next call downloads again and loads
    hf_env.set_offline(False)
    del repo.tampered['model.safetensors']
    model = timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert_same_weights(model, official_model('internimage_t', kwargs, official))


def test_size_mismatch_is_reported_and_evicted(t_repo, hf_env, manifest_entry):
    kwargs, _, repo = t_repo
    good = repo.files['model.safetensors']
    manifest_entry(T_REPO, files={'model.safetensors': {'size': len(good), 'sha256': repo.sha256('model.safetensors')}})
    repo.tampered['model.safetensors'] = good[:-1000]  # a truncated file the server also announces as complete
    with pytest.raises(ChecksumMismatchError, match=f'expected {len(good)} bytes, got {len(good) - 1000} bytes'):
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert not _cached_blobs(hf_env.cache)


def test_checksum_mismatch_in_a_shard(g_repo, hf_env, manifest_entry):
    kwargs, _, repo = g_repo
    shard = 'model-00002-of-00003.safetensors'
    manifest_entry(G_REPO, files={name: {'size': len(data), 'sha256': repo.sha256(name)}
                                  for name, data in repo.files.items() if name.startswith('model')})
    repo.tampered[shard] = repo.files[shard][:-8] + b'\0' * 8
    with pytest.raises(ChecksumMismatchError, match=shard):
        timm.create_model(G_TAG, pretrained=True, **kwargs)
    cached = {p.name for p in hf_env.cache.rglob('snapshots/*/*')}
    assert shard not in cached and 'model-00001-of-00003.safetensors' in cached


def test_checksums_of_another_revision_do_not_apply(t_repo, manifest_entry):
    """The manifest's sha256 describe its revision; weights asked for at another commit are not held to them."""
    kwargs, official, repo = t_repo
    manifest_entry(T_REPO, revision='0' * 40, files={'model.safetensors': {'size': 1, 'sha256': '0' * 64}})
    model = timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=f'{T_REPO}@{repo.commit}'),
                              **kwargs)
    assert_same_weights(model, official_model('internimage_t', kwargs, official))


def test_repo_without_safetensors_is_refused(hf_env):
    kwargs, official = tiny_case('tiny_t')
    pickled = io.BytesIO()
    torch.save(official, pickled)
    hf_env.hub.add_repo('someone/pickled-only', {'pytorch_model.bin': pickled.getvalue(), 'config.json': b'{}'})
    with pytest.raises(PretrainedWeightsError, match='has neither model.safetensors nor .* only safetensors'):
        timm.create_model('internimage_t', pretrained=True,
                          pretrained_cfg_overlay=dict(hf_hub_id='someone/pickled-only', hf_hub_filename=None), **kwargs)
    with pytest.raises(PretrainedWeightsError, match='refusing to load someone/pickled-only/pytorch_model.bin'):
        timm.create_model('internimage_t', pretrained=True, pretrained_cfg_overlay=dict(
            hf_hub_id='someone/pickled-only', hf_hub_filename='pytorch_model.bin'), **kwargs)
    assert not [p for _, p in hf_env.hub.requests if p.endswith('.bin')]


def test_private_repo_uses_hf_token(hf_env, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError
    kwargs, official = tiny_case('tiny_t')
    repo = hf_env.hub.add_repo('someone/private-tiny', single_file_repo(hf_format(official)))
    repo.token = 'hf_test_token_123'
    overlay = dict(hf_hub_id='someone/private-tiny', hf_hub_filename='model.safetensors')
    with pytest.raises(RepositoryNotFoundError, match='someone/private-tiny'):
        timm.create_model('internimage_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    monkeypatch.setenv('HF_TOKEN', repo.token)
    model = timm.create_model('internimage_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    assert_same_weights(model, official_model('internimage_t', kwargs, official))
    assert f'Bearer {repo.token}' in hf_env.hub.auth_headers


def test_cache_dir_argument(t_repo, hf_env, tmp_path):
    kwargs, _, _ = t_repo
    cache = tmp_path / 'custom_cache'
    timm.create_model(T_TAG, pretrained=True, cache_dir=cache, **kwargs)
    assert list(cache.rglob('snapshots/*/model.safetensors'))
    assert not list(hf_env.cache.rglob('*.safetensors'))


@pytest.mark.parametrize('how', ['HF_HUB_CACHE', 'cache_dir', 'read-only'])
def test_unwritable_cache_names_the_directory_and_the_fix(t_repo, hf_env, tmp_path, monkeypatch, how):
    from huggingface_hub import constants
    kwargs, _, _ = t_repo
    if how == 'read-only':
        if os.geteuid() == 0:
            pytest.skip('root writes to read-only directories')
        cache = tmp_path / 'read_only'
        cache.mkdir(mode=0o500)
    else:
        (tmp_path / 'a_file').write_bytes(b'')
        cache = tmp_path / 'a_file' / 'hub'  # under a file: no directory can be made there
    if how == 'cache_dir':
        kwargs = dict(kwargs, cache_dir=cache)
    else:
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    with pytest.raises(PretrainedWeightsError, match=f'cache {cache} cannot be written .*HF_HOME.*cache_dir='):
        timm.create_model(T_TAG, pretrained=True, **kwargs)


# ---- a Hub that stalls or fails: clear errors within huggingface_hub's timeouts ----------------------------------


@pytest.fixture
def short_hub_timeouts(monkeypatch):
    """``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT`` of 1 s (huggingface_hub reads them at import)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_ETAG_TIMEOUT', 1)
    monkeypatch.setattr(constants, 'HF_HUB_DOWNLOAD_TIMEOUT', 1)


@pytest.mark.parametrize('fault,error,message,max_seconds', [
    ('server_error', PretrainedWeightsError, r'server error \(HTTP 500\)', 5),
    ('server_error_get', PretrainedWeightsError, r'server error \(HTTP 503\)', 5),
    ('truncate', PretrainedWeightsError, 'broke off .*RemoteProtocolError', 15),
    # huggingface_hub resumes a stalled transfer 5 times, 1 s apart: 6 timeouts + 5 s
    pytest.param('stall_body', PretrainedWeightsError, r'stopped answering .*HF_HUB_DOWNLOAD_TIMEOUT=1 s', 20,
                 marks=pytest.mark.slow),
])
def test_hub_failure_is_a_clear_error_within_the_timeouts(t_repo, short_hub_timeouts, fault, error, message,
                                                          max_seconds):
    kwargs, _, repo = t_repo
    repo.faults['model.safetensors'] = fault
    start = time.monotonic()
    with pytest.raises(error, match=message) as info:
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert time.monotonic() - start < max_seconds
    assert f'{T_REPO}/model.safetensors (revision main)' in str(info.value)


def test_stalled_hub_honours_hf_hub_etag_timeout(t_repo, hf_env):
    """A Hub that accepts the connection but never answers: an error after HF_HUB_ETAG_TIMEOUT, no retries of
    60 s each (a subprocess, so that huggingface_hub reads the variable at import as it does for users)."""
    kwargs, _, repo = t_repo
    repo.faults['model.safetensors'] = 'stall_head'
    env = dict(hf_env.subprocess_env(), HF_HUB_ETAG_TIMEOUT='1')
    code = f'import timm, timm_internimage; timm.create_model({T_TAG!r}, pretrained=True, **{kwargs!r})'
    start = time.monotonic()
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    assert 'PretrainedWeightsError' in result.stderr and 'stopped answering' in result.stderr
    assert 'HF_HUB_ETAG_TIMEOUT=1 s' in result.stderr


def test_unreachable_hub_with_a_cold_cache_fails_fast(t_repo, hf_env, monkeypatch):
    from huggingface_hub import constants
    kwargs, _, _ = t_repo
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(('127.0.0.1', 0))
        endpoint = 'http://127.0.0.1:%d' % closed.getsockname()[1]
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    start = time.monotonic()
    with pytest.raises(WeightsNotCachedError, match=f'the Hub at {endpoint} could not be reached'):
        timm.create_model(T_TAG, pretrained=True, **kwargs)
    assert time.monotonic() - start < 5


# ---- local files through pretrained_cfg_overlay=dict(file=...) -------------------------------------------------


@pytest.mark.parametrize('layout', ['official', 'hf', 'timm'])
def test_overlay_local_safetensors(tmp_path, layout):
    kwargs, official = tiny_case('tiny_s')
    reference = official_model('internimage_s', kwargs, official)
    state_dict = {'official': official, 'hf': hf_format(official), 'timm': reference.state_dict()}[layout]
    path = tmp_path / 'weights.safetensors'
    path.write_bytes(safetensors_bytes(state_dict))
    model = timm.create_model('internimage_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert_same_weights(model, reference)


@pytest.mark.parametrize('where', ['index', 'folder'])
def test_overlay_local_sharded(tmp_path, where):
    kwargs, official = tiny_case('tiny_g')
    for name, data in sharded_repo(hf_format(official), num_shards=2).items():
        (tmp_path / name).write_bytes(data)
    file = tmp_path / 'model.safetensors.index.json' if where == 'index' else tmp_path
    model = timm.create_model('internimage_g', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
    assert_same_weights(model, official_model('internimage_g', kwargs, official))


@pytest.mark.parametrize('index', [
    [], {'weight_map': {'stem.conv1.weight': 3}}, {'weight_map': ['model-00001-of-00001.safetensors']}, {}, b'\xff'],
    ids=['list', 'integer shard name', 'list weight_map', 'no weight_map', 'not text'])
def test_malformed_local_index_names_the_file(tmp_path, index):
    path = tmp_path / 'model.safetensors.index.json'
    path.write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    message = f'{path} is not a safetensors index'
    for file in (path, tmp_path):
        with pytest.raises(PretrainedWeightsError, match=message):
            tiny_model('internimage_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    with pytest.raises(PretrainedWeightsError, match=message):
        load_checkpoint(path)


def test_overlay_missing_file(tmp_path):
    with pytest.raises(PretrainedWeightsError, match='pretrained file not found: .*nope.safetensors'):
        timm.create_model('internimage_t', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.safetensors')))


def test_overlay_official_pth(tmp_path):
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path / 'internimage_t_1k_224.pth'
    torch.save({'model': official}, path)
    model = timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert_same_weights(model, official_model('internimage_t', kwargs, official))


class CfgNode(dict):
    """Stand-in for yacs' ``CfgNode`` that pickles like it: ``yacs.config.CfgNode``, a dict with yacs' attributes."""
    __module__ = 'yacs.config'

    def __init__(self, init_dict=None):
        super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in (init_dict or {}).items()})
        self.__dict__.update(__immutable__=False, __deprecated_keys__=set(), __renamed_keys__={},
                             __new_allowed__=False)


@pytest.fixture
def yacs_config(monkeypatch):
    """An official training config as ``torch.save`` writes it (``yacs.config.CfgNode``); the test removes the
    stand-in ``yacs`` module again before loading."""
    yacs, yacs_config = types.ModuleType('yacs'), types.ModuleType('yacs.config')
    yacs_config.CfgNode, yacs.config = CfgNode, yacs_config
    monkeypatch.setitem(sys.modules, 'yacs', yacs)
    monkeypatch.setitem(sys.modules, 'yacs.config', yacs_config)
    return CfgNode({'MODEL': {'TYPE': 'intern_image', 'INTERN_IMAGE': {'CORE_OP': 'DCNv3', 'CHANNELS': 16}},
                    'TRAIN': {'EPOCHS': 300, 'BASE_LR': 5e-4}})


@pytest.mark.parametrize('wrapper', ['model', 'module'])
def test_official_training_checkpoint_loads_without_unpickling_code(tmp_path, yacs_config, monkeypatch, wrapper):
    """The official ``save_checkpoint`` format: weights next to the yacs config, optimizer, scheduler and epoch."""
    from timm.scheduler import CosineLRScheduler
    kwargs, official = tiny_case('tiny_t')
    reference = official_model('internimage_t', kwargs, official)
    optimizer = torch.optim.AdamW(reference.parameters())
    reference(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / 'ckpt_epoch_299.pth'
    torch.save({wrapper: official, 'optimizer': optimizer.state_dict(),
                'lr_scheduler': CosineLRScheduler(optimizer, t_initial=300).state_dict(),
                'max_accuracy': 83.5, 'epoch': 299, 'config': yacs_config}, path)
    monkeypatch.delitem(sys.modules, 'yacs.config')
    monkeypatch.delitem(sys.modules, 'yacs')
    model = timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert_same_weights(model, official_model('internimage_t', kwargs, official))
    with official_checkpoint_globals():
        config = torch.load(path, weights_only=True)['config']
    assert type(config) is OrderedDict and config['MODEL']['INTERN_IMAGE']['CORE_OP'] == 'DCNv3'


class _NotATensor:
    pass


def test_pth_with_other_objects_is_refused(tmp_path):
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path / 'unsafe.pth'
    torch.save({'model': official, 'config': _NotATensor()}, path)
    with pytest.raises(RuntimeError, match=r'weights_only=True blocked .* test_pretrained\._NotATensor'):
        timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


class _Malicious:
    marker = None

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_malicious_pickle_does_not_run(tmp_path):
    kwargs, official = tiny_case('tiny_t')
    path, marker = tmp_path / 'malicious.pth', tmp_path / 'pwned'
    payload = _Malicious()
    payload.marker = marker
    torch.save({'model': official, 'config': payload}, path)
    with pytest.raises(RuntimeError, match=r'weights_only=True blocked .* (posix|nt)\.mkdir'):
        timm.create_model(T_TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    with pytest.raises(RuntimeError, match=r'(posix|nt)\.mkdir'):
        load_checkpoint(path)
    assert not marker.exists()


# ---- dtypes: every loading path goes through checkpoint_filter_fn ----------------------------------------------


def _load_through(path_kind, state_dict, tmp_path, kwargs):
    """Load ``state_dict`` into an internimage_s model through one loading path; returns the loaded state dict."""
    if path_kind == 'convert':
        from timm_internimage.tools.convert import convert
        path = tmp_path / 'weights.safetensors'
        path.write_bytes(safetensors_bytes(state_dict))
        model_kwargs = {k: v for k, v in kwargs.items() if k != 'num_classes'}  # 1000, the default
        out = convert(str(path), str(tmp_path / 'converted'), model_name='internimage_s', model_kwargs=model_kwargs)
        return load_checkpoint(out / 'model.safetensors')
    if path_kind == 'file':
        file = tmp_path / 'weights.safetensors'
        file.write_bytes(safetensors_bytes(state_dict))
    else:
        for name, data in sharded_repo(state_dict, num_shards=2).items():
            (tmp_path / name).write_bytes(data)
        file = tmp_path / 'model.safetensors.index.json'
    return timm.create_model(
        'internimage_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs).state_dict()


@pytest.mark.parametrize('path_kind', ['file', 'sharded', 'convert'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_float_checkpoint_of_another_dtype_is_cast_and_logged(tmp_path, caplog, path_kind, dtype):
    kwargs, official = tiny_case('tiny_s')
    reference = official_model('internimage_s', kwargs, official).state_dict()
    with caplog.at_level(logging.WARNING, logger='timm_internimage'):
        checkpoint = {k: v.to(dtype) if v.is_floating_point() else v for k, v in official.items()}
        loaded = _load_through(path_kind, checkpoint, tmp_path, kwargs)
    for key, value in reference.items():
        expected = value.to(dtype).float() if value.is_floating_point() else value
        assert loaded[key].dtype == value.dtype, key
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0, msg=key)
    casts = [r.getMessage() for r in caplog.records if 'Cast checkpoint tensors' in r.getMessage()]
    assert len(casts) == 1 and f'{dtype} -> torch.float32' in casts[0], casts


@pytest.mark.parametrize('path_kind', ['file', 'sharded', 'convert'])
def test_integer_tensor_for_a_float_parameter_is_an_error(tmp_path, path_kind):
    kwargs, official = tiny_case('tiny_s')
    state_dict = dict(official, **{'patch_embed.conv1.weight': official['patch_embed.conv1.weight'].to(torch.int32)})
    with pytest.raises(PretrainedWeightsError, match=r"'stem\.conv1\.weight' is torch\.int32 .* float checkpoint"):
        _load_through(path_kind, state_dict, tmp_path, kwargs)
