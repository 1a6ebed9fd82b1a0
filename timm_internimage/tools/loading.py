"""Loading a model for the tools (predict, validate, convert, export): device resolution, model names, checkpoint
files, pretrained weights. Library code: it raises :class:`UsageError`, which the command line reports as
``error: ...``.
"""
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    import torch

__all__ = ['UsageError', 'check_checkpoint', 'create_model', 'load_pretrained_model', 'resolve_device']


class UsageError(Exception):
    """An input the tools cannot use (model name, arguments, device, file); the message says what to change."""


def resolve_device(name: str) -> 'torch.device':
    """The torch device for ``--device``: ``auto`` is CUDA if available, then MPS, else CPU; a named device must
    exist here (``UsageError`` otherwise)."""
    import torch

    def available(kind: str) -> bool:
        backend = torch.backends.mps if kind == 'mps' else getattr(torch, kind, None)  # torch.cpu, torch.cuda, ...
        return bool(getattr(backend, 'is_available', lambda: False)())

    if name == 'auto':
        return torch.device(next((kind for kind in ('cuda', 'mps') if available(kind)), 'cpu'))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps') from None
    if not available(device.type):
        raise UsageError(f'--device {name}: no {device.type} device is available here; use --device auto or cpu')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f'--device {name}: there are {torch.cuda.device_count()} CUDA device(s)')
    return device


def create_model(model_name: str, **kwargs: Any):
    """``timm.create_model`` with ``UsageError`` for an unknown model or tag, or keyword arguments it does not take."""
    import timm
    from timm.models import get_arch_pretrained_cfgs
    arch, _, tag = model_name.partition('.')
    if ':' not in arch:  # hf-hub:/local-dir: names are timm's to resolve
        if not timm.is_model(arch):
            raise UsageError(f'unknown model {arch!r}; see `python -m timm_internimage list`')
        tagged_names = list(get_arch_pretrained_cfgs(arch))
        if tag and model_name not in tagged_names:
            raise UsageError(f'unknown tag {tag!r} for {arch}; its tags: {", ".join(tagged_names) or "none"}')
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as e:  # an unknown keyword argument, from --model-args
        raise UsageError(f'{model_name} cannot be built with these arguments (check --model-args): {e}') from None


def check_checkpoint(path_text: str) -> None:
    """``UsageError`` naming ``path_text`` unless it is a folder, a shard index, a PyTorch ``.pth`` (a
    ``torch.save`` zip archive or a pickle) or a safetensors file whose header is whole."""
    from safetensors import SafetensorError, safe_open
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UsageError(f'{path}: no such file or folder')
    if path.is_dir() or path.suffix == '.json':
        return
    if not path.is_file():
        raise UsageError(f'{path}: not a regular file (a device, FIFO or socket); pass a checkpoint file or folder')
    with open(path, 'rb') as f:
        head = f.read(9)
    if head[:1] == b'\x80' or head[:4] == b'PK\x03\x04':  # a pickle (protocol 2+) or a torch.save zip archive
        return
    if head[8:9] != b'{':  # safetensors: an 8-byte header length, then the JSON header
        raise UsageError(f'{path}: not a checkpoint (neither safetensors nor a PyTorch .pth archive or pickle)')
    try:
        with safe_open(str(path), framework='pt'):
            pass
    except SafetensorError as e:
        raise UsageError(f'{path}: corrupt or truncated safetensors file ({e})') from None


def load_pretrained_model(model_name: str, checkpoint: Optional[str], model_kwargs: Optional[Dict[str, Any]],
                          device: 'torch.device') -> 'torch.nn.Module':
    """The pretrained model in eval mode on ``device``: the tag's Hub weights, or ``checkpoint`` (whose head has
    ``model_kwargs['num_classes']`` classes when given, so a fine-tuned classifier is kept)."""
    from safetensors import SafetensorError
    from timm.models import get_pretrained_cfg
    kwargs = dict(model_kwargs or {})
    if checkpoint:
        check_checkpoint(checkpoint)
        overlay = dict(file=checkpoint)
        if 'num_classes' in kwargs:
            overlay['num_classes'] = kwargs['num_classes']
        kwargs['pretrained_cfg_overlay'] = overlay
    elif 'num_classes' in kwargs and ':' not in model_name:  # before any download; hf-hub: etc. after loading
        cfg = get_pretrained_cfg(model_name)
        if cfg is not None:
            _refuse_untrained_head(model_name, kwargs['num_classes'], cfg.num_classes)
    try:
        model = create_model(model_name, pretrained=True, **kwargs)
    except SafetensorError as e:
        raise UsageError(f'{checkpoint or model_name}: corrupt or truncated safetensors weights ({e})') from None
    if not kwargs.get('features_only'):  # a feature extractor has no classifier to be untrained
        _refuse_untrained_head(model_name, model.num_classes, model.pretrained_cfg.get('num_classes'))
    return model.eval().to(device)


def _refuse_untrained_head(model_name: str, num_classes: int, trained_classes: Optional[int]) -> None:
    """``UsageError`` when the model's classifier has another class count than its weights: timm then leaves it
    randomly initialised, and its predictions and accuracy would mean nothing."""
    if trained_classes is not None and num_classes != trained_classes:
        raise UsageError(f'--model-args num_classes={num_classes}: the weights of {model_name} have a '
                       f'{trained_classes}-class classifier, so a {num_classes}-class one would be untrained '
                       f'(random); pass the fine-tuned weights with --checkpoint, or leave num_classes out')
