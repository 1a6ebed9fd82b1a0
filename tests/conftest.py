"""Shared fixtures and helpers.

- ``fake_hub``/``hf_env``: a local Hub-compatible server and an isolated Hugging Face cache; ``t_repo``: the T tag's
  repo on it; ``manifest_entry``: edits a manifest entry for one test.
- ``golden_float64``: the float64 reference outputs of the large-offset golden model cases, once per session.
- Plain helpers the test modules import (``from conftest import ...``): ``REPO_ROOT``, ``NEEDS_COMPILED``,
  ``KERNEL_BACKENDS``, ``ALL_BACKENDS`` (the DCNv3 backends to parametrize over), ``TINY``, ``TINY_HG``, ``tiny_kwargs``,
  ``tiny_model``, ``official_model``, ``assert_same_weights``, ``random_case``, ``output_size``, ``leaves``,
  ``forward_backward``, ``dcnv3_module``.

``test_compiled_op.py`` also runs alone in an environment with only torch, pytest, safetensors, numpy and the
compiled op (``cd tests && python -m pytest test_compiled_op.py``), and this file is loaded there too: at module
level it imports nothing else (timm, timm_internimage and huggingface_hub are imported inside functions).
"""
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_file(relative_path: str) -> types.ModuleType:
    """A script of the repository that is not in a package (an example, a benchmark, hubconf.py), executed afresh
    as a module. It is registered in ``sys.modules`` under a name made from its path, where dataclasses and pickle
    look their module up."""
    name = '_repo_' + '_'.join(Path(relative_path).with_suffix('').parts)
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _compiled_op_available():
    try:
        from timm_internimage.ops import compiled_backend_available
    except ImportError:  # test_compiled_op.py's own environment: torch and the compiled op only
        return False
    return compiled_backend_available()


NEEDS_COMPILED = pytest.mark.skipif(not _compiled_op_available(), reason='timm-internimage-dcnv3 is not installed')
KERNEL_BACKENDS = ['torch', pytest.param('compiled', marks=NEEDS_COMPILED)]  # the official CUDA kernel's semantics
ALL_BACKENDS = ['reference', 'torch', pytest.param('compiled', marks=NEEDS_COMPILED)]

# ---- settings -----------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_settings():
    """Tests change the DCNv3 backend and the fused-linear switch with timm_internimage.set_backend /
    set_fused_linear; each test ends with the settings it started with. (Skipped where timm_internimage is not
    installed: test_compiled_op.py alone.)"""
    try:
        from timm_internimage.ops import fused_linear_enabled, get_backend, set_backend, set_fused_linear
    except ImportError:
        yield
        return
    saved = get_backend(), fused_linear_enabled()
    yield
    set_backend(saved[0])
    set_fused_linear(saved[1])


# ---- small models -----------------------------------------------------------------------------------------------

# Every stage and every block kind, a fraction of a second a forward. H and G need six stage-2 blocks for their
# level-2 post norms (after blocks 1, 3 and 5).
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(2, 4, 8, 16))
TINY_HG = dict(TINY, depths=(1, 1, 6, 1), level2_post_norm_block_ids=(1, 3, 5))


def tiny_kwargs(name):
    """``TINY_HG`` for H and G, ``TINY`` for the other variants."""
    return TINY_HG if name in ('internimage_h', 'internimage_g') else TINY


def tiny_model(name='internimage_t', **kwargs):
    """``timm.create_model(name)`` shrunk by ``tiny_kwargs(name)``; ``kwargs`` add or override."""
    import timm
    import timm_internimage  # noqa: F401  (registers the models)
    return timm.create_model(name, **dict(tiny_kwargs(name), **kwargs))


def official_model(name, kwargs, official_state_dict):
    """``timm.create_model(name, **kwargs)`` in eval mode holding an official state dict (any key format).

    A classifier of another size than the checkpoint's keeps its initialisation (the checkpoint's is dropped and the
    rest loads strictly)."""
    import timm
    from timm_internimage import checkpoint_filter_fn  # (and registers the models)
    model = timm.create_model(name, **kwargs).eval()
    state_dict = checkpoint_filter_fn(official_state_dict, model)
    own = model.state_dict()
    head = [k for k in state_dict if k.startswith('head.fc.') and state_dict[k].shape != own[k].shape]
    for key in head:
        del state_dict[key]
    model.load_state_dict(state_dict, strict=not head)
    return model


def assert_same_weights(model, reference, skip=()):
    """The same state-dict keys, and equal tensors except under the key prefixes ``skip``."""
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        if not key.startswith(skip):
            assert torch.equal(got[key], want[key]), key


