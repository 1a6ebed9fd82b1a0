"""Graph export (issue 22): the DCNv3 export formulation against the op goldens, and export_model / the
``export`` command writing ONNX, OpenVINO and torch.export artifacts that run at other batches and sizes and
match eager PyTorch."""
import importlib.util
import json
import sys

import pytest
import torch

from timm_internimage.cli import main
from timm_internimage.tools.export import ExportCheckError, ExportError, export_model
from timm_internimage.ops import Geometry
from timm_internimage.ops.dcn_v3_export import dcnv3_export, export_formulation, export_formulation_active
from conftest import forward_backward, tiny_model
from golden import (
    DCNV4_MODEL_CASES, MODEL_OUTPUTS, cuda_semantics_args, cuda_semantics_cases, flash_golden_model, golden_model,
    load_cuda_semantics_case, load_op_case, op_args, op_cases)
from hub_server import safetensors_bytes, tiny_case

NEEDS_OPENVINO = pytest.mark.skipif(importlib.util.find_spec('openvino') is None, reason='openvino is not installed')
GRADIENTS = ('grad_input', 'grad_offset', 'grad_mask')
# The reference README's float32 agreement with the official model, as in test_internimage.py.
GOLDEN_ATOL = 1e-4


@pytest.mark.parametrize('case', op_cases(), ids=lambda c: c['file'].split('.')[0])
def test_export_formulation_matches_op_goldens_float64(case):
    tensors = load_op_case(case)
    got = forward_backward(dcnv3_export, [tensors[k] for k in ('input', 'offset', 'mask')], tensors['grad_output'],
                           Geometry(*op_args(case)))
    for value, name in zip(got, ('output',) + GRADIENTS):
        torch.testing.assert_close(value, tensors[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize('case', cuda_semantics_cases(), ids=lambda c: c['name'])
def test_export_formulation_follows_official_cuda_semantics_float64(case):
    """Integer positions, positions at -1 and at the size (not counted), NaN/inf offsets (no output)."""
    data = load_cuda_semantics_case(case)
    got = forward_backward(dcnv3_export, [data[k] for k in ('input', 'offset', 'mask')], data['grad_output'],
                           Geometry(*cuda_semantics_args(case, data['input'].shape[-1])))
    for value, name in zip(got, ('output',) + GRADIENTS):
        torch.testing.assert_close(value, data[name], rtol=0, atol=1e-12, msg=name)


def test_export_formulation_is_a_scoped_switch():
    assert not export_formulation_active()
    with export_formulation():
        assert export_formulation_active()
    assert not export_formulation_active()


def _onnx_session(path):
    import onnxruntime
    return onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])


@pytest.mark.parametrize('name', ['tiny_t', 'tiny_h'])
def test_dynamic_onnx_runs_golden_inputs_of_other_shapes_in_onnxruntime(name, tmp_path):
    """Traced at batch 3, 96x128; run at the golden inputs' shapes (batch 2 at 64x64, batch 1 at 56x72 or 64x96):
    the logits match the official model's and eager PyTorch's within 1e-4."""
    import onnx
    model, case, tensors = golden_model(name, calm=True)
    path = tmp_path / f'{name}.onnx'
    result = export_model(model, path, 'onnx', dynamic=True, batch=3, img_size=(96, 128))
    assert result.traced_shape == (3, 3, 96, 128) and result.max_abs_diff <= 1e-4
    graph = onnx.load(str(path))
    assert {node.domain for node in graph.graph.node} == {''}  # standard operators only
    assert all(opset.version >= 17 for opset in graph.opset_import if opset.domain in ('', 'ai.onnx'))
    session = _onnx_session(path)
    for index in range(len(case['inputs'])):
        x = tensors[f'input.{index}']
        (logits,) = session.run(None, {'image': x.numpy()})
        with torch.no_grad():
            eager = model(x)
        torch.testing.assert_close(torch.from_numpy(logits), tensors[f'logits.{index}'], rtol=0, atol=GOLDEN_ATOL)
        torch.testing.assert_close(torch.from_numpy(logits), eager, rtol=0, atol=1e-4)


@pytest.mark.parametrize('name', DCNV4_MODEL_CASES)
def test_flash_internimage_dynamic_onnx_matches_the_official_model_in_onnxruntime(name, tmp_path):
    """FlashInternImage (DCNv4) through the same standard-operator graph: traced at batch 3, 96x128, run in ONNX
    Runtime at the golden input's shape, the logits match the official model's within 1e-4."""
    import onnx
    model, _, tensors = flash_golden_model(name)
    path = tmp_path / f'{name}.onnx'
    result = export_model(model, path, 'onnx', dynamic=True, batch=3, img_size=(96, 128))
    assert result.max_abs_diff <= 1e-4
    assert {node.domain for node in onnx.load(str(path)).graph.node} == {''}  # standard operators only
    (logits,) = _onnx_session(path).run(None, {'image': tensors['input'].numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), tensors['logits'], rtol=0, atol=GOLDEN_ATOL)


def test_features_only_onnx_has_one_output_per_stage(tmp_path):
    """A features_only backbone: four NCHW outputs matching the official stage outputs at another shape."""
    model, case, tensors = golden_model('tiny_t', calm=True)
    import timm
    backbone = timm.create_model('internimage_t', features_only=True, **case['config'])
    missing, _ = backbone.model.load_state_dict(model.state_dict(), strict=False)  # the head is pruned
    assert not missing
    path = tmp_path / 'features.onnx'
    export_model(backbone, path, 'onnx', dynamic=True, batch=2, img_size=(96, 96))
    session = _onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ['stage0', 'stage1', 'stage2', 'stage3']
    outputs = session.run(None, {'image': tensors['input.1'].numpy()})
    for got, output in zip(outputs, MODEL_OUTPUTS[1:]):
        torch.testing.assert_close(torch.from_numpy(got), tensors[f'{output}.1'], rtol=0, atol=GOLDEN_ATOL)


