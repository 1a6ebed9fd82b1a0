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

    point_x, point_y = _kernel_points(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, device, loc_dtype)
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    center_x = torch.arange(width_out, device=device, dtype=loc_dtype) * stride_w + (half_w - pad_w)
    center_y = torch.arange(height_out, device=device, dtype=loc_dtype) * stride_h + (half_h - pad_h)

    offset = offset.reshape(batch, height_out, width_out, group, num_points, 2).to(loc_dtype)
    loc_x = center_x.view(1, 1, width_out, 1, 1) + (point_x + offset[..., 0]) * offset_scale
    loc_y = center_y.view(1, height_out, 1, 1, 1) + (point_y + offset[..., 1]) * offset_scale

    x0 = loc_x.floor()
    y0 = loc_y.floor()
    frac_x = loc_x - x0
    frac_y = loc_y - y0
    # Corner dimension pairs: (..., 2) for x in {x0, x0 + 1} and y in {y0, y0 + 1}.
    corner_step = torch.arange(2, device=device, dtype=loc_dtype)
    corner_x = x0.unsqueeze(-1) + corner_step
    corner_y = y0.unsqueeze(-1) + corner_step
    weight_x = torch.stack((1 - frac_x, frac_x), dim=-1) * ((corner_x >= 0) & (corner_x <= width - 1))
    weight_y = torch.stack((1 - frac_y, frac_y), dim=-1) * ((corner_y >= 0) & (corner_y <= height - 1))

    mask = mask.reshape(batch, height_out, width_out, group, num_points).to(loc_dtype)
    weights = (weight_y * mask.unsqueeze(-1)).unsqueeze(-1) * weight_x.unsqueeze(-2)  # (..., P, 2y, 2x)

    # Row of the (N * H * W * G, C) table each corner reads; out-of-bounds corners read row 0 with weight 0.
    index_dtype = torch.int32 if batch * height * width * group < 2 ** 31 else torch.int64
    corner_x = corner_x.clamp(0, width - 1).to(index_dtype)
    corner_y = corner_y.clamp(0, height - 1).to(index_dtype)
    batch_base = torch.arange(batch, device=device, dtype=index_dtype).view(batch, 1, 1, 1, 1, 1) * height
    pixel = ((batch_base + corner_y).unsqueeze(-1) * width + corner_x.unsqueeze(-2))
    group_index = torch.arange(group, device=device, dtype=index_dtype).view(1, 1, 1, group, 1, 1, 1)
    rows = pixel * group + group_index

    table = input.reshape(batch * height * width * group, group_channels)
    bags = batch * height_out * width_out * group
    output = F.embedding_bag(
        rows.reshape(bags, num_points * 4),
        table,
        per_sample_weights=weights.reshape(bags, num_points * 4).to(input.dtype),
        mode='sum',
    )
    return output.view(batch, height_out, width_out, group * group_channels)
