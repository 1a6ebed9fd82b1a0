"""Pretrained weights: Hugging Face Hub download (safetensors only), checksums, local files, sharded checkpoints.

``timm.create_model('internimage_t.in1k', pretrained=True)`` reaches :func:`prepare_pretrained` through
``_create_internimage``. It resolves the pretrained cfg exactly as timm does, fetches and verifies the weight
files *before* the model is built (so a missing or corrupt file fails fast), and hands timm a loader through
``pretrained_filter_fn``. timm's own ``load_pretrained`` then does the rest with its usual semantics: stem
adaptation for ``in_chans``, dropping the classifier for a different ``num_classes``, strict loading,
``features_only`` wrapping.

Memory: safetensors files are memory-mapped (safetensors' default ``mmap`` backend), one shard after the
other, and official ``.pth`` files are loaded with ``torch.load(mmap=True, weights_only=True)`` where their
format allows. The state dict therefore holds views of the files (clean, reclaimable page cache), not a second
in-memory copy of the weights: the only full resident copy is the model's own parameters.
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._manifest import load_manifest, weight_filename

__all__ = [
    'PretrainedWeightsError', 'ChecksumMismatchError', 'WeightsNotCachedError',
    'prepare_pretrained', 'resolve_weight_source', 'fetch_hub_weights', 'load_weight_files',
    'load_checkpoint', 'manifest_entry', 'sha256_file', 'verify_file',
]

_logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = 'model.safetensors'
SAFE_WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'
_PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
_DEFERRED_KEY = '__timm_internimage_deferred__'


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, downloaded, verified or read."""


class ChecksumMismatchError(PretrainedWeightsError):
    """A downloaded file does not have the sha256 (or size) the manifest records. It has been removed from the cache."""


class WeightsNotCachedError(PretrainedWeightsError, FileNotFoundError):
    """A weight file is not in the local Hugging Face cache and cannot be downloaded now (offline or no network)."""


# ----------------------------------------------------------------------------------------------------------------
# manifest lookups


