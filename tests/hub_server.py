"""A small Hugging Face Hub stand-in for tests: the HTTP protocol the real huggingface_hub client speaks for
model repos (create, preupload, LFS batch + PUT, NDJSON commit, HEAD/GET resolve, model info, tree), kept in
memory and served on 127.0.0.1. Start it before huggingface_hub is imported, with HF_ENDPOINT pointing at it.
Files of LFS_SUFFIXES go the LFS way (set HF_HUB_DISABLE_XET=1), the rest inline in the commit."""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = ('.safetensors', '.bin', '.pth')


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else '0' * 40


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.Lock()


def _etag(data: bytes, path: str) -> str:
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):  # keep test output clean
        pass

    # -- helpers
    def _send(self, status: int, body: bytes = b'', headers: dict[str, str] | None = None,
              content_type: str = 'application/json') -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {'error': message}, {'X-Error-Code': code, 'X-Error-Message': message})

    def _body(self) -> bytes:
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _repo(self, repo_id: str) -> Repo | None:
        return self.state.repos.get(repo_id)

    # -- downloads
    def _resolve(self, path: str) -> None:
        # /{org}/{name}/resolve/{rev}/{file}
        parts = path.strip('/').split('/')
        repo_id, rev, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
        if rev not in ('main', repo.sha):
            return self._error(404, 'RevisionNotFound', f'Revision {rev} not found')
        if filename not in repo.files:
            return self._error(404, 'EntryNotFound', f'{filename} not found in {repo_id}')
        data = repo.files[filename]
        headers = {'X-Repo-Commit': repo.sha, 'ETag': f'"{_etag(data, filename)}"'}
        if filename.endswith(LFS_SUFFIXES):
            headers.update({'X-Linked-Etag': f'"{_etag(data, filename)}"', 'X-Linked-Size': str(len(data))})
        self._send(200, data, headers, content_type='application/octet-stream')

    def _model_info(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
        siblings = [{'rfilename': p} for p in sorted(repo.files)]
        self._json(200, {'id': repo_id, 'modelId': repo_id, 'sha': repo.sha, 'private': False,
                         'lastModified': '2024-01-01T00:00:00.000Z', 'siblings': siblings, 'tags': []})

    def _tree(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
        entries = []
        for p, data in sorted(repo.files.items()):
            entry = {'type': 'file', 'path': p, 'size': len(data), 'oid': _etag(data, p)}
            if p.endswith(LFS_SUFFIXES):
                entry['lfs'] = {'oid': hashlib.sha256(data).hexdigest(), 'size': len(data), 'pointerSize': 134}
            entries.append(entry)
        self._json(200, entries)

    def do_HEAD(self):
        path = unquote(urlparse(self.path).path)
        if '/resolve/' in path:
            return self._resolve(path)
        self._error(404, 'EntryNotFound', 'not found')

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        if path.startswith('/api/models/'):
            rest = path[len('/api/models/'):].split('/')
            repo_id = '/'.join(rest[:2])
            if len(rest) > 2 and rest[2] == 'tree':
                return self._tree(repo_id)
            return self._model_info(repo_id)
        if '/resolve/' in path:
            return self._resolve(path)
        self._error(404, 'EntryNotFound', 'not found')

    def do_PUT(self):
        path = unquote(urlparse(self.path).path)
        data = self._body()
        if path.startswith('/lfs-upload/'):
            oid = path.rsplit('/', 1)[-1]
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, 'BadRequest', 'sha256 mismatch')
            with self.state.lock:
                self.state.lfs_objects[oid] = data
            return self._send(200)
        self._error(404, 'EntryNotFound', 'not found')

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == '/api/repos/create':
            req = json.loads(body)
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self._error(409, 'RepoExists', 'You already created this model repo')
                self.state.repos[repo_id] = Repo()
            return self._json(200, {'url': f'http://{self.headers["Host"]}/{repo_id}', 'name': repo_id})
        if path == '/api/validate-yaml':
            return self._json(200, {'errors': [], 'warnings': []})
        if path.endswith('.git/info/lfs/objects/batch'):
            req = json.loads(body)
            host = self.headers['Host']
            objects = [{'oid': o['oid'], 'size': o['size'], 'authenticated': True,
                        'actions': {'upload': {'href': f'http://{host}/lfs-upload/{o["oid"]}'}}}
                       for o in req['objects'] if o['oid'] not in self.state.lfs_objects]
            objects += [{'oid': o['oid'], 'size': o['size']} for o in req['objects']
                        if o['oid'] in self.state.lfs_objects]
            return self._json(200, {'transfer': 'basic', 'objects': objects},
                              {'Content-Type': 'application/vnd.git-lfs+json'})
        if path.startswith('/api/models/'):
            rest = path[len('/api/models/'):].split('/')
            repo_id, action = '/'.join(rest[:2]), rest[2]
            repo = self._repo(repo_id)
            if repo is None:
                return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
            if action == 'preupload':
                files = json.loads(body)['files']
                return self._json(200, {'files': [
                    {'path': f['path'], 'uploadMode': 'lfs' if f['path'].endswith(LFS_SUFFIXES) else 'regular',
                     'shouldIgnore': False, 'oid': None} for f in files]})
            if action == 'commit':
                return self._commit(repo_id, repo, body)
        self._error(404, 'EntryNotFound', 'not found')

    def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
        staged: dict[str, bytes | None] = {}
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item['key'], item.get('value', {})
            if key == 'file':
                staged[value['path']] = base64.b64decode(value['content'])
            elif key == 'lfsFile':
                data = self.state.lfs_objects.get(value['oid'])
                if data is None:
                    return self._error(400, 'BadRequest', f"LFS object {value['oid']} was never uploaded")
                staged[value['path']] = data
            elif key == 'deletedFile':
                staged[value['path']] = None
        with self.state.lock:
            for p, data in staged.items():
                if data is None:
                    repo.files.pop(p, None)
                else:
                    repo.files[p] = data
            sha = hashlib.sha1(f'{repo_id}{len(repo.commits)}{sorted(staged)}'.encode()).hexdigest()
            repo.commits.append(sha)
        host = self.headers['Host']
        self._json(200, {'commitOid': sha, 'commitUrl': f'http://{host}/{repo_id}/commit/{sha}',
                         'success': True, 'commitMessage': 'ok'})


class HubServer:
    """``with HubServer() as hub:`` serves on 127.0.0.1 at ``hub.url`` until the block ends."""

    def __init__(self):
        self.state = HubState()
        handler = type('Handler', (_Handler,), {'state': self.state})
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_files(self, repo_id: str, files: dict[str, bytes]) -> None:
        """Put files straight into a repo (created if needed), as one commit."""
        with self.state.lock:
            repo = self.state.repos.setdefault(repo_id, Repo())
            repo.files.update(files)
            repo.commits.append(hashlib.sha1(f'{repo_id}{len(repo.commits)}'.encode() + b''.join(
                hashlib.sha256(d).digest() for d in files.values())).hexdigest())

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
