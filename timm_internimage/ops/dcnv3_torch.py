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
from torch.autograd.function import once_differentiable

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


def _corner_rows(top_left: Tensor, group: int, row_stride: int) -> Tensor:
    """(bags, P) top-left table rows -> (bags, 4 * P) rows of the 4 corners, corner-major within a bag."""
    rows = torch.stack((top_left, top_left + group, top_left + row_stride, top_left + (row_stride + group)), 1)
    return rows.view(top_left.shape[0], 4 * top_left.shape[1])


class _BilinearGather(torch.autograd.Function):
    """``embedding_bag`` of the 4 bilinear corners of every point, with a faster backward than ATen's CPU one.

    ATen's dense embedding_bag backward loops over every index, one ``group_channels`` row at a time,
    after sorting all ``4 * P`` indices of every bag. Here the input gradient is the transposed gather:
    the points are sorted by their top-left row only (4x fewer keys), one embedding_bag per corner sums
    ``grad_output`` rows into a bag per table row, and the 4 results are added at their corner shifts.
    The weight gradient is ATen's per-sample-weights backward (one row dot product per index).
    """

    @staticmethod
    def forward(ctx, table: Tensor, top_left: Tensor, weights: Tensor, group: int, row_stride: int) -> Tensor:
        ctx.save_for_backward(table, top_left, weights)
        ctx.group, ctx.row_stride = group, row_stride
        rows = _corner_rows(top_left, group, row_stride)
        return F.embedding_bag(rows, table, per_sample_weights=weights.reshape(rows.shape), mode='sum')

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        table, top_left, weights = ctx.saved_tensors
        group, row_stride = ctx.group, ctx.row_stride
        grad_output = grad_output.contiguous()
        bags, points = top_left.shape
        num_rows = table.shape[0]
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            flat = top_left.reshape(-1)
            order = torch.sort(flat, stable=True)[1]
            counts = torch.bincount(flat, minlength=num_rows)
            offsets = counts.cumsum(0) - counts
            bag_of = torch.arange(bags, device=flat.device, dtype=flat.dtype).view(bags, 1).expand(bags, points)
            bag_of = bag_of.reshape(-1).index_select(0, order)
            corner_weights = weights.view(bags, 4, points).transpose(0, 1).reshape(4, bags * points)
            corner_weights = corner_weights.index_select(1, order)
            grad_table = F.embedding_bag(
                bag_of, grad_output, offsets, per_sample_weights=corner_weights[0], mode='sum')
            for k, shift in enumerate((group, row_stride, row_stride + group), 1):
                grad_table[shift:] += F.embedding_bag(
                    bag_of, grad_output, offsets, per_sample_weights=corner_weights[k], mode='sum')[:num_rows - shift]
        if ctx.needs_input_grad[2]:
            rows = _corner_rows(top_left, group, row_stride).view(-1)
            slots = 4 * points
            offsets = torch.arange(0, bags * slots, slots, device=rows.device, dtype=rows.dtype)
            offset2bag = torch.arange(bags, device=rows.device, dtype=rows.dtype).view(bags, 1).expand(bags, slots)
            grad_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_output, table, rows, offsets, offset2bag.reshape(-1), 0, -1).view(weights.shape)
        return grad_table, None, grad_weights, None, None


def _bilinear_gather_plain(table: Tensor, top_left: Tensor, weights: Tensor, group: int, row_stride: int) -> Tensor:
    rows = _corner_rows(top_left, group, row_stride)
    return F.embedding_bag(rows, table, per_sample_weights=weights.reshape(rows.shape), mode='sum')


@torch.jit.unused
def _bilinear_gather_autograd(table: Tensor, top_left: Tensor, weights: Tensor, group: int, row_stride: int) -> Tensor:
    return _BilinearGather.apply(table, top_left, weights, group, row_stride)


@torch.jit.unused
def _use_custom_backward(table: Tensor, weights: Tensor) -> bool:
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False  # exporters see plain ATen ops
    return torch.is_grad_enabled() and (table.requires_grad or weights.requires_grad)


