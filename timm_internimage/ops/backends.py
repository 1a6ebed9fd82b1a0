"""Which backend runs DCNv3 and DCNv4: the setting, the compiled wheel, and the choice for each call.

Backends:
    ``torch``: the fast pure-PyTorch implementation (:mod:`.dcn_v3_torch`), any device and dtype.
    ``reference``: pure PyTorch in the official fallback's float arithmetic (:mod:`.dcn_v3_reference`),
    bit-for-bit equal to the official outputs; slower, for verification.
    ``compiled``: the CPU/CUDA kernels of the optional ``timm-internimage-dcnv3`` wheel.
    ``auto`` (default): ``compiled`` when installed and able to run the call, else ``torch``.
Graph export runs a fifth formulation, ``export`` (:mod:`.dcn_v3_export`), whatever is asked for.

``TIMM_INTERNIMAGE_DCNV3_BACKEND`` (``auto``, ``torch``, ``reference``, ``compiled``) is read once, when the
package is imported, as the default. :func:`set_backend`, or the context manager :func:`backend`, change it
afterwards; a ``backend=`` argument of the op still wins for its call.

The settings are process-wide, as ``torch.backends`` flags and timm's ``set_fused_attn`` are: a change, a
``with`` block included, applies to every thread until it is undone, so set them before threads share a model
rather than per thread. ``torch.compile`` reads them while it traces: the backend choice is guarded (a change
recompiles).
"""
import contextlib
import functools
import importlib
import importlib.metadata
import logging
import os
from types import ModuleType
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .dcn_v3_export import export_formulation_active
from .dcn_v3_torch import dcnv3_torch_differentiable, differentiable_grads, softmax_over_points
from .geometry import Geometry

__all__ = [
    'BACKENDS', 'backend', 'choose_backend', 'compiled_backend_available', 'compiled_packed_available', 'get_backend',
    'requested_backend', 'run_compiled', 'run_compiled_packed', 'set_backend',
]

_logger = logging.getLogger(__name__)

BACKENDS = ('auto', 'torch', 'reference', 'compiled')
BACKEND_ENV = 'TIMM_INTERNIMAGE_DCNV3_BACKEND'

# The default, from the environment at import. It is validated where it is used, so that a bad value is an error
# naming it at the first call rather than a failed import.
_backend = os.environ.get(BACKEND_ENV) or 'auto'

_EXTENSION_MODULE = 'timm_internimage_dcnv3'
# The compiled kernels address rows and columns in 32 bits; larger maps go to the torch backend.
_COMPILED_MAX_SIDE = 2 ** 31 - 1
# The compiled kernels' fused mask softmax keeps one value per point on the stack.
COMPILED_MAX_SOFTMAX_POINTS = 64
# The wheel's own entry points (DCNv3's picks the plain or fused-softmax op), set when the wheel is loaded; DCNv4's
# is None for a wheel built before its DCNv4 kernels (DCNv4 then runs on the DCNv3 kernels, unpacked).
_compiled_dcnv3: Optional[Callable[..., Tensor]] = None
_compiled_dcnv4: Optional[Callable[..., Tensor]] = None


def _checked_backend(name: str) -> str:
    checked = name.lower()
    if checked not in BACKENDS:
        raise ValueError(f'dcnv3: unknown backend {name!r}; choose one of {", ".join(BACKENDS)}')
    return checked


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: ``backend`` if given, else the setting (:func:`set_backend`, by default
    ``TIMM_INTERNIMAGE_DCNV3_BACKEND`` as it was at import, else ``'auto'``). The one place the setting is read,
    for the ops and for the model's fused layers alike."""
    return _checked_backend(backend or _backend)


def get_backend() -> str:
    """The backend setting (``'auto'`` unless set)."""
    return requested_backend()


def set_backend(name: str) -> None:
    """Run DCNv3/DCNv4 on ``name`` (``'auto'``, ``'torch'``, ``'reference'`` or ``'compiled'``) from now on, in
    every thread; a ``backend=`` argument still wins for its call."""
    global _backend
    _backend = _checked_backend(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with backend('torch'):`` runs the block on that backend, then restores the previous setting."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


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
    global _compiled_dcnv3, _compiled_dcnv4
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
    _compiled_dcnv3 = extension.dcnv3
    _compiled_dcnv4 = getattr(extension, 'dcnv4', None)
    return extension


def _compiled_create_graph_backward(
        grad_output: Tensor, input: Tensor, offset: Tensor, mask: Tensor, schema_args: Tuple[object, ...],
        mask_is_logits: bool, needs_input_grad: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """The compiled op's gradients when its backward is differentiated too (``create_graph=True``): autograd of
    the pure-PyTorch formulation of the same function (the kernels compute first-order gradients only).
    ``schema_args`` are the op's scalar arguments, the fields of :class:`.Geometry` in order."""
    geometry = Geometry(*schema_args)

    def function(input: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        if mask_is_logits:
            mask = softmax_over_points(mask, geometry.group)
        return dcnv3_torch_differentiable(input, offset, mask, geometry)

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


def choose_backend(requested: str, input: Tensor) -> str:
    """The backend that runs this call of DCNv3 or DCNv4: ``auto`` takes ``compiled`` wherever it can run the
    call; graph export (ONNX, or :func:`.dcn_v3_export.export_formulation`) takes ``export``, whatever is
    requested."""
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


@functools.lru_cache(maxsize=None)
def _log_choice(backend: str, device_type: str, dtype: torch.dtype) -> None:
    _logger.debug('dcnv3: using the %s backend for %s %s', backend, device_type, dtype)


def run_compiled(input: Tensor, offset: Tensor, mask: Tensor, geometry: Geometry, mask_is_logits: bool) -> Tensor:
    """The compiled kernels, through the wheel's own entry point, which picks the plain or fused-softmax op; the
    geometry becomes the schema's scalar arguments here. For calls :func:`choose_backend` gave ``compiled``."""
    assert _compiled_dcnv3 is not None, 'choose_backend loads the wheel before it chooses compiled'
    return _compiled_dcnv3(input, offset, mask, *geometry, mask_is_logits=mask_is_logits)


@torch.compiler.assume_constant_result
def compiled_packed_available() -> bool:
    """Whether the loaded wheel has the DCNv4 kernels on the packed ``offset_mask`` (for calls
    :func:`choose_backend` gave ``compiled``; a constant for torch.compile)."""
    return _compiled_dcnv4 is not None


def run_compiled_packed(input: Tensor, offset_mask: Tensor, geometry: Geometry, softmax: bool) -> Tensor:
    """The compiled DCNv4 kernels on the packed ``offset_mask``, through the wheel's entry point. For calls
    :func:`choose_backend` gave ``compiled`` when :func:`compiled_packed_available`."""
    assert _compiled_dcnv4 is not None, 'the caller checks compiled_packed_available'
    return _compiled_dcnv4(input, offset_mask, *geometry, softmax=softmax)
