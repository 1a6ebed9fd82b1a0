"""Read (and, for the maintainer command, write) ``weights_manifest.json``, the single source of truth for the
pretrained tags. timm's pretrained cfgs are generated from it by :func:`pretrained_cfgs`."""
import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional, Union

__all__ = ['load_manifest', 'pretrained_cfgs', 'dump_manifest', 'manifest_path', 'weight_filename']

MANIFEST_NAME = 'weights_manifest.json'


@functools.lru_cache(maxsize=None)
def load_manifest() -> Dict[str, Any]:
    """The parsed manifest shipped with the package."""
    return json.loads(resources.files('timm_internimage').joinpath(MANIFEST_NAME).read_text(encoding='utf-8'))


def manifest_path() -> Path:
    """The manifest file on disk (in a source checkout, the repo-root file the package symlinks to)."""
    return Path(str(resources.files('timm_internimage').joinpath(MANIFEST_NAME))).resolve()


def dump_manifest(manifest: Dict[str, Any]) -> str:
    """Serialise like the checked-in file: indent 2, short numeric lists on one line, trailing newline."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    text = re.sub(r'\[\s+([-0-9.e,\s]+?)\s+\]', lambda m: '[' + ', '.join(x.strip() for x in m.group(1).split(',')) + ']',
                  text)
    return text + '\n'


def weight_filename(entry: Dict[str, Any]) -> Optional[str]:
    """The file a tag loads first: the single weights file or the shard index; None if the layout is unverified."""
    return entry.get('file') or entry.get('index_file')


def _feature_stride(model_name: str) -> int:
    """Reduction of the map that ``forward_features`` returns (H/G fuse stages 2 and 3 at stride 16)."""
    return 16 if model_name in ('internimage_h', 'internimage_g') else 32


def _hf_hub_id(entry: Dict[str, Any]) -> str:
    return entry['hf_hub_id']


def pretrained_cfgs(manifest: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """timm pretrained cfgs keyed ``model.tag``, in manifest order (the first tag of a model is its default).

    The revision and checksums are not part of timm's cfg; the loader (``pretrained.py``) reads them from the
    manifest entry of the tag when the cfg still points at the manifest's repo.
    """
    cfgs = {}
    for name, entry in (manifest or load_manifest())['models'].items():
        model_name = name.split('.')[0]
        input_size = tuple(entry['input_size'])
        stride = _feature_stride(model_name)
        top1 = entry.get('top1')
        cfgs[name] = {
            'hf_hub_id': _hf_hub_id(entry),
            'hf_hub_filename': weight_filename(entry),
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
            'description': (f'ImageNet-1k top-1 {top1}% (published)' if top1 is not None
                            else f'{entry["num_classes"]}-class ImageNet-22k head'),
            'paper_ids': 'arXiv:2211.05778',
            'paper_name': 'InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions',
            'origin_url': 'https://github.com/OpenGVLab/InternImage',
        }
    return cfgs


def write_manifest(manifest: Dict[str, Any], path: Union[str, Path, None] = None) -> Path:
    path = Path(path) if path is not None else manifest_path()
    path.write_text(dump_manifest(manifest), encoding='utf-8')
    load_manifest.cache_clear()
    return path