@NEEDS_OPENVINO
def test_dynamic_openvino_runs_golden_inputs(tmp_path):
    import openvino
    model, case, tensors = golden_model('tiny_t', calm=True)
    path = tmp_path / 'model.xml'
    result = export_model(model, path, 'openvino', dynamic=True, batch=3, img_size=(96, 128))
    assert result.files == (path, path.with_suffix('.bin'))
    compiled = openvino.Core().compile_model(str(path), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    for index in range(len(case['inputs'])):
        logits = compiled(tensors[f'input.{index}'].numpy())[compiled.outputs[0]]
        torch.testing.assert_close(torch.from_numpy(logits), tensors[f'logits.{index}'], rtol=0, atol=GOLDEN_ATOL)


@pytest.mark.slow
def test_torch_export_artifact_loads_and_matches(tmp_path):
    model, case, tensors = golden_model('tiny_t', calm=True)
    path = tmp_path / 'model.pt2'
    export_model(model, path, 'torch-export', dynamic=True, batch=3, img_size=(96, 128))
    program = torch.export.load(str(path))
    for index in range(len(case['inputs'])):
        with torch.no_grad():
            logits = program.module()(tensors[f'input.{index}'])
        torch.testing.assert_close(logits, tensors[f'logits.{index}'], rtol=0, atol=GOLDEN_ATOL)


class _DiffersWhenExported(torch.nn.Module):
    """A model whose traced graph computes something else than its eager forward."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) + (1e-3 if export_formulation_active() else 0.0)


def test_artifact_that_differs_from_eager_is_removed(tmp_path):
    path = tmp_path / 'bad.onnx'
    with pytest.raises(ExportCheckError, match='differs from eager PyTorch by 0.001') as error:
        export_model(_DiffersWhenExported(), path, 'onnx', img_size=64)
    assert error.value.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert not path.exists()


@pytest.mark.parametrize('kwargs, message', [
    (dict(format='tflite'), "unknown format 'tflite'"),
    (dict(img_size=16), 'image size 16x16 cannot be taken by this model'),
    (dict(dtype='int8'), "unknown dtype 'int8'"),
])
def test_bad_arguments_are_export_errors(kwargs, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_model(tiny_model(), tmp_path / 'model.onnx', **kwargs)
    assert not (tmp_path / 'model.onnx').exists()


# ---------------------------------------------------------------------------------------------------------------
# the export command


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """``(model args JSON, safetensors path)`` of the ``tiny_t`` case."""
    kwargs, official = tiny_case('tiny_t')
    path = tmp_path_factory.mktemp('weights') / 'tiny.safetensors'
    path.write_bytes(safetensors_bytes(official))
    model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != 'num_classes'}
    return json.dumps(model_args), path


def _export_args(tiny_checkpoint, out, *extra):
    model_args, weights = tiny_checkpoint
    return ['export', '--model', 'internimage_t', '--checkpoint', str(weights), '--model-args', model_args,
            str(out), *extra]


def test_export_command_onnx_dynamic(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    assert main(_export_args(tiny_checkpoint, out, '--dynamic', '--img-size', '64', '64')) == 0
    captured = capsys.readouterr()
    assert 'Exporting to onnx' in captured.err and 'Checking' in captured.err
    assert f'onnx {out}: max abs difference from eager PyTorch' in captured.out
    assert 'on input (3, 3, 96, 160)' in captured.out  # batch 1 + 2, 64x64 + (32, 96)
    session = _onnx_session(out)
    assert [d if isinstance(d, str) else None for d in session.get_inputs()[0].shape] == [
        'batch', None, 'height', 'width']


def test_export_command_features_only_static(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / 'backbone.onnx'
    assert main(_export_args(tiny_checkpoint, out, '--features-only', '--out-indices', '1', '3',
                             '--img-size', '64', '96', '--batch', '2')) == 0
    session = _onnx_session(out)
    assert session.get_inputs()[0].shape == [2, 3, 64, 96]
    assert [o.shape for o in session.get_outputs()] == [[2, 32, 8, 12], [2, 128, 2, 3]]


@pytest.mark.parametrize('extra, message', [
    (['--format', 'tflite'], "error: unknown format 'tflite'; choose one of onnx, openvino, torch-export, aoti"),
    (['--img-size', '16', '16'], 'error: image size 16x16 cannot be taken by this model'),
    (['--out-indices', '1'], 'error: --out-indices selects the stages of --features-only'),
    (['--format', 'openvino'], 'error: format \'openvino\' needs openvino: pip install openvino'),
    (['--format', 'onnx'], 'error: format \'onnx\' needs onnxruntime: pip install onnxruntime'),
], ids=['unknown format', 'too small', 'out-indices alone', 'no openvino', 'no onnxruntime'])
def test_export_command_errors(tiny_checkpoint, tmp_path, capsys, monkeypatch, extra, message):
    if 'needs' in message:  # the runtime is not installed: importing it fails
        monkeypatch.setitem(sys.modules, message.split('needs ')[1].split(':')[0], None)
    out = tmp_path / 'model.onnx'
    assert main(_export_args(tiny_checkpoint, out, *extra)) == 2
    captured = capsys.readouterr()
    assert message in captured.err and 'Traceback' not in captured.err
    assert not out.exists()
