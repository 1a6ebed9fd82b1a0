"""The model families, one file each (timm style); importing this package registers them with timm."""
from .flash_internimage import FlashInternImage
from .internimage import InternImage, checkpoint_filter_fn

__all__ = ['FlashInternImage', 'InternImage', 'checkpoint_filter_fn']
