#!/usr/bin/env python3
"""Fine-tune a pretrained InternImage on an image folder with timm's data pipeline, optimizer and schedule.

DATA holds ``train/`` (and optionally ``val/``) class folders, or the class folders themselves. Single process::

    python examples/finetune.py DATA --model internimage_t.in1k --epochs 10 --batch-size 32 --lr 1e-4 --output out

Data parallel (DDP) or fully sharded (FSDP2: ``fully_shard`` on every block, then on the model), on GPUs (NCCL) or
CPUs (gloo)::

    torchrun --standalone --nproc-per-node 8 examples/finetune.py DATA --distributed fsdp2 --amp bf16

The optimizer is timm's ``create_optimizer_v2`` with layer-wise learning-rate decay (``--layer-decay``: the stem,
then the blocks stage by stage, the head last), the schedule ``create_scheduler_v2`` (cosine with warmup, stepped
every update; it applies each group's ``lr_scale``). ``--grad-checkpointing`` trades compute for activation memory.
``OUTPUT/model.safetensors`` holds the full weights (gathered from the shards under FSDP2), and
``OUTPUT/finetune.json`` the model name, class count and class names. Load them with::

    timm.create_model('internimage_t', pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file='out/model.safetensors', num_classes=N))

and check them with ``python -m timm_internimage validate DATA/val --model internimage_t --checkpoint
out/model.safetensors --model-args '{"num_classes": N}'``.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

import timm
import timm_internimage  # noqa: F401  (registers the models)
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('data', help='folder with train/ (and val/) class folders, or the class folders themselves')
    p.add_argument('--model', default='internimage_t.in1k', help='model name or model.tag')
    p.add_argument('--no-pretrained', action='store_true', help='start from a random initialisation')
    p.add_argument('--model-args', default='{}', help='extra timm.create_model keyword arguments (JSON object)')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--max-steps', type=int, default=0, help='stop after this many optimizer steps (0: no limit)')
    p.add_argument('--batch-size', type=int, default=32, help='per process')
    p.add_argument('--lr', type=float, default=1e-4, help='peak learning rate (of the head; see --layer-decay)')
    p.add_argument('--min-lr', type=float, default=1e-6)
    p.add_argument('--warmup-epochs', type=float, default=1.0)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--layer-decay', type=float, default=0.9, help='layer-wise lr decay (1: none)')
    p.add_argument('--opt', default='adamw')
    p.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    p.add_argument('--drop-path', type=float, default=0.1)
    p.add_argument('--img-size', type=int, default=0, help='input size (default: the model\'s)')
    p.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast dtype (default: float32)')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--distributed', choices=('ddp', 'fsdp2'), default='ddp', help='wrapper under torchrun')
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output', default='finetune_output')
    return p.parse_args(argv)


def setup_distributed() -> Tuple[int, int, torch.device]:
    """``(rank, world size, device)``; initialises the process group under torchrun (NCCL on CUDA, else gloo)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        return dist.get_rank(), world_size, device
    return 0, 1, device


def log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def split_root(data: str) -> Tuple[Path, Optional[Path]]:
    root = Path(data)
    if (root / 'train').is_dir():
        return root / 'train', (root / 'val') if (root / 'val').is_dir() else None
    return root, None


def wrap(model: torch.nn.Module, how: str, world_size: int, device: torch.device) -> torch.nn.Module:
    if world_size == 1:
        return model
    if how == 'ddp':
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    from torch.distributed.fsdp import fully_shard
    for stage in model.stages:
        for block in stage.blocks:
            fully_shard(block)
    fully_shard(model)
    return model


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU on every rank, unsharded and without the DDP prefix."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, autocast: Any) -> float:
    """Top-1 (%) over all ranks (the distributed sampler pads the last batch with repeated images)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, targets in loader:
        with autocast:
            logits = model(images.to(device))
        counts += torch.tensor([(logits.argmax(1) == targets.to(device)).sum().item(), targets.numel()],
                               dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train()
    return float(100 * counts[0] / counts[1].clamp(min=1))


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    torch.manual_seed(args.seed)
    train_dir, val_dir = split_root(args.data)
    train_set = create_dataset('', root=str(train_dir), is_training=True, search_split=False)
    classes = sorted(train_set.reader.class_to_idx, key=train_set.reader.class_to_idx.get)
    val_set = create_dataset('', root=str(val_dir), class_map=train_set.reader.class_to_idx,
                             search_split=False) if val_dir else None

    model = timm.create_model(args.model, pretrained=not args.no_pretrained, num_classes=len(classes),
                              drop_path_rate=args.drop_path, **json.loads(args.model_args))
    model.set_grad_checkpointing(args.grad_checkpointing)
    data_config = resolve_data_config({'input_size': (3, args.img_size, args.img_size)} if args.img_size else {},
                                      model=model)
    model.to(device).train()
    model = wrap(model, args.distributed, world_size, device)
    core = getattr(model, 'module', model)
    optimizer = create_optimizer_v2(core, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    layer_decay=args.layer_decay if args.layer_decay < 1 else None)

    loader_args = dict(input_size=data_config['input_size'], batch_size=args.batch_size, mean=data_config['mean'],
                       std=data_config['std'], interpolation=data_config['interpolation'],
                       num_workers=args.workers, distributed=world_size > 1, device=device,
                       use_prefetcher=device.type == 'cuda', pin_memory=device.type == 'cuda',
                       persistent_workers=args.workers > 0)
    train_loader = create_loader(train_set, is_training=True, **loader_args)
    val_loader = create_loader(val_set, crop_pct=data_config['crop_pct'], **loader_args) if val_set else None
    updates_per_epoch = len(train_loader)
    scheduler, epochs = create_scheduler_v2(optimizer, sched='cosine', num_epochs=args.epochs, min_lr=args.min_lr,
                                            warmup_epochs=args.warmup_epochs, step_on_epochs=False,
                                            updates_per_epoch=updates_per_epoch)
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    log(rank, f'{args.model}: {len(classes)} classes, {len(train_set)} training images, {world_size} process(es) '
              f'({args.distributed if world_size > 1 else "single"}, {device.type}), {epochs} epochs of '
              f'{updates_per_epoch} steps')

    step, top1, start = 0, None, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        for images, targets in train_loader:
            with autocast:
                loss = criterion(model(images.to(device)), targets.to(device))
            if not math.isfinite(loss.item()):
                raise RuntimeError(f'loss is {loss.item()} at step {step}')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            if step % 50 == 0 or step == 1:
                lr = optimizer.param_groups[-1]['lr']
                log(rank, f'epoch {epoch} step {step}: loss {loss.item():.4f}, lr {lr:.3g}')
            if step == args.max_steps:
                break
        if val_loader is not None:
            top1 = evaluate(model, val_loader, device, autocast)
            log(rank, f'epoch {epoch}: val top-1 {top1:.2f}%')
        if step == args.max_steps:
            break

    state_dict = full_state_dict(model)  # a collective under FSDP2: every rank takes part
    output = Path(args.output)
    summary = dict(model=args.model, num_classes=len(classes), classes=classes, steps=step, val_top1=top1,
                   seconds=time.perf_counter() - start, world_size=world_size)
    if rank == 0:
        from safetensors.torch import save_file
        output.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(output / 'model.safetensors'),
                  metadata={'format': 'pt'})
        (output / 'finetune.json').write_text(json.dumps(summary, indent=2))
        log(rank, f'saved {output / "model.safetensors"} after {step} steps')
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == '__main__':
    main()
