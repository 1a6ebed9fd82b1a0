"""``python -m timm_internimage validate``: top-1 / top-5, loss and throughput on a labelled image folder, next to
the published top-1 of the tag.

Layouts (:func:`find_samples`):

- class folders (ImageFolder): folders named by ImageNet wnids (``n01440764`` ...), by ImageNet-1k class indices
  (``0`` ... ``999``, the ImageNet-V2 layout) or by any other names (classes in timm's natural sort order, for
  a fine-tuned head); images anywhere below each class folder;
- a flat folder plus a labels file: CSV ``filename,label`` (header optional), whitespace ``filename label`` lines
  (the Caffe-style ``val.txt``) or Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``). Labels are
  wnids, integers or names as above; file names may omit the extension.

Wnids and integer labels are mapped to the model's outputs by name (:func:`label_space`): a subset of the
ImageNet-1k classes keeps its ImageNet-1k indices, and for a 21841-class (ImageNet-22k) head the logits are
restricted to the 1000 ImageNet-1k classes unless ``all_classes``. Wnids outside the model's classes are an
error. ImageNet-ReaL labels (timm's bundled file, or another) score val images by their reassessed label sets.
"""
import csv
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .loading import UsageError, load_pretrained_model, resolve_device

__all__ = ['FULL_VAL_IMAGES', 'GAP_POINTS', 'LabelSpace', 'find_samples', 'label_space', 'published_top1',
           'compare_published', 'validate']

FULL_VAL_IMAGES = 50_000  # the ImageNet-1k validation set
GAP_POINTS = 0.3  # measured vs published top-1 on the full val set, in points, beyond which validate flags it
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
_WNID = re.compile(r'n\d{8}')
_VAL_NUMBER = re.compile(r'ILSVRC2012_val_(\d{8})')
_HEADER_NAMES = {'filename', 'file', 'image', 'imageid', 'path', 'name'}

Key = Union[int, str]


class UnreadableImageError(RuntimeError):
    """An image of the data set cannot be decoded (raised in a DataLoader worker, re-raised in the main process)."""


@dataclass
class LabelSpace:
    """How dataset labels meet the model's outputs: ``targets[key]`` is a sample's class index among the scored
    outputs, ``columns`` the model outputs that are scored (None: all), ``name`` a description."""
    targets: Dict[Key, int]
    columns: Optional[List[int]]
    name: str
    imagenet_1k: bool = False  # targets are ImageNet-1k indices (the published top-1 applies)
    from_1k: Optional[List[int]] = None  # ImageNet-1k class index -> target, for ImageNet heads (ReaL labels)


# ----------------------------------------------------------------------------------------------------------------
# samples


def _key(text: str) -> Key:
    return int(text) if text.isdigit() else text


def _image_files(root: Path) -> List[Path]:
    from timm.data import get_img_extensions
    extensions = get_img_extensions(as_set=True)
    return sorted(Path(dirpath) / name for dirpath, _, names in os.walk(root, followlinks=True)
                  for name in names if os.path.splitext(name)[1].lower() in extensions)


def _read_labels_file(path: Path) -> Dict[str, Key]:
    """File name (as written, maybe without extension) -> label key."""
    try:
        lines = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines()]
    except OSError as e:
        raise UsageError(f'{path}: cannot read the labels file ({e})') from None
    lines = [line for line in lines if line]
    if lines and all(line.isdigit() for line in lines):
        raise UsageError(f'{path} holds one number a line: the ILSVRC2012 devkit ground truth, whose class ids need '
                       f"the devkit's meta.mat. Use a file of filename,label lines (wnids or ImageNet-1k indices), "
                       f"the Caffe val.txt or Kaggle's LOC_val_solution.csv, or class folders")
    labels = {}
    for number, line in enumerate(lines, 1):
        fields = next(csv.reader([line])) if ',' in line else line.split()
        label = fields[1].split()[0] if len(fields) > 1 and fields[1].split() else ''
        if number == 1 and fields[0].strip().lower() in _HEADER_NAMES:
            continue
        if not label:
            raise UsageError(f'{path}, line {number}: expected "filename,label", got {line!r}')
        labels[fields[0].strip()] = _key(label)
    if not labels:
        raise UsageError(f'{path}: no labels')
    return labels