def manifest_entry(name_or_cfg: Union[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Manifest entry for ``'model.tag'`` (or a bare model name: its default tag), or for a resolved pretrained cfg.

    For a cfg the entry is only returned if the cfg still points at the manifest's repo (an overlay pointing
    somewhere else must not inherit the manifest's revision and checksums).
    """
    models = load_manifest()['models']
    if isinstance(name_or_cfg, str):
        if name_or_cfg in models:
            return models[name_or_cfg]
        for tag, entry in models.items():  # first tag of a model is its default
            if tag.split('.')[0] == name_or_cfg:
                return entry
        return None
    cfg = name_or_cfg
    arch, tag = cfg.get('architecture'), cfg.get('tag')
    entry = models.get(f'{arch}.{tag}') if arch and tag else None
    if entry is None or entry['hf_hub_id'] != _split_revision(cfg.get('hf_hub_id') or '')[0]:
        return None
    filename = cfg.get('hf_hub_filename')
    if filename and filename != weight_filename(entry):
        return None
    return entry


def _split_revision(hf_hub_id: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = hf_hub_id.partition('@')
    return repo_id, revision or None


# ----------------------------------------------------------------------------------------------------------------
# checksums


def sha256_file(path: Union[str, Path], chunk_size: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _remove_from_cache(path: Path) -> None:
    """Delete a cached Hub file: the snapshot entry and the blob it points to (no trace left that looks valid)."""
    targets = []
    if path.is_symlink():
        targets.append(Path(os.path.realpath(path)))
    targets.append(path)
    for target in targets:
        try:
            target.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # pragma: no cover - read-only caches
            _logger.warning('could not remove %s from the cache: %s', target, e)


def verify_file(path: Union[str, Path], expected: Dict[str, Any], label: str, remove_on_mismatch: bool = True) -> None:
    """Check ``path`` against ``expected`` (``sha256`` and/or ``size``); on a mismatch delete it and raise.

    Raises:
        ChecksumMismatchError: naming the file, the expected and the actual value.
    """
    path = Path(path)
    problem = None
    size = expected.get('size')
    if size is not None and path.stat().st_size != size:
        problem = f'size mismatch: expected {size} bytes, got {path.stat().st_size} bytes'
    elif expected.get('sha256'):
        actual = sha256_file(path)
        if actual != expected['sha256'].lower():
            problem = f'sha256 mismatch: expected {expected["sha256"].lower()}, got {actual}'
    if problem is None:
        return
    if remove_on_mismatch:
        _remove_from_cache(path)
        where = f'The corrupt download has been removed from the cache ({path}); retrying downloads it again.'
    else:
        where = f'File: {path}'
    raise ChecksumMismatchError(f'{label}: {problem}. {where}')


# ----------------------------------------------------------------------------------------------------------------
# Hub download


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise PretrainedWeightsError('loading pretrained InternImage weights needs `pip install huggingface_hub`') from e
    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants
    is_offline = getattr(constants, 'is_offline_mode', None)  # huggingface_hub >= 1.0 reads it at call time
    return bool(is_offline() if is_offline is not None else constants.HF_HUB_OFFLINE)


def _hub_errors():
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    return EntryNotFoundError, LocalEntryNotFoundError


def _download(
        repo_id: str,
        filename: str,
        revision: Optional[str],
        cache_dir: Optional[Union[str, Path]],
        what: str,
) -> Path:
    """``hf_hub_download`` with a clear error when the file is neither cached nor downloadable."""
    hub = _hub()
    from huggingface_hub import constants
    _, LocalEntryNotFoundError = _hub_errors()
    try:
        return Path(hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=str(cache_dir) if cache_dir else None))
    except LocalEntryNotFoundError as e:
        cache = cache_dir or constants.HF_HUB_CACHE
        rev = revision or 'main'
        reason = ('HF_HUB_OFFLINE is set' if _offline()
                  else f'the Hub at {constants.ENDPOINT} could not be reached')
        raise WeightsNotCachedError(
            f'{what}: {repo_id}/{filename} (revision {rev}) is not in the Hugging Face cache ({cache}) and '
            f'cannot be downloaded because {reason}. Fetch it once with network access, e.g. '
            f'`hf download {repo_id} {filename} --revision {rev}` (or run the same create_model call online), '
            f'then retry; or set HF_ENDPOINT to a reachable mirror.') from e


def fetch_hub_weights(
        repo_id: str,
        revision: Optional[str] = None,
        filename: Optional[str] = None,
        index_filename: Optional[str] = None,
        expected: Optional[Dict[str, Dict[str, Any]]] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        what: str = 'pretrained weights',
) -> List[Path]:
    """Download (or find in the cache) a repo's safetensors weights; returns the local file(s), verified.

    With neither ``filename`` nor ``index_filename`` the repo is probed for ``model.safetensors`` and then
    ``model.safetensors.index.json``; pickled checkpoints are never fetched from the Hub.
    ``expected`` maps file names to ``{'sha256': ..., 'size': ...}``; files listed there are verified.
    """
    EntryNotFoundError, _ = _hub_errors()
    expected = expected or {}

    def get(name: str) -> Path:
        path = _download(repo_id, name, revision, cache_dir, what)
        if name in expected:
            verify_file(path, expected[name], f'{what}: {repo_id}/{name} (revision {revision or "main"})')
        return path

    if filename is None and index_filename is None:
        try:
            return [get(SAFE_WEIGHTS_NAME)]
        except (EntryNotFoundError, WeightsNotCachedError) as single_error:
            try:
                index_filename = SAFE_WEIGHTS_INDEX_NAME
                index_path = get(index_filename)
            except (EntryNotFoundError, WeightsNotCachedError):
                if isinstance(single_error, WeightsNotCachedError):
                    raise single_error
                raise PretrainedWeightsError(
                    f'{what}: {repo_id} (revision {revision or "main"}) has neither {SAFE_WEIGHTS_NAME} nor '
                    f'{SAFE_WEIGHTS_INDEX_NAME}; only safetensors weights are loaded from the Hub') from single_error
    elif filename is not None:
        if not filename.endswith(('.safetensors', '.json')):
            raise PretrainedWeightsError(
                f'{what}: refusing to load {filename!r} from the Hub; only safetensors weights are loaded from the Hub '
                f'(convert a pickled checkpoint with `python -m timm_internimage convert`)')
        if not filename.endswith('.json'):
            return [get(filename)]
        index_filename, index_path = filename, get(filename)
    else:
        index_path = get(index_filename)
    shards = _shards_from_index(index_path, f'{repo_id}/{index_filename}')
    prefix = index_filename.rpartition('/')[0]
    return [get(f'{prefix}/{shard}' if prefix else shard) for shard in shards]


def _shards_from_index(index_path: Path, label: str) -> List[str]:
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding='utf-8'))['weight_map']
    except (ValueError, KeyError) as e:
        raise PretrainedWeightsError(f'{label} is not a safetensors index (no "weight_map"): {e}') from e
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if not shard.endswith('.safetensors') or '..' in shard.split('/') or shard.startswith('/'):
            raise PretrainedWeightsError(f'{label} lists an unsupported shard {shard!r}; expected *.safetensors files')
    return shards


# ----------------------------------------------------------------------------------------------------------------
# reading weight files


def load_weight_files(paths: Sequence[Union[str, Path]]) -> Dict[str, torch.Tensor]:
    """Merge safetensors files (a single file or a checkpoint's shards) into one memory-mapped state dict."""
    from safetensors.torch import load_file
    state_dict: Dict[str, torch.Tensor] = {}
    for path in paths:
        shard = load_file(str(path), device='cpu')  # mmap-backed: tensors are views of the file, not copies
        duplicated = state_dict.keys() & shard.keys()
        if duplicated:
            raise PretrainedWeightsError(f'{path}: keys already loaded from an earlier shard: {sorted(duplicated)[:8]}')
        state_dict.update(shard)
        del shard
    return state_dict


def _torch_load(path: Path) -> Dict[str, Any]:
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):  # legacy (non-zip) torch.save format cannot be memory-mapped
                raise
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if type(e).__name__ == 'UnpicklingError' or 'weights_only' in str(e):
            raise PretrainedWeightsError(
                f'{path}: refused to unpickle it with weights_only=True ({str(e).splitlines()[0]}). The file holds '
                f'Python objects beyond tensors; only load it unrestricted if you trust its source, then save '
                f'just its state dict (or use safetensors).') from e
        raise


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a local checkpoint: ``.safetensors`` (memory-mapped), a safetensors index ``.json`` with its shards,
    an official ``.pth`` (``weights_only=True``), or a folder holding ``model.safetensors`` or an index."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
            if (path / name).is_file():
                return load_checkpoint(path / name)
        pickles = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if len(pickles) == 1:
            return load_checkpoint(pickles[0])
        raise PretrainedWeightsError(
            f'{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in this folder'
            + (f' and several checkpoints {[p.name for p in pickles]}; pass one file' if pickles else ''))
    if not path.is_file():
        raise PretrainedWeightsError(f'checkpoint file not found: {path}')
    if path.suffix == '.safetensors':
        return load_weight_files([path])
    if path.suffix == '.json':
        shards = _shards_from_index(path, str(path))
        return load_weight_files([path.parent / shard for shard in shards])
    return _torch_load(path)


# ----------------------------------------------------------------------------------------------------------------
# timm integration


def resolve_weight_source(cfg: Dict[str, Any]) -> Tuple[str, Any]:
    """Where a resolved pretrained cfg's weights come from, following timm's precedence.

    Returns ``('state_dict', sd)``, ``('file', path)``, ``('local-dir', path)``, ``('hf-hub', (repo, revision,
    filename))`` or ``('url', url)``; ``('', None)`` when there is none.
    """
    source = cfg.get('source') or ''
    if source == 'hf-hub' and cfg.get('hf_hub_id'):
        repo_id, revision = _split_revision(cfg['hf_hub_id'])
        return 'hf-hub', (repo_id, revision, cfg.get('hf_hub_filename'))
    if source == 'local-dir':
        return 'local-dir', cfg.get('file')
    if cfg.get('state_dict'):
        return 'state_dict', cfg['state_dict']
    if cfg.get('file'):
        return 'file', cfg['file']
    if cfg.get('hf_hub_id'):
        repo_id, revision = _split_revision(cfg['hf_hub_id'])
        return 'hf-hub', (repo_id, revision, cfg.get('hf_hub_filename'))
    if cfg.get('url'):
        return 'url', cfg['url']
    return '', None


def fetch_for_cfg(cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]] = None) -> Optional[List[Path]]:
    """Download and verify the Hub weight files of a resolved pretrained cfg (None if it is not a Hub source)."""
    kind, loc = resolve_weight_source(cfg)
    if kind != 'hf-hub':
        return None
    repo_id, revision, filename = loc
    what = '.'.join(x for x in (cfg.get('architecture'), cfg.get('tag')) if x) or repo_id
    entry = manifest_entry(cfg)
    index_filename = None
    expected: Dict[str, Dict[str, Any]] = {}
    if entry is not None:
        if revision is None and entry.get('revision') not in (None, '', 'main'):
            revision = entry['revision']
        expected = {name: meta for name, meta in (entry.get('files') or {}).items()
                    if meta.get('sha256') or meta.get('size') is not None}
        if filename is None:
            filename = entry.get('file')
            index_filename = entry.get('index_file') if filename is None else None
    if filename is not None and filename.endswith('.json'):
        filename, index_filename = None, filename
    return fetch_hub_weights(
        repo_id, revision=revision, filename=filename, index_filename=index_filename, expected=expected,
        cache_dir=cache_dir, what=what)


