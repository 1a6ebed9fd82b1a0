"""Loading of the compiled DCNv3 library and its Python-side registrations.

The C++ library defines the schemas (``timm_internimage::dcnv3_forward`` and
friends, ``timm_internimage::dcnv4_forward/dcnv4_backward`` on DCNv4's packed
``offset_mask``) and the CPU/CUDA kernels on PyTorch's stable ABI. This module adds the
fake (meta) kernels and the autograd formulas, so the ops work under
``torch.compile(fullgraph=True)`` and ``torch.export``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
from typing import Any, Callable, Sequence

import torch

_logger = logging.getLogger(__name__)

_NS = "timm_internimage"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load(module: str) -> str | None:
    spec = importlib.util.find_spec(f"{__package__}.{module}")
    if spec is None or spec.origin is None:
        return None
    torch.ops.load_library(spec.origin)
    return spec.origin


# The libraries target the torch stable ABI of this version (TORCH_TARGET_VERSION).
MIN_TORCH = (2, 10)


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return MIN_TORCH


if _torch_version() < MIN_TORCH:
    raise ImportError(
        f"timm_internimage_dcnv3 needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its stable ABI); "
        f"found torch {torch.__version__}. Upgrade torch or use the pure-PyTorch op."
    )

try:
    _CPU_LIBRARY = _load("_C")
except OSError as exc:
    raise ImportError(
        f"timm_internimage_dcnv3: the compiled library failed to load with torch {torch.__version__}: {exc}"
    ) from exc
if _CPU_LIBRARY is None:
    raise ImportError(
        "timm_internimage_dcnv3: the compiled library _C is missing; reinstall the wheel or rebuild it "
        "(see dcnv3/README.md)"
    )

# What the dynamic loader says when a dependency is missing: glibc / musl, macOS, Windows.
_MISSING_LIBRARY_PATTERNS = (
    re.compile(r"([^\s:'\"]+\.so(?:\.[0-9]+)*): cannot open shared object file"),
    re.compile(r"Error loading shared library ([^\s:'\"]+)"),
    re.compile(r"Library not loaded: ([^\s'\"]+)"),
    re.compile(r"Could not find module '([^']+)'"),
)


def _missing_library(message: str) -> str | None:
    """The library a failed load names as missing (e.g. ``libcudart.so.13``), or None."""
    for pattern in _MISSING_LIBRARY_PATTERNS:
        found = pattern.search(message)
        if found:
            name = found.group(1).replace("\\", "/").rsplit("/", 1)[-1]
            # Windows names the library being loaded, not its missing dependency.
            return None if name.startswith("_C_cuda") else name
    return None


def _cuda_load_failure(exc: OSError) -> str:
    """One sentence on why the CUDA library did not load, and what to install instead."""
    try:
        from ._build_info import CUDA_VERSION as built_cuda
    except ImportError:
        built_cuda = None
    # torch.ops.load_library re-raises the loader's error as "Could not load this library: <path>".
    messages = []
    error: BaseException | None = exc
    while error is not None and len(messages) < 4:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    detail = messages[-1]
    missing = _missing_library(" | ".join(messages))
    reason = f"missing library {missing}" if missing else detail
    if missing is None and sys.platform == "win32" and built_cuda:
        # Windows names no dependency; the one torch must have loaded is the CUDA runtime.
        reason = f"missing library cudart64_{built_cuda.split('.')[0]}.dll or another dependency ({detail})"
    torch_cuda = torch.version.cuda
    text = (
        f"timm_internimage_dcnv3: the CUDA kernels (built for CUDA {built_cuda or 'unknown'}) could not be "
        f"loaded with torch {torch.__version__} (CUDA {torch_cuda}): {reason}. The CPU kernels work; CUDA "
        "tensors use the pure-PyTorch op."
    )
    if built_cuda and torch_cuda and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        text += (
            f" This wheel is for CUDA {built_cuda.split('.')[0]}.x and torch for CUDA {torch_cuda.split('.')[0]}.x: "
            "install the matching variant (see 'Install' in the timm-internimage README)."
        )
    return text


_CUDA_LIBRARY: str | None = None
_CUDA_LOAD_ERROR: str | None = None
if importlib.util.find_spec(f"{__package__}._C_cuda") is not None:
    try:
        _CUDA_LIBRARY = _load("_C_cuda")
    except OSError as exc:  # CPU-only torch, other CUDA major, missing CUDA runtime
        _CUDA_LOAD_ERROR = _cuda_load_failure(exc)
        # Runs once per process (at import). Expected with a CPU-only torch, so only a debug line
        # there; with a CUDA torch the user has lost the CUDA kernels, so a warning.
        _logger.log(logging.WARNING if torch.version.cuda else logging.DEBUG, "%s", _CUDA_LOAD_ERROR)


def built_with_cuda() -> bool:
    """Whether this build ships CUDA kernels (regardless of a GPU being present)."""
    return importlib.util.find_spec(f"{__package__}._C_cuda") is not None


def cuda_loaded() -> bool:
    """Whether the CUDA kernels are loaded in this process."""
    return _CUDA_LIBRARY is not None


def cuda_load_error() -> str | None:
    """Why a CUDA build's kernels could not be loaded (e.g. CPU-only torch), or None."""
    return _CUDA_LOAD_ERROR


