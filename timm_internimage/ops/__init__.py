"""DCNv3 and DCNv4 operators: functional APIs, modules, the pure-PyTorch implementations, the backend setting and
the model's fused CPU linear layers."""
from .backends import BACKENDS, backend, compiled_backend_available, get_backend, set_backend
from .dcn_v3 import DCNv3, dcnv3, dcnv3_core
from .dcn_v3_reference import dcnv3_reference
from .dcn_v3_torch import dcnv3_torch
from .dcn_v4 import DCNv4, dcnv4, dcnv4_core
from .geometry import Geometry, dcnv3_output_size
from .linear import fused_linear, fused_linear_enabled, set_fused_linear

__all__ = [
    'BACKENDS', 'DCNv3', 'DCNv4', 'Geometry', 'backend', 'compiled_backend_available', 'dcnv3', 'dcnv3_core',
    'dcnv3_output_size', 'dcnv3_reference', 'dcnv3_torch', 'dcnv4', 'dcnv4_core', 'fused_linear',
    'fused_linear_enabled', 'get_backend', 'set_backend', 'set_fused_linear',
]