def prepare_pretrained(
        variant: str,
        kwargs: Dict[str, Any],
        filter_fn: Callable[[Dict[str, Any], torch.nn.Module], Dict[str, Any]],
) -> Tuple[Dict[str, Any], Callable, Callable[[torch.nn.Module], torch.nn.Module]]:
    """Fetch the weights a ``pretrained=True`` build needs and route them through timm's ``load_pretrained``.

    Returns ``(kwargs for build_model_with_cfg, pretrained_filter_fn, finalize)``; ``finalize(model)`` restores
    the public ``pretrained_cfg`` after the build.
    """
    from timm.models._builder import resolve_pretrained_cfg
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if overlay.get('state_dict'):
        return kwargs, filter_fn, lambda model: model  # an in-memory state dict: plain timm behaviour
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay).to_dict()
    kind, loc = resolve_weight_source(cfg)
    label = '.'.join(x for x in (cfg.get('architecture') or variant, cfg.get('tag')) if x)
    if kind == 'hf-hub':
        paths = fetch_for_cfg(cfg, cache_dir=kwargs.get('cache_dir'))
        loader = lambda: load_weight_files(paths)  # noqa: E731
    elif kind in ('file', 'local-dir'):
        if not loc or not Path(loc).expanduser().exists():
            raise PretrainedWeightsError(f'{label}: pretrained file not found: {loc}')
        loader = lambda: load_checkpoint(loc)  # noqa: E731
    else:
        return kwargs, filter_fn, lambda model: model  # url / nothing: timm reports it as usual

    num_classes = kwargs.get('num_classes')
    if (num_classes is not None and not kwargs.get('features_only')
            and num_classes != cfg.get('num_classes', 1000)):
        _logger.warning(
            '%s: the checkpoint classifies %s classes but the model is built with num_classes=%s; the classifier '
            '(head.fc) is not loaded and keeps its random initialisation', label, cfg.get('num_classes'), num_classes)

    def deferred_filter_fn(_placeholder: Dict[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
        return filter_fn(loader(), model)

    kwargs = dict(kwargs)
    # A non-empty placeholder selects timm's "state_dict" branch; the real weights come from deferred_filter_fn.
    kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict={_DEFERRED_KEY: True}, source='timm')
    original_source = cfg.get('source')

    def finalize(model: torch.nn.Module) -> torch.nn.Module:
        for module in (model, getattr(model, 'model', None)):
            pcfg = getattr(module, 'pretrained_cfg', None)
            if isinstance(pcfg, dict):
                pcfg.pop('state_dict', None)
                if original_source:
                    pcfg['source'] = original_source
                else:
                    pcfg.pop('source', None)
        return model

    return kwargs, deferred_filter_fn, finalize
