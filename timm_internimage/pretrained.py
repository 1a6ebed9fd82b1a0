"""Pretrained weights: Hub files fetched and checked before timm reads them, official ``.pth``, sharded checkpoints.

``build_with_pretrained`` (models/internimage.py) resolves the pretrained cfg once, passes it through
:func:`fetch_pretrained` and builds with the result; timm's own ``load_pretrained`` then loads the weights:

- one safetensors file, on the Hub (``hf_hub_id``, with ``@revision`` once pinned, and ``hf_hub_filename``) or
  local (``file``), through timm's loader with ``pretrained_filter_fn=checkpoint_filter_fn``;
- a sharded checkpoint (a ``model.safetensors.index.json`` on the Hub, or a local index or folder) through the
  one extension: timm's ``custom_load`` hook calls ``InternImage.load_pretrained``, i.e.
  :func:`load_sharded_pretrained`, which reads the shards one after the other (memory-mapped) and hands them to
  timm's ``load_pretrained``, so ``num_classes``, ``in_chans`` and ``features_only`` work as for any timm model.

Hub files come through huggingface_hub, which pins revisions (a file of a pinned commit that is in its cache is
used without any request) and checks that every transfer has the size the server announces. It does not check
the content: the files the manifest records are checked against its size and sha256 here, before anything reads
them. Official training ``.pth`` files hold a yacs config next to the weights, mmcv 1.x (detection, segmentation)
ones may hold numpy scalars in their ``meta``; ``torch.load(weights_only=True)`` accepts these through
:func:`official_checkpoint_globals` and nothing else beyond tensors and plain data. The official detection and
segmentation ``.pth`` on the Hub (``OpenGVLab/InternImage``) are the only pickled files fetched, and only those the
manifest lists.
"""
import contextlib
import dataclasses
import errno
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, NoReturn, Optional, Union

import torch
from timm.models import PretrainedCfg, load_pretrained, load_state_dict
# Private function: no public timm API says which source (file, Hub, url, state_dict) load_pretrained will read for
# a cfg, and fetch_pretrained must fetch and check that very one.
from timm.models._builder import _resolve_pretrained_source

from ._manifest import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, repo_entry, weight_filename

__all__ = [
    'PretrainedWeightsError', 'ChecksumMismatchError', 'WeightsNotCachedError', 'official_checkpoint_globals',
    'fetch_pretrained', 'fetch_hub_weights', 'load_checkpoint', 'load_sharded_pretrained', 'shard_names',
]


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, downloaded, verified or read."""


class ChecksumMismatchError(PretrainedWeightsError):
    """A downloaded file does not have the size or sha256 the manifest records. It has been removed from the cache."""


class WeightsNotCachedError(PretrainedWeightsError, FileNotFoundError):
    """A weight file is not in the Hugging Face cache and cannot be downloaded now (offline or no network)."""


class _YacsCfgNode:
    """Stand-in for ``yacs.config.CfgNode``, the training config in official ``.pth`` files: it unpickles as a
    plain ``OrderedDict``, so no yacs code runs (and yacs need not be installed)."""

    def __new__(cls, *args: Any) -> OrderedDict:
        return OrderedDict()


def _numpy_scalar_globals() -> list:
    """numpy scalars (``numpy.float64`` ...), which mmcv 1.x checkpoints may hold in ``meta['hook_msgs']`` (an
    evaluation hook's best score). They unpickle from a dtype and raw bytes, nothing else."""
    try:
        import numpy as np
    except ImportError:
        return []
    scalar = np.core.multiarray.scalar if np.__version__ < '2' else np._core.multiarray.scalar
    numeric_dtypes = [type(np.dtype(code)) for code in '?bhilqBHILQefd']  # bool, ints, floats (numpy >= 1.25)
    return [np.dtype, *numeric_dtypes, (scalar, 'numpy.core.multiarray.scalar'),
            (scalar, 'numpy._core.multiarray.scalar')]


def official_checkpoint_globals() -> ContextManager:
    """Allow what official checkpoints hold beyond tensors and plain data in ``weights_only`` loads (torch >= 2.6
    can map a global's name to a stand-in; older versions keep refusing such files): the yacs config of the
    classification training checkpoints, and numpy scalars in the ``meta`` of mmcv 1.x (mmdet / mmseg) ones, whose
    other entries (strings, numbers, the ``CLASSES`` tuple, dicts) are plain data. Anything else stays refused."""
    if torch.__version__ < '2.6':
        return contextlib.nullcontext()
    return torch.serialization.safe_globals([(_YacsCfgNode, 'yacs.config.CfgNode'), *_numpy_scalar_globals()])


# ----------------------------------------------------------------------------------------------------------------
# Hub files

_UNWRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)  # a cache directory we cannot write
_HTTP_CLIENTS = ('httpx2', 'httpx', 'requests', 'urllib3')  # huggingface_hub's HTTP client, by its version