def _out_size(size: Any, pad: int, dil: int, k: int, stride: int) -> Any:
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


def _fake_forward(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
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
) -> torch.Tensor:
    torch._check(input.dim() == 4, lambda: "dcnv3: input must be 4-D (N, H, W, C)")
    torch._check(input.shape[3] == group * group_channels, lambda: "dcnv3: channels != group*group_channels")
    n, h, w, _ = input.shape
    ho = _out_size(h, pad_h, dilation_h, kernel_h, stride_h)
    wo = _out_size(w, pad_w, dilation_w, kernel_w, stride_w)
    return input.new_empty((n, ho, wo, group * group_channels))


# The schemas' geometry scalars, kernel_h ... remove_center (timm_internimage.ops.Geometry's fields); DCNv4's
# schemas add its softmax flag after them.
_GEOMETRY_ARGS = 12


def _fake_packed_forward(input: torch.Tensor, offset_mask: torch.Tensor, *args: Any) -> torch.Tensor:
    return _fake_forward(input, offset_mask, offset_mask, *args[:_GEOMETRY_ARGS])


def _fake_backward(grad_output: torch.Tensor, *inputs: Any) -> tuple[torch.Tensor, ...]:
    """The gradients of the op's tensor inputs (3 for DCNv3, 2 for DCNv4), shaped like them."""
    return tuple(torch.empty_like(t) for t in inputs if isinstance(t, torch.Tensor))


def _make_setup_context(num_tensors: int) -> Callable[[Any, Sequence[Any], torch.Tensor], None]:
    def _setup_context(ctx: Any, inputs: Sequence[Any], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs[:num_tensors])
        ctx.args = tuple(inputs[num_tensors:])

    return _setup_context


# How to differentiate the backward itself (create_graph=True); the kernels compute first-order gradients only.
_create_graph_backward: Callable[..., tuple[Any, ...]] | None = None


def set_create_graph_backward(function: Callable[..., tuple[Any, ...]] | None) -> None:
    """Register the gradients used when the backward is to be differentiated (``create_graph=True``: gradient
    penalties, Hessian-vector products).

    ``function(grad_output, input, offset, mask, args, mask_is_logits, needs_input_grad)`` returns the
    gradients of ``input``, ``offset`` and ``mask`` (None where not needed) as differentiable tensors; ``args``
    are the op's 12 scalar arguments in the schema's order (``kernel_h`` ... ``remove_center``, the fields of
    ``timm_internimage.ops.Geometry``). timm_internimage registers its pure-PyTorch formulation here; without
    one, such a backward is an error rather than silently wrong second-order gradients.
    """
    global _create_graph_backward
    _create_graph_backward = function


