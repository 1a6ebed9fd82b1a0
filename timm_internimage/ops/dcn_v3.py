"""DCNv3: functional op with backend dispatch, and the DCNv3 module.

Backends:
    ``torch``: the fast pure-PyTorch implementation (:mod:`.dcnv3_torch`), any device and dtype.
    ``reference``: pure PyTorch in the official fallback's float arithmetic (:mod:`.dcnv3_reference`),
    bit-for-bit equal to the official outputs; slower, for verification.
    ``compiled``: the CPU/CUDA kernels of the optional ``timm-internimage-dcnv3`` wheel.
    ``auto`` (default): ``compiled`` when installed and able to run the call, else ``torch``.

``torch`` and ``compiled`` follow the official CUDA kernel's semantics exactly (integer positions, borders,
non-finite offsets); ``reference`` follows the official ``grid_sample`` fallback. The backend is chosen per
call in one place (:func:`.settings.requested_backend`): a ``backend=`` argument, else the setting
(:func:`.settings.set_backend`; by default ``TIMM_INTERNIMAGE_DCNV3_BACKEND`` at import, else ``auto``). Arguments
are validated once, before any backend runs.
"""
import functools
import importlib
import importlib.metadata
import logging
from types import ModuleType
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch import Tensor

from timm.layers import register_notrace_function

from .dcnv3_export import dcnv3_export, export_formulation_active
from .settings import BACKENDS, fused_linear_enabled, requested_backend
from .dcnv3_reference import dcnv3_reference
from .dcnv3_torch import dcnv3_output_size, dcnv3_torch, dcnv3_torch_differentiable, differentiable_grads

__all__ = ['dcnv3', 'DCNv3', 'compiled_backend_available', 'linear', 'requested_backend', 'use_fused_linear', 'BACKENDS']

_logger = logging.getLogger(__name__)

_EXTENSION_MODULE = 'timm_internimage_dcnv3'
# The compiled kernels address rows and columns in 32 bits; larger maps go to the torch backend.
_COMPILED_MAX_SIDE = 2 ** 31 - 1
# The compiled kernels' fused mask softmax keeps one value per point on the stack.
_COMPILED_MAX_SOFTMAX_POINTS = 64

IntOrPair = Union[int, Tuple[int, int]]


def _int_pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f'dcnv3: {name} must be an int or a pair of ints, got {value!r}')
    return pair


def _package_version() -> Optional[str]:
    """The installed version of timm-internimage (its metadata, not the package root, which the op does not import),
    or None when it runs from a source tree that is not installed."""
    try:
        return importlib.metadata.version('timm-internimage')
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _extension() -> Optional[ModuleType]:
    """The compiled op wheel, imported on first use (once), or None if it is not installed.

    A broken or mismatched wheel is an ImportError naming the fix: the pure-PyTorch backends never call this.
    """
    try:
        extension = importlib.import_module(_EXTENSION_MODULE)
    except ImportError as error:
        if getattr(error, 'name', None) == _EXTENSION_MODULE:
            return None
        raise ImportError(
            f'{_EXTENSION_MODULE} is installed but failed to load ({error}). It was probably built for an '
            f'incompatible torch; rebuild it against this torch (`bash dcnv3/build_wheel.sh --cpu --install` in a '
            f'clone; from the first release, `pip install --force-reinstall timm-internimage[compiled]`), '
            f"or call timm_internimage.set_backend('torch') to use the pure-PyTorch op.") from error
    version = _package_version()
    if version is not None and getattr(extension, '__version__', None) != version:
        raise ImportError(
            f'{_EXTENSION_MODULE} {getattr(extension, "__version__", "?")} does not match timm-internimage '
            f'{version}; install matching versions (the op built from the same clone, or '
            f'`pip install timm-internimage[compiled]=={version}` from the first release), '
            f"or call timm_internimage.set_backend('torch') to use the pure-PyTorch op.")
    extension.set_create_graph_backward(_compiled_create_graph_backward)
    return extension