def _hub_offline() -> bool:
    from huggingface_hub import constants
    return constants.is_offline_mode() if hasattr(constants, 'is_offline_mode') else constants.HF_HUB_OFFLINE


def _transport_failure(error: BaseException) -> Optional[str]:
    """``'timeout'`` or ``'network'`` for a transport failure of huggingface_hub's HTTP client, else None."""
    classes = type(error).__mro__
    if not any(cls.__module__.partition('.')[0] in _HTTP_CLIENTS for cls in classes):
        return None
    return 'timeout' if any('Timeout' in cls.__name__ for cls in classes) else 'network'


def _raise_download_error(
        error: Exception,
        repo_id: str,
        filename: str,
        revision: str,
        cache_dir: Optional[Union[str, Path]],
        metadata_request: bool,
) -> NoReturn:
    """Raise ``error`` of a Hub request (the metadata request, or the download) as an error that says what failed
    and how to fix it, where it is one of: not cached and not downloadable (offline, Hub unreachable), a Hub server
    error (5xx), a Hub that stopped answering within huggingface_hub's timeout, a broken transfer, a cache that
    cannot be written."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    where = f'{repo_id}/{filename} (revision {revision})'
    cache = cache_dir or constants.HF_HUB_CACHE
    hub = f'the Hub at {constants.ENDPOINT}'
    timeout_variable = 'HF_HUB_ETAG_TIMEOUT' if metadata_request else 'HF_HUB_DOWNLOAD_TIMEOUT'
    failure = _transport_failure(error) if not isinstance(error, HfHubHTTPError) else None
    if isinstance(error, LocalEntryNotFoundError) or (failure == 'network' and metadata_request):
        reason = 'HF_HUB_OFFLINE is set' if _hub_offline() else f'{hub} could not be reached'
        raise WeightsNotCachedError(
            f'{where} is not in the Hugging Face cache ({cache}) and cannot be downloaded because {reason}. Fetch it '
            f'once with network access, e.g. `hf download {repo_id} {filename} --revision {revision}` (or run the '
            f'same call online), then retry; or set HF_ENDPOINT to a reachable mirror.') from error
    status = getattr(getattr(error, 'response', None), 'status_code', None)
    if isinstance(error, HfHubHTTPError) and status is not None and status >= 500:
        raise PretrainedWeightsError(
            f'{hub} answered {where} with a server error (HTTP {status}); retry later, or set HF_ENDPOINT to a '
            f'working mirror.') from error
    if failure == 'timeout':
        raise PretrainedWeightsError(
            f'{hub} stopped answering for {where} ({timeout_variable}={getattr(constants, timeout_variable)} s '
            f'without data); retry later, raise {timeout_variable} for a slow connection, or set HF_ENDPOINT to a '
            f'working mirror.') from error
    if failure == 'network':
        raise PretrainedWeightsError(
            f'the download of {where} from {hub} broke off ({type(error).__name__}: {error}); retry later, or '
            f'set HF_ENDPOINT to a working mirror.') from error
    if isinstance(error, OSError) and error.errno in _UNWRITABLE_ERRNOS:
        raise PretrainedWeightsError(
            f'cannot download {where}: the Hugging Face cache {cache} cannot be written ({error.strerror}: '
            f'{error.filename}). Point HF_HOME (or HF_HUB_CACHE) at a writable directory, or pass cache_dir= to '
            f'timm.create_model.') from error
    raise error


def _download(repo_id: str, filename: str, revision: str, cache_dir: Optional[Union[str, Path]]) -> Path:
    """``hf_hub_download`` with errors that say what failed and how to fix it, and bounded waits.

    For a file that is not cached, huggingface_hub retries a failed metadata request for minutes (60 s timeouts,
    then backoff): one request without retries, within ``HF_HUB_ETAG_TIMEOUT``, first finds a Hub that stalls,
    fails or cannot be reached.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    if not _hub_offline() and try_to_load_from_cache(repo_id, filename, cache_dir, revision) is None:
        try:
            get_hf_file_metadata(
                hf_hub_url(repo_id, filename, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as e:
            _raise_download_error(e, repo_id, filename, revision, cache_dir, metadata_request=True)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except Exception as e:
        _raise_download_error(e, repo_id, filename, revision, cache_dir, metadata_request=False)


def _verify(path: Path, expected: Dict[str, Any], label: str) -> None:
    """Check a downloaded file against the manifest's size and sha256; a mismatching file leaves the cache."""
    from huggingface_hub.utils.sha import sha_fileobj
    size = path.stat().st_size
    if size != expected['size']:
        problem = f'size mismatch: expected {expected["size"]} bytes, got {size} bytes'
    else:
        with open(path, 'rb') as f:
            sha256 = sha_fileobj(f).hex()
        if sha256 == expected['sha256']:
            return
        problem = f'sha256 mismatch: expected {expected["sha256"]}, got {sha256}'
    for target in (path.resolve(), path):  # the blob, then the snapshot link to it
        target.unlink(missing_ok=True)
    raise ChecksumMismatchError(
        f'{label}: {problem}. The corrupt download has been removed from the cache ({path}); retrying downloads it '
        f'again.')


def shard_names(index_path: Union[str, Path]) -> List[str]:
    """The shard files a safetensors index lists, in order."""
    try:
        index = json.loads(Path(index_path).read_text(encoding='utf-8'))
    except ValueError as e:
        raise PretrainedWeightsError(f'{index_path} is not a safetensors index (not JSON: {e})') from e
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise PretrainedWeightsError(
            f'{index_path} is not a safetensors index: it needs a "weight_map" object mapping each tensor name to '
            f'the name of its shard file')
    shards = list(dict.fromkeys(weight_map.values()))
    unsupported = [shard for shard in shards if not shard.endswith('.safetensors')]
    if unsupported:
        raise PretrainedWeightsError(f'{index_path} lists {unsupported}; only safetensors shards are loaded')
    return shards


def fetch_hub_weights(
        repo_id: str,
        revision: Optional[str] = None,
        filename: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
) -> Dict[str, Path]:
    """Download (or find in the cache) a repo's safetensors weights: ``{file in the repo: local path}``, the single
    file or the index first, then its shards.

    For a repo the manifest lists, ``revision`` and ``filename`` default to its pinned revision and its layout,
    and the files it records for that revision are verified. With no known layout the repo is probed for
    ``model.safetensors``, then for the shard index. The only pickled files fetched from the Hub are the official
    ``.pth`` the manifest lists under a repo's ``checkpoints`` (InternImage's detection / segmentation backbones,
    FlashInternImage, which is published as ``.pth`` only); they are read ``weights_only``.
    """
    from huggingface_hub.errors import EntryNotFoundError
    entry = repo_entry(repo_id) or {'revision': 'main', 'files': {}}
    revision = revision or entry['revision']
    filename = filename or weight_filename(entry)
    expected = entry['files'] if revision == entry['revision'] else {}

    def fetch(name: str) -> Path:
        path = _download(repo_id, name, revision, cache_dir)
        if name in expected:
            _verify(path, expected[name], f'{repo_id}/{name} (revision {revision})')
        return path

    if filename is None:
        try:
            return {SAFE_WEIGHTS_NAME: fetch(SAFE_WEIGHTS_NAME)}
        except (EntryNotFoundError, WeightsNotCachedError) as single_file_error:
            try:
                filename, index_path = SAFE_WEIGHTS_INDEX_NAME, fetch(SAFE_WEIGHTS_INDEX_NAME)
            except (EntryNotFoundError, WeightsNotCachedError):
                if isinstance(single_file_error, WeightsNotCachedError):
                    raise single_file_error
                raise PretrainedWeightsError(
                    f'{repo_id} (revision {revision}) has neither {SAFE_WEIGHTS_NAME} nor '
                    f'{SAFE_WEIGHTS_INDEX_NAME}; only safetensors weights are loaded from the Hub'
                ) from single_file_error
    elif filename.endswith('.safetensors') or filename in entry.get('checkpoints', {}):
        return {filename: fetch(filename)}
    elif filename.endswith('.json'):
        index_path = fetch(filename)
    else:
        raise PretrainedWeightsError(
            f'refusing to load {repo_id}/{filename}: only safetensors weights, and the official .pth files the '
            f'manifest lists, are loaded from the Hub (convert a pickled checkpoint with '
            f'`python -m timm_internimage convert`)')
    folder = filename.rpartition('/')[0]
    shards = [f'{folder}/{shard}' if folder else shard for shard in shard_names(index_path)]
    return {filename: index_path, **{shard: fetch(shard) for shard in shards}}


def fetch_pretrained(pretrained_cfg: PretrainedCfg, cache_dir: Optional[Union[str, Path]] = None) -> PretrainedCfg:
    """Get ready the weights a resolved pretrained cfg names; returns the cfg to build with.

    Hub weights are fetched and verified into the Hugging Face cache, where timm then finds them; a found layout
    fills ``hf_hub_filename``. A shard index, on the Hub or local, or a local folder loads through timm's
    ``custom_load`` hook. Other sources are timm's alone.
    """
    load_from, location = _resolve_pretrained_source(pretrained_cfg.to_dict())
    if load_from == 'hf-hub':
        hf_hub_id, filename = location if isinstance(location, tuple) else (location, None)
        repo_id, _, revision = hf_hub_id.partition('@')
        filename = next(iter(fetch_hub_weights(repo_id, revision or 'main', filename, cache_dir)))
        return dataclasses.replace(
            pretrained_cfg, hf_hub_filename=filename, custom_load='hf' if filename.endswith('.json') else False)
    if load_from == 'file':
        path = Path(location)
        if not path.exists():
            raise PretrainedWeightsError(f'pretrained file not found: {path}')
        if path.is_dir() or path.suffix == '.json':
            return dataclasses.replace(pretrained_cfg, custom_load=True)
    return pretrained_cfg


# ----------------------------------------------------------------------------------------------------------------
# reading checkpoints


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a local checkpoint: a safetensors file, a shard index (its shards memory-mapped, one after the other),
    a folder holding ``model.safetensors`` or an index, or an official ``.pth`` (``weights_only``)."""
    from safetensors.torch import load_file
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if (path / name).is_file()]
        if not found:
            raise PretrainedWeightsError(f'{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in this folder')
        path = found[0]
    if not path.is_file():
        raise PretrainedWeightsError(f'checkpoint file not found: {path}')
    if path.suffix == '.json':
        state_dict = {}
        for shard in shard_names(path):
            state_dict.update(load_file(path.parent / shard))
        return state_dict
    with official_checkpoint_globals():
        return load_state_dict(str(path))


def load_sharded_pretrained(
        model: torch.nn.Module,
        checkpoint_path: Union[str, Path],
        filter_fn: Callable[[Dict[str, Any], torch.nn.Module], Dict[str, Any]],
) -> None:
    """timm's ``custom_load`` hook for a shard index or a folder: its weights go through timm's ``load_pretrained``
    (``filter_fn``, ``in_chans`` adaptation, a fresh classifier for another ``num_classes``). The hook passes no
    ``pretrained_strict``: the load is strict unless the classifier is replaced."""
    pretrained_cfg = dict(model.pretrained_cfg, source=None, state_dict=load_checkpoint(checkpoint_path))
    load_pretrained(model, pretrained_cfg, num_classes=model.num_classes, in_chans=model.in_chans, filter_fn=filter_fn)
