"""``weights_manifest.json``: the facts about the published weight files, keyed by Hugging Face Hub repo.

For each repo: the revision the weights load from, their layout (one file or a shard index), the size and
sha256 of every file, and the published results (top-1; of the repos of official ``.pth`` files, per file: top-1 or
detection / segmentation scores). The pretrained cfgs of both families (``models/``) read these; the loader
(``pretrained.py``) checks the files against them.
"""
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ['SAFE_WEIGHTS_NAME', 'SAFE_WEIGHTS_INDEX_NAME', 'load_manifest', 'manifest_path', 'dump_manifest',
           'repo_entry', 'weight_filename', 'hub_source', 'published_results']

MANIFEST_NAME = 'weights_manifest.json'
SAFE_WEIGHTS_NAME = 'model.safetensors'
SAFE_WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'


@functools.lru_cache(maxsize=None)
def load_manifest() -> Dict[str, Any]:
    """The parsed manifest shipped with the package."""
    return json.loads(resources.files('timm_internimage').joinpath(MANIFEST_NAME).read_text(encoding='utf-8'))


def manifest_path() -> Path:
    """The manifest file on disk (in a source checkout, the repo-root file the package links to)."""
    return Path(str(resources.files('timm_internimage').joinpath(MANIFEST_NAME))).resolve()


def dump_manifest(manifest: Dict[str, Any]) -> str:
    """Serialise like the checked-in file."""
    return json.dumps(manifest, indent=2, ensure_ascii=False) + '\n'


def repo_entry(repo_id: str) -> Optional[Dict[str, Any]]:
    """The manifest entry of a Hub repo, None for a repo the manifest does not list."""
    return load_manifest()['repos'].get(repo_id)


def weight_filename(entry: Dict[str, Any]) -> Optional[str]:
    """The file a repo's weights load from: the single file or the shard index; None while unverified."""
    return entry.get('file') or entry.get('index_file')


def hub_source(repo_id: str) -> Dict[str, Any]:
    """The Hub fields of a pretrained cfg: ``hf_hub_id`` (``repo@revision`` once pinned) and ``hf_hub_filename``.

    A shard index loads through timm's ``custom_load`` hook (``InternImage.load_pretrained``).
    """
    entry = load_manifest()['repos'][repo_id]
    return dict(
        hf_hub_id=repo_id if entry['revision'] == 'main' else f'{repo_id}@{entry["revision"]}',
        hf_hub_filename=weight_filename(entry),
        custom_load='hf' if 'index_file' in entry else False,
    )


def published_results(repo_id: str, filename: Optional[str]) -> Dict[str, Any]:
    """The published results of a weights file: ``{'top1': ...}`` of a classifier (None for a 22k head),
    ``{'scores': {...}}`` of a detection / segmentation backbone. A repo of one model's weights has one ``top1``; a
    repo of official ``.pth`` files (``checkpoints``) has them per file. ``{}`` for a repo or file the manifest does
    not list."""
    entry = repo_entry(repo_id)
    if entry is None:
        return {}
    if 'checkpoints' in entry:
        return entry['checkpoints'].get(filename, {})
    return {'top1': entry['top1']}
