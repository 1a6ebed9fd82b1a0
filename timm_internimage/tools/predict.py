"""Classifying image files with a pretrained model (``python -m timm_internimage predict``)."""
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from .images import check_images, image_batches
from .loading import UsageError, load_pretrained_model, resolve_device

if TYPE_CHECKING:
    import torch

__all__ = ['DEFAULT_MODEL', 'predict']

DEFAULT_MODEL = 'internimage_t.in1k'


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

    check_images(images)  # fail on unreadable images before downloading weights
    torch_device = resolve_device(device)
    model = load_pretrained_model(model_name, checkpoint, model_kwargs, torch_device)
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    label = _label_fn(model.num_classes)
    top_k = min(top_k, model.num_classes)
    results = []
    with torch.inference_mode():
        for chunk, batch, errors in image_batches(images, transform, batch_size):
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