def _separate_create_graph_backward(
    grad_output: torch.Tensor, tensors: Sequence[torch.Tensor], args: tuple, mask_is_logits: bool,
    needs_input_grad: Sequence[bool],
) -> tuple[Any, ...]:
    input, offset, mask = tensors
    return _create_graph_backward(grad_output, input, offset, mask, args, mask_is_logits, needs_input_grad)


def _packed_create_graph_backward(
    grad_output: torch.Tensor, tensors: Sequence[torch.Tensor], args: tuple, softmax: bool,
    needs_input_grad: Sequence[bool],
) -> tuple[Any, ...]:
    """DCNv4's differentiable gradients through the registered DCNv3 function: offsets and weights are views of
    offset_mask, and their gradients are packed back (the padding channels zero)."""
    input, offset_mask = tensors
    kernel_h, kernel_w, _, _, _, _, _, _, group, _, _, remove_center = args  # the schema's scalars, by name
    points = kernel_h * kernel_w - int(remove_center)
    packed = offset_mask[..., : 3 * group * points].unflatten(-1, (group, 3 * points))
    offset, mask = packed[..., : 2 * points].flatten(-2), packed[..., 2 * points :].flatten(-2)
    needs_input, needs_offset_mask = needs_input_grad
    grad_input, grad_offset, grad_mask = _create_graph_backward(
        grad_output, input, offset, mask, args, softmax, (needs_input, needs_offset_mask, needs_offset_mask)
    )
    grad_offset_mask = None
    if needs_offset_mask:
        grad_packed = torch.cat([grad_offset.unflatten(-1, (group, -1)), grad_mask.unflatten(-1, (group, -1))], -1)
        padding = offset_mask.shape[-1] - 3 * group * points
        grad_offset_mask = torch.nn.functional.pad(grad_packed.flatten(-2), (0, padding))
    return grad_input, grad_offset_mask


def _make_backward(backward_op: Any, num_tensors: int, mask_is_logits: bool | None) -> Any:
    """The autograd formula of a forward op with ``num_tensors`` tensor inputs; ``mask_is_logits`` None: the op's
    last argument (DCNv4's ``softmax``) says it."""
    create_graph = _separate_create_graph_backward if num_tensors == 3 else _packed_create_graph_backward

    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        tensors = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            if _create_graph_backward is None:
                raise RuntimeError(
                    "DCNv3: the compiled kernels compute first-order gradients only. For second-order gradients "
                    "(create_graph=True) use the op through timm_internimage (`import timm_internimage`), which "
                    "differentiates them in pure PyTorch."
                )
            logits = ctx.args[_GEOMETRY_ARGS] if mask_is_logits is None else mask_is_logits
            grads = create_graph(
                grad_output, tensors, ctx.args[:_GEOMETRY_ARGS], logits, ctx.needs_input_grad[:num_tensors]
            )
        else:
            grads = backward_op(grad_output.contiguous(), *tensors, *ctx.args)
        return tuple(grads) + (None,) * len(ctx.args)

    return _backward


# forward, backward, fake forward, tensor inputs, mask_is_logits (None: the op's softmax argument)
for _fwd, _bwd, _fake, _num_tensors, _mask_is_logits in (
    ("dcnv3_forward", "dcnv3_backward", _fake_forward, 3, False),
    ("dcnv3_softmax_forward", "dcnv3_softmax_backward", _fake_forward, 3, True),
    ("dcnv4_forward", "dcnv4_backward", _fake_packed_forward, 2, None),
):
    torch.library.register_fake(f"{_NS}::{_fwd}")(_fake)
    torch.library.register_fake(f"{_NS}::{_bwd}")(_fake_backward)
    torch.library.register_autograd(
        f"{_NS}::{_fwd}",
        _make_backward(getattr(torch.ops.timm_internimage, _bwd).default, _num_tensors, _mask_is_logits),
        setup_context=_make_setup_context(_num_tensors),
    )