def find_samples(root: Union[str, Path],
                 labels_file: Union[str, Path, None] = None) -> Tuple[List[Tuple[str, Key]], str]:
    """``([(image path, label key)], layout)`` of a class-folder tree, or of the images under ``root`` that
    ``labels_file`` names (sorted by path). Keys are ints for integer labels, else the folder name or label."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f'{root}: not a folder')
    if labels_file is not None:
        labels = _read_labels_file(Path(labels_file).expanduser())
        by_name: Dict[str, Path] = {}
        for path in _image_files(root):
            relative = path.relative_to(root).as_posix()
            by_name[relative] = path
            by_name.setdefault(os.path.splitext(relative)[0], path)
        samples = sorted((str(by_name[name]), key) for name, key in labels.items() if name in by_name)
        if not samples:
            raise UsageError(f'none of the {len(labels)} files that {labels_file} names is an image under {root}')
        return samples, 'labels file'
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    samples = [(str(path), _key(folder.name)) for folder in folders for path in _image_files(folder)]
    if not samples:
        raise UsageError(f'{root}: no images in class folders; for a flat folder of images pass --labels FILE')
    integers = all(isinstance(key, int) for _, key in samples)
    return samples, 'class folders' + (' named by class index' if integers else '')


# ----------------------------------------------------------------------------------------------------------------
# labels -> model outputs


def label_space(keys: Sequence[Key], num_classes: int, all_classes: bool = False) -> LabelSpace:
    """Map label keys to the outputs of a ``num_classes``-way head (see the module docstring); ``UsageError`` for
    labels the head does not have. Keys missing from ``targets`` are ImageNet-1k classes that a 21841-class head
    lacks: their images are skipped."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    from timm.utils import natural_key
    unique = sorted(set(keys), key=lambda k: (isinstance(k, str), natural_key(str(k))))
    ints = [k for k in unique if isinstance(k, int)]
    names = [k for k in unique if isinstance(k, str)]
    wnids = [k for k in names if _WNID.fullmatch(k)]
    if ints and names or names and wnids and len(wnids) != len(names):
        raise UsageError(f'the labels mix ImageNet wnids, integers and other names: {unique[:3]} ... {unique[-3:]}')
    subset = infer_imagenet_subset({'num_classes': num_classes})
    if names and not wnids:  # a custom set of classes, in timm's ImageFolder order
        if len(names) > num_classes:
            raise UsageError(f'{len(names)} classes ({names[0]} ... {names[-1]}) but the model has {num_classes}')
        return LabelSpace({name: i for i, name in enumerate(names)}, None, f'{len(names)} classes by folder name')
    if subset not in ('imagenet-1k', 'imagenet-22k'):
        if wnids:
            raise UsageError(f'the labels are ImageNet wnids but the model has {num_classes} classes, neither '
                           f'ImageNet-1k (1000) nor ImageNet-22k (21841)')
        out_of_range = [k for k in ints if k >= num_classes]
        if out_of_range:
            raise UsageError(f'label {out_of_range[0]} is beyond the {num_classes} classes of the model')
        return LabelSpace({k: k for k in ints}, None, f'class indices of the {num_classes}-class head')
    in1k = ImageNetInfo('imagenet-1k').label_names()
    index_1k = {wnid: i for i, wnid in enumerate(in1k)}
    if ints:
        beyond = [k for k in ints if k >= len(in1k)]
        if beyond:
            raise UsageError(f'integer labels are ImageNet-1k class indices (0-999), got {beyond[0]}')
        wnid_of = {k: in1k[k] for k in ints}
    else:
        wnid_of = {k: k for k in wnids}
    if subset == 'imagenet-1k':
        outside = [w for w in wnid_of.values() if w not in index_1k]
        if outside:
            raise UsageError(f'{len(outside)} wnid(s) of the data are not ImageNet-1k classes ({", ".join(outside[:5])})'
                           f', and the model has the 1000 ImageNet-1k classes: an ImageNet-22k folder needs a '
                           f'21841-class tag')
        return LabelSpace({k: index_1k[w] for k, w in wnid_of.items()}, None, 'ImageNet-1k', True,
                          list(range(len(in1k))))
    index_22k = {wnid: i for i, wnid in enumerate(ImageNetInfo('imagenet-22k').label_names())}
    headless = [w for w in in1k if w not in index_22k]  # n04399382 (teddy bear) is not in ImageNet-22k (fall 2011)
    outside = [w for w in wnid_of.values() if w not in index_22k and w not in headless]
    if outside:
        raise UsageError(f'{len(outside)} wnid(s) of the data are not ImageNet-22k classes ({", ".join(outside[:5])})')
    note = f'; {", ".join(headless)} has no output, its images are skipped' if headless else ''
    if not all_classes and all(w in index_1k for w in wnid_of.values()):
        scored = [w for w in in1k if w in index_22k]
        position = {w: i for i, w in enumerate(scored)}
        return LabelSpace({k: position[w] for k, w in wnid_of.items() if w in position},
                          [index_22k[w] for w in scored],
                          f'ImageNet-1k (the {len(scored)} ImageNet-1k outputs of the {num_classes}-class head{note})',
                          True, [position.get(w, -1) for w in in1k])
    return LabelSpace({k: index_22k[w] for k, w in wnid_of.items() if w in index_22k}, None,
                      f'ImageNet-22k (all {num_classes} classes{note})', False, [index_22k.get(w, -1) for w in in1k])


