"""Fine-tuning paths on CPU: DDP and FSDP2 on gloo (two processes), gradient checkpointing, layer-wise lr decay through
``group_matcher``, ``torch.compile`` of a training step, and ``examples/finetune.py`` (single process and torchrun)."""
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm

import timm_internimage
from timm_internimage import set_backend
from timm_internimage.ops import compiled_backend_available

import finetune_worker
from conftest import ALL_BACKENDS, NEEDS_COMPILED, REPO_ROOT, TINY, tiny_kwargs, tiny_model

DIST_TIMEOUT_S = 420


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1', **extra)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / 'tests')] +
                                        [p for p in [os.environ.get('PYTHONPATH')] if p])
    return env


# ---------------------------------------------------------------------------------------------------------------
# DDP and FSDP2


@pytest.fixture(scope='module')
def distributed_run(tmp_path_factory):
    """The parameters each of two gloo ranks holds after ``finetune_worker.STEPS`` steps, per wrapper and backend."""
    out = tmp_path_factory.mktemp('distributed')
    port = _free_port()
    backends = [b for b in finetune_worker.BACKENDS if b != 'compiled' or compiled_backend_available()]
    procs = [subprocess.Popen([sys.executable, str(REPO_ROOT / 'tests' / 'finetune_worker.py'), str(rank),
                               str(finetune_worker.WORLD_SIZE), str(port), str(out), *backends],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(finetune_worker.WORLD_SIZE)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=DIST_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0] * len(procs), '\n'.join(logs)
    return out


@functools.lru_cache(maxsize=None)
def _one_process(backend):
    """Initial parameters and final state dict of the single-process run on the whole batches."""
    with timm_internimage.backend(backend):
        model = finetune_worker.build_model()
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        finetune_worker.train(model, finetune_worker.make_optimizer(model.parameters()))
    return initial, model.state_dict()


@pytest.mark.parametrize('backend', ALL_BACKENDS)
@pytest.mark.parametrize('wrapper', finetune_worker.WRAPPERS)
def test_data_parallel_training_equals_one_process_on_the_whole_batch(distributed_run, wrapper, backend):
    """Both ranks end with the same parameters, equal (float64, 1e-10) to one process stepping on the concatenated
    batches, and training moved them. ``examples/finetune.py``'s checkpoint state dict (gathered from the shards
    under FSDP2, without DDP's prefix) holds the same weights."""
    ranks = [torch.load(distributed_run / f'{wrapper}-{backend}-rank{rank}.pt')
             for rank in range(finetune_worker.WORLD_SIZE)]
    saved = torch.load(distributed_run / f'{wrapper}-{backend}-saved.pt')
    initial, single = _one_process(backend)
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    for name in initial:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], single[name], rtol=0, atol=1e-10, msg=name)
    assert max(float((single[n] - initial[n]).abs().max()) for n in initial) > 1e-3
    assert saved.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# gradient checkpointing