def _built_cuda_archs() -> list[tuple[int, int, bool]] | None:
    """(major, minor, ptx) of each architecture in the build, or None if unknown."""
    try:
        from ._build_info import CUDA_ARCH_LIST
    except ImportError:
        return None
    if not CUDA_ARCH_LIST:
        return None
    archs = []
    for item in CUDA_ARCH_LIST.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        major, _, minor = item.removesuffix("+PTX").partition(".")
        try:
            archs.append((int(major), int(minor.rstrip("afAF") or 0), ptx))
        except ValueError:
            return None
    return archs


@functools.lru_cache(maxsize=None)
def _cuda_device_supported(index: int) -> bool:
    """Whether the build has a kernel image (SASS of the same major, or PTX) for GPU ``index``."""
    archs = _built_cuda_archs()
    if archs is None:
        return True  # unknown build: let the kernel's own check raise if needed
    major, minor = torch.cuda.get_device_capability(index)
    for a_major, a_minor, ptx in archs:
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return True
    return False


def supports(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the compiled op can run on ``device`` with ``dtype``.

    CPU: always for float32/float64/float16/bfloat16. CUDA: when the CUDA kernels
    are built and loaded, a GPU is available, and the build has code for its
    architecture.
    """
    device = torch.device(device)
    if dtype not in _FLOAT_DTYPES:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if _CUDA_LIBRARY is None or not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_device_supported(index)
    return False


def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
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
    remove_center: bool | int,
    mask_is_logits: bool = False,
) -> torch.Tensor:
    """DCNv3 sampling (autograd-enabled), NHWC in and out: the one place that picks the plain or the
    fused-softmax op (timm_internimage's compiled backend calls this too).

    ``input`` is (N, H, W, group*group_channels), ``offset`` (N, Ho, Wo,
    group*P*2) as (x, y) pairs with x slowest over the kernel, ``mask`` (N, Ho,
    Wo, group*P) with P = kernel_h*kernel_w - remove_center. ``mask`` is taken
    as already normalised, or, with ``mask_is_logits=True``, as logits whose
    softmax over the P points of each group is computed inside the kernel.
    """
    op = torch.ops.timm_internimage.dcnv3_softmax_forward if mask_is_logits else torch.ops.timm_internimage.dcnv3_forward
    return op(
        input,
        offset,
        mask,
        int(kernel_h),
        int(kernel_w),
        int(stride_h),
        int(stride_w),
        int(pad_h),
        int(pad_w),
        int(dilation_h),
        int(dilation_w),
        int(group),
        int(group_channels),
        float(offset_scale),
        bool(remove_center),
    )


def dcnv4(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
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
    remove_center: bool | int,
    softmax: bool = False,
) -> torch.Tensor:
    """DCNv4 sampling (autograd-enabled), NHWC in and out.

    ``offset_mask`` is (N, Ho, Wo, M), DCNv4's packed layout: per group 2P
    offsets ((x, y) pairs, x slowest over the kernel) then P point weights,
    M = 3*group*P or padded up to a multiple of 8 (the padding is not read;
    its gradient is 0). The weights are used as given, or, with
    ``softmax=True``, normalised over the P points of each group in the kernel.
    """
    return torch.ops.timm_internimage.dcnv4_forward(
        input,
        offset_mask,
        int(kernel_h),
        int(kernel_w),
        int(stride_h),
        int(stride_w),
        int(pad_h),
        int(pad_w),
        int(dilation_h),
        int(dilation_w),
        int(group),
        int(group_channels),
        float(offset_scale),
        bool(remove_center),
        bool(softmax),
    )
