"""DCNv3 operator: functional API, module, and the pure-PyTorch implementation."""
from .dcn_v3 import BACKENDS, DCNv3, compiled_backend_available, dcnv3, dcnv3_core
from .dcnv3_reference import dcnv3_reference
from .dcnv3_torch import dcnv3_output_size, dcnv3_torch

__all__ = [
    'BACKENDS', 'DCNv3', 'compiled_backend_available', 'dcnv3', 'dcnv3_core', 'dcnv3_output_size', 'dcnv3_reference',
    'dcnv3_torch',
]