# ---- the DCNv3 op -----------------------------------------------------------------------------------------------


def output_size(size, kernel, stride=1, pad=0, dilation=1):
    """One side of a DCNv3 (convolution) output."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def random_case(batch=2, height=7, width=9, group=2, group_channels=4, kernel=3, stride=1, pad=1, dilation=1,
                offset_scale=1.0, remove_center=False, dtype=torch.float64, device='cpu', spread=2.0, seed=0):
    """``(input, offset, mask, args)`` of a random DCNv3 case; ``args`` are the op's positional scalars.

    NHWC input ~ N(0, 1); offsets ~ N(0, spread), large enough to sample outside the map and between pixels; the
    mask normalised (softmax over each group's points). ``kernel`` is an int or ``(kernel_h, kernel_w)``. Drawn in
    float64 from its own generator, then cast: every dtype and device gets the same values.
    """
    kernel_h, kernel_w = (kernel, kernel) if isinstance(kernel, int) else kernel
    points = kernel_h * kernel_w - int(remove_center)
    height_out = output_size(height, kernel_h, stride, pad, dilation)
    width_out = output_size(width, kernel_w, stride, pad, dilation)
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(batch, height, width, group * group_channels, generator=generator, dtype=torch.float64)
    offset = spread * torch.randn(batch, height_out, width_out, group * points * 2, generator=generator,
                                  dtype=torch.float64)
    mask = torch.randn(batch, height_out, width_out, group, points, generator=generator, dtype=torch.float64)
    mask = mask.softmax(-1).flatten(-2)
    args = (kernel_h, kernel_w, stride, stride, pad, pad, dilation, dilation, group, group_channels, offset_scale,
            remove_center)
    return (*(t.to(device=device, dtype=dtype) for t in (input, offset, mask)), args)


def leaves(*tensors):
    """Detached copies that require gradients."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def forward_backward(fn, inputs, grad_output, *args, **kwargs):
    """``[output, *gradients of inputs]`` of ``fn(*inputs, *args, **kwargs)`` for the upstream ``grad_output``."""
    inputs = leaves(*inputs)
    output = fn(*inputs, *args, **kwargs)
    output.backward(grad_output)
    return [output.detach()] + [t.grad for t in inputs]


def dcnv3_module(channels=16, group=2, dtype=torch.float32, **kwargs):
    """A seeded ``DCNv3`` module whose offsets and masks matter (the official initialisation makes offsets zero)."""
    from timm_internimage.ops import DCNv3
    torch.manual_seed(0)
    module = DCNv3(channels=channels, group=group, **kwargs).to(dtype)
    for layer in (module.offset, module.mask):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return module


# ---- golden model cases -----------------------------------------------------------------------------------------


@pytest.fixture(scope='session')
def golden_float64():
    """``get(name) -> (model, case, tensors, outputs)`` for a large-offset golden model case, computed once a session.

    ``model`` is the official model in float64 (eval mode; tests may run it, not change it), ``outputs[j]`` the
    reference backend's float64 logits and stage outputs (``golden.golden_outputs``) for the case's input ``j``.
    """
    from golden import golden_model, golden_outputs
    cache = {}

    def get(name):
        if name not in cache:
            model, case, tensors = golden_model(name, torch.float64)
            from timm_internimage import backend
            with backend('reference'):
                outputs = [golden_outputs(model, tensors[f'input.{j}'].double()) for j in range(len(case['inputs']))]
            cache[name] = model, case, tensors, outputs
        return cache[name]

    return get


# ---- a local Hub ------------------------------------------------------------------------------------------------


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
    fake_hub.clear_faults()

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

    yield Env()
    fake_hub.clear_faults()  # end the requests a test left stalled


@pytest.fixture
def t_repo(hf_env):
    """``internimage_t.in1k``'s Hub repo on ``fake_hub``, holding the ``tiny_t`` golden case in the Hugging Face
    format. Returns ``(model kwargs, official state dict, FakeRepo)``."""
    from hub_server import hf_format, single_file_repo, tiny_case
    kwargs, official = tiny_case('tiny_t')
    repo = hf_env.hub.add_repo('OpenGVLab/internimage_t_1k_224', single_file_repo(hf_format(official)))
    return kwargs, official, repo


@pytest.fixture
def manifest_entry(monkeypatch):
    """Edit the manifest entry of a Hub repo for one test (revision pin, checksums); restored afterwards."""
    from timm_internimage._manifest import load_manifest

    def edit(repo_id, **fields):
        entry = load_manifest()['repos'][repo_id]
        for key, value in fields.items():
            monkeypatch.setitem(entry, key, value)
        return entry
    return edit
