"""Pure-PyTorch DCNv3 sampling core.

Every output vector of a group is a weighted sum of at most ``4 * P`` input rows
(P kernel points, 4 bilinear corners). With the input in NHWC layout, the rows of
a group are already contiguous, so ``input.view(N * H * W * G, C)`` is an embedding
table and the whole op is a single ``F.embedding_bag`` in ``sum`` mode with the
mask folded into the bilinear weights. Unlike a ``grid_sample`` formulation this
needs no layout transposes and no ``P`` times larger sampled intermediate, and its
autograd comes from ATen (it runs on any device, traces and compiles).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['dcnv3_torch', 'dcnv3_output_size']


def dcnv3_output_size(
        height: int,
        width: int,
        kernel_h: int,
        kernel_w: int,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
) -> Tuple[int, int]:
    """Output spatial size of DCNv3, as for a convolution with the same geometry."""
    height_out = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    width_out = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    return height_out, width_out


def _kernel_points(
        kernel_h: int,
        kernel_w: int,
        dilation_h: int,
        dilation_w: int,
        remove_center: bool,
        device: torch.device,
        dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """Kernel point offsets (x, y) from the window centre, x varying slowest."""
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    kx = torch.arange(kernel_w, device=device, dtype=dtype) * dilation_w - half_w
    ky = torch.arange(kernel_h, device=device, dtype=dtype) * dilation_h - half_h
    point_x = kx.repeat_interleave(kernel_h)
    point_y = ky.repeat(kernel_w)
    if remove_center:
        center = (kernel_h * kernel_w) // 2
        keep = torch.cat([torch.arange(center, device=device), torch.arange(center + 1, kernel_h * kernel_w, device=device)])
        point_x = point_x[keep]
        point_y = point_y[keep]
    return point_x, point_y


def dcnv3_torch(
        input: Tensor,
        offset: Tensor,
        mask: Tensor,
        kernel_h: int,
        kernel_w: int,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
        group: int,
        group_channels: int,
        offset_scale: float,
        remove_center: bool,
) -> Tensor:
    """DCNv3 core in pure PyTorch.

    Args:
        input: ``(N, H, W, group * group_channels)``.
        offset: ``(N, H_out, W_out, group * P * 2)``, (x, y) pairs in pixels.
        mask: ``(N, H_out, W_out, group * P)``, already normalised.

    Returns:
        ``(N, H_out, W_out, group * group_channels)`` in the input's dtype.
    """
    batch, height, width, _ = input.shape
    height_out, width_out = offset.shape[1], offset.shape[2]
    num_points = kernel_h * kernel_w - int(remove_center)
    # Locations are computed in at least float32: half precision cannot address pixels of large maps.
    loc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    device = input.device

    # Sampling location = window origin + (kernel point + offset) * offset_scale, in input pixels.
    point_x, point_y = _kernel_points(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, device, loc_dtype)
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    origin_x = torch.arange(width_out, device=device, dtype=loc_dtype) * stride_w + (half_w - pad_w)
    origin_y = torch.arange(height_out, device=device, dtype=loc_dtype) * stride_h + (half_h - pad_h)
    base_x = origin_x.view(1, 1, width_out, 1, 1) + point_x * offset_scale
    base_y = origin_y.view(1, height_out, 1, 1, 1) + point_y * offset_scale
    offset = offset.reshape(batch, height_out, width_out, group, num_points, 2).to(loc_dtype)
    loc_x = base_x + offset[..., 0] * offset_scale
    loc_y = base_y + offset[..., 1] * offset_scale

    # The table gets a border of two zero pixels: clamping the top-left corner to [-2, size] then makes
    # both corners of an axis read zeros exactly when they lie outside the map, with no validity masks.
    x0 = loc_x.floor()
    y0 = loc_y.floor()
    frac_x = loc_x - x0
    frac_y = loc_y - y0
    mask = mask.reshape(batch, height_out, width_out, group, num_points).to(loc_dtype)
    weight_y = torch.stack((mask - frac_y * mask, frac_y * mask), dim=-1)  # (..., P, 2): mask * (1 - fy, fy)
    weight_x = torch.stack((1 - frac_x, frac_x), dim=-1)
    weights = weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)  # (..., P, 2 rows, 2 columns)

    border = 2
    padded_h, padded_w = height + 2 * border, width + 2 * border
    index_dtype = torch.int32 if batch * padded_h * padded_w * group < 2 ** 31 else torch.int64
    column = x0.clamp(-border, width).to(index_dtype) + border
    row = y0.clamp(-border, height).to(index_dtype) + border
    # Table row of each top-left corner: ((n * padded_h + row) * padded_w + column) * group + g.
    image_base = torch.arange(batch, device=device, dtype=index_dtype).view(batch, 1, 1, 1, 1) * (padded_h * padded_w * group)
    group_base = torch.arange(group, device=device, dtype=index_dtype).view(1, 1, 1, group, 1)
    top_left = (row * padded_w + column) * group + (image_base + group_base)
    corner_step = torch.tensor([0, group, padded_w * group, (padded_w + 1) * group], device=device, dtype=index_dtype)
    rows = top_left.unsqueeze(-1) + corner_step  # (..., P, 4) in the same (row, column) order as weights

    table = F.pad(input, (0, 0, border, border, border, border)).reshape(-1, group_channels)
    bags = batch * height_out * width_out * group
    output = F.embedding_bag(
        rows.reshape(bags, num_points * 4),
        table,
        per_sample_weights=weights.reshape(bags, num_points * 4).to(input.dtype),
        mode='sum',
    )
    return output.view(batch, height_out, width_out, group * group_channels)
