"""The model's linear layers, on oneDNN in CPU float32 inference, and their setting.

``TIMM_INTERNIMAGE_FUSED_LINEAR`` (``0`` switches the oneDNN layers off) is read once, when the package is
imported, as the default; :func:`set_fused_linear`, or the context manager :func:`fused_linear`, change it
afterwards. Like the backend setting (:mod:`.backends`) it is process-wide, for every thread; ``torch.compile``
takes it as a constant of the compiled graph.
"""
import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import requested_backend
from .dcn_v3_export import export_formulation_active

__all__ = ['fused_linear', 'fused_linear_enabled', 'linear', 'set_fused_linear', 'use_fused_linear']

FUSED_LINEAR_ENV = 'TIMM_INTERNIMAGE_FUSED_LINEAR'

_enabled = os.environ.get(FUSED_LINEAR_ENV, '1') != '0'


def fused_linear_enabled() -> bool:
    """Whether CPU float32 inference may run the model's linear layers on oneDNN (on unless switched off)."""
    return _enabled


def set_fused_linear(enabled: bool) -> None:
    """Allow (or forbid) the oneDNN linear layers of CPU float32 inference from now on, in every thread."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def fused_linear(enabled: bool) -> Iterator[None]:
    """``with fused_linear(False):`` runs the block with ATen's linear layers, then restores the setting."""
    previous = _enabled
    set_fused_linear(enabled)
    try:
        yield
    finally:
        set_fused_linear(previous)


@torch.jit.unused
def use_fused_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` runs on oneDNN for input ``x`` and ``weight``: float32 CPU inference.

    That is: CPU float32 tensors that autograd does not track, outside fx and TorchScript tracing (a trace holds
    ATen's linear whatever the grad mode), autocast and ONNX export, with oneDNN available and enabled
    (``torch.backends.mkldnn``), unless switched off (:func:`set_fused_linear`) or the requested backend is
    ``reference``, which keeps the official float operation order in the whole model.
    """
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or export_formulation_active():
        return False
    if x.device.type != 'cpu' or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return not torch.is_autocast_enabled('cpu') and _onednn_enabled() and requested_backend() != 'reference'


@torch.compiler.assume_constant_result
def _onednn_enabled() -> bool:
    """oneDNN is built in and enabled, and the fused linear layers are not switched off (a constant for
    torch.compile, which evaluates it once while tracing)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and fused_linear_enabled()


@torch.library.custom_op('timm_internimage_cpu::linear', mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: str) -> Tensor:
    """oneDNN's linear with an optional GELU (``gelu``: ``'none'``/``'tanh'``, or ``''`` for no GELU).

    A custom op so that torch.compile keeps it as one call (inductor lowers oneDNN's own op only with frozen
    weights) and fuses the layers around it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu' if gelu else 'none', [], gelu)


@_onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: str) -> Tensor:
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


@torch.jit.unused
def _fused_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: Optional[str]) -> Tensor:
    return _onednn_linear(x, weight, bias, gelu or '')


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: Optional[str] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, then ``F.gelu(approximate=gelu)`` if ``gelu`` is given.

    Where :func:`use_fused_linear` allows, one oneDNN call computes it all (GEMM, bias and GELU in one pass
    over the output): the same function up to float32 rounding, and on CPUs where ATen's MKL GEMM is slow for
    these thin matrices (measured on an AVX-512 AMD EPYC) much faster; see docs/benchmarks.md.
    """
    if not torch.jit.is_scripting() and use_fused_linear(x, weight):
        return _fused_linear(x, weight, bias, gelu)
    out = F.linear(x, weight, bias)
    return out if gelu is None else F.gelu(out, approximate=gelu)
