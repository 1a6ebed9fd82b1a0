"""Golden vectors read off the official implementation (copied from shared/reference/golden)."""
import json
import math
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import torch

GOLDEN_DIR = Path(__file__).parent / 'data' / 'golden'
MODEL_CASES = ('tiny_t', 'tiny_s', 'tiny_l', 'tiny_h', 'tiny_g')
OP_ARG_NAMES = (
    'kernel_h', 'kernel_w', 'stride_h', 'stride_w', 'pad_h', 'pad_w', 'dilation_h', 'dilation_w',
    'group', 'group_channels', 'offset_scale', 'remove_center')


def official_weight(key: str, shape: List[int], weight_seed: int) -> torch.Tensor:
    """The reference README's rule that rebuilds the golden models' official weights from their key names."""
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
        return uniform(0.5, 1.0)
    if len(shape) == 1 and key.endswith('.weight'):
        return 1 + normal(0.1)
    if '.offset.' in key or '.mask.' in key:
        return normal(0.5)
    if 'center_feature_scale_proj' in key:
        return normal(0.3)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    return normal(1 / math.sqrt(fan_in))


def load_model_case(name: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(case json, official state dict, golden tensors) for a tiny model case."""
    from safetensors.torch import load_file
    case = json.loads((GOLDEN_DIR / f'{name}.json').read_text())
    state_dict = {k: official_weight(k, shape, case['weight_seed']) for k, shape in case['state_dict_keys'].items()}
    return case, state_dict, load_file(str(GOLDEN_DIR / f'{name}.safetensors'))


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
