"""Read ``weights_manifest.json``, the single source of truth for the pretrained tags."""
import functools
import json
from importlib import resources
from typing import Any, Dict

__all__ = ['load_manifest', 'pretrained_cfgs']

MANIFEST_NAME = 'weights_manifest.json'


@functools.lru_cache(maxsize=None)
def load_manifest() -> Dict[str, Any]:
    """The parsed manifest shipped with the package."""
    return json.loads(resources.files('timm_internimage').joinpath(MANIFEST_NAME).read_text(encoding='utf-8'))


def _feature_stride(model_name: str) -> int:
    """Reduction of the map that ``forward_features`` returns (H/G fuse stages 2 and 3 at stride 16)."""
    return 16 if model_name in ('internimage_h', 'internimage_g') else 32


def pretrained_cfgs() -> Dict[str, Dict[str, Any]]:
    """timm pretrained cfgs keyed ``model.tag``, in manifest order (the first tag of a model is its default)."""
    cfgs = {}
    for name, entry in load_manifest()['models'].items():
        model_name = name.split('.')[0]
        input_size = tuple(entry['input_size'])
        stride = _feature_stride(model_name)
        cfgs[name] = {
            'hf_hub_id': entry['hf_hub_id'],
            'hf_hub_filename': entry.get('file', entry.get('index_file')),
            'num_classes': entry['num_classes'],
            'input_size': input_size,
            'pool_size': (input_size[1] // stride, input_size[2] // stride),
            'min_input_size': (3, 32, 32),
            'crop_pct': entry['crop_pct'],
            'crop_mode': entry['crop_mode'],
            'interpolation': entry['interpolation'],
            'mean': tuple(entry['mean']),
            'std': tuple(entry['std']),
            'first_conv': 'stem.conv1',
            'classifier': 'head.fc',
            'license': entry['license'],
            'paper_ids': 'arXiv:2211.05778',
            'paper_name': 'InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions',
            'origin_url': 'https://github.com/OpenGVLab/InternImage',
        }
    return cfgs