def _bilinear_gather(table: Tensor, top_left: Tensor, weights: Tensor, group: int, row_stride: int) -> Tensor:
    """Sum over the 4 corners of every point of ``weights * table[row]``: ``(bags, group_channels)``."""
    if not torch.jit.is_scripting() and _use_custom_backward(table, weights):
        return _bilinear_gather_autograd(table, top_left, weights, group, row_stride)
    return _bilinear_gather_plain(table, top_left, weights, group, row_stride)


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
    index_dtype = torch.int32 if batch * (height + 3) * (width + 3) * group < 2 ** 31 else torch.int64
    device = input.device

    # The table gets a zero border, 1 pixel before and 2 after each spatial axis; locations are in padded
    # coordinates (+1). As in the official CUDA kernel, a sample counts only if -1 < position < size on both
    # axes (strict: NaN and +-inf fail). Locations are clamped to [-1, size] (NaN to -1), so every corner is a
    # real row of the table: no validity masks per corner, no index clamping. A sample that does not count
    # then reads only the zero border or gets zero weight: its location's gradient is zero (clamp passes none
    # at its bounds) and its mask weight is replaced by 0, so that even a NaN weight adds nothing.
    padded_h, padded_w = height + 3, width + 3
    table = F.pad(input, (0, 0, 1, 2, 1, 2)).reshape(batch * padded_h * padded_w * group, group_channels)

    # Sampling grid without offsets, in padded coordinates: (H_out, W_out, 1, P, 2) (x, y) pairs.
    point_x, point_y = _kernel_points(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, device, loc_dtype)
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    center_x = torch.arange(width_out, device=device, dtype=loc_dtype) * stride_w + (half_w - pad_w + 1)
    center_y = torch.arange(height_out, device=device, dtype=loc_dtype) * stride_h + (half_h - pad_h + 1)
    grid = torch.stack((
        (center_x.view(1, width_out, 1) + point_x * offset_scale).expand(height_out, width_out, num_points),
        (center_y.view(height_out, 1, 1) + point_y * offset_scale).expand(height_out, width_out, num_points),
    ), -1).unsqueeze(2)

    offset = offset.reshape(batch, height_out, width_out, group, num_points, 2).to(loc_dtype)
    loc = grid + offset * offset_scale if offset_scale != 1.0 else grid + offset
    loc_x, loc_y = loc[..., 0], loc[..., 1]
    counts = (loc_x > 0) & (loc_x < width + 1) & (loc_y > 0) & (loc_y < height + 1)
    if height == width:
        loc = loc.clamp(0, width + 1)
    else:
        loc = torch.minimum(loc.clamp_min(0), torch.tensor([width + 1, height + 1], device=device, dtype=loc_dtype))
    loc = loc.nan_to_num(0.0)
    corner = loc.to(index_dtype)  # truncation is floor: loc >= 0
    frac = loc.frac()
    frac_x, frac_y = frac[..., 0], frac[..., 1]

    mask = torch.where(counts, mask.reshape(batch, height_out, width_out, group, num_points).to(loc_dtype), 0.0)
    top = (1 - frac_y) * mask
    bottom = frac_y * mask
    left = 1 - frac_x
    bags = batch * height_out * width_out * group
    # (bags, 4, P): corners top-left, top-right, bottom-left, bottom-right
    weights = torch.stack((top * left, top * frac_x, bottom * left, bottom * frac_x), -2).to(input.dtype)

    row_stride = padded_w * group
    base = (torch.arange(batch, device=device, dtype=index_dtype).view(batch, 1, 1, 1, 1) * (padded_h * row_stride)
            + torch.arange(group, device=device, dtype=index_dtype).view(1, 1, 1, group, 1))
    top_left = corner[..., 1] * row_stride + corner[..., 0] * group + base
    output = _bilinear_gather(
        table, top_left.reshape(bags, num_points), weights.reshape(bags, 4, num_points), group, row_stride)
    return output.view(batch, height_out, width_out, group * group_channels)
