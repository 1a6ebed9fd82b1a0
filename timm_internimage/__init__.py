"""InternImage for timm: importing this package registers ``internimage_{t,s,b,l,xl,h,g}`` and
``flash_internimage_{t,s,b,l}`` with timm."""
__version__ = '0.1.0'

from .flash_internimage import FlashInternImage
from .internimage import InternImage, checkpoint_filter_fn

__all__ = ['FlashInternImage', 'InternImage', 'checkpoint_filter_fn', '__version__']
