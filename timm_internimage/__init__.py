"""InternImage for timm: importing this package registers ``internimage_{t,s,b,l,xl,h,g}`` and
``flash_internimage_{t,s,b,l}`` with timm."""
__version__ = '0.1.0'

from .models import FlashInternImage, InternImage, checkpoint_filter_fn
from .ops import backend, fused_linear, fused_linear_enabled, get_backend, set_backend, set_fused_linear

__all__ = [
    'FlashInternImage', 'InternImage', 'backend', 'checkpoint_filter_fn', 'fused_linear', 'fused_linear_enabled',
    'get_backend', 'set_backend', 'set_fused_linear', '__version__',
]
