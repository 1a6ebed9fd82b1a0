"""DCNv4: the functional op and the DCNv4 module (FlashInternImage's core operator).

DCNv4 samples exactly as DCNv3 does (same grid, ``-1 < loc < size`` rule, bilinear corners and gradients); it
differs in its inputs: one packed ``offset_mask`` tensor instead of separate offsets and mask, and point weights
used as given (no softmax, unless asked for). It shares DCNv3's backend setting, choice and validation (with its
errors): the ``compiled`` backend runs the wheel's DCNv4 kernels, which read ``offset_mask`` directly; the other
backends (and a wheel without those kernels) get ``offset_mask`` unpacked into DCNv3's layouts and run
:func:`~timm_internimage.ops.dcn_v3.run_checked`. Gradients flow back into ``offset_mask`` (zero in its padding
channels).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import register_notrace_function

from .backends import (
    COMPILED_MAX_SOFTMAX_POINTS, choose_backend, compiled_packed_available, requested_backend, run_compiled_packed)
from .dcn_v3 import blend_center_feature, check_module_geometry, dcnv3_core, run_checked
from .geometry import Geometry, IntOrPair, check_geometry, check_tensors, make_geometry, num_points
from .linear import linear

__all__ = ['dcnv4', 'dcnv4_core', 'DCNv4', 'offset_mask_channels']


def offset_mask_channels(group: int, num_points: int) -> int:
    """Channels of the official packed ``offset_mask``: ``3 * group * num_points`` rounded up to a multiple of 8."""
    return int(math.ceil(3 * group * num_points / 8) * 8)


def _check_arguments(input: Tensor, offset_mask: Tensor, geometry: Geometry) -> None:
    """ValueError naming the argument and the fix for anything no backend can compute: DCNv3's validation of the
    tensors and the geometry, with its messages, and the rank, size and channel count of ``offset_mask``."""
    if input.dim() != 4 or offset_mask.dim() != 4:
        raise ValueError(
            f'dcnv4: input and offset_mask must be 4-D channels-last tensors, got shapes {tuple(input.shape)} and '
            f'{tuple(offset_mask.shape)}')
    check_tensors(input, offset_mask, offset_mask)
    height_out, width_out = check_geometry(geometry, input)
    points = num_points(geometry)
    used, padded = 3 * geometry.group * points, offset_mask_channels(geometry.group, points)
    expected = (input.shape[0], height_out, width_out)
    if tuple(offset_mask.shape[:3]) != expected:
        raise ValueError(
            f'dcnv4: offset_mask must be (N, H_out, W_out, channels) = {expected + ("channels",)} for input '
            f'{tuple(input.shape)}, got {tuple(offset_mask.shape)}')
    if not used <= offset_mask.shape[3] <= padded:
        raise ValueError(
            f'dcnv4: offset_mask needs 3 * group * points = 3 * {geometry.group} * {points} = {used} channels, '
            f'optionally padded to {padded} (the official layout), got {offset_mask.shape[3]}')


def _unpack(offset_mask: Tensor, geometry: Geometry) -> Tuple[Tensor, Tensor]:
    """DCNv3's offset and mask of the packed ``offset_mask``: per group, 2 * P offsets ((x, y) per point), then P
    weights; the padding channels are not read."""
    points = num_points(geometry)
    packed = offset_mask[..., :3 * geometry.group * points].unflatten(-1, (geometry.group, 3 * points))
    return packed[..., :2 * points].flatten(-2).contiguous(), packed[..., 2 * points:].flatten(-2).contiguous()


@register_notrace_function
def dcnv4_core(
        input: Tensor,
        offset_mask: Tensor,
        geometry: Geometry,
        softmax: bool = False,
        backend: Optional[str] = None,
) -> Tensor:
    """DCNv4 for a :class:`.Geometry` (the official op's scalar arguments as one value, without ``im2col_step``),
    validated once, then run by the compiled DCNv4 kernels or as DCNv3."""
    if torch.jit.is_scripting():  # TorchScript compiles only this branch: DCNv3's pure-PyTorch op
        offset, mask = _unpack(offset_mask, geometry)
        return dcnv3_core(input, offset, mask, geometry, mask_is_logits=softmax)
    requested = requested_backend(backend)
    _check_arguments(input, offset_mask, geometry)
    chosen = choose_backend(requested, input)
    if (chosen == 'compiled' and compiled_packed_available()
            and (not softmax or num_points(geometry) <= COMPILED_MAX_SOFTMAX_POINTS)):
        return run_compiled_packed(input, offset_mask, geometry, softmax)
    offset, mask = _unpack(offset_mask, geometry)
    return run_checked(input, offset, mask, geometry, softmax, chosen)


def dcnv4(
        input: Tensor,
        offset_mask: Tensor,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: IntOrPair = 1,
        dilation: IntOrPair = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        remove_center: bool = False,
        softmax: bool = False,
        backend: Optional[str] = None,
) -> Tensor:
    """Deformable convolution v4 sampling (no input/output projections).

    Args:
        input: ``(N, H, W, C)`` channels-last features, ``C`` divisible by ``group`` (any group width).
        offset_mask: ``(N, H_out, W_out, M)``, the official packed layout: for group ``g``, channels
            ``g * 3P .. (g + 1) * 3P`` hold 2P offsets in pixels ((x, y) per point, points ordered with x
            varying slowest) then P point weights; ``P = kh * kw - remove_center``. ``M`` is ``3 * group * P``,
            or up to the official padded size ``ceil(3 * group * P / 8) * 8`` (the padding is ignored).
        group: number of groups sharing offsets and weights.
        softmax: normalise the weights with a per-group softmax over the points (FlashInternImage: off).
        kernel_size, stride, padding, dilation, offset_scale, remove_center, backend: as for
            :func:`~timm_internimage.ops.dcnv3` (the same backends and setting).

    Returns ``(N, H_out, W_out, C)`` in the input's dtype; raises a ValueError naming the argument and the fix for
    arguments no backend can compute.
    """
    channels = input.shape[-1] if input.dim() > 0 else 0
    geometry = make_geometry(channels, kernel_size, stride, padding, dilation, group, offset_scale, remove_center)
    return dcnv4_core(input, offset_mask, geometry, softmax=bool(softmax), backend=backend)


class DCNv4(nn.Module):
    """DCNv4 block: value projection, packed offsets and weights predicted by a linear layer (after an optional
    depthwise conv), deformable sampling, optional centre feature scaling, output projection.

    Channels-last ``(N, H, W, C)`` in and out. Parameter names are the official ones, except that the official
    ``center_feature_scale_proj_weight``/``_bias`` are the weight and bias of the ``center_feature_scale_proj``
    linear here (as in :class:`~timm_internimage.ops.DCNv3`); ``checkpoint_filter_fn`` maps them.
    """

    def __init__(
            self,
            channels: int = 64,
            kernel_size: int = 3,
            stride: int = 1,
            pad: int = 1,
            dilation: int = 1,
            group: int = 4,
            offset_scale: float = 1.0,
            dw_kernel_size: Optional[int] = None,
            center_feature_scale: bool = False,
            remove_center: bool = False,
            output_bias: bool = True,
            without_pointwise: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        check_module_geometry('DCNv4', channels, group, kernel_size, stride, pad, dilation, remove_center)
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.dw_kernel_size = dw_kernel_size
        self.remove_center = bool(remove_center)
        self.without_pointwise = without_pointwise
        num_points = kernel_size * kernel_size - int(self.remove_center)

        self.offset_mask_dw = nn.Conv2d(
            channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels, **dd,
        ) if dw_kernel_size is not None else None
        self.offset_mask = nn.Linear(channels, offset_mask_channels(group, num_points), **dd)
        if without_pointwise:
            self.value_proj = self.output_proj = None
        else:
            self.value_proj = nn.Linear(channels, channels, **dd)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias, **dd)
        self.center_feature_scale_proj = nn.Linear(channels, group, **dd) if center_feature_scale else None
        if not self.offset_mask.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero offsets and weights, Xavier projections and a neutral centre scale, as the official initialisation."""
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        for layer in (self.value_proj, self.output_proj):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if self.center_feature_scale_proj is not None:
            nn.init.zeros_(self.center_feature_scale_proj.weight)
            nn.init.zeros_(self.center_feature_scale_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, H, W, C)`` in and out."""
        projected = x if self.value_proj is None else linear(x, self.value_proj.weight, self.value_proj.bias)
        context = x
        if self.offset_mask_dw is not None:
            context = self.offset_mask_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        offset_mask = linear(context, self.offset_mask.weight, self.offset_mask.bias)
        geometry = Geometry(
            self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad, self.pad, self.dilation,
            self.dilation, self.group, self.group_channels, self.offset_scale, self.remove_center)
        out = dcnv4_core(projected, offset_mask, geometry)
        if self.center_feature_scale_proj is not None:
            # As officially, the scale is predicted from the sampled features.
            out = blend_center_feature(out, projected, self.center_feature_scale_proj(out), self.group)
        if self.output_proj is not None:
            out = linear(out, self.output_proj.weight, self.output_proj.bias)
        return out
