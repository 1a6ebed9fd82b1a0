"""DCNv3: the functional op and the DCNv3 module.

A call builds its :class:`.Geometry` once, validates it with the tensors once (:func:`.geometry.check_arguments`)
before any backend runs, and runs on the backend that :func:`.backends.choose_backend` picks for it: ``torch``,
``reference``, ``compiled`` or, during graph export, ``export`` (see :mod:`.backends`). DCNv4 (:mod:`.dcn_v4`)
ends in the same place, :func:`run_checked`.
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import register_notrace_function

from .backends import (
    COMPILED_MAX_SOFTMAX_POINTS, choose_backend, compiled_backend_available, requested_backend, run_compiled)
from .dcn_v3_export import dcnv3_export
from .dcn_v3_reference import dcnv3_reference
from .dcn_v3_torch import dcnv3_torch, softmax_over_points
from .geometry import Geometry, IntOrPair, check_arguments, make_geometry, num_points
from .linear import linear

# compiled_backend_available lives in .backends; named here too, where it was first imported from.
__all__ = ['DCNv3', 'compiled_backend_available', 'dcnv3', 'dcnv3_core']


@register_notrace_function
def dcnv3_core(
        input: Tensor,
        offset: Tensor,
        mask: Tensor,
        geometry: Geometry,
        mask_is_logits: bool = False,
        backend: Optional[str] = None,
) -> Tensor:
    """DCNv3 for a :class:`.Geometry` (the official op's scalar arguments as one value), validated, then run on
    a backend.

    With ``mask_is_logits`` the mask holds logits and their per-group softmax over the kernel points is
    part of the op (inside the kernel for the compiled backend, up to 64 points).
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this branch: the pure-PyTorch op
        if mask_is_logits:
            mask = softmax_over_points(mask, geometry.group, exact=False)
        return dcnv3_torch(input, offset, mask, geometry)
    requested = requested_backend(backend)
    check_arguments(input, offset, mask, geometry)
    return run_checked(input, offset, mask, geometry, mask_is_logits, choose_backend(requested, input))


def run_checked(
        input: Tensor, offset: Tensor, mask: Tensor, geometry: Geometry, mask_is_logits: bool, chosen: str,
) -> Tensor:
    """DCNv3 of validated arguments on ``chosen``, the backend :func:`.backends.choose_backend` picked for this
    call."""
    if mask_is_logits and (chosen != 'compiled' or num_points(geometry) > COMPILED_MAX_SOFTMAX_POINTS):
        mask = softmax_over_points(mask, geometry.group, exact=chosen in ('reference', 'export'))
        mask_is_logits = False
    if chosen == 'compiled':
        return run_compiled(input, offset, mask, geometry, mask_is_logits)
    if input.shape[0] == 0:
        # An empty batch: an empty output that still belongs to the autograd graph of all three inputs.
        empty = input.new_zeros(0, offset.shape[1], offset.shape[2], input.shape[3])
        return empty + (input.sum() + offset.sum() + mask.sum()) * 0
    implementation = {'reference': dcnv3_reference, 'export': dcnv3_export}.get(chosen, dcnv3_torch)
    return implementation(input, offset, mask, geometry)


def dcnv3(
        input: Tensor,
        offset: Tensor,
        mask: Tensor,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: IntOrPair = 1,
        dilation: IntOrPair = 1,
        group: int = 1,
        offset_scale: float = 1.0,
        remove_center: bool = False,
        backend: Optional[str] = None,
) -> Tensor:
    """Deformable convolution v3 sampling (no input/output projections).

    Args:
        input: ``(N, H, W, C)`` channels-last features, ``C`` divisible by ``group``.
        offset: ``(N, H_out, W_out, group * P * 2)`` sampling offsets in pixels as (x, y) pairs,
            points ordered with x varying slowest; ``P = kh * kw - remove_center``.
        mask: ``(N, H_out, W_out, group * P)`` point weights, already normalised (e.g. softmax over P).
        kernel_size, stride, padding, dilation: ints or (h, w) pairs.
        group: number of groups sharing offsets and mask.
        offset_scale: scale of both the base kernel grid and the offsets.
        remove_center: drop the kernel's centre point (needs an odd number of kernel points).
        backend: ``'auto'``, ``'torch'``, ``'reference'`` or ``'compiled'``; default: the setting
            (:func:`timm_internimage.set_backend`).

    Returns:
        ``(N, H_out, W_out, C)`` in the input's dtype.

    Raises:
        ValueError: for arguments no backend can compute (the message names the argument and the fix).
    """
    channels = input.shape[-1] if input.dim() > 0 else 0
    geometry = make_geometry(channels, kernel_size, stride, padding, dilation, group, offset_scale, remove_center)
    return dcnv3_core(input, offset, mask, geometry, backend=backend)


def blend_center_feature(out: Tensor, projected: Tensor, scale_logits: Tensor, group: int) -> Tensor:
    """Centre feature scaling: ``out * (1 - s) + projected * s`` with ``s = sigmoid(scale_logits)``, one scale per
    group broadcast over its channels (not ``repeat_interleave``, which the TorchScript ONNX exporter crashes on)."""
    scale = torch.sigmoid(scale_logits).unsqueeze(-1)
    groups = (group, out.shape[-1] // group)
    return (out.unflatten(-1, groups) * (1 - scale) + projected.unflatten(-1, groups) * scale).flatten(-2)


def check_module_geometry(
        name: str, channels: int, group: int, kernel_size: int, stride: int, pad: int, dilation: int,
        remove_center: bool,
) -> None:
    """ValueError for a deformable-conv module (``name``: DCNv3, DCNv4) that cannot keep the spatial size: its
    offsets and weights are predicted at the input resolution."""
    if channels % group != 0:
        raise ValueError(f'{name}: channels ({channels}) must be divisible by group ({group})')
    if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
        raise ValueError(
            f'{name}: the module keeps the spatial size, so it needs stride 1 and 2 * pad == dilation * '
            f'(kernel_size - 1); got stride {stride}, pad {pad}, dilation {dilation}, kernel_size {kernel_size}')
    if remove_center and kernel_size == 1:
        raise ValueError(f'{name}: remove_center on a 1x1 kernel leaves no sampling point; use a larger kernel')


class DCNv3(nn.Module):
    """DCNv3 block: input projection, offsets and softmax mask predicted by a depthwise conv branch,
    deformable sampling, optional centre feature scaling, output projection. Channels-last in and out.
    """

    def __init__(
            self,
            channels: int = 64,
            kernel_size: int = 3,
            dw_kernel_size: Optional[int] = None,
            stride: int = 1,
            pad: int = 1,
            dilation: int = 1,
            group: int = 4,
            offset_scale: float = 1.0,
            act_layer: type = nn.GELU,
            norm_layer: Callable[..., nn.Module] = functools.partial(nn.LayerNorm, eps=1e-6),
            center_feature_scale: bool = False,
            remove_center: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        check_module_geometry('DCNv3', channels, group, kernel_size, stride, pad, dilation, remove_center)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.remove_center = bool(remove_center)
        num_points = kernel_size * kernel_size - int(self.remove_center)

        self.dw_conv = nn.Conv2d(
            channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels, **dd)
        self.dw_norm = norm_layer(channels, **dd)
        self.dw_act = act_layer()
        self.offset = nn.Linear(channels, group * num_points * 2, **dd)
        self.mask = nn.Linear(channels, group * num_points, **dd)
        self.input_proj = nn.Linear(channels, channels, **dd)
        self.output_proj = nn.Linear(channels, channels, **dd)
        self.center_feature_scale_proj = nn.Linear(channels, group, **dd) if center_feature_scale else None
        if not self.offset.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero offsets, uniform mask and a neutral centre scale, as the official initialisation."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.center_feature_scale_proj is not None:
            nn.init.zeros_(self.center_feature_scale_proj.weight)
            nn.init.zeros_(self.center_feature_scale_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, H, W, C)`` in and out."""
        projected = linear(x, self.input_proj.weight, self.input_proj.bias)
        context = self.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        context = self.dw_act(self.dw_norm(context))
        offset = linear(context, self.offset.weight, self.offset.bias)
        mask = linear(context, self.mask.weight, self.mask.bias)
        geometry = Geometry(
            self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad, self.pad, self.dilation,
            self.dilation, self.group, self.group_channels, self.offset_scale, self.remove_center)
        out = dcnv3_core(projected, offset, mask, geometry, mask_is_logits=True)
        if self.center_feature_scale_proj is not None:
            out = blend_center_feature(out, projected, self.center_feature_scale_proj(context), self.group)
        return linear(out, self.output_proj.weight, self.output_proj.bias)