def _real_label_sets(paths: Sequence[str], real_json: Optional[str], space: LabelSpace) -> List[List[int]]:
    """ImageNet-ReaL label sets of the val images ``paths`` as scored targets (timm's bundled file by default)."""
    import pkgutil
    if space.from_1k is None:
        raise UsageError('ImageNet-ReaL labels need an ImageNet-1k or -22k head and ImageNet labels')
    if real_json:
        real = json.loads(Path(real_json).expanduser().read_text(encoding='utf-8'))
    else:
        real = json.loads(pkgutil.get_data('timm.data', '_info/imagenet_real_labels.json').decode('utf-8'))
    sets = []
    for path in paths:
        match = _VAL_NUMBER.search(os.path.basename(path))
        if not match or not 0 < int(match.group(1)) <= len(real):
            raise UsageError(f'{path}: not an ImageNet val image name (ILSVRC2012_val_NNNNNNNN) in the ReaL labels')
        labels = [space.from_1k[i] for i in real[int(match.group(1)) - 1]]
        sets.append(labels)
    return sets


# ----------------------------------------------------------------------------------------------------------------
# evaluation


class LabelledImages(Dataset):
    """``(transformed image, target, index)`` of ``(path, target)`` pairs; images decoded as timm's ImageDataset
    does (Pillow, converted to RGB)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        from PIL import Image
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert('RGB')
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UnreadableImageError(f'{path}: cannot be read as an image ({e})') from None
        return self.transform(rgb), target, index


def _spread(items: Sequence[Any], limit: Optional[int]) -> List[Any]:
    """``limit`` items spread evenly over ``items`` (all of them without a limit), in order."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


@dataclass
class _Tally:
    images: int = 0
    top1: int = 0
    top5: int = 0
    loss: float = 0.0
    real: Dict[int, List[bool]] = field(default_factory=lambda: {1: [], 5: []})


def _score(tally: _Tally, logits: torch.Tensor, targets: torch.Tensor, real: Optional[List[List[int]]]) -> None:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    tally.images += targets.numel()
    tally.top1 += int((top[:, 0] == targets).sum())
    tally.top5 += int((top == targets[:, None]).any(dim=1).sum())
    tally.loss += float(F.cross_entropy(logits, targets, reduction='sum'))
    for labels, predicted in zip(real or (), top.tolist()):
        if labels:
            for n in tally.real:
                tally.real[n].append(any(p in labels for p in predicted[:n]))


