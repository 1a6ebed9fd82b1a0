"""Converting checkpoints (official ``.pth``, mmcv detection / segmentation files, Hub repos) into timm folders:
``config.json`` + ``model.safetensors`` with this package's key names."""
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set, Tuple

from .loading import UsageError, check_checkpoint, create_model

__all__ = ['convert', 'infer_model']


def _repo_tags() -> Dict[str, str]:
    """Hub repo of one model's weights -> the ``model.tag`` whose weights it holds (the repos of official ``.pth``
    files, which hold several tags' weights, are left out)."""
    from .._manifest import repo_entry
    from ..models import pretrained_cfgs
    repos = {cfg.hf_hub_id.partition('@')[0]: name for name, cfg in pretrained_cfgs().items()}
    return {repo_id: name for repo_id, name in repos.items() if 'checkpoints' not in (repo_entry(repo_id) or {})}


def _registered_variants(flash: bool) -> Dict[int, Tuple[str, Set[str]]]:
    """Stem width -> (model name, state-dict keys) of every registered variant of one family (FlashInternImage or
    InternImage), read off meta-device models."""
    import timm
    variants = {}
    for name in timm.list_models(module='flash_internimage' if flash else 'internimage'):
        model = timm.create_model(name, device='meta')
        variants[model.stem.conv2.out_channels] = (name, set(model.state_dict()))
    return variants


