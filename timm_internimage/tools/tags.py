"""The pretrained tags: their table (``python -m timm_internimage list``) and the manifest refresh that pins their
Hub revisions, sizes and sha256 (``manifest-refresh``, maintainers, online)."""
import datetime
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .loading import UsageError

__all__ = ['list_tags', 'refresh_manifest']

_logger = logging.getLogger(__name__)


def _tag_task(published: Dict[str, Any]) -> Tuple[str, Dict[str, float]]:
    """(task, published scores) of a tag from its file's published results: ImageNet top-1 of a classifier, box /
    mask AP or mIoU of a backbone."""
    if 'scores' in published:
        return ('detection' if 'box AP' in published['scores'] else 'segmentation'), published['scores']
    top1 = published.get('top1')
    return 'classification', ({'top-1': top1} if top1 is not None else {})


def list_tags() -> Dict[str, Dict[str, Any]]:
    """Every pretrained tag of both families: its Hub file and revision, classes, input size, task, published
    scores and size."""
    from .._manifest import published_results, repo_entry
    from ..models import pretrained_cfgs
    rows = {}
    for name, cfg in pretrained_cfgs().items():
        repo_id, _, revision = cfg.hf_hub_id.partition('@')
        published = published_results(repo_id, cfg.hf_hub_filename)
        task, scores = _tag_task(published)
        rows[name] = dict(hf_hub_id=repo_id, hf_hub_filename=cfg.hf_hub_filename, revision=revision or 'main',
                          num_classes=cfg.num_classes, input_size=list(cfg.input_size), task=task, scores=scores,
                          top1=published.get('top1'), size=repo_entry(repo_id)['approx_size'])
    return rows


def refresh_manifest(manifest: Dict[str, Any], tags: Optional[Sequence[str]] = None,
                     endpoint: Optional[str] = None, progress: Callable[[str], None] = _logger.info
                     ) -> Dict[str, Any]:
    """Pin the repos of every (or the given) tag to their current commit and record weight file sizes and sha256.

    Sizes and sha256 of LFS files come from the Hub's file metadata; a non-LFS file (the shard index) is
    downloaded at the pinned commit and hashed. ``progress`` gets one line per repo. Returns the updated manifest
    (also modified in place).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils.sha import sha_fileobj
    from .._manifest import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    from ..pretrained import shard_names
    from ..models import pretrained_cfgs
    repo_tags = {name: cfg.hf_hub_id.partition('@')[0] for name, cfg in pretrained_cfgs().items()}
    unknown = [tag for tag in (tags or []) if tag not in repo_tags]
    if unknown:
        raise UsageError(f'unknown tag(s) {unknown}; see `python -m timm_internimage list`')
    api = HfApi(endpoint=endpoint)
    for repo_id in (list(dict.fromkeys(repo_tags[tag] for tag in tags)) if tags else list(manifest['repos'])):
        entry = manifest['repos'][repo_id]
        info = api.model_info(repo_id, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}

        def describe(name: str) -> Dict[str, Any]:
            sibling = siblings[name]
            if sibling.lfs is not None:
                return {'size': sibling.lfs.size, 'sha256': sibling.lfs.sha256}
            path = Path(hf_hub_download(repo_id, name, revision=info.sha, endpoint=endpoint))
            with open(path, 'rb') as f:
                return {'size': path.stat().st_size, 'sha256': sha_fileobj(f).hex()}

        entry.pop('file', None)
        entry.pop('index_file', None)
        if 'checkpoints' in entry:  # OpenGVLab/InternImage, OpenGVLab/DCNv4: the official .pth files the tags load
            absent = [name for name in entry['checkpoints'] if name not in siblings]
            if absent:
                raise UsageError(f'{repo_id}@{info.sha} lacks {absent}, which the manifest lists')
            files = {name: describe(name) for name in entry['checkpoints']}
        elif SAFE_WEIGHTS_NAME in siblings:
            entry['file'] = SAFE_WEIGHTS_NAME
            files = {SAFE_WEIGHTS_NAME: describe(SAFE_WEIGHTS_NAME)}
        elif SAFE_WEIGHTS_INDEX_NAME in siblings:
            entry['index_file'] = SAFE_WEIGHTS_INDEX_NAME
            files = {SAFE_WEIGHTS_INDEX_NAME: describe(SAFE_WEIGHTS_INDEX_NAME)}
            index_path = hf_hub_download(repo_id, SAFE_WEIGHTS_INDEX_NAME, revision=info.sha, endpoint=endpoint)
            for shard in shard_names(index_path):
                if shard not in siblings:
                    raise UsageError(f'{repo_id}@{info.sha}: the index lists {shard}, which the repo lacks')
                files[shard] = describe(shard)
        else:
            raise UsageError(f'{repo_id}@{info.sha} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}')
        entry['revision'] = info.sha
        entry['files'] = files
        entry['unverified'] = [f for f in entry['unverified'] if f not in ('revision', 'files', 'layout')]
        progress(f'{repo_id}@{info.sha[:12]}: {len(files)} file(s), '
                 f'{sum(f["size"] for f in files.values()) / 2 ** 20:.1f} MiB')
    manifest['refreshed'] = {
        'at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        'endpoint': api.endpoint,
        'tags': 'all' if not tags else list(tags),
    }
    return manifest
