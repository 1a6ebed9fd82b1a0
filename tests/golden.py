"""Golden vectors read off the official implementation (copied from shared/reference/golden).

Model cases: ``data/golden/<case>`` with the large-offset weight rule (chaotic: float64 checks) and
``data/golden/calm/<case>`` with the calm rule (every float32 output checked). Op cases: ``dcnv3_op_*`` and
``cuda_semantics/``. FlashInternImage (DCNv4): ``data/golden/dcnv4`` (op and model cases, one ``cases.json``).
"""
import json
import math
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import torch

GOLDEN_DIR = Path(__file__).parent / 'data' / 'golden'
CALM_DIR = GOLDEN_DIR / 'calm'
MODEL_CASES = ('tiny_t', 'tiny_s', 'tiny_l', 'tiny_h', 'tiny_g')
MODEL_OUTPUTS = ('logits', 'stage0', 'stage1', 'stage2', 'stage3')  # golden tensors `<output>.<input index>`
OP_ARG_NAMES = (
    'kernel_h', 'kernel_w', 'stride_h', 'stride_w', 'pad_h', 'pad_w', 'dilation_h', 'dilation_w',
    'group', 'group_channels', 'offset_scale', 'remove_center')


WEIGHT_RULES = ('large_offsets', 'calm', 'calm_dcnv4')


def official_weight(key: str, shape: List[int], weight_seed: int, rule: str = 'large_offsets') -> torch.Tensor:
    """The reference README's rules that rebuild the golden models' official weights from their key names.

    ``large_offsets`` (the cases in ``data/golden``): large layer scales, offsets and masks, so sampling far
    outside the map is exercised (chaotic models: float64 checks only). ``calm`` (``data/golden/calm``, the case
    json's ``weight_rule``): small layer scales and biases, offsets of about a pixel (well conditioned: every
    float32 output checked). ``calm_dcnv4`` (``data/golden/dcnv4``): the calm rule with the weights of DCNv4's
    offset/weight branch (``offset_mask`` and ``offset_mask_dw``) divided by 3, since DCNv4 does not normalise its
    point weights.
    """
    if rule == 'calm_dcnv4':
        weight = official_weight(key, shape, weight_seed, 'calm')
        return weight / 3 if '.offset_mask' in key and key.endswith('.weight') else weight
    if rule not in WEIGHT_RULES:
        raise ValueError(f'unknown weight rule {rule!r}, expected one of {WEIGHT_RULES}')
    calm = rule == 'calm'
    generator = torch.Generator().manual_seed((zlib.crc32(key.encode()) + weight_seed) % 2 ** 63)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    def normal(std: float) -> torch.Tensor:
        return std * torch.randn(shape, generator=generator)

    if key.endswith('num_batches_tracked'):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith('running_var'):
        return uniform(0.75, 1.25)
    if key.endswith('running_mean'):
        return normal(0.1)
    if 'gamma' in key or 'layer_scale' in key:
        return uniform(0.02, 0.1) if calm else uniform(0.5, 1.0)
    if len(shape) == 1 and key.endswith('.weight'):
        return 1 + normal(0.1)
    if calm and len(shape) == 1:
        return normal(0.02)
    if not calm and ('.offset.' in key or '.mask.' in key):
        return normal(0.5)
    if 'center_feature_scale_proj' in key:
        return normal(0.3)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    return normal(1 / math.sqrt(fan_in))


def load_model_case(name: str, calm: bool = False) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(case json, official state dict, golden tensors) for a tiny model case, large-offset or calm."""
    from safetensors.torch import load_file
    directory = CALM_DIR if calm else GOLDEN_DIR
    case = json.loads((directory / f'{name}.json').read_text())
    rule = case.get('weight_rule', 'large_offsets')
    state_dict = {key: official_weight(key, shape, case['weight_seed'], rule)
                  for key, shape in case['state_dict_keys'].items()}
    return case, state_dict, load_file(str(directory / f'{name}.safetensors'))


def golden_model(name: str, dtype: torch.dtype = torch.float32, calm: bool = False):
    """(model, case json, golden tensors): the case's official constructor arguments, verbatim, with its official
    weights, in eval mode and ``dtype``."""
    from timm_internimage import InternImage, checkpoint_filter_fn
    case, state_dict, tensors = load_model_case(name, calm)
    model = InternImage(**case['config']).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model.to(dtype), case, tensors


def golden_outputs(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The model's outputs in ``MODEL_OUTPUTS`` order: logits, then each stage's output (NCHW)."""
    with torch.no_grad():
        return [model(x)] + model.forward_intermediates(x, intermediates_only=True)