def _saved_tensor_bytes_and_grads(model, x, y):
    """Bytes that autograd keeps for backward outside checkpointed regions, and the parameter gradients."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(1)  # the stochastic-depth draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(saved), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize('backend', ALL_BACKENDS)
def test_grad_checkpointing_same_gradients_less_saved_memory(backend, monkeypatch):
    """``set_grad_checkpointing(True)`` and the official ``with_cp=True`` give the gradients of the plain model
    (stochastic depth on: the recomputation replays its random draws) and keep less for backward."""
    set_backend(backend)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 3])
    results = {}
    for how in ('plain', 'set_grad_checkpointing', 'with_cp'):
        torch.manual_seed(0)
        model = tiny_model(num_classes=5, drop_path_rate=0.3, with_cp=how == 'with_cp').double().train()
        if how == 'set_grad_checkpointing':
            model.set_grad_checkpointing(True)
        assert all(stage.grad_checkpointing == (how != 'plain') for stage in model.stages)
        results[how] = _saved_tensor_bytes_and_grads(model, x, y)
    plain_bytes, plain_grads = results['plain']
    for how in ('set_grad_checkpointing', 'with_cp'):
        saved_bytes, grads = results[how]
        assert saved_bytes < 0.5 * plain_bytes, (how, saved_bytes, plain_bytes)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-12, msg=f'{how}: {name}')


# ---------------------------------------------------------------------------------------------------------------
# layer-wise learning-rate decay


def _expected_layer(name, depths):
    """The BEiT-style layer of a parameter: 0 the stem, then one layer per block in order (a stage's downsample
    with its first block, its norm with its last), the neck and head last."""
    if name.startswith('stem.'):
        return 0
    match = re.match(r'stages\.(\d+)\.(downsample|norm|blocks\.(\d+))\.', name)
    if match is None:
        assert name.startswith(('head.', 'neck.')), name
        return 1 + sum(depths)
    stage = int(match.group(1))
    first = 1 + sum(depths[:stage])
    if match.group(2) == 'downsample':
        return first
    if match.group(2) == 'norm':
        return first + depths[stage] - 1
    return first + int(match.group(3))


@pytest.mark.parametrize('name', ['internimage_t', 'internimage_h'])
def test_layer_decay_groups_by_stage_and_block(name):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    decay, lr = 0.5, 1e-3
    model = tiny_model(name)
    depths = tiny_kwargs(name)['depths']
    optimizer = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=0.05, layer_decay=decay)
    num_layers = sum(depths) + 2
    scale_of = {id(p): group['lr_scale'] for group in optimizer.param_groups for p in group['params']}
    decay_of = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    named = list(model.named_parameters())
    assert len(scale_of) == len(named)
    for param_name, param in named:
        layer = _expected_layer(param_name, depths)
        assert scale_of[id(param)] == pytest.approx(decay ** (num_layers - 1 - layer)), param_name
        assert decay_of[id(param)] == (0.0 if param.ndim <= 1 or param_name.endswith('.gamma') else 0.05), param_name
    assert {_expected_layer(n, depths) for n, _ in named} == set(range(num_layers))
    # timm's schedulers apply the scales
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=10)
    scheduler.step(0)
    assert all(group['lr'] == pytest.approx(lr * group['lr_scale']) for group in optimizer.param_groups)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['torch', pytest.param('compiled', marks=NEEDS_COMPILED)])
def test_compiled_training_step_matches_eager(backend, monkeypatch):
    """Training steps with the forward and loss under ``torch.compile(fullgraph=True)`` through AOTAutograd, which
    compiles the backward with them through the op's fake and autograd kernels; the parameters (float64, SGD)
    match eager.
    (Inductor also compiles this step, in 2-3 minutes on two CPU cores: too slow for the suite.)"""
    set_backend(backend)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 3])
    params = {}
    for mode in ('eager', 'compiled'):
        torch.manual_seed(0)
        model = tiny_model(num_classes=5, depths=(1, 1, 1, 1)).double().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # linear in the gradients

        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)

        if mode == 'compiled':
            loss_fn = torch.compile(loss_fn, fullgraph=True, backend='aot_eager')
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(x, y).backward()  # the backward graph AOTAutograd compiled with the forward
            optimizer.step()
        params[mode] = {n: p.detach() for n, p in model.named_parameters()}
    for name, value in params['eager'].items():
        torch.testing.assert_close(params['compiled'][name], value, rtol=0, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# examples/finetune.py


@pytest.fixture
def image_folder(tmp_path):
    """``train/`` and ``val/`` with two classes of variants of the bundled photo."""
    from PIL import Image, ImageOps
    from timm_internimage.tools.images import sample_image_path
    with Image.open(sample_image_path()) as image:
        base = image.convert('RGB')
    for split, count in (('train', 4), ('val', 1)):
        for label, change in (('cat', lambda im: im), ('upside_down', ImageOps.flip)):
            (tmp_path / 'data' / split / label).mkdir(parents=True)
            for i in range(count):
                change(base.crop((30 * i, 0, 300 + 30 * i, 300))).save(tmp_path / 'data' / split / label / f'{i}.jpg')
    return tmp_path / 'data'


def _example(args, env, launcher=(sys.executable,)):
    return subprocess.run([*launcher, str(REPO_ROOT / 'examples' / 'finetune.py'), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=DIST_TIMEOUT_S)


def _assert_checkpoint_loads(output, kwargs, pretrained):
    """The saved weights load through ``pretrained_cfg_overlay=dict(file=...)`` and are the trained ones."""
    from safetensors.torch import load_file
    summary = json.loads((output / 'finetune.json').read_text())
    assert summary['classes'] == ['cat', 'upside_down'] and summary['steps'] == 2
    saved = load_file(str(output / 'model.safetensors'))
    model = timm.create_model('internimage_t', pretrained=True, num_classes=2, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(output / 'model.safetensors'), num_classes=2))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    changed = [k for k in pretrained if k in saved and not torch.equal(saved[k], pretrained[k])]
    assert 'stem.conv1.weight' in changed and 'stages.3.blocks.0.mlp.fc2.weight' in changed
    return summary, model.eval()


def test_example_finetune_two_steps_from_the_hub(t_repo, hf_env, image_folder, tmp_path, capsys):
    """Two steps from the T tag's weights (loopback Hub) on a new 2-class head; the checkpoint loads back, and
    ``validate --checkpoint`` scores it with its fine-tuned head."""
    from timm.data import ImageDataset, create_transform, resolve_data_config
    from timm_internimage.cli import main
    kwargs = {k: v for k, v in t_repo[0].items() if k != 'num_classes'}
    model_args = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    result = _example([str(image_folder), '--model', 'internimage_t.in1k', '--model-args', model_args,
                       '--batch-size', '2', '--max-steps', '2', '--img-size', '64', '--workers', '0',
                       '--output', str(tmp_path / 'out')], _env(**hf_env.env))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'saved' in result.stdout and 'val top-1' in result.stdout
    pretrained = timm.create_model('internimage_t.in1k', pretrained=True, **kwargs).state_dict()
    _, model = _assert_checkpoint_loads(tmp_path / 'out', kwargs, pretrained)

    dataset = ImageDataset(str(image_folder / 'val'), transform=create_transform(**resolve_data_config(model=model)))
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    with torch.no_grad():
        logits = model(x)
    assert main(['validate', str(image_folder / 'val'), '--model', 'internimage_t', '--json', '--workers', '0',
                 '--checkpoint', str(tmp_path / 'out' / 'model.safetensors'),
                 '--model-args', json.dumps(dict(json.loads(model_args), num_classes=2))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['images'] == 2 and summary['published_top1'] is None
    assert summary['top1'] == pytest.approx(100 * float((logits.argmax(1) == y).float().mean()))
    assert summary['loss'] == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-5)


@pytest.mark.slow
def test_example_finetune_torchrun_fsdp2(image_folder, tmp_path):
    """Two gloo processes under torchrun with FSDP2 and gradient checkpointing: the gathered checkpoint loads."""
    torchrun = shutil.which('torchrun', path=str(Path(sys.executable).parent))
    assert torchrun is not None
    model_args = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    result = _example([str(image_folder), '--model', 'internimage_t', '--no-pretrained', '--model-args', model_args,
                       '--batch-size', '2', '--max-steps', '2', '--img-size', '64', '--workers', '0',
                       '--distributed', 'fsdp2', '--grad-checkpointing', '--output', str(tmp_path / 'out')],
                      _env(), launcher=(torchrun, '--standalone', '--nproc-per-node', '2'))
    assert result.returncode == 0, result.stdout + result.stderr
    torch.manual_seed(0)  # the example's seed: its initial weights
    initial = tiny_model(num_classes=2, drop_path_rate=0.1).state_dict()
    summary, _ = _assert_checkpoint_loads(tmp_path / 'out', dict(TINY), initial)
    assert summary['world_size'] == 2