def _last_line(error: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker (which prepends a traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1].split(': ', 1)[-1] if len(lines) > 1 else str(error)


def published_top1(model: torch.nn.Module) -> Optional[float]:
    """The published ImageNet-1k top-1 of the tag the model was built from, None if none applies (22k heads,
    other class counts, repos the manifest does not list)."""
    from .._manifest import published_results
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    repo = (cfg.get('hf_hub_id') or '').partition('@')[0]
    top1 = published_results(repo, cfg.get('hf_hub_filename')).get('top1') if repo else None
    if top1 is None or model.num_classes != cfg.get('num_classes'):
        return None
    return float(top1)


def compare_published(top1: float, published: Optional[float], images: int, imagenet_1k: bool) -> Dict[str, Any]:
    """``{published_top1, top1_gap, full_val, gap_flagged}``: the gap is flagged when it exceeds
    ``GAP_POINTS`` on the full ImageNet-1k val set (``FULL_VAL_IMAGES`` images with ImageNet-1k labels)."""
    full_val = imagenet_1k and images == FULL_VAL_IMAGES
    gap = None if published is None else top1 - published
    return dict(published_top1=published, top1_gap=gap, full_val=full_val,
                gap_flagged=bool(full_val and gap is not None and abs(gap) > GAP_POINTS))


def validate(
        data: str,
        model_name: str,
        labels: Optional[str] = None,
        batch_size: int = 64,
        workers: int = 4,
        device: str = 'auto',
        amp: Optional[str] = None,
        channels_last: bool = False,
        limit: Optional[int] = None,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        all_classes: bool = False,
        real: Union[bool, str] = False,
        progress: bool = True,
) -> Dict[str, Any]:
    """Evaluate a pretrained model on an image folder; returns the summary (see ``validate --json``).

    The preprocessing is the model's own (``resolve_data_config`` + ``create_transform``). ``limit`` takes that
    many images spread evenly over the sorted samples. ``real``: also score ImageNet-ReaL labels (True: timm's
    bundled file; a path: that file).
    """
    from timm.data import create_transform, resolve_data_config

    if workers < 0:
        raise UsageError(f'--workers must be 0 or more, got {workers}')
    samples, layout = find_samples(data, labels)
    torch_device = resolve_device(device)
    if amp is not None and amp not in AMP_DTYPES:
        raise UsageError(f'--amp must be one of {", ".join(AMP_DTYPES)}, got {amp!r}')
    model = load_pretrained_model(model_name, checkpoint, model_kwargs, torch_device)
    space = label_space([key for _, key in samples], model.num_classes, all_classes)
    skipped = sum(1 for _, key in samples if key not in space.targets)
    samples = _spread([sample for sample in samples if sample[1] in space.targets], limit)
    real_sets = _real_label_sets([p for p, _ in samples], real if isinstance(real, str) else None, space) \
        if real else None
    config = resolve_data_config(model=model)
    dataset = LabelledImages([(path, space.targets[key]) for path, key in samples],
                             create_transform(**config, is_training=False))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch_device.type == 'cuda')
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    columns = None if space.columns is None else torch.tensor(space.columns, device=torch_device)
    autocast = torch.autocast(torch_device.type, dtype=AMP_DTYPES[amp], enabled=amp is not None) if amp else None

    from tqdm.auto import tqdm
    tally = _Tally()
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(dataset), unit='img', disable=None if progress else True,
                                      desc=f'validate {model_name}', leave=False) as bar:
        try:
            for images, targets, indices in loader:
                images = images.to(torch_device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if autocast is not None:
                    with autocast:
                        logits = model(images)
                else:
                    logits = model(images)
                logits = logits.float()
                if columns is not None:
                    logits = logits.index_select(1, columns)
                if not logits.isfinite().all():
                    raise UsageError(f'{model_name} gave NaN or infinite outputs; check the weights (and --amp)')
                _score(tally, logits, targets.to(torch_device),
                       [real_sets[i] for i in indices.tolist()] if real_sets is not None else None)
                bar.update(targets.numel())
        except UnreadableImageError as e:
            raise UsageError(_last_line(e)) from None
    if torch_device.type == 'cuda':
        torch.cuda.synchronize(torch_device)
    seconds = time.perf_counter() - start

    top1 = 100.0 * tally.top1 / tally.images
    summary = dict(
        model=model_name,
        data=str(data),
        layout=layout,
        labels=space.name,
        images=tally.images,
        skipped_images=skipped,
        top1=top1,
        top5=100.0 * tally.top5 / tally.images,
        loss=tally.loss / tally.images,
        img_per_s=tally.images / seconds if seconds > 0 else math.inf,
        seconds=seconds,
        device=str(torch_device),
        amp=amp,
        channels_last=channels_last,
        batch_size=batch_size,
        input_size=list(config['input_size']),
        crop_pct=config.get('crop_pct'),
        interpolation=config.get('interpolation'),
    )
    if real_sets is not None:
        for n, hits in tally.real.items():
            summary[f'real_top{n}'] = 100.0 * sum(hits) / len(hits) if hits else None
        summary['real_images'] = len(tally.real[1])
    summary.update(compare_published(top1, published_top1(model) if space.imagenet_1k else None, tally.images,
                                     space.imagenet_1k))
    return summary