def _compiled_create_graph_backward(
        grad_output: Tensor, input: Tensor, offset: Tensor, mask: Tensor, args: Tuple[Any, ...], mask_is_logits: bool,
        needs_input_grad: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """The compiled op's gradients when its backward is differentiated too (``create_graph=True``): autograd of
    the pure-PyTorch formulation of the same function (the kernels compute first-order gradients only)."""
    group = args[8]

    def function(input: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        if mask_is_logits:
            mask = _softmax_over_points(mask, group)
        return dcnv3_torch_differentiable(input, offset, mask, *args)

    return differentiable_grads(function, (input, offset, mask), needs_input_grad, grad_output)


@torch.compiler.assume_constant_result
def _compiled_supports(device_type: str, device_index: int, dtype: torch.dtype) -> bool:
    """Whether the compiled op is installed and runs this device and dtype (a constant for torch.compile,
    which evaluates it once while tracing: it imports the wheel on first use)."""
    extension = _extension()
    if extension is None:
        return False
    device = torch.device(device_type) if device_index < 0 else torch.device(device_type, device_index)
    return bool(extension.supports(device, dtype))


def compiled_backend_available(device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled op is installed and can run ``device``/``dtype`` (CPU if ``device`` is None)."""
    device = torch.device(device or 'cpu')
    return _compiled_supports(device.type, -1 if device.index is None else device.index, dtype)


def _choose_backend(requested: str, input: Tensor) -> str:
    """The backend that runs this call: ``auto`` takes ``compiled`` wherever it can run the call; graph export
    (ONNX, or :func:`.dcnv3_export.export_formulation`) takes ``export``, whatever is requested."""
    if export_formulation_active():
        return 'export'
    if requested in ('torch', 'reference'):
        return requested
    device = input.device
    # A TorchScript trace gets the pure-PyTorch op under ``auto``, so that it runs without the wheel (forcing
    # ``compiled`` records its op).
    usable = not (requested == 'auto' and torch.jit.is_tracing()) and compiled_backend_available(device, input.dtype)
    fits = input.shape[1] <= _COMPILED_MAX_SIDE and input.shape[2] <= _COMPILED_MAX_SIDE
    if requested == 'compiled' and not (usable and fits):
        if not usable and _extension() is None:
            reason = ('is not installed (build it in a clone: `bash dcnv3/build_wheel.sh --cpu --install`; from the '
                      'first release, `pip install timm-internimage[compiled]`)')
        elif not usable:
            reason = f'does not support {input.dtype} on {device.type}'
        else:
            reason = f'addresses at most {_COMPILED_MAX_SIDE} rows and columns (use the torch backend)'
        raise RuntimeError(f'dcnv3: backend "compiled" was forced but the compiled op {reason}.')
    chosen = 'compiled' if usable and fits else 'torch'
    if not torch.compiler.is_compiling():
        _log_choice(chosen, device.type, input.dtype)
    return chosen


@torch.jit.unused
def use_fused_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` runs on oneDNN for input ``x`` and ``weight``: float32 CPU inference.

    That is: CPU float32 tensors that autograd does not track, outside fx and TorchScript tracing (a trace holds
    ATen's linear whatever the grad mode), autocast and ONNX export, with oneDNN available and enabled
    (``torch.backends.mkldnn``), unless switched off (:func:`.settings.set_fused_linear`) or the requested backend
    is ``reference``, which keeps the official float operation order in the whole model.
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


@functools.lru_cache(maxsize=None)
def _log_choice(backend: str, device_type: str, dtype: torch.dtype) -> None:
    _logger.debug('dcnv3: using the %s backend for %s %s', backend, device_type, dtype)


def _softmax_over_points(mask_logits: Tensor, group: int, exact: bool = True) -> Tensor:
    """Per-group softmax over the kernel points of ``(N, H, W, group * P)`` logits.

    ``exact=False`` writes the softmax out (max, exp, sum, divide): same value up to float rounding and
    several times faster on CPU than ATen's softmax over a last dimension of P = 9. The reference backend
    keeps ATen's, the official model's rounding.
    """
    batch, height, width, channels = mask_logits.shape
    logits = mask_logits.reshape(batch, height, width, group, channels // group)
    if exact:
        return logits.softmax(-1).reshape(mask_logits.shape)
    exp = (logits - logits.amax(-1, keepdim=True)).exp()
    return (exp / exp.sum(-1, keepdim=True)).reshape(mask_logits.shape)


def _check_arguments(
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
        remove_center: bool,
) -> None:
    """Raises a ValueError naming the argument and the fix for anything no backend can compute."""
    shapes = f'{tuple(input.shape)}, {tuple(offset.shape)}, {tuple(mask.shape)}'
    if input.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
        raise ValueError(f'dcnv3: input, offset and mask must be 4-D channels-last tensors, got shapes {shapes}')
    if not (input.dtype == offset.dtype == mask.dtype) or not input.dtype.is_floating_point:
        raise ValueError(
            f'dcnv3: input, offset and mask must have one floating dtype, got {input.dtype}, {offset.dtype} and '
            f'{mask.dtype}; convert them with .to(input.dtype)')
    if not (input.device == offset.device == mask.device):
        raise ValueError(
            f'dcnv3: input, offset and mask must be on one device, got {input.device}, {offset.device} and '
            f'{mask.device}; move them with .to(input.device)')
    for name, value, low in (
            ('kernel_size', (kernel_h, kernel_w), 1), ('stride', (stride_h, stride_w), 1),
            ('padding', (pad_h, pad_w), 0), ('dilation', (dilation_h, dilation_w), 1)):
        if min(value) < low:
            raise ValueError(f'dcnv3: {name} must be at least {low}, got {value}')
    if remove_center and (kernel_h * kernel_w) % 2 == 0:
        raise ValueError('dcnv3: remove_center needs a kernel with an odd number of points')
    if remove_center and kernel_h * kernel_w == 1:
        raise ValueError('dcnv3: remove_center on a 1x1 kernel leaves no sampling point; use a larger kernel')
    batch, height, width, channels = input.shape
    if height < 1 or width < 1:
        raise ValueError(f'dcnv3: input height and width must be at least 1, got {height}x{width}')
    if group < 1 or channels % group != 0:
        raise ValueError(f'dcnv3: input channels ({channels}) must be divisible by group ({group}), a positive int')
    if group_channels < 1 or channels != group * group_channels:
        raise ValueError(
            f'dcnv3: input channels ({channels}) must equal group ({group}) * group_channels ({group_channels}); '
            f'pass group_channels = {channels // group}')
    height_out, width_out = dcnv3_output_size(
        height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    if height_out < 1 or width_out < 1:
        raise ValueError(
            f'dcnv3: input of size {height}x{width} is too small for this kernel, stride, padding and dilation '
            f'(output {height_out}x{width_out}); pad the input or use more padding')
    num_points = kernel_h * kernel_w - int(remove_center)
    expected_offset = (batch, height_out, width_out, group * num_points * 2)
    expected_mask = (batch, height_out, width_out, group * num_points)
    if tuple(offset.shape) != expected_offset or tuple(mask.shape) != expected_mask:
        raise ValueError(
            f'dcnv3: expected offset {expected_offset} and mask {expected_mask} for input {tuple(input.shape)}, '
            f'got {tuple(offset.shape)} and {tuple(mask.shape)}')


@register_notrace_function
def dcnv3_core(
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
        mask_is_logits: bool = False,
        backend: Optional[str] = None,
) -> Tensor:
    """DCNv3 with explicit per-axis arguments (the official op's signature), validated, then dispatched to a
    backend.

    With ``mask_is_logits`` the mask holds logits and their per-group softmax over the kernel points is
    part of the op (inside the kernel for the compiled backend, up to 64 points).
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this branch: the pure-PyTorch op
        if mask_is_logits:
            mask = _softmax_over_points(mask, group, exact=False)
        return dcnv3_torch(
            input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
            dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)
    requested = requested_backend(backend)
    _check_arguments(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        group, group_channels, remove_center)
    chosen = _choose_backend(requested, input)
    num_points = kernel_h * kernel_w - int(remove_center)
    if mask_is_logits and (chosen != 'compiled' or num_points > _COMPILED_MAX_SOFTMAX_POINTS):
        mask = _softmax_over_points(mask, group, exact=chosen in ('reference', 'export'))
        mask_is_logits = False
    args = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
            float(offset_scale), bool(remove_center))
    if chosen == 'compiled':
        op = torch.ops.timm_internimage.dcnv3_softmax_forward if mask_is_logits else torch.ops.timm_internimage.dcnv3_forward
        return op(input, offset, mask, *args)
    if input.shape[0] == 0:
        # An empty batch: an empty output that still belongs to the autograd graph of all three inputs.
        empty = input.new_zeros(0, offset.shape[1], offset.shape[2], input.shape[3])
        return empty + (input.sum() + offset.sum() + mask.sum()) * 0
    implementation = {'reference': dcnv3_reference, 'export': dcnv3_export}.get(chosen, dcnv3_torch)
    return implementation(input, offset, mask, *args)


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
    kernel_h, kernel_w = _int_pair(kernel_size, 'kernel_size')
    stride_h, stride_w = _int_pair(stride, 'stride')
    pad_h, pad_w = _int_pair(padding, 'padding')
    dilation_h, dilation_w = _int_pair(dilation, 'dilation')
    channels = input.shape[-1] if input.dim() > 0 else 0
    group_channels = channels // group if isinstance(group, int) and group > 0 and channels % group == 0 else 0
    return dcnv3_core(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, float(offset_scale), bool(remove_center), backend=backend)


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
        out = dcnv3_core(
            projected, offset, mask,
            self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad, self.pad,
            self.dilation, self.dilation, self.group, self.group_channels, self.offset_scale, self.remove_center,
            mask_is_logits=True)
        if self.center_feature_scale_proj is not None:
            out = blend_center_feature(out, projected, self.center_feature_scale_proj(context), self.group)
        return linear(out, self.output_proj.weight, self.output_proj.bias)
