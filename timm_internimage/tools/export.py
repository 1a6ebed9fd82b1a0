"""Export a model to a deployable artifact, run it once in its runtime and compare it with eager PyTorch.

Formats (and what runs them):
    ``onnx``: an ONNX file of standard operators (default domain, opset 20), for ONNX Runtime, OpenVINO,
    TensorRT's ONNX parser... Needs ``onnx`` to write, ``onnxruntime`` for the check
    (``pip install timm-internimage[onnx]``).
    ``openvino``: OpenVINO IR (``.xml`` + ``.bin``), converted from that ONNX graph; needs the ONNX packages to
    write and ``openvino`` (``pip install timm-internimage[openvino]``).
    ``torch-export``: a ``torch.export`` program (``.pt2``), loaded with ``torch.export.load``.
    ``aoti``: an AOTInductor package (``.pt2``) of compiled code, loaded with
    ``torch._inductor.aoti_load_package``; needs a C++ compiler to build.

Every format traces the model with the DCNv3 layers in their export formulation
(:mod:`..ops.dcn_v3_export`: standard operations, int64 indices, no size-dependent branches) and ATen's linear
layers, so the artifacts need neither this package nor the compiled op. With ``dynamic``, batch, height and
width are symbolic (sides of at least 32; multiples of 32 for the H/G classifiers, whose heads fuse stride-16
and stride-32 maps), and the check runs a batch and size other than the traced ones.
"""
import importlib
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..ops.dcn_v3_export import export_formulation

__all__ = [
    'FORMATS', 'ExportError', 'ExportCheckError', 'ExportResult', 'artifact_paths', 'check_format', 'export_model']

_logger = logging.getLogger(__name__)

FORMATS = ('onnx', 'openvino', 'torch-export', 'aoti')
DTYPES = {'float32': torch.float32, 'float16': torch.float16}
ONNX_OPSET = 20
MIN_SIDE = 32
# torch.export takes a dynamic size of 1 for a constant: the last stage's map must be larger than 1x1.
MIN_DYNAMIC_SIDE = 33
# Largest |artifact - eager| accepted: absolute in float32; for float16, relative to the largest output.
FLOAT32_TOLERANCE = 1e-4
FLOAT16_RELATIVE_TOLERANCE = 1e-2
# The check's input differs from the traced one by this much (batch, height, width) with dynamic shapes.
CHECK_SHAPE_STEP = (2, 32, 96)

# What each format needs to be written and checked: (module, pip package).
_RUNTIMES = {
    'onnx': (('onnx', 'onnx'), ('onnxruntime', 'onnxruntime')),
    'openvino': (('onnx', 'onnx'), ('openvino', 'openvino')),
    'torch-export': (),
    'aoti': (),
}


class ExportError(RuntimeError):
    """The model could not be exported or checked (the message names the cause and the fix)."""


class ExportCheckError(ExportError):
    """The artifact ran but its outputs differ from eager PyTorch by more than the tolerance (it was removed)."""

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how it compared with eager PyTorch."""
    path: Path
    format: str
    dynamic: bool
    traced_shape: Tuple[int, int, int, int]
    checked_shape: Tuple[int, int, int, int]
    max_abs_diff: float
    tolerance: float
    export_seconds: float
    files: Tuple[Path, ...]


def artifact_paths(out: Union[str, Path], format: str) -> Tuple[Path, ...]:
    """The files a format writes for ``out``: OpenVINO's ``.bin`` beside the ``.xml``, else ``out`` alone."""
    out = Path(out)
    return (out, out.with_suffix('.bin')) if format == 'openvino' else (out,)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_format(format: str) -> None:
    """ExportError for an unknown format, or one whose writer or runtime is not installed (naming the pip
    command): checked before anything slow happens."""
    if format not in FORMATS:
        raise ExportError(f'unknown format {format!r}; choose one of {", ".join(FORMATS)}')
    missing = [package for module, package in _RUNTIMES[format] if not _importable(module)]
    if missing:
        raise ExportError(
            f'format {format!r} needs {", ".join(missing)}: pip install {" ".join(missing)} '
            f'(or pip install "timm-internimage[{"onnx" if format == "onnx" else "openvino"}]")')


def _needs_multiple_of_32(model: nn.Module) -> bool:
    """The H/G classifiers fuse stride-16 and stride-32 maps: sides must keep ceil(side / 16) even."""
    return getattr(model, 'neck', None) is not None


