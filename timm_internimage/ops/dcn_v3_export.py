"""DCNv3 sampling core for graph export (ONNX, OpenVINO, ``torch.export``): plain tensor operations only.

The same function as :func:`.dcn_v3_torch.dcnv3_torch` (the official CUDA kernel's sampling rule: a sample
counts only if ``-1 < location < size`` on both axes, strictly, so NaN and infinite locations do not; bilinear
corners outside the map read zeros), written with operations every ONNX runtime has: ``Floor``, ``Where``,
``Gather`` with int64 indices, ``Mul`` and ``ReduceSum``. No ``embedding_bag`` (which exports to a loop of
reductions OpenVINO rejects), no ``frac`` (which the TorchScript exporter lacks), no int32 index arithmetic
(which meets int64 shape arithmetic in one ``Concat`` once a size is dynamic), and no Python branch on a size,
so one graph serves every batch and image size.

The input is padded by one zero pixel on every side and the 4 bilinear corners of every pixel are laid side by
side in one row, ``(N * (H + 1) * (W + 1) * G, 4 * C)``: a kernel point then reads one contiguous row (one
gather index instead of four), and its 4 corner weights multiply the 4 blocks of that row.

It is selected by :func:`export_formulation` (which :func:`timm_internimage.tools.export.export_model` enters), or
by ONNX export through ``torch.onnx.export``.
"""
import contextlib
import threading
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import Geometry, dcnv3_output_size, num_points

__all__ = ['dcnv3_export', 'export_formulation', 'export_formulation_active']

_state = threading.local()


@contextlib.contextmanager
def export_formulation() -> Iterator[None]:
    """Within this context, DCNv3 layers run :func:`dcnv3_export` and the model's linear layers run ATen's
    ``linear`` (not the oneDNN custom op), so that traced graphs hold standard operations only."""
    previous = getattr(_state, 'active', False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def export_formulation_active() -> bool:
    """Whether :func:`export_formulation` is entered (in this thread), or an ONNX export is under way."""
    return getattr(_state, 'active', False) or torch.onnx.is_in_onnx_export()


def _kernel_points(geometry: Geometry) -> Tuple[List[int], List[int]]:
    """Kernel point offsets (x, y) from the window centre as Python lists, x varying slowest."""
    g = geometry
    half_h, half_w = (g.dilation_h * (g.kernel_h - 1)) // 2, (g.dilation_w * (g.kernel_w - 1)) // 2
    points = [(i * g.dilation_w - half_w, j * g.dilation_h - half_h)
              for i in range(g.kernel_w) for j in range(g.kernel_h)]
    if g.remove_center:
        del points[(g.kernel_h * g.kernel_w) // 2]
    return [p[0] for p in points], [p[1] for p in points]


def dcnv3_export(input: Tensor, offset: Tensor, mask: Tensor, geometry: Geometry) -> Tensor:
    """DCNv3 core (arguments as :func:`.dcn_v3_torch.dcnv3_torch`): ``(N, H_out, W_out, group * group_channels)``.

    Locations are computed in at least float32, in the padded coordinates and order of operations of
    :func:`.dcn_v3_torch.dcnv3_torch`.
    """
    g = geometry
    group, group_channels, offset_scale = g.group, g.group_channels, g.offset_scale
    batch, height, width = input.shape[0], input.shape[1], input.shape[2]
    # From the input's size, not offset.shape: when offset is DCNv4's unpacked offset_mask, the ONNX exporter
    # folds its shape to the traced sizes, and the graph would take no other image size.
    height_out, width_out = dcnv3_output_size(height, width, geometry)
    points = num_points(geometry)
    loc_dtype = torch.float64 if offset.dtype == torch.float64 else torch.float32
    device = input.device

    # Padded coordinates (+1): a sample counts if 0 < location < size + 1; corners then lie in [0, size + 1].
    point_x, point_y = _kernel_points(geometry)
    point_x = torch.tensor(point_x, device=device, dtype=loc_dtype)
    point_y = torch.tensor(point_y, device=device, dtype=loc_dtype)
    half_h = (g.dilation_h * (g.kernel_h - 1)) // 2
    half_w = (g.dilation_w * (g.kernel_w - 1)) // 2
    center_x = torch.arange(width_out, device=device).to(loc_dtype) * g.stride_w + (half_w - g.pad_w + 1)
    center_y = torch.arange(height_out, device=device).to(loc_dtype) * g.stride_h + (half_h - g.pad_h + 1)
    grid_x = center_x.view(1, 1, width_out, 1, 1) + point_x * offset_scale  # (1, 1, W_out, 1, P)
    grid_y = center_y.view(1, height_out, 1, 1, 1) + point_y * offset_scale  # (1, H_out, 1, 1, P)

    offset = offset.reshape(batch, height_out, width_out, group, points, 2).to(loc_dtype)
    if offset_scale != 1.0:
        offset = offset * offset_scale
    loc_x = grid_x + offset[..., 0]
    loc_y = grid_y + offset[..., 1]
    # The sizes as tensors of the location dtype (ONNX: Shape -> Cast), compared strictly: NaN fails.
    size_x = torch.full((), 1, device=device, dtype=loc_dtype) * (width + 1)
    size_y = torch.full((), 1, device=device, dtype=loc_dtype) * (height + 1)
    counts = (loc_x > 0) & (loc_x < size_x) & (loc_y > 0) & (loc_y < size_y)
    # A sample that does not count reads the zero border (location 0) with weight 0.
    zero = torch.zeros((), device=device, dtype=loc_dtype)
    loc_x = torch.where(counts, loc_x, zero)
    loc_y = torch.where(counts, loc_y, zero)
    floor_x = loc_x.floor()
    floor_y = loc_y.floor()
    frac_x = loc_x - floor_x
    frac_y = loc_y - floor_y
    weight = torch.where(counts, mask.reshape(batch, height_out, width_out, group, points).to(loc_dtype), zero)
    top = (1 - frac_y) * weight
    bottom = frac_y * weight
    left = 1 - frac_x
    # (N, H_out, W_out, G, P, 4): the corner weights, corners in the order of the table's row blocks.
    corner_weights = torch.stack((top * left, top * frac_x, bottom * left, bottom * frac_x), -1)

    # Table rows: one per top-left corner (y, x) of the padded map and group, holding the 4 corners' channels.
    # Top-left corners lie in [0, size] of the map padded to size + 2.
    padded = F.pad(input, (0, 0, 1, 1, 1, 1)).reshape(batch, height + 2, width + 2, group, group_channels)
    table = torch.cat((
        padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]), -1)
    table = table.reshape(batch * (height + 1) * (width + 1) * group, 4 * group_channels)

    row_y = floor_y.to(torch.int64)
    row_x = floor_x.to(torch.int64)
    batch_index = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1)
    group_index = torch.arange(group, device=device).view(1, 1, 1, group, 1)
    rows = ((batch_index * (height + 1) + row_y) * (width + 1) + row_x) * group + group_index
    # The reshapes below merge or split static dimensions only (flatten/unflatten): no view of a dynamic size
    # that torch.export would have to prove divisible. (N, H_out, W_out, G, P, 4 * C) -> (..., 4 * P, C)
    sampled = F.embedding(rows, table).unflatten(-1, (4, group_channels)).flatten(-3, -2)  # ONNX Gather
    # (..., 1, 4 * P) @ (..., 4 * P, C): the weighted sum over points and corners as one batched MatMul.
    output = torch.matmul(corner_weights.to(input.dtype).flatten(-2).unsqueeze(-2), sampled)
    return output.flatten(-3)
