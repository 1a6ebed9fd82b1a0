"""InternImage for timm: importing this package registers ``internimage_{t,s,b,l,xl,h,g}`` with timm."""
__version__ = '0.1.0'

from .internimage import InternImage, checkpoint_filter_fn

__all__ = ['InternImage', 'checkpoint_filter_fn', '__version__']