def golden_expected(tensors: Dict[str, torch.Tensor], index: int) -> List[torch.Tensor]:
    """The official outputs for the case's input ``index``, in ``MODEL_OUTPUTS`` order."""
    return [tensors[f'{output}.{index}'] for output in MODEL_OUTPUTS]


def op_cases() -> List[dict]:
    return json.loads((GOLDEN_DIR / 'dcnv3_op_cases.json').read_text())


def load_op_case(case: dict) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(GOLDEN_DIR / case['file']))


def op_args(case: dict) -> tuple:
    """Positional scalar arguments of the official op signature, in order."""
    return tuple(bool(case[k]) if k == 'remove_center' else case[k] for k in OP_ARG_NAMES)


CUDA_SEMANTICS_DIR = GOLDEN_DIR / 'cuda_semantics'


def cuda_semantics_cases() -> List[dict]:
    """The official CUDA kernel's behaviour at integer positions, borders and non-finite offsets (float64)."""
    return json.loads((CUDA_SEMANTICS_DIR / 'cases.json').read_text())


def load_cuda_semantics_case(case: dict) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(CUDA_SEMANTICS_DIR / case['file']))


def cuda_semantics_kwargs(case: dict) -> dict:
    """Keyword arguments of ``timm_internimage.ops.dcnv3`` for a cuda_semantics case."""
    names = ('kernel_size', 'stride', 'padding', 'dilation', 'group', 'offset_scale', 'remove_center')
    return {name: case[name] for name in names}


def cuda_semantics_args(case: dict, channels: int) -> tuple:
    """Positional scalar arguments of the official op signature for a cuda_semantics case of ``channels``."""
    k, s, p, d, g = (case[name] for name in ('kernel_size', 'stride', 'padding', 'dilation', 'group'))
    return (k, k, s, s, p, p, d, d, g, channels // g, case['offset_scale'], bool(case['remove_center']))


DENSE_DIR = GOLDEN_DIR / 'dense'
DENSE_CASES = ('tiny_mask_rcnn_t', 'tiny_dino_l', 'tiny_upernet_h')


def load_dense_case(name: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(case json, backbone weights keyed ``backbone.<official key>`` as in an mmdet / mmseg checkpoint, golden
    tensors ``input`` and ``out<i>``) for a tiny detection / segmentation backbone (``data/golden/dense``).

    The weights follow the calm rule, drawn with the prefixed key names."""
    from safetensors.torch import load_file
    case = json.loads((DENSE_DIR / f'{name}.json').read_text())
    state_dict = {f'backbone.{key}': official_weight(f'backbone.{key}', shape, case['weight_seed'], 'calm')
                  for key, shape in case['state_dict_keys'].items()}
    return case, state_dict, load_file(str(DENSE_DIR / f'{name}.safetensors'))


def dense_model_kwargs(case: dict) -> dict:
    """The official backbone constructor arguments of a dense case (published config with its tiny overrides),
    as ``timm.create_model`` keyword arguments (``out_indices`` included; training-only ones left out)."""
    config = dict(case['published_backbone'], **case['overrides'])
    for training_only in ('drop_path_rate', 'with_cp'):
        config.pop(training_only, None)
    config['out_indices'] = tuple(case['out_indices'])
    return config


DCNV4_DIR = GOLDEN_DIR / 'dcnv4'
DCNV4_MODEL_CASES = ('model_flash_tiny', 'model_flash_tiny_flags')
DCNV4_OUTPUTS = ('logits', 'stage0', 'stage1', 'stage2', 'stage3')  # golden tensors of a DCNv4 model case


def dcnv4_cases() -> Dict[str, dict]:
    """``data/golden/dcnv4/cases.json``: op cases ``op_*`` and tiny FlashInternImage cases ``model_*``."""
    return json.loads((DCNV4_DIR / 'cases.json').read_text())


def flash_golden_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, case json, golden tensors) of a tiny FlashInternImage case: its official constructor arguments,
    verbatim, with the official weights of its key names (``calm_dcnv4``), in eval mode and ``dtype``."""
    from safetensors.torch import load_file
    from timm_internimage import FlashInternImage, checkpoint_filter_fn
    case = dcnv4_cases()[name]
    state_dict = {key: official_weight(key, shape, case['weight_seed'], case['weight_rule'])
                  for key, shape in case['state_dict_keys'].items()}
    model = FlashInternImage(**case['config']).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model.to(dtype), case, load_file(str(DCNV4_DIR / f'{name}.safetensors'))
