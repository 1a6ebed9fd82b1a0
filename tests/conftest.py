"""Shared fixtures. ``fake_hub``/``hf_env``: a local Hub-compatible server and an isolated Hugging Face cache."""
import os
from pathlib import Path

import pytest

from hub_server import FakeHub


@pytest.fixture(scope='session')
def fake_hub():
    """A Hub-compatible HTTP server on 127.0.0.1 for the whole session (tests add repos to it)."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def hf_env(fake_hub, tmp_path, monkeypatch):
    """Point huggingface_hub at ``fake_hub`` with a fresh, empty cache (``HF_HOME``) for this test.

    Sets the environment variables (inherited by subprocesses) and the matching ``huggingface_hub.constants``
    values, which the library reads once at import time. Yields a namespace with ``hub``, ``home``, ``cache``,
    ``env`` (for subprocesses) and ``set_offline(bool)``.
    """
    from huggingface_hub import constants
    home = tmp_path / 'hf_home'
    cache = home / 'hub'
    env = {
        'HF_HOME': str(home),
        'HF_HUB_CACHE': str(cache),
        'HF_ENDPOINT': fake_hub.endpoint,
        'HF_HUB_OFFLINE': '0',
        'HF_HUB_DISABLE_TELEMETRY': '1',
        'HF_HUB_ETAG_TIMEOUT': '5',
        'NO_PROXY': '127.0.0.1,localhost',
        'no_proxy': '127.0.0.1,localhost',
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_HOME', str(home))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'ENDPOINT', fake_hub.endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                        fake_hub.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    fake_hub.clear_log()

    class Env:
        hub = fake_hub

        def __init__(self):
            self.home = home
            self.cache = cache
            self.env = env

        def set_offline(self, offline: bool = True) -> None:
            monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)
            monkeypatch.setenv('HF_HUB_OFFLINE', '1' if offline else '0')
            self.env['HF_HUB_OFFLINE'] = '1' if offline else '0'

        def subprocess_env(self) -> dict:
            out = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
            out.update(self.env)
            out['PYTHONPATH'] = os.pathsep.join(
                [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get('PYTHONPATH')] if p])
            return out

    return Env()
