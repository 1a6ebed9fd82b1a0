"""A small Hugging Face Hub-compatible HTTP server for tests (127.0.0.1, no internet).

It implements what ``huggingface_hub`` (2.x) uses to download and inspect model repos:

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: ``X-Repo-Commit``, ``ETag`` (the sha256 for LFS-like
  files, a git-style sha1 otherwise, as the Hub does), ``Content-Length``, ``Range`` requests; 404s carry
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client raises the right error.
- ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}``: model info with ``sha`` and
  ``siblings`` (``size``, ``blobId``, ``lfs.sha256`` with ``?blobs=true``).

Repos are plain dicts of file name -> bytes; ``tampered`` lets a test serve bytes that differ from the ones the
server advertises (a corrupted transfer or a compromised mirror). ``faults`` makes the server misbehave on one
file (see ``FAULTS``). Every request is logged in ``requests``.
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit, parse_qs

LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt', '.jpg', '.png')

# ``FakeRepo.faults[filename]``: how the server fails for that file. Transfers stop at the file's midpoint, so a
# resumed (``Range``) download makes no further progress.
FAULTS = {
    'stall_head': 'accept the HEAD request and never answer it',
    'stall_body': 'send the headers and the first half of the body, then keep the connection open, silent',
    'truncate': 'send the headers and the first half of the body, then close the connection',
    'server_error': 'answer HEAD and GET with 500',
    'server_error_get': 'answer HEAD normally and GET with 503',
}
STALL_LIMIT_S = 60  # a stalled handler gives up after this long (or when the hub stops or its faults are cleared)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class FakeRepo:
    def __init__(self, repo_id: str, files: Dict[str, bytes], commit: Optional[str] = None) -> None:
        self.repo_id = repo_id
        self.files = dict(files)
        self.commit = commit or hashlib.sha1(repo_id.encode() + b''.join(
            name.encode() + data for name, data in sorted(self.files.items()))).hexdigest()
        self.tampered: Dict[str, bytes] = {}
        self.token: Optional[str] = None  # set to make the repo private: requests need 'Authorization: Bearer <token>'
        self.faults: Dict[str, str] = {}  # filename -> a FAULTS key

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else _git_blob_sha1(data)

    def sibling(self, name: str, with_blobs: bool) -> dict:
        data = self.files[name]
        info = {'rfilename': name}
        if with_blobs:
            info.update(size=len(data), blobId=_git_blob_sha1(data))
            if name.endswith(LFS_SUFFIXES):
                info['lfs'] = {'size': len(data), 'sha256': self.sha256(name), 'pointerSize': 134}
        return info


class FakeHub:
    """``with FakeHub() as hub: hub.add_repo(...); os.environ['HF_ENDPOINT'] = hub.endpoint``."""

    def __init__(self) -> None:
        self.repos: Dict[str, FakeRepo] = {}
        self.requests: List[Tuple[str, str]] = []
        self.auth_headers: List[Optional[str]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._release_stalls = threading.Event()

    # -- repos ------------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: Dict[str, bytes], commit: Optional[str] = None) -> FakeRepo:
        repo = FakeRepo(repo_id, files, commit)
        self.repos[repo_id] = repo
        return repo

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.auth_headers.clear()

    def clear_faults(self) -> None:
        """Serve every file normally again and end the stalled requests."""
        for repo in self.repos.values():
            repo.faults.clear()
        self._release_stalls.set()
        self._release_stalls = threading.Event()

    def _stall(self) -> None:
        self._release_stalls.wait(STALL_LIMIT_S)

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> 'FakeHub':
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.clear_faults()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> 'FakeHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling -------------------------------------------------------------------------------------
    def _send(self, handler, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              head: bool = False, content_length: Optional[int] = None, fault: Optional[str] = None,
              sent_limit: int = 0) -> None:
        """Send a response; with a ``stall_body`` or ``truncate`` fault, only the first ``sent_limit`` body bytes."""
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header('Content-Length', str(len(body) if content_length is None else content_length))
        handler.end_headers()
        if head or not body:
            return
        if fault not in ('stall_body', 'truncate'):
            handler.wfile.write(body)
            return
        handler.wfile.write(body[:sent_limit])
        handler.wfile.flush()
        if fault == 'stall_body':
            self._stall()
        handler.close_connection = True

    def _error(self, handler, status: int, code: str, head: bool, commit: Optional[str] = None) -> None:
        headers = {'X-Error-Code': code, 'Content-Type': 'application/json'}
        if commit:
            headers['X-Repo-Commit'] = commit
        body = json.dumps({'error': code}).encode()
        self._send(handler, status, body, headers, head=head)

    def _find_repo(self, parts: List[str]) -> Tuple[Optional[FakeRepo], List[str]]:
        for n in (2, 1):
            repo_id = '/'.join(parts[:n])
            if repo_id in self.repos:
                return self.repos[repo_id], parts[n:]
        return None, parts

    def _handle(self, handler, head: bool) -> None:
        url = urlsplit(handler.path)
        with self._lock:
            self.requests.append(('HEAD' if head else 'GET', url.path))
        parts = [unquote(p) for p in url.path.strip('/').split('/')]
        if parts[:2] == ['api', 'models']:
            return self._model_info(handler, parts[2:], parse_qs(url.query), head)
        repo, rest = self._find_repo(parts)
        if repo is None or not self._authorized(handler, repo):
            return self._error(handler, 401 if repo is not None else 404, 'RepoNotFound', head)
        if len(rest) < 3 or rest[0] != 'resolve':
            return self._error(handler, 404, 'EntryNotFound', head, repo.commit)
        revision, filename = rest[1], '/'.join(rest[2:])
        if revision not in ('main', repo.commit):
            return self._error(handler, 404, 'RevisionNotFound', head)
        if filename not in repo.files:
            return self._error(handler, 404, 'EntryNotFound', head, repo.commit)
        data = repo.tampered.get(filename, repo.files[filename])
        fault = repo.faults.get(filename)
        if fault == 'stall_head' and head:
            return self._stall()
        if fault == 'server_error' or (fault == 'server_error_get' and not head):
            return self._error(handler, 500 if fault == 'server_error' else 503, 'ServerError', head)
        headers = {
            'X-Repo-Commit': repo.commit,
            'ETag': f'"{repo.etag(filename)}"',
            'Accept-Ranges': 'bytes',
            'Content-Type': 'application/octet-stream',
        }
        range_header = handler.headers.get('Range')
        if range_header and range_header.startswith('bytes=') and not head:
            start_s, _, end_s = range_header[len('bytes='):].partition('-')
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            chunk = data[start:end + 1]
            headers['Content-Range'] = f'bytes {start}-{start + len(chunk) - 1}/{len(data)}'
            return self._send(handler, 206, chunk, headers, fault=fault, sent_limit=max(len(data) // 2 - start, 0))
        self._send(handler, 200, data, headers, head=head, content_length=len(data), fault=fault,
                   sent_limit=len(data) // 2)

    def _authorized(self, handler, repo: FakeRepo) -> bool:
        with self._lock:
            self.auth_headers.append(handler.headers.get('Authorization'))
        return repo.token is None or handler.headers.get('Authorization') == f'Bearer {repo.token}'

    def _model_info(self, handler, parts: List[str], query: Dict[str, List[str]], head: bool) -> None:
        repo, rest = self._find_repo(parts)
        if repo is None or not self._authorized(handler, repo):
            return self._error(handler, 401 if repo is not None else 404, 'RepoNotFound', head)
        if rest and (rest[0] != 'revision' or len(rest) < 2 or rest[1] not in ('main', repo.commit)):
            return self._error(handler, 404, 'RevisionNotFound', head)
        blobs = query.get('blobs', ['false'])[0].lower() == 'true'
        info = {
            'id': repo.repo_id,
            'author': repo.repo_id.split('/')[0],
            'sha': repo.commit,
            'private': False,
            'cardData': {'license': 'mit'},
            'siblings': [repo.sibling(name, blobs) for name in sorted(repo.files)],
        }
        self._send(handler, 200, json.dumps(info).encode(), {'Content-Type': 'application/json'}, head=head)


# ----------------------------------------------------------------------------------------------------------------
# Repo builders: tiny InternImage checkpoints in the published formats.

def tiny_case(name: str = 'tiny_t', num_classes: int = 1000):
    """``(model_kwargs, official_state_dict)`` for a golden tiny case with an ``num_classes``-way head.

    Weights follow the reference rule (``golden.official_weight``); only the head shape changes.
    """
    from golden import GOLDEN_DIR, official_weight
    case = json.loads((GOLDEN_DIR / f'{name}.json').read_text())
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in case['config'].items() if k != 'num_classes'}
    kwargs['num_classes'] = num_classes
    state_dict = {}
    for key, shape in case['state_dict_keys'].items():
        if key in ('head.weight', 'head.bias'):
            shape = [num_classes] + list(shape[1:])
        state_dict[key] = official_weight(key, list(shape), case['weight_seed'])
    return kwargs, state_dict


def hf_format(official_state_dict):
    """The transformers remote-code layout: ``model.`` prefix and ``gamma1/2`` -> ``layer_scale1/2``."""
    out = {}
    for key, value in official_state_dict.items():
        key = key.replace('.gamma1', '.layer_scale1').replace('.gamma2', '.layer_scale2')
        out['model.' + key] = value
    return out


def safetensors_bytes(state_dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in state_dict.items()}, metadata={'format': 'pt'})


def single_file_repo(state_dict, extra: Optional[Dict[str, bytes]] = None) -> Dict[str, bytes]:
    files = {'model.safetensors': safetensors_bytes(state_dict), 'config.json': b'{"model_type": "intern_image"}'}
    files.update(extra or {})
    return files


def sharded_repo(state_dict, num_shards: int = 3) -> Dict[str, bytes]:
    """``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``, as transformers writes."""
    keys = list(state_dict)
    per_shard = -(-len(keys) // num_shards)
    files, weight_map, total = {}, {}, 0
    for i in range(num_shards):
        name = f'model-{i + 1:05d}-of-{num_shards:05d}.safetensors'
        part = {k: state_dict[k] for k in keys[i * per_shard:(i + 1) * per_shard]}
        files[name] = safetensors_bytes(part)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
    files['model.safetensors.index.json'] = json.dumps(index, indent=2).encode()
    files['config.json'] = b'{"model_type": "intern_image"}'
    return files
