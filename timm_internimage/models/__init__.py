"""The model families, one file each (timm style); importing this package registers them with timm.

The variant facts live in each family's ``register_model`` entrypoints (``model_args``) and pretrained cfg table
(``default_cfgs``); :func:`pretrained_cfgs` and :func:`dense_tags` are the two families' tables in one place.
"""
from typing import Dict

from timm.models import PretrainedCfg, get_arch_pretrained_cfgs

from . import flash_internimage, internimage
from .flash_internimage import FlashInternImage
from .internimage import DenseTag, InternImage, checkpoint_filter_fn

__all__ = ['FlashInternImage', 'InternImage', 'checkpoint_filter_fn', 'DenseTag', 'dense_tags', 'pretrained_cfgs']

_FAMILIES = (internimage, flash_internimage)


def pretrained_cfgs() -> Dict[str, PretrainedCfg]:
    """Every tag of both families, ``model.tag`` -> pretrained cfg, model by model in each family's cfg table order
    (a model's first tag is its default)."""
    return {name: cfg for family in _FAMILIES for model in family.default_cfgs
            for name, cfg in get_arch_pretrained_cfgs(model).items()}


def dense_tags() -> Dict[str, DenseTag]:
    """Every detection / segmentation tag of both families, ``model.tag`` -> its checkpoint."""
    return {name: tag for family in _FAMILIES for name, tag in family.DENSE_TAGS.items()}
