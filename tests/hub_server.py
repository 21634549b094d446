"""A Hugging Face Hub-protocol server on 127.0.0.1 (port 0) for tests: the endpoints huggingface_hub and timm use.

In-memory git-like storage (commits, branches); files are always answered as `regular` uploads so the client never
switches to Xet. Commits are applied atomically after the whole request body parsed. Fault injection:
`fail_next_commits` (`fail_status`, 503 by default, on the next N commit requests), `fail_paths` (500 on any commit
touching those paths) and `corrupt_downloads` (those paths are served with their last byte flipped, while tree and
ETag report the stored bytes).
"""
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ['HubServer', 'git_blob_sha1', 'point_client_at', 'serve_patched']

_REPO = r'(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)'
_INITIAL_FILES = {'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    history: List[str] = field(default_factory=list)
    refs: Dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Optional[str]:
        return self.refs.get(rev) or (rev if rev in self.commits else None)

    def commit(self, branch: str, files: Dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(json.dumps([self.refs.get(branch), message, len(self.history),
                                       sorted((p, git_blob_sha1(d)) for p, d in files.items())]).encode()).hexdigest()
        self.commits[sha] = files
        self.history.append(sha)
        self.refs[branch] = sha
        return sha


class HubServer:
    """Start with `HubServer().start()`; `endpoint` is its base URL; `stop()` shuts it down."""

    def __init__(self, token: Optional[str] = None):
        self.token = token
        self.repos: Dict[Tuple[str, str], Repo] = {}
        self.fail_next_commits = 0
        self.fail_status = 503
        self.fail_paths: Set[str] = set()
        self.corrupt_downloads: Set[str] = set()
        self.commit_requests = 0
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self._httpd.server_address[1]}'

    def start(self) -> 'HubServer':
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def files(self, repo_id: str, rev: str = 'main', repo_type: str = 'model') -> Dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return dict(repo.commits[repo.resolve(rev)])

    def history(self, repo_id: str, repo_type: str = 'model') -> List[str]:
        return list(self.repos[(repo_type, repo_id)].history)


def _make_handler(hub: HubServer):

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        # --- plumbing
        def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
            self._send(status, json.dumps(obj).encode(), {'Content-Type': 'application/json', **(headers or {})})

        def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
            self._send(status, b'' if head else json.dumps({'error': message}).encode(),
                       {'Content-Type': 'application/json', 'X-Error-Code': code, 'X-Error-Message': message},
                       head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get('Content-Length') or 0))

        def _authorized(self) -> bool:
            return hub.token is None or self.headers.get('Authorization') == f'Bearer {hub.token}'

        def _repo(self, m) -> Optional[Repo]:
            return hub.repos.get((m['type'], m['repo']))

        # --- dispatch
        def do_GET(self) -> None:
            self._dispatch('GET')

        def do_HEAD(self) -> None:
            self._dispatch('HEAD')

        def do_POST(self) -> None:
            self._dispatch('POST')

        def do_DELETE(self) -> None:
            self._dispatch('DELETE')

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            hub.requests.append((method, url.path))
            path, query = url.path, parse_qs(url.query)
            for verb, pattern, fn in _ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method in verb:
                    if method == 'POST' or method == 'DELETE':
                        if not self._authorized():
                            self._body()
                            return self._error(401, 'Unauthorized', 'invalid or missing token')
                    return fn(self, m, method, query)
            self._error(404, 'NotFound', f'no route for {method} {path}', head=method == 'HEAD')

        # --- endpoints
        def whoami(self, m, method, query):
            if hub.token is not None and not self._authorized():
                return self._error(401, 'Unauthorized', 'invalid or missing token')
            self._json(200, {'type': 'user', 'name': 'tester', 'orgs': [], 'auth': {'type': 'access_token'}})

        def create_repo(self, m, method, query):
            req = json.loads(self._body() or b'{}')
            repo_type = req.get('type') or 'model'
            repo_id = f"{req['organization']}/{req['name']}" if req.get('organization') else req['name']
            url = f"{hub.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
            with hub.lock:
                if (repo_type, repo_id) in hub.repos:
                    return self._json(409, {'error': 'You already created this model repo', 'url': url})
                repo = Repo(private=bool(req.get('private')) or req.get('visibility') == 'private')
                repo.commit('main', dict(_INITIAL_FILES), 'initial commit')
                hub.repos[(repo_type, repo_id)] = repo
            self._json(200, {'url': url, 'name': repo_id})

        def delete_repo(self, m, method, query):
            req = json.loads(self._body() or b'{}')
            repo_id = f"{req['organization']}/{req['name']}" if req.get('organization') else req['name']
            hub.repos.pop((req.get('type') or 'model', repo_id), None)
            self._json(200, {})

        def validate_yaml(self, m, method, query):
            self._body()
            self._json(200, {'errors': [], 'warnings': []})

        def preupload(self, m, method, query):
            req = json.loads(self._body())
            repo = self._repo(m)
            if repo is None:
                return self._error(404, 'RepoNotFound', 'repository not found')
            sha = repo.resolve(unquote(m['rev']))
            current = repo.commits[sha] if sha else {}
            files = [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
                      'oid': git_blob_sha1(current[f['path']]) if f['path'] in current else None}
                     for f in req['files']]
            self._json(200, {'files': files, 'commitOid': sha})

        def commit(self, m, method, query):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            repo = self._repo(m)
            if repo is None:
                return self._error(404, 'RepoNotFound', 'repository not found')
            branch = unquote(m['rev'])
            with hub.lock:
                hub.commit_requests += 1
                if hub.fail_next_commits > 0:
                    hub.fail_next_commits -= 1
                    return self._error(hub.fail_status, 'InjectedFailure', 'injected failure')
                if branch not in repo.refs:
                    return self._error(404, 'RevisionNotFound', f'branch {branch} not found')
                files = dict(repo.commits[repo.refs[branch]])
                message = ''
                for line in lines:
                    key, value = line['key'], line['value']
                    if key == 'header':
                        message = value.get('summary', '')
                        parent = value.get('parentCommit')
                        if parent and parent != repo.refs[branch]:
                            return self._error(412, 'PreconditionFailed', 'parent commit is not the branch head')
                    elif key in ('file', 'lfsFile', 'deletedFile'):
                        if value['path'] in hub.fail_paths:
                            return self._error(500, 'InternalError', f"injected failure on {value['path']}")
                        if key == 'file':
                            files[value['path']] = base64.b64decode(value['content'])
                        elif key == 'deletedFile':
                            files.pop(value['path'], None)
                        else:
                            return self._error(400, 'BadRequest', 'this server only accepts regular uploads')
                    else:
                        return self._error(400, 'BadRequest', f'unsupported commit operation {key}')
                sha = repo.commit(branch, files, message)
            self._json(200, {'commitUrl': f"{hub.endpoint}/{m['repo']}/commit/{sha}", 'commitOid': sha,
                             'pullRequestUrl': None})

        def create_branch(self, m, method, query):
            req = json.loads(self._body() or b'{}')
            repo = self._repo(m)
            if repo is None:
                return self._error(404, 'RepoNotFound', 'repository not found')
            branch = unquote(m['branch'])
            with hub.lock:
                if branch in repo.refs:
                    return self._error(409, 'Conflict', f'branch {branch} already exists')
                start = repo.resolve(req.get('startingPoint') or 'main')
                repo.refs[branch] = start
            self._json(200, {})

        def repo_info(self, m, method, query):
            repo = self._repo(m)
            if repo is None:
                return self._error(404, 'RepoNotFound', 'repository not found')
            rev = unquote(m['rev']) if m['rev'] else 'main'
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, 'RevisionNotFound', f'revision {rev} not found')
            self._json(200, {'id': m['repo'], 'modelId': m['repo'], 'sha': sha, 'private': repo.private,
                             'author': m['repo'].split('/')[0], 'tags': [], 'downloads': 0, 'likes': 0,
                             'siblings': [{'rfilename': p} for p in sorted(repo.commits[sha])]})

        def tree(self, m, method, query):
            repo = self._repo(m)
            if repo is None:
                return self._error(404, 'RepoNotFound', 'repository not found')
            rest = m['rest'].split('/', 1)
            sha = repo.resolve(unquote(rest[0]))
            if sha is None:
                return self._error(404, 'RevisionNotFound', 'revision not found')
            prefix = unquote(rest[1]).strip('/') + '/' if len(rest) > 1 and rest[1] else ''
            recursive = query.get('recursive', ['false'])[0].lower() == 'true'
            entries, dirs = [], set()
            for path, data in sorted(repo.commits[sha].items()):
                if not path.startswith(prefix):
                    continue
                rel = path[len(prefix):]
                if '/' in rel and not recursive:
                    dirs.add(prefix + rel.split('/')[0])
                    continue
                entries.append({'type': 'file', 'path': path, 'size': len(data), 'oid': git_blob_sha1(data)})
            entries += [{'type': 'directory', 'path': d, 'oid': '0' * 40} for d in sorted(dirs)]
            self._json(200, entries)

        def refs(self, m, method, query):
            repo = self._repo(m)
            if repo is None:
                return self._error(404, 'RepoNotFound', 'repository not found')
            self._json(200, {'branches': [{'name': b, 'ref': f'refs/heads/{b}', 'targetCommit': s}
                                          for b, s in repo.refs.items()], 'tags': [], 'converts': []})

        def resolve(self, m, method, query):
            head = method == 'HEAD'
            repo = hub.repos.get((m['type'] or 'model', m['repo']))
            if repo is None or (repo.private and not self._authorized()):
                return self._error(404, 'RepoNotFound', 'repository not found', head=head)
            sha = repo.resolve(unquote(m['rev']))
            if sha is None:
                return self._error(404, 'RevisionNotFound', 'revision not found', head=head)
            data = repo.commits[sha].get(unquote(m['path']))
            if data is None:
                return self._error(404, 'EntryNotFound', 'entry not found', head=head)
            headers = {'X-Repo-Commit': sha, 'ETag': f'"{git_blob_sha1(data)}"',
                       'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes'}
            if unquote(m['path']) in hub.corrupt_downloads:
                data = data[:-1] + bytes([data[-1] ^ 1])
            rng = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range') or '')
            if rng and not head:
                start, end = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
                headers['Content-Range'] = f'bytes {start}-{end}/{len(data)}'
                return self._send(206, data[start:end + 1], headers)
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

    _ROUTES = [
        (('GET',), r'/api/whoami-v2', Handler.whoami),
        (('POST',), r'/api/repos/create', Handler.create_repo),
        (('DELETE',), r'/api/repos/delete', Handler.delete_repo),
        (('POST',), r'/api/validate-yaml', Handler.validate_yaml),
        (('POST',), rf'/api/{_REPO}/preupload/(?P<rev>[^/]+)', Handler.preupload),
        (('POST',), rf'/api/{_REPO}/commit/(?P<rev>[^/]+)', Handler.commit),
        (('POST',), rf'/api/{_REPO}/branch/(?P<branch>[^/]+)', Handler.create_branch),
        (('GET',), rf'/api/{_REPO}/tree/(?P<rest>.+)', Handler.tree),
        (('GET',), rf'/api/{_REPO}/refs', Handler.refs),
        (('GET',), rf'/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?', Handler.repo_info),
        (('GET', 'HEAD'), r'/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)',
         Handler.resolve),
    ]
    return Handler


def point_client_at(monkeypatch, endpoint: str, cache_dir) -> None:
    """Point the already imported huggingface_hub at `endpoint` (the three places its endpoint lives), online,
    with a fresh cache."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(hf_api.api, 'endpoint', endpoint)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache_dir))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)


def serve_patched(monkeypatch, cache_dir, token: str) -> HubServer:
    """Start a server, point huggingface_hub at it and put `token` in HF_TOKEN; stop it with `server.stop()`."""
    server = HubServer(token=token).start()
    point_client_at(monkeypatch, server.endpoint, cache_dir)
    monkeypatch.setenv('HF_TOKEN', token)
    return server
