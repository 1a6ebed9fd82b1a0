"""``python -m timm_internimage`` (also the ``timm-internimage`` console script).

Commands:
    predict [IMAGE ...]       classify images (default: a photo shipped with the package)
    validate DATA             top-1 / top-5, loss and throughput on a labelled image folder, vs the published top-1
    convert SRC OUT_DIR       official .pth / HF-format folder / Hub repo id -> timm folder (config.json + model.safetensors)
    list                      the pretrained tags and where their weights live
    manifest-refresh          (maintainers, online) pin revisions, sizes and sha256 in weights_manifest.json
    export OUT                ONNX / OpenVINO / torch.export / AOTInductor artifact, checked against eager PyTorch
"""
import argparse
import datetime
import json
import logging
import os
import re
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .loading import UsageError, check_checkpoint, create_model, load_pretrained_model, resolve_device

if TYPE_CHECKING:
    import torch

__all__ = ['main', 'build_parser', 'SAMPLE_IMAGE_NAME']

SAMPLE_IMAGE_NAME = 'chelsea.jpg'
SAMPLE_IMAGE_CREDIT = ("'Chelsea the cat', scikit-image sample data (skimage.data.chelsea), CC0 by the photographer "
                       "Stefan van der Walt")
DEFAULT_MODEL = 'internimage_t.in1k'




def _out(text: str = '') -> None:
    sys.stdout.write(text + '\n')


def _err(text: str) -> None:
    sys.stderr.write(text + '\n')
    sys.stderr.flush()


def _json_arg(text: Optional[str], what: str) -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f'{what} is not valid JSON: {e}') from e
    if not isinstance(value, dict):
        raise UsageError(f'{what} must be a JSON object, got {text!r}')
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


# ----------------------------------------------------------------------------------------------------------------
# predict


