"""The package's settings: which DCNv3 (and DCNv4) backend runs, and whether CPU inference runs the model's linear
layers on oneDNN.

``TIMM_INTERNIMAGE_DCNV3_BACKEND`` (``auto``, ``torch``, ``reference``, ``compiled``) and
``TIMM_INTERNIMAGE_FUSED_LINEAR`` (``0`` switches the oneDNN layers off) are read once, when the package is
imported, as the defaults. :func:`set_backend` / :func:`set_fused_linear`, or the context managers
:func:`backend` / :func:`fused_linear`, change them afterwards; a ``backend=`` argument of the op still wins for
its call.

The settings are process-wide, as ``torch.backends`` flags and timm's ``set_fused_attn`` are: a change, a
``with`` block included, applies to every thread until it is undone, so set them before threads share a model
rather than per thread. ``torch.compile`` reads them while it traces: the backend choice is guarded (a change
recompiles), the fused-linear switch is taken as a constant of the compiled graph.
"""
import contextlib
import os
from typing import Iterator, Optional

__all__ = [
    'BACKENDS', 'backend', 'fused_linear', 'fused_linear_enabled', 'get_backend', 'requested_backend', 'set_backend',
    'set_fused_linear',
]

BACKENDS = ('auto', 'torch', 'reference', 'compiled')
BACKEND_ENV = 'TIMM_INTERNIMAGE_DCNV3_BACKEND'
FUSED_LINEAR_ENV = 'TIMM_INTERNIMAGE_FUSED_LINEAR'

# The defaults, from the environment at import. The backend is validated where it is used, so that a bad value
# is an error naming it at the first call rather than a failed import.
_backend = os.environ.get(BACKEND_ENV) or 'auto'
_fused_linear = os.environ.get(FUSED_LINEAR_ENV, '1') != '0'


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


def fused_linear_enabled() -> bool:
    """Whether CPU float32 inference may run the model's linear layers on oneDNN (on unless switched off)."""
    return _fused_linear


def set_fused_linear(enabled: bool) -> None:
    """Allow (or forbid) the oneDNN linear layers of CPU float32 inference from now on, in every thread."""
    global _fused_linear
    _fused_linear = bool(enabled)


@contextlib.contextmanager
def fused_linear(enabled: bool) -> Iterator[None]:
    """``with fused_linear(False):`` runs the block with ATen's linear layers, then restores the setting."""
    previous = _fused_linear
    set_fused_linear(enabled)
    try:
        yield
    finally:
        set_fused_linear(previous)