def infer_model(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Variant and class count of a checkpoint in any of the three key formats: the family from its core op
    (DCNv4's ``offset_mask`` keys: FlashInternImage), the variant from its stem width, the class count from its
    classifier; of a backbone-only (detection / segmentation) checkpoint, the arguments its config changes."""
    import timm
    from ..models.internimage import remap_checkpoint_keys
    keys = remap_checkpoint_keys(state_dict, timm.create_model('internimage_t', device='meta'))
    if 'stem.conv1.weight' not in keys:
        raise UsageError('cannot tell the architecture: the checkpoint has no stem convolution '
                         '(patch_embed.conv1.weight); pass --model')
    flash = any('.dcn.offset_mask.' in k for k in keys)
    channels = 2 * keys['stem.conv1.weight'].shape[0]
    variants = _registered_variants(flash)
    if channels not in variants:
        raise UsageError(f'no released {"FlashInternImage" if flash else "InternImage"} has {channels} channels; '
                         f'pass --model and --model-args')
    model_name, variant_keys = variants[channels]
    inferred = {'model': model_name}
    if 'head.fc.weight' in keys:
        inferred['num_classes'] = keys['head.fc.weight'].shape[0]
        return inferred
    # A backbone (detection / segmentation) checkpoint: T's config adds layer scales, H's drops the clip projector.
    layer_scale = 'stages.0.blocks.0.ls1.gamma'
    if layer_scale in keys and layer_scale not in variant_keys:
        inferred['layer_scale'] = 1.0
    if 'neck.proj_stage3.weight' in variant_keys and 'neck.proj_stage3.weight' not in keys:
        inferred['use_clip_projector'] = False
    return inferred


def _read_checkpoint(src: str) -> Dict[str, Any]:
    """``load_checkpoint`` with a ``UsageError`` naming ``src`` when it is not a readable checkpoint."""
    import pickle
    from safetensors import SafetensorError
    from ..pretrained import PretrainedWeightsError, load_checkpoint
    check_checkpoint(src)
    try:
        return load_checkpoint(src)
    except PretrainedWeightsError:
        raise
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise UsageError(f'{src}: cannot be read as a checkpoint ({e})') from None


def _write_atomically(out: Path, writers: Dict[str, Callable[[Path], None]], force: bool) -> None:
    """Write ``out/NAME`` with ``writers[NAME](path)`` for each name: first to temporary names in ``out``, then
    renamed. Existing outputs are a ``UsageError`` unless ``force``. On failure, what was created is removed
    (temporary files, new outputs, folders made for ``out``)."""
    existing = [str(out / name) for name in writers if (out / name).exists()]
    if existing and not force:
        raise UsageError(f'{", ".join(existing)} already exist(s); pass --force to overwrite')
    new_folders = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    temporary = {name: out / f'.{name}.{os.getpid()}.tmp' for name in writers}
    renamed = []
    try:
        for name, write in writers.items():
            write(temporary[name])
        for name, path in temporary.items():
            os.replace(path, out / name)
            renamed.append(out / name)
    except BaseException:
        for path in temporary.values():
            path.unlink(missing_ok=True)
        for path in renamed:
            if str(path) not in existing:
                path.unlink(missing_ok=True)
        for folder in new_folders:
            folder.rmdir()
        raise


def convert(
        src: str,
        out_dir: str,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        revision: Optional[str] = None,
        force: bool = False,
) -> Path:
    """Write ``out_dir/config.json`` + ``out_dir/model.safetensors`` (this package's key names) from ``src``.

    Existing outputs are overwritten only with ``force``; the files appear whole or not at all."""
    from safetensors.torch import save_file
    from timm.models import get_arch_pretrained_cfgs
    # Private module: timm.models exports only save_for_hf, which writes the model's own state_dict where it
    # stands; convert writes a checkpoint's tensors without materialising the model, atomically.
    from timm.models._hub import save_config_for_hf
    from ..models import checkpoint_filter_fn, dense_tags
    from ..pretrained import PretrainedWeightsError, fetch_hub_weights

    kwargs = dict(model_kwargs or {})
    src_path = Path(src).expanduser()
    if src_path.exists():
        state_dict = _read_checkpoint(src)
    elif src.count('/') == 1 and not src.endswith(('.pth', '.safetensors', '.json')):
        repo_id, _, at_revision = src.partition('@')
        files = fetch_hub_weights(repo_id, revision or at_revision or None)
        state_dict = _read_checkpoint(str(next(iter(files.values()))))
        model_name = model_name or _repo_tags().get(repo_id)
    else:
        raise UsageError(f'{src}: no such file or folder (and not a Hub repo id like OpenGVLab/internimage_t_1k_224)')

    tags = dense_tags()
    dense_files = {tag.filename: name for name, tag in tags.items()}
    if model_name is None and src_path.name in dense_files:  # an official detection / segmentation file
        model_name = dense_files[src_path.name]
    if model_name is None:
        inferred = infer_model(state_dict)
        model_name = inferred.pop('model')
        for key, value in inferred.items():
            kwargs.setdefault(key, value)
    if '.' not in model_name and 'num_classes' in kwargs:
        # a released tag with the same class count carries the right preprocessing metadata
        model_name = next((name for name, cfg in get_arch_pretrained_cfgs(model_name).items()
                           if cfg.num_classes == kwargs['num_classes']), model_name)
    meta_model = create_model(model_name, pretrained=False, device='meta', **kwargs)
    try:
        converted = checkpoint_filter_fn(state_dict, meta_model, source=src)  # the backbone is complete
    except PretrainedWeightsError as e:
        raise PretrainedWeightsError(f'checkpoint does not fit {model_name} {kwargs or ""}: {e}') from e
    backbone_only = not any(k.startswith(('head.', 'neck.')) for k in converted)  # detection, segmentation
    try:  # every key and shape (a backbone checkpoint's: the backbone), before anything is written
        missing, _ = meta_model.load_state_dict(converted, assign=True, strict=not backbone_only)
    except RuntimeError as e:
        raise PretrainedWeightsError(f'checkpoint does not fit {model_name} {kwargs or ""}: {e}') from e
    if backbone_only:
        kwargs['num_classes'] = meta_model.num_classes = 0  # loaded back without a head: features_only
        meta_model.pretrained_cfg = dict(meta_model.pretrained_cfg, num_classes=0)
    dense = tags.get(model_name)
    model_args = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dict(dense.model_args if dense else {}, **kwargs).items() if k != 'num_classes'}
    out = Path(out_dir)
    _write_atomically(out, {
        'model.safetensors': lambda path: save_file({k: v.contiguous() for k, v in converted.items()}, str(path),
                                                    metadata={'format': 'pt'}),
        'config.json': lambda path: save_config_for_hf(meta_model, str(path), model_args=model_args),
    }, force)
    return out