def sample_image_path() -> Path:
    return Path(str(resources.files('timm_internimage').joinpath('data', SAMPLE_IMAGE_NAME)))


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _open_image(path: str):
    """The Pillow image of ``path``, header read but not decoded; ``UsageError`` naming the file if it is not one.

    Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused, not just warned about.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        if path == '-':
            raise UsageError("-: reading images from standard input is not supported; save the image to a file "
                           "and pass its path") from None
        if re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', path):
            raise UsageError(f'{path}: URLs are not supported; download the image first (for example '
                           f'`curl -LO URL`) and pass the file') from None
        raise UsageError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise UsageError(f'{path}: is a directory, not an image') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f'{path}: refused as a possible decompression bomb ({e})') from None
    except UnidentifiedImageError:
        raise UsageError(f'{path}: not an image file Pillow can read (unknown or corrupt format)') from None
    except (OSError, ValueError) as e:
        raise UsageError(f'{path}: cannot be read as an image ({e})') from None


def _check_images(paths: Sequence[str]) -> None:
    """Open every image (headers only), reporting all that cannot be read in one ``UsageError``."""
    problems = []
    for path in paths:
        try:
            _open_image(path).close()
        except UsageError as e:
            problems.append(str(e))
    if problems:
        raise UsageError('cannot read image(s):\n  ' + '\n  '.join(problems))


def _white_level(mode: str, peak: float) -> float:
    """The value that is white in a single-channel high-bit-depth image.

    65535 for 16-bit images. 32-bit integer (``I``) and float (``F``) images carry no range, so it is the
    smallest of 1 (floats only), 255 and 65535 that holds the brightest pixel, or else that pixel.
    """
    if mode.startswith('I;16'):
        return 65535.0
    for level in ((1.0, 255.0, 65535.0) if mode == 'F' else (255.0, 65535.0)):
        if peak <= level:
            return level
    return peak


def _to_rgb(image):
    """8-bit RGB of a Pillow image; 16-bit, 32-bit integer and float images are scaled to 0-255, not clipped."""
    import numpy as np
    from PIL import Image
    if image.mode not in ('I', 'F') and not image.mode.startswith('I;16'):
        return image.convert('RGB')
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    scale = 255.0 / _white_level(image.mode, float(values.max(initial=0.0)))
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, 'L').convert('RGB')


def _decode_image(path: str):
    """Decode ``path`` once: EXIF orientation applied, as 8-bit RGB."""
    from PIL import ImageOps
    with _open_image(path) as image:
        try:
            return _to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError) as e:  # truncated or corrupt image data
            raise UsageError(f'{path}: cannot be decoded ({e})') from None


def _image_batches(paths: Sequence[str], transform: Callable, batch_size: int
                   ) -> Iterator[Tuple[List[str], Any, List[Optional[str]]]]:
    """``(paths, batch tensor, errors)`` per batch, each image decoded when its batch is made: one batch in memory.

    ``errors[i]`` is the message for ``paths[i]`` if it cannot be decoded, else ``None``; the tensor holds the
    decoded images in order (``None`` if there are none)."""
    import torch
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        tensors, errors = [], []
        for path in chunk:
            try:
                tensors.append(transform(_decode_image(path)))
                errors.append(None)
            except UsageError as e:
                errors.append(str(e))
        yield chunk, torch.stack(tensors) if tensors else None, errors


def _label_fn(num_classes: int) -> Callable[[int], str]:
    """Class index -> name: ImageNet-1k or ImageNet-22k (sorted wnids, as timm's ``imagenet22k_synsets.txt``)
    names by class count, else ``class N``."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset({'num_classes': num_classes})
    if subset is None:
        return lambda index: f'class {index}'
    info = ImageNetInfo(subset)
    return info.index_to_description


def predict(
        images: Sequence[str],
        model_name: str = DEFAULT_MODEL,
        top_k: int = 5,
        device: str = 'auto',
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        batch_size: int = 8,
) -> List[Dict[str, Any]]:
    """Classify image files; returns ``[{image, predictions: [{rank, index, label, probability}]}]``.

    Each image is decoded once, when its batch is made; one that cannot be decoded (a truncated file) gets
    ``{image, error, predictions: []}`` and the others are still classified. ``top_k`` is capped at the class
    count. A model output that is not finite (NaN or inf) is a ``UsageError`` naming the images.
    """
    import torch
    from timm.data import create_transform, resolve_data_config

    _check_images(images)  # fail on unreadable images before downloading weights
    torch_device = resolve_device(device)
    model = load_pretrained_model(model_name, checkpoint, model_kwargs, torch_device)
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    label = _label_fn(model.num_classes)
    top_k = min(top_k, model.num_classes)
    results = []
    with torch.inference_mode():
        for chunk, batch, errors in _image_batches(images, transform, batch_size):
            paths = [path for path, error in zip(chunk, errors) if error is None]
            predictions = iter(_top_k(model, batch, paths, model_name, top_k, label, torch_device) if paths else [])
            for path, error in zip(chunk, errors):
                if error is None:
                    results.append({'image': str(path), 'predictions': next(predictions)})
                else:
                    results.append({'image': str(path), 'error': error, 'predictions': []})
    return results


def _top_k(model: 'torch.nn.Module', batch: 'torch.Tensor', paths: Sequence[str], model_name: str, top_k: int,
           label: Callable[[int], str], device: 'torch.device') -> List[List[Dict[str, Any]]]:
    """The ``top_k`` predictions of each image of ``batch``; ``UsageError`` naming ``paths`` with non-finite outputs."""
    logits = model(batch.to(device)).float()
    finite = logits.isfinite().all(dim=-1).tolist()
    if not all(finite):
        bad = ', '.join(path for path, ok in zip(paths, finite) if not ok)
        raise UsageError(f'{model_name} gave NaN or infinite outputs for {bad}; check the weights')
    values, indices = logits.softmax(dim=-1).topk(top_k, dim=-1)
    return [[{'rank': r + 1, 'index': i, 'label': label(i), 'probability': v}
             for r, (v, i) in enumerate(zip(vals, idxs))] for vals, idxs in zip(values.tolist(), indices.tolist())]


def _cmd_predict(args: argparse.Namespace) -> int:
    images = list(args.images)
    if not images:
        images = [str(sample_image_path())]
        if not args.json:
            _err(f'No IMAGE given; classifying the sample photo {SAMPLE_IMAGE_CREDIT}.')
    model_kwargs = _json_arg(args.model_args, '--model-args')
    _check_images(images)  # report unreadable images before anything is downloaded
    if not args.json:
        _err(_loading_message(args.model, args.checkpoint))
    results = predict(images, args.model, args.top_k, device=args.device, checkpoint=args.checkpoint,
                      model_kwargs=model_kwargs, batch_size=args.batch_size)
    failed = [result for result in results if 'error' in result]
    for result in failed:
        _err(f'error: {result["error"]}')
    if failed:
        _err(f'{len(failed)} of {len(results)} image(s) could not be classified')
    status = 1 if failed else 0
    if args.json:
        _out(json.dumps({'model': args.model, 'results': results}, indent=2, allow_nan=False))
        return status
    for result in results:
        if 'error' in result:
            continue
        _out(result['image'])
        width = max(len(p['label']) for p in result['predictions'])
        for p in result['predictions']:
            _out(f'  {p["rank"]:>2}. {p["label"]:<{width}}  {100 * p["probability"]:6.2f}%  (class {p["index"]})')
    return status


def _loading_message(model_name: str, checkpoint: Optional[str]) -> str:
    if checkpoint:
        return f'Loading {model_name} with the weights in {checkpoint} ...'
    return f'Loading {model_name} (weights are downloaded once, then read from the Hugging Face cache) ...'


# ----------------------------------------------------------------------------------------------------------------
# validate (the evaluation itself is validate.py)


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import FULL_VAL_IMAGES, GAP_POINTS, validate
    if not args.json:
        _err(_loading_message(args.model, args.checkpoint))
    summary = validate(args.data, args.model, labels=args.labels, batch_size=args.batch_size, workers=args.workers,
                       device=args.device, amp=args.amp, channels_last=args.channels_last, limit=args.limit,
                       checkpoint=args.checkpoint, model_kwargs=_json_arg(args.model_args, '--model-args'),
                       all_classes=args.all_classes, real=args.real_labels or args.real, progress=not args.json)
    if args.json:
        _out(json.dumps(summary, indent=2, allow_nan=False))
        return 1 if summary['gap_flagged'] else 0
    _out(f'{summary["model"]} on {summary["data"]}: {summary["images"]} images ({summary["layout"]}; '
         f'labels: {summary["labels"]})')
    _out(f'  top-1 {summary["top1"]:7.3f}%   top-5 {summary["top5"]:7.3f}%   loss {summary["loss"]:.4f}   '
         f'{summary["img_per_s"]:.1f} img/s ({summary["device"]}, {summary["amp"] or "float32"}, '
         f'batch {summary["batch_size"]})')
    if summary.get('real_top1') is not None:
        _out(f'  ImageNet-ReaL top-1 {summary["real_top1"]:7.3f}%   top-5 {summary["real_top5"]:7.3f}%   '
             f'({summary["real_images"]} images with ReaL labels)')
    published = summary['published_top1']
    if published is None:
        _out('  published top-1: none for this model and labels (only the ImageNet-1k tags have one)')
        return 0
    _out(f'  published top-1 {published:.1f}%, measured {summary["top1"]:.2f}% ({summary["top1_gap"]:+.2f} points)')
    if summary['gap_flagged']:
        _out(f'  WARNING: more than {GAP_POINTS} points from the published top-1 on the full {FULL_VAL_IMAGES:,}-image '
             f'val set: check the weights (conversion) and the preprocessing')
        return 1
    if not summary['full_val']:
        _out(f'  (not the full {FULL_VAL_IMAGES:,}-image ImageNet-1k val set: the comparison is indicative only)')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the pretrained tags


def _repo_tags() -> Dict[str, str]:
    """Hub repo -> the ``model.tag`` whose weights it holds (classification repos: one tag each)."""
    from .internimage import DENSE_TAGS, pretrained_cfgs
    return {cfg.hf_hub_id.partition('@')[0]: name for name, cfg in pretrained_cfgs().items() if name not in DENSE_TAGS}


# ----------------------------------------------------------------------------------------------------------------
# convert


def _infer_model(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Variant and class count of a checkpoint in any of the three key formats, from its stem and classifier."""
    import timm
    from .internimage import _VARIANT_ARGS, remap_checkpoint_keys
    keys = remap_checkpoint_keys(state_dict, timm.create_model('internimage_t', device='meta'))
    if 'stem.conv1.weight' not in keys:
        raise UsageError('cannot tell the architecture: the checkpoint has no stem convolution '
                       '(patch_embed.conv1.weight); pass --model')
    channels = 2 * keys['stem.conv1.weight'].shape[0]
    models = {args['channels']: model for model, args in _VARIANT_ARGS.items()}
    if channels not in models:
        raise UsageError(f'no released InternImage has {channels} channels; pass --model and --model-args')
    inferred = {'model': models[channels]}
    if 'head.fc.weight' in keys:
        inferred['num_classes'] = keys['head.fc.weight'].shape[0]
        return inferred
    # A backbone (detection / segmentation) checkpoint: T's has layer scales, H's no clip projector.
    variant_args = _VARIANT_ARGS[inferred['model']]
    if variant_args.get('layer_scale') is None and 'stages.0.blocks.0.ls1.gamma' in keys:
        inferred['layer_scale'] = 1.0
    if variant_args.get('use_clip_projector') and 'neck.proj_stage3.weight' not in keys:
        inferred['use_clip_projector'] = False
    return inferred


def _read_checkpoint(src: str) -> Dict[str, Any]:
    """``load_checkpoint`` with a ``UsageError`` naming ``src`` when it is not a readable checkpoint."""
    import pickle
    from safetensors import SafetensorError
    from .pretrained import PretrainedWeightsError, load_checkpoint
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
    from timm.models._hub import save_config_for_hf
    from .internimage import DENSE_TAGS, checkpoint_filter_fn
    from .pretrained import PretrainedWeightsError, fetch_hub_weights

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

    dense_files = {tag.filename: name for name, tag in DENSE_TAGS.items()}
    if model_name is None and src_path.name in dense_files:  # an official detection / segmentation file
        model_name = dense_files[src_path.name]
    if model_name is None:
        inferred = _infer_model(state_dict)
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
    dense = DENSE_TAGS.get(model_name)
    model_args = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dict(dense.model_args if dense else {}, **kwargs).items() if k != 'num_classes'}
    out = Path(out_dir)
    _write_atomically(out, {
        'model.safetensors': lambda path: save_file({k: v.contiguous() for k, v in converted.items()}, str(path),
                                                    metadata={'format': 'pt'}),
        'config.json': lambda path: save_config_for_hf(meta_model, str(path), model_args=model_args),
    }, force)
    return out


def _cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out_dir, args.model, _json_arg(args.model_args, '--model-args'), args.revision,
                  args.force)
    _err(f'Wrote {out / "config.json"} and {out / "model.safetensors"}.')
    _out(str(out))
    _err(f'Load it with timm.create_model("local-dir:{out}", pretrained=True) after `import timm_internimage`, '
         f'or upload the folder and use "hf-hub:<your repo>".')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# list


def _tag_task(name: str, cfg: Any) -> Tuple[str, Dict[str, float]]:
    """(task, published scores) of a tag: ImageNet top-1 of a classifier, box / mask AP or mIoU of a backbone."""
    from ._manifest import repo_entry
    from .internimage import DENSE_TAGS, dense_scores
    if name in DENSE_TAGS:
        scores = dense_scores(DENSE_TAGS[name].filename)
        return ('detection' if 'box AP' in scores else 'segmentation'), scores
    top1 = repo_entry(cfg.hf_hub_id.partition('@')[0])['top1']
    return 'classification', ({'top-1': top1} if top1 is not None else {})


def _cmd_list(args: argparse.Namespace) -> int:
    from ._manifest import repo_entry
    from .internimage import pretrained_cfgs
    rows = {}
    for name, cfg in pretrained_cfgs().items():
        repo_id, _, revision = cfg.hf_hub_id.partition('@')
        entry = repo_entry(repo_id)
        task, scores = _tag_task(name, cfg)
        rows[name] = dict(hf_hub_id=repo_id, hf_hub_filename=cfg.hf_hub_filename, revision=revision or 'main',
                          num_classes=cfg.num_classes, input_size=list(cfg.input_size), task=task, scores=scores,
                          top1=entry['top1'], size=entry['approx_size'])
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    _out(f'{"model.tag":<56} {"Hub repo":<36} {"classes":>7} {"input":>5}  {"task":<14} size      '
         f'{"revision":<22} published')
    for name, row in rows.items():
        scores = ', '.join(f'{metric} {value}' for metric, value in row['scores'].items()) or '-'
        revision = row['revision'][:10] + (' (unpinned)' if row['revision'] == 'main' else '')
        _out(f'{name:<56} {row["hf_hub_id"]:<36} {row["num_classes"]:>7} {row["input_size"][1]:>5}  '
             f'{row["task"]:<14} {row["size"]:<9} {revision:<22} {scores}')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# manifest-refresh


def refresh_manifest(manifest: Dict[str, Any], tags: Optional[Sequence[str]] = None,
                     endpoint: Optional[str] = None) -> Dict[str, Any]:
    """Pin the repos of every (or the given) tag to their current commit and record weight file sizes and sha256.

    Sizes and sha256 of LFS files come from the Hub's file metadata; a non-LFS file (the shard index) is
    downloaded at the pinned commit and hashed. Returns the updated manifest (also modified in place).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils.sha import sha_fileobj
    from ._manifest import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    from .pretrained import shard_names
    from .internimage import pretrained_cfgs
    repo_tags = {name: cfg.hf_hub_id.partition('@')[0] for name, cfg in pretrained_cfgs().items()}
    unknown = [tag for tag in (tags or []) if tag not in repo_tags]
    if unknown:
        raise UsageError(f'unknown tag(s) {unknown}; see `python -m timm_internimage list`')
    api = HfApi(endpoint=endpoint)
    for repo_id in (list(dict.fromkeys(repo_tags[tag] for tag in tags)) if tags else list(manifest['repos'])):
        entry = manifest['repos'][repo_id]
        info = api.model_info(repo_id, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}

        def describe(name: str) -> Dict[str, Any]:
            sibling = siblings[name]
            if sibling.lfs is not None:
                return {'size': sibling.lfs.size, 'sha256': sibling.lfs.sha256}
            path = Path(hf_hub_download(repo_id, name, revision=info.sha, endpoint=endpoint))
            with open(path, 'rb') as f:
                return {'size': path.stat().st_size, 'sha256': sha_fileobj(f).hex()}

        entry.pop('file', None)
        entry.pop('index_file', None)
        if 'checkpoints' in entry:  # OpenGVLab/InternImage: the detection / segmentation .pth the tags load
            absent = [name for name in entry['checkpoints'] if name not in siblings]
            if absent:
                raise UsageError(f'{repo_id}@{info.sha} lacks {absent}, which the manifest lists')
            files = {name: describe(name) for name in entry['checkpoints']}
        elif SAFE_WEIGHTS_NAME in siblings:
            entry['file'] = SAFE_WEIGHTS_NAME
            files = {SAFE_WEIGHTS_NAME: describe(SAFE_WEIGHTS_NAME)}
        elif SAFE_WEIGHTS_INDEX_NAME in siblings:
            entry['index_file'] = SAFE_WEIGHTS_INDEX_NAME
            files = {SAFE_WEIGHTS_INDEX_NAME: describe(SAFE_WEIGHTS_INDEX_NAME)}
            index_path = hf_hub_download(repo_id, SAFE_WEIGHTS_INDEX_NAME, revision=info.sha, endpoint=endpoint)
            for shard in shard_names(index_path):
                if shard not in siblings:
                    raise UsageError(f'{repo_id}@{info.sha}: the index lists {shard}, which the repo lacks')
                files[shard] = describe(shard)
        else:
            raise UsageError(f'{repo_id}@{info.sha} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}')
        entry['revision'] = info.sha
        entry['files'] = files
        entry['unverified'] = [f for f in entry['unverified'] if f not in ('revision', 'files', 'layout')]
        _err(f'{repo_id}@{info.sha[:12]}: {len(files)} file(s), '
             f'{sum(f["size"] for f in files.values()) / 2 ** 20:.1f} MiB')
    manifest['refreshed'] = {
        'at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        'endpoint': api.endpoint,
        'tags': 'all' if not tags else list(tags),
    }
    return manifest


def _cmd_manifest_refresh(args: argparse.Namespace) -> int:
    from ._manifest import dump_manifest, manifest_path
    path = Path(args.manifest) if args.manifest else manifest_path()
    manifest = json.loads(path.read_text(encoding='utf-8'))
    refresh_manifest(manifest, args.tags or None)
    if args.dry_run:
        _out(dump_manifest(manifest).rstrip('\n'))
    else:
        path.write_text(dump_manifest(manifest), encoding='utf-8')
        _err(f'Updated {path}.')
    return 0


# ----------------------------------------------------------------------------------------------------------------
# export (the export itself is export.py)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch
    from .export import ExportError, check_format, export_model
    model_kwargs = _json_arg(args.model_args, '--model-args')
    if args.out_indices and not args.features_only:
        raise UsageError('--out-indices selects the stages of --features-only; add --features-only')
    if args.features_only:
        model_kwargs['features_only'] = True
        if args.out_indices:
            model_kwargs['out_indices'] = tuple(args.out_indices)
    try:
        check_format(args.format)  # before any download
        _err(f'Loading {args.model} (weights are downloaded once, then read from the Hugging Face cache) ...')
        model = load_pretrained_model(args.model, args.checkpoint, model_kwargs, torch.device('cpu'))
        result = export_model(model, args.out, args.format, dynamic=args.dynamic, batch=args.batch,
                              img_size=tuple(args.img_size) if args.img_size else None, dtype=args.dtype,
                              progress=_err)
    except ExportError as e:
        raise UsageError(str(e)) from None
    _err(f'Wrote {", ".join(str(path) for path in result.files)} in {result.export_seconds:.1f} s.')
    _out(f'{result.format} {result.path}: max abs difference from eager PyTorch {result.max_abs_diff:.3g} '
         f'(tolerance {result.tolerance:.3g}) on input {result.checked_shape}')
    return 0


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_internimage',
        description='InternImage models for timm: classify images, convert checkpoints, inspect pretrained tags.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log loading details')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('predict', help='classify images with a pretrained model',
                       description='Print the top ImageNet classes of each image. With no IMAGE, classify a sample '
                                   'photo shipped with the package (' + SAMPLE_IMAGE_CREDIT + ').')
    p.add_argument('images', nargs='*', metavar='IMAGE', help='image files (any format Pillow reads)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model name or model.tag (default {DEFAULT_MODEL})')
    p.add_argument('--top-k', '-k', type=_positive_int, default=5,
                   help='number of classes to print (default 5; at most the class count)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.add_argument('--device', default='auto', help='torch device (default auto: CUDA if available, then MPS, '
                                                    'else CPU)')
    p.add_argument('--batch-size', type=_positive_int, default=8, help='images per forward pass (default 8)')
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('validate', help='top-1 / top-5, loss and throughput on a labelled image folder',
                       description='Evaluate a pretrained model on DATA: class folders (ImageNet wnids such as '
                                   'n01440764, ImageNet-1k indices 0-999 as in ImageNet-V2, or any names for a '
                                   'fine-tuned head), or a flat folder with --labels. Prints top-1 / top-5, loss '
                                   'and throughput, and the published top-1 of the tag; on the full 50,000-image '
                                   'val set a gap above 0.3 points is flagged (exit status 1).')
    p.add_argument('data', metavar='DATA', help='image folder')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model name or model.tag (default {DEFAULT_MODEL})')
    p.add_argument('--labels', help='labels of a flat folder: CSV filename,label (wnid or ImageNet-1k index), the '
                                    "Caffe val.txt or Kaggle's LOC_val_solution.csv")
    p.add_argument('--real', action='store_true',
                   help='also score ImageNet-ReaL labels (timm\'s bundled real.json); ImageNet val images only')
    p.add_argument('--real-labels', metavar='REAL_JSON', help='--real with this real.json instead of timm\'s')
    p.add_argument('--all-classes', action='store_true',
                   help='21841-class tags: score all outputs, not only the 1000 ImageNet-1k ones')
    p.add_argument('--batch-size', '-b', type=_positive_int, default=64, help='images per batch (default 64)')
    p.add_argument('--workers', '-j', type=int, default=min(8, os.cpu_count() or 1),
                   help='DataLoader worker processes (default: CPU count, at most 8; 0 loads in this process)')
    p.add_argument('--device', default='auto', help='torch device (default auto: CUDA if available, then MPS, '
                                                    'else CPU)')
    p.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast to this dtype (default: float32)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    p.add_argument('--limit', type=_positive_int, help='evaluate only N images, spread evenly over the data')
    p.add_argument('--json', action='store_true', help='print the summary as JSON (no progress bar)')
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser('convert', help='write a timm folder (config.json + model.safetensors) from a checkpoint',
                       description='SRC: an official .pth, a .safetensors file or HF-format folder, or a Hub repo '
                                   'id (e.g. OpenGVLab/internimage_t_1k_224, optionally @revision). The output '
                                   'loads with timm.create_model("local-dir:OUT_DIR") or, uploaded, "hf-hub:<repo>".')
    p.add_argument('src')
    p.add_argument('out_dir')
    p.add_argument('--model', help='model name or model.tag (default: inferred from the weights or the manifest)')
    p.add_argument('--model-args', help='model keyword arguments as a JSON object (non-standard configs)')
    p.add_argument('--revision', help='Hub revision for a repo id')
    p.add_argument('--force', action='store_true', help='overwrite an existing config.json / model.safetensors')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('list', help='list the pretrained tags (from weights_manifest.json)')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('manifest-refresh', help='(maintainers, online) pin revisions, sizes and sha256 from the Hub',
                       description='Query the Hub (HF_ENDPOINT) for every tag: pin its revision to the current '
                                   'commit, record the weight layout and each file\'s size and sha256, and clear '
                                   'the corresponding "unverified" fields in weights_manifest.json.')
    p.add_argument('--tags', nargs='*', help='only these tags (default: all)')
    p.add_argument('--manifest', help='manifest file to update (default: the package\'s weights_manifest.json)')
    p.add_argument('--dry-run', action='store_true', help='print the updated manifest instead of writing it')
    p.set_defaults(func=_cmd_manifest_refresh)

    p = sub.add_parser('export', help='write an ONNX / OpenVINO / torch.export / AOTInductor artifact',
                       description='Export a model, run the artifact once in its runtime (ONNX Runtime for onnx, '
                                   'OpenVINO for openvino, torch for torch-export and aoti) on an input of another '
                                   'batch and size (with --dynamic), and print its max abs difference from eager '
                                   'PyTorch; above 1e-4 (float32) it is an error and no file is left behind. '
                                   'onnx needs `pip install onnx onnxruntime`, openvino `pip install onnx '
                                   'openvino`.')
    p.add_argument('out', metavar='OUT', help='file to write (.onnx; .xml for openvino, with its .bin; .pt2)')
    p.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model name or model.tag (default {DEFAULT_MODEL})')
    p.add_argument('--checkpoint', help='local weights (.safetensors, official .pth, or a converted folder) '
                                        'instead of the Hub')
    p.add_argument('--model-args', help='extra timm.create_model keyword arguments as a JSON object')
    p.add_argument('--features-only', action='store_true',
                   help='export the backbone: one NCHW output per stage (for detection and segmentation)')
    p.add_argument('--out-indices', type=int, nargs='+', metavar='I', help='with --features-only: these stages')
    p.add_argument('--format', default='onnx', help='onnx (default), openvino, torch-export or aoti')
    p.add_argument('--dynamic', action='store_true',
                   help='dynamic batch, height and width (else fixed to --batch and --img-size)')
    p.add_argument('--batch', type=_positive_int, default=1, help='batch size of the traced input (default 1)')
    p.add_argument('--img-size', type=_positive_int, nargs=2, metavar=('H', 'W'),
                   help="height and width of the traced input (default: the tag's input size)")
    p.add_argument('--dtype', choices=('float32', 'float16'), default='float32', help='weights and input dtype')
    p.set_defaults(func=_cmd_export)
    return parser


def _setup_logging(verbose: bool) -> None:
    """Log records on stderr; huggingface_hub's are left to its own handler (else they would print twice)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(levelname)s %(name)s: %(message)s'))
    handler.addFilter(lambda record: not record.name.startswith('huggingface_hub'))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from .pretrained import PretrainedWeightsError
    try:
        return args.func(args)
    except UsageError as e:
        _err(f'error: {e}')
        return 2
    except PretrainedWeightsError as e:
        _err(f'error: {e}')
        return 1
    except OSError as e:  # includes huggingface_hub's HTTP errors (repo not found, private repo, ...)
        _err(f'error: {e}')
        return 1


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
