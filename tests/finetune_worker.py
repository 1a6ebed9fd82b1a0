"""One rank of the two-process fine-tuning checks in ``test_finetune.py`` (DDP and FSDP2 on gloo, CPU).

``python finetune_worker.py RANK WORLD_SIZE PORT OUT_DIR [BACKEND ...]`` trains a tiny float64 InternImage for
``STEPS`` steps with each DCNv3 backend (default ``BACKENDS``), wrapped as ``examples/finetune.py`` wraps it, in
DDP and then in FSDP2 (``fully_shard`` per block, then the model), and saves the full parameters as this rank
sees them to ``OUT_DIR/{wrapper}-{backend}-rank{RANK}.pt``, and (rank 0) the example's checkpoint state dict,
gathered from all ranks, to ``OUT_DIR/{wrapper}-{backend}-saved.pt``. The test module imports ``build_model``, ``make_optimizer``
and ``train`` from here for its single-process reference.
"""
import datetime
import os
import sys
from typing import Dict, Iterable, Sequence

import torch
import torch.nn.functional as F

import timm_internimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'examples'))
from finetune import full_state_dict, wrap  # noqa: E402  (examples/finetune.py)

BACKENDS = ('torch', 'compiled', 'reference')
WRAPPERS = ('ddp', 'fsdp2')
STEPS = 3
PER_RANK = 2
WORLD_SIZE = 2
NUM_CLASSES = 5
IMG_SIZE = 32
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(2, 4, 8, 16))


def build_model() -> torch.nn.Module:
    """The same float64 tiny model on every rank: seeded init, no stochastic depth, the head BatchNorm frozen.

    Per-rank BatchNorm statistics are the one thing that makes data-parallel training differ from one process on
    the whole batch (SyncBatchNorm needs CUDA), so the head BN uses its running statistics, as in fine-tuning
    with small per-device batches."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('internimage_t', num_classes=NUM_CLASSES, **TINY).double().train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def global_batch(step: int):
    """``(images, targets)`` of the whole (all ranks') batch of ``step``."""
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(PER_RANK * WORLD_SIZE, 3, IMG_SIZE, IMG_SIZE, generator=generator, dtype=torch.float64)
    targets = torch.randint(NUM_CLASSES, (PER_RANK * WORLD_SIZE,), generator=generator)
    return images, targets


def make_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0, world_size: int = 1) -> None:
    """``STEPS`` steps of mean cross-entropy on this rank's slice of each global batch."""
    for step in range(STEPS):
        images, targets = global_batch(step)
        per_rank = images.shape[0] // world_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = F.cross_entropy(model(images[part]), targets[part])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _full_parameters(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's parameters, FSDP2 shards all-gathered into full tensors, without DDP's prefix."""
    model = getattr(model, 'module', model)
    return {name: (p.full_tensor() if hasattr(p, 'full_tensor') else p).detach().clone()
            for name, p in model.named_parameters()}


def main(rank: int, world_size: int, port: int, out_dir: str, backends: Sequence[str] = BACKENDS) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for backend in backends:
            timm_internimage.set_backend(backend)
            for wrapper in WRAPPERS:
                model = wrap(build_model(), wrapper, world_size, torch.device('cpu'))
                train(model, make_optimizer(model.parameters()), rank, world_size)
                torch.save(_full_parameters(model), os.path.join(out_dir, f'{wrapper}-{backend}-rank{rank}.pt'))
                saved = full_state_dict(model)  # a collective; the whole state dict on rank 0 only
                if rank == 0:
                    torch.save(saved, os.path.join(out_dir, f'{wrapper}-{backend}-saved.pt'))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:] or BACKENDS)