def _default_img_size(model: nn.Module) -> Tuple[int, int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    input_size = cfg.get('input_size') if isinstance(cfg, dict) else getattr(cfg, 'input_size', None)
    return tuple(input_size[-2:]) if input_size else (224, 224)


def _in_chans(model: nn.Module) -> int:
    return getattr(model, 'in_chans', None) or next(
        (m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)


def _flatten(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for item in outputs for t in _flatten(item)]


def _dynamic_shapes(multiple_of_32: bool):
    """Batch, height and width dynamic. ``Dim.DYNAMIC``: the sizes' guards that hold for every size (divisibility
    facts the symbolic solver cannot prove, such as ``(2 * k + 2) % (k + 1) == 0``) are kept, not errors."""
    from torch.export import Dim
    if multiple_of_32:
        height = 32 * Dim('height_blocks', min=2, max=1024)
        width = 32 * Dim('width_blocks', min=2, max=1024)
    else:
        height = Dim.DYNAMIC(min=MIN_DYNAMIC_SIDE, max=32768)
        width = Dim.DYNAMIC(min=MIN_DYNAMIC_SIDE, max=32768)
    return ({0: Dim.DYNAMIC(min=1, max=4096), 2: height, 3: width},)


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, num_outputs: int) -> None:
    """The TorchScript-based exporter: it traces the sizes' arithmetic into the graph, so with ``dynamic`` one
    graph takes any batch and any side of at least 32, and it exports InternImage-T in seconds. (The
    ``torch.export``-based exporter, ``dynamo=True``, spends minutes in symbolic shape arithmetic on it.)"""
    output_names = ['output'] if num_outputs == 1 else [f'stage{i}' for i in range(num_outputs)]
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic_axes.update({name: {0: 'batch'} if num_outputs == 1 else {0: 'batch', 2: f'{name}_height',
                                                                          3: f'{name}_width'}
                             for name in output_names})
    with export_formulation(), torch.no_grad(), warnings.catch_warnings():
        # The exporter's deprecation notice, and tracer warnings about the input checks' Python booleans.
        warnings.simplefilter('ignore')
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=['image'], output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET)


def _run_onnxruntime(path: Path, x: torch.Tensor) -> List[torch.Tensor]:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return [torch.from_numpy(y) for y in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def _run_openvino(path: Path, x: torch.Tensor) -> List[torch.Tensor]:
    import openvino
    # OpenVINO computes in bfloat16 by default on CPUs that have it (AVX-512 BF16, AMX): ask for float32.
    precision = 'f16' if x.dtype == torch.float16 else 'f32'
    compiled = openvino.Core().compile_model(str(path), 'CPU', {'INFERENCE_PRECISION_HINT': precision})
    result = compiled(x.numpy())
    return [torch.from_numpy(result[output].copy()) for output in compiled.outputs]


def _trace_program(model: nn.Module, example: torch.Tensor, dynamic_shapes):
    with export_formulation(), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)


