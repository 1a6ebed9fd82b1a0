"""The geometry of one deformable-convolution call as one value, checked once.

:class:`Geometry` mirrors the C++ ``Geometry`` of the compiled kernels (``dcnv3/csrc/dcnv3_sampling.h``): the
op's kernel, stride, padding, dilation, groups, offset scale and centre removal. Its fields are in the order of
the scalar arguments of the ``torch.ops.timm_internimage.dcnv3_*`` schemas, so ``Geometry(*args)`` reads them and
``*geometry`` writes them back; the value is flattened only there. It is a ``typing.NamedTuple``, so TorchScript
compiles the functions that take it (build it inside ``forward``: a module attribute would be a plain tuple).
"""
from typing import NamedTuple, Tuple, Union

from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = [
    'Geometry', 'IntOrPair', 'check_arguments', 'check_geometry', 'check_tensors', 'dcnv3_output_size', 'make_geometry',
    'num_points',
]

IntOrPair = Union[int, Tuple[int, int]]


class Geometry(NamedTuple):
    """Kernel, stride, padding and dilation per axis, ``group`` groups of ``group_channels`` channels, the scale of
    the kernel grid and offsets, and whether the kernel's centre point is dropped."""
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    group: int
    group_channels: int
    offset_scale: float
    remove_center: bool


def num_points(geometry: Geometry) -> int:
    """Sampling points per group: ``kernel_h * kernel_w``, less the centre if it is removed."""
    return geometry.kernel_h * geometry.kernel_w - int(geometry.remove_center)


def dcnv3_output_size(height: int, width: int, geometry: Geometry) -> Tuple[int, int]:
    """Output spatial size, as for a convolution with the same geometry."""
    g = geometry
    height_out = (height + 2 * g.pad_h - (g.dilation_h * (g.kernel_h - 1) + 1)) // g.stride_h + 1
    width_out = (width + 2 * g.pad_w - (g.dilation_w * (g.kernel_w - 1) + 1)) // g.stride_w + 1
    return height_out, width_out


def _int_pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f'dcnv3: {name} must be an int or a pair of ints, got {value!r}')
    return pair


def make_geometry(
        channels: int, kernel_size: IntOrPair, stride: IntOrPair, padding: IntOrPair, dilation: IntOrPair,
        group: int, offset_scale: float, remove_center: bool,
) -> Geometry:
    """The geometry of the functional API's arguments (ints or ``(h, w)`` pairs) for ``channels`` input channels.
    A ``group`` that does not divide ``channels`` gets ``group_channels`` 0, which :func:`check_geometry` names."""
    group_channels = channels // group if isinstance(group, int) and group > 0 and channels % group == 0 else 0
    return Geometry(
        *_int_pair(kernel_size, 'kernel_size'), *_int_pair(stride, 'stride'), *_int_pair(padding, 'padding'),
        *_int_pair(dilation, 'dilation'), group, group_channels, float(offset_scale), bool(remove_center))


def check_tensors(input: Tensor, offset: Tensor, mask: Tensor) -> None:
    """ValueError unless the three tensors are 4-D, of one floating dtype and on one device."""
    if input.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
        raise ValueError(
            f'dcnv3: input, offset and mask must be 4-D channels-last tensors, got shapes {tuple(input.shape)}, '
            f'{tuple(offset.shape)}, {tuple(mask.shape)}')
    if not (input.dtype == offset.dtype == mask.dtype) or not input.dtype.is_floating_point:
        raise ValueError(
            f'dcnv3: input, offset and mask must have one floating dtype, got {input.dtype}, {offset.dtype} and '
            f'{mask.dtype}; convert them with .to(input.dtype)')
    if not (input.device == offset.device == mask.device):
        raise ValueError(
            f'dcnv3: input, offset and mask must be on one device, got {input.device}, {offset.device} and '
            f'{mask.device}; move them with .to(input.device)')


def check_geometry(geometry: Geometry, input: Tensor) -> Tuple[int, int]:
    """ValueError naming the argument and the fix for a geometry no backend can compute on the 4-D ``input``;
    else the output size."""
    g = geometry
    for name, value, low in (
            ('kernel_size', (g.kernel_h, g.kernel_w), 1), ('stride', (g.stride_h, g.stride_w), 1),
            ('padding', (g.pad_h, g.pad_w), 0), ('dilation', (g.dilation_h, g.dilation_w), 1)):
        if min(value) < low:
            raise ValueError(f'dcnv3: {name} must be at least {low}, got {value}')
    if g.remove_center and (g.kernel_h * g.kernel_w) % 2 == 0:
        raise ValueError('dcnv3: remove_center needs a kernel with an odd number of points')
    if g.remove_center and g.kernel_h * g.kernel_w == 1:
        raise ValueError('dcnv3: remove_center on a 1x1 kernel leaves no sampling point; use a larger kernel')
    _, height, width, channels = input.shape
    if height < 1 or width < 1:
        raise ValueError(f'dcnv3: input height and width must be at least 1, got {height}x{width}')
    if g.group < 1 or channels % g.group != 0:
        raise ValueError(
            f'dcnv3: input channels ({channels}) must be divisible by group ({g.group}), a positive int')
    if g.group_channels < 1 or channels != g.group * g.group_channels:
        raise ValueError(
            f'dcnv3: input channels ({channels}) must equal group ({g.group}) * group_channels '
            f'({g.group_channels}); pass group_channels = {channels // g.group}')
    height_out, width_out = dcnv3_output_size(height, width, g)
    if height_out < 1 or width_out < 1:
        raise ValueError(
            f'dcnv3: input of size {height}x{width} is too small for this kernel, stride, padding and dilation '
            f'(output {height_out}x{width_out}); pad the input or use more padding')
    return height_out, width_out


def check_arguments(input: Tensor, offset: Tensor, mask: Tensor, geometry: Geometry) -> None:
    """ValueError naming the argument and the fix for anything no backend can compute: the one validation of a
    DCNv3 call, before any backend runs."""
    check_tensors(input, offset, mask)
    height_out, width_out = check_geometry(geometry, input)
    points = num_points(geometry)
    expected_offset = (input.shape[0], height_out, width_out, geometry.group * points * 2)
    expected_mask = (input.shape[0], height_out, width_out, geometry.group * points)
    if tuple(offset.shape) != expected_offset or tuple(mask.shape) != expected_mask:
        raise ValueError(
            f'dcnv3: expected offset {expected_offset} and mask {expected_mask} for input {tuple(input.shape)}, '
            f'got {tuple(offset.shape)} and {tuple(mask.shape)}')
