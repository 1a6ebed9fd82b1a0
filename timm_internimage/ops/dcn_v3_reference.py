"""DCNv3 with the official fallback's float arithmetic, for bit-for-bit verification.

Same function as :func:`.dcn_v3_torch.dcnv3_torch`, but evaluated in the official order: sampling
locations normalised by the padded input size, ``grid_sample`` per group, then a mask multiply and a
sum over the kernel points. In float32 this reproduces the official implementation's outputs to the
last bit (on the same hardware), which matters for inputs whose outputs are ill-conditioned (large
learned offsets amplify rounding differences by orders of magnitude). It is slower and needs a
``P`` times larger intermediate, so it is a verification backend, not the default.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import Geometry, num_points

__all__ = ['dcnv3_reference']


def _normalized_kernel_grid(
        geometry: Geometry, padded_h: int, padded_w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Kernel point offsets divided by the padded size, ``(group * P, 2)``, x varying slowest."""
    kernel_h, kernel_w = geometry.kernel_h, geometry.kernel_w
    dilation_h, dilation_w = geometry.dilation_h, geometry.dilation_w
    start_w = -((dilation_w * (kernel_w - 1)) // 2)
    start_h = -((dilation_h * (kernel_h - 1)) // 2)
    xs = torch.linspace(start_w, start_w + (kernel_w - 1) * dilation_w, kernel_w, device=device, dtype=dtype)
    ys = torch.linspace(start_h, start_h + (kernel_h - 1) * dilation_h, kernel_h, device=device, dtype=dtype)
    point_x = (xs / padded_w).repeat_interleave(kernel_h)
    point_y = (ys / padded_h).repeat(kernel_w)
    points = torch.stack((point_x, point_y), dim=-1)
    if geometry.remove_center:
        center = (kernel_h * kernel_w) // 2
        points = torch.cat((points[:center], points[center + 1:]))
    return points.repeat(geometry.group, 1)


def dcnv3_reference(input: Tensor, offset: Tensor, mask: Tensor, geometry: Geometry) -> Tensor:
    """DCNv3 core evaluated in the official order of float operations (see module docstring)."""
    batch = input.shape[0]
    height_out, width_out = offset.shape[1], offset.shape[2]
    g = geometry
    group, group_channels, offset_scale = g.group, g.group_channels, g.offset_scale
    points = num_points(geometry)
    input = F.pad(input, [0, 0, g.pad_w, g.pad_w, g.pad_h, g.pad_h])
    padded_h, padded_w = input.shape[1], input.shape[2]
    device, dtype = input.device, input.dtype

    half_h = (g.dilation_h * (g.kernel_h - 1)) // 2
    half_w = (g.dilation_w * (g.kernel_w - 1)) // 2
    ref_y = torch.linspace(
        half_h + 0.5, half_h + 0.5 + (height_out - 1) * g.stride_h, height_out, device=device, dtype=dtype)
    ref_x = torch.linspace(
        half_w + 0.5, half_w + 0.5 + (width_out - 1) * g.stride_w, width_out, device=device, dtype=dtype)
    reference = torch.stack((
        (ref_x / padded_w).view(1, width_out).expand(height_out, width_out),
        (ref_y / padded_h).view(height_out, 1).expand(height_out, width_out),
    ), dim=-1).view(1, height_out, width_out, 1, 2)
    kernel_grid = _normalized_kernel_grid(geometry, padded_h, padded_w, device, dtype)
    spatial_norm = torch.tensor([padded_w, padded_h], device=device, dtype=dtype).repeat(group * points)

    base = (reference + kernel_grid.view(1, 1, 1, group * points, 2) * offset_scale).flatten(3, 4)
    locations = base + offset * offset_scale / spatial_norm
    grids = 2 * locations - 1

    values = input.reshape(batch, padded_h * padded_w, group * group_channels).transpose(1, 2)
    values = values.reshape(batch * group, group_channels, padded_h, padded_w)
    # reshape, not view: offset and mask may be any strided views (as on the other backends).
    grids = grids.reshape(batch, height_out * width_out, group, points, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(values, grids, mode='bilinear', padding_mode='zeros', align_corners=False)
    mask = mask.reshape(batch, height_out * width_out, group, points).transpose(1, 2)
    mask = mask.reshape(batch * group, 1, height_out * width_out, points)
    output = (sampled * mask).sum(-1).view(batch, group * group_channels, height_out * width_out)
    return output.transpose(1, 2).reshape(batch, height_out, width_out, -1).contiguous()
