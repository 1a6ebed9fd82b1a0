"""Linear layers with their bias and residual work fused, for the CPU inference and training fast path.

On CPU, ``F.linear`` first broadcast-copies the bias into its output and then accumulates the GEMM into
it; a GEMM followed by an in-place bias add is cheaper, and a residual branch can take the bias into its
residual copy and accumulate the GEMM in place (one pass over the output instead of three). The values
are the same up to float rounding. The model uses these helpers only where
:func:`~timm_internimage.ops.dcn_v3.use_fused_linear` says so: never for the ``reference`` DCNv3
backend, which keeps the official float operation order.
"""
from typing import Optional

import torch
from torch import Tensor

__all__ = ['linear', 'linear_gelu', 'linear_residual']


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)`` as a GEMM followed by an in-place bias add."""
    out = torch.mm(_flat(x), weight.t())
    if bias is not None:
        out.add_(bias)
    return out.view(x.shape[:-1] + (out.shape[-1],))


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str = 'none') -> Tensor:
    """``gelu(F.linear(x, weight, bias))`` with the bias and the activation applied in place."""
    return torch.ops.aten.gelu_(linear(x, weight, bias), approximate=approximate)


def linear_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    """``residual + F.linear(x, weight, bias)``: the bias goes into a copy of the residual and the GEMM
    accumulates into it in place."""
    out = (residual + bias if bias is not None else residual.clone()).contiguous()
    out.view(-1, out.shape[-1]).addmm_(_flat(x), weight.t())
    return out