def export_model(
        model: nn.Module,
        out: Union[str, Path],
        format: str = 'onnx',
        *,
        dynamic: bool = False,
        batch: int = 1,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        dtype: Union[str, torch.dtype] = torch.float32,
        progress: Optional[Callable[[str], None]] = None,
) -> ExportResult:
    """Write ``model`` (eval mode, CPU) as ``format`` to ``out``, run the artifact once and compare with eager.

    Args:
        model: any model taking an ``(N, C, H, W)`` image batch: a classifier, or a ``features_only`` backbone
            (one output per stage). It is put in eval mode on CPU in ``dtype`` (in place) and exported.
        out: the file to write (OpenVINO also writes the ``.bin`` beside the ``.xml``).
        format: one of :data:`FORMATS`.
        dynamic: batch, height and width symbolic; else fixed to ``batch`` and ``img_size``.
        batch, img_size: the traced input shape (default size: the model's pretrained input size, else 224).
        dtype: ``float32`` or ``float16`` (weights and input).
        progress: called with a line before each slow step (default: logged at INFO).

    Returns:
        An :class:`ExportResult` with the max abs difference from eager PyTorch on a check input (another batch
        and size when ``dynamic``).

    Raises:
        ExportError: unknown format or dtype, a missing package (named, with its pip command), a size the model
            cannot take, or a failed export or run. :class:`ExportCheckError` (the files are removed): the
            artifact's outputs differ from eager by more than 1e-4 in float32 (1% of the largest output in
            float16) or are not finite.
    """
    report = progress or _logger.info
    check_format(format)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f'unknown dtype {dtype!r}; choose one of {", ".join(DTYPES)}')
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ExportError(f'dtype {dtype} is not supported; choose one of {", ".join(DTYPES)}')
    if batch < 1:
        raise ExportError(f'batch must be at least 1, got {batch}')
    height, width = (img_size, img_size) if isinstance(img_size, int) else (img_size or _default_img_size(model))
    # torch.export's dynamic sizes of the H/G classifiers are multiples of 32 (the ONNX graph takes any size).
    multiple_of_32 = _needs_multiple_of_32(model) and dynamic and format in ('torch-export', 'aoti')
    if height < MIN_SIDE or width < MIN_SIDE or (multiple_of_32 and (height % 32 or width % 32)):
        need = 'multiples of 32' if multiple_of_32 else f'at least {MIN_SIDE}'
        raise ExportError(f'image size {height}x{width} cannot be taken by this model: sides must be {need}')
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = artifact_paths(out, format)

    model = model.eval().to(device='cpu', dtype=dtype)
    in_chans = _in_chans(model)
    # A traced batch of 1 would be specialised (torch.export treats sizes 0 and 1 as constants).
    traced_batch = max(batch, 2) if dynamic else batch
    traced_shape = (traced_batch, in_chans, height, width)
    if dynamic:
        checked_shape = (batch + CHECK_SHAPE_STEP[0], in_chans, height + CHECK_SHAPE_STEP[1],
                         width + CHECK_SHAPE_STEP[2])
    else:
        checked_shape = traced_shape
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(traced_shape, generator=generator).to(dtype)
    check_input = torch.randn(checked_shape, generator=generator).to(dtype)
    try:
        with torch.no_grad():
            model(example)  # the model's own checks name sizes it cannot take, before the slow export
            expected = [t.detach() for t in _flatten(model(check_input))]
    except ValueError as e:
        raise ExportError(f'the model cannot take input {tuple(traced_shape)}: {e}') from None
    dynamic_shapes = _dynamic_shapes(multiple_of_32) if dynamic else None

    report(f'Exporting to {format} ({"dynamic batch and size" if dynamic else "fixed shape"} '
           f'{tuple(traced_shape)}, {str(dtype).replace("torch.", "")}) ...')
    start = time.perf_counter()
    _remove(files)
    try:
        if format == 'onnx':
            _write_onnx(model, example, out, dynamic, len(expected))
        elif format == 'openvino':
            import openvino
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = Path(tmp) / 'model.onnx'
                _write_onnx(model, example, onnx_path, dynamic, len(expected))
                report('Converting the ONNX graph to OpenVINO IR ...')
                openvino.save_model(openvino.convert_model(str(onnx_path)), str(out), compress_to_fp16=False)
        else:
            program = _trace_program(model, example, dynamic_shapes)
            if format == 'torch-export':
                torch.export.save(program, str(out))
            else:
                report('Compiling with AOTInductor (C++ compiler) ...')
                torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    except ExportError:
        _remove(files)
        raise
    except Exception as e:
        _remove(files)
        raise ExportError(f'{format} export failed: {type(e).__name__}: {e}') from e
    export_seconds = time.perf_counter() - start

    report(f'Checking {out} on input {tuple(checked_shape)} against eager PyTorch ...')
    try:
        got = _run_artifact(format, out, check_input)
    except Exception as e:
        _remove(files)
        raise ExportError(f'the {format} artifact failed to run on input {tuple(checked_shape)}: '
                          f'{type(e).__name__}: {e}') from e
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        _remove(files)
        raise ExportCheckError(
            f'the {format} artifact gave outputs of shapes {[tuple(g.shape) for g in got]}, eager PyTorch '
            f'{[tuple(e.shape) for e in expected]}; {out} was removed', float('inf'))
    diff = max(float((g.double() - e.double()).abs().max()) if g.numel() else 0.0 for g, e in zip(got, expected))
    largest = max(float(e.double().abs().max()) if e.numel() else 0.0 for e in expected)
    tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else FLOAT16_RELATIVE_TOLERANCE * max(1.0, largest)
    if not diff <= tolerance:  # NaN fails too
        _remove(files)
        raise ExportCheckError(
            f'the {format} artifact differs from eager PyTorch by {diff:.3g} (tolerance {tolerance:.3g}) on input '
            f'{tuple(checked_shape)}; {out} was removed', diff)
    return ExportResult(
        path=out, format=format, dynamic=dynamic, traced_shape=traced_shape, checked_shape=checked_shape,
        max_abs_diff=diff, tolerance=tolerance, export_seconds=export_seconds,
        files=tuple(path for path in files if path.exists()))


def _run_artifact(format: str, path: Path, x: torch.Tensor) -> List[torch.Tensor]:
    """The artifact's outputs for ``x``, run in its runtime."""
    if format == 'onnx':
        return _run_onnxruntime(path, x)
    if format == 'openvino':
        return _run_openvino(path, x)
    with torch.no_grad():
        if format == 'torch-export':
            return _flatten(torch.export.load(str(path)).module()(x))
        return _flatten(torch._inductor.aoti_load_package(str(path))(x))
