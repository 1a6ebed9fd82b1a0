"""DCNv3 and DCNv4 operators: functional APIs, modules, and the pure-PyTorch implementation."""
from .settings import (
    BACKENDS, backend, fused_linear, fused_linear_enabled, get_backend, set_backend, set_fused_linear)
from .dcn_v3 import DCNv3, compiled_backend_available, dcnv3, dcnv3_core
from .dcn_v4 import DCNv4, dcnv4, dcnv4_core
from .dcnv3_reference import dcnv3_reference
from .dcnv3_torch import dcnv3_output_size, dcnv3_torch

__all__ = [
    'BACKENDS', 'DCNv3', 'DCNv4', 'backend', 'compiled_backend_available', 'dcnv3', 'dcnv3_core', 'dcnv3_output_size',
    'dcnv3_reference', 'dcnv3_torch', 'dcnv4', 'dcnv4_core', 'fused_linear', 'fused_linear_enabled', 'get_backend',
    'set_backend', 'set_fused_linear',
]
