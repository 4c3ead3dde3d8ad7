"""A small in-memory Hugging Face Hub on 127.0.0.1: the part of the API that huggingface_hub's client uses to
create repos, upload (regular and LFS "basic" transfer), list and download files. Used with HF_ENDPOINT, so the
real client runs unpatched."""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Store:
    def __init__(self):
        self.repos = {}  # repo_id -> {'branches': {name: sha}, 'commits': {sha: {path: bytes}}}
        self.lfs = {}  # oid -> bytes
        self.lock = threading.Lock()
        self.requests = []

    def create(self, repo_id):
        if repo_id in self.repos:
            return False
        sha = hashlib.sha1(f'init-{repo_id}'.encode()).hexdigest()
        self.repos[repo_id] = {'branches': {'main': sha}, 'commits': {sha: {}}}
        return True

    def files(self, repo_id, rev):
        repo = self.repos[repo_id]
        sha = repo['branches'].get(rev, rev if rev in repo['commits'] else None)
        return (sha, repo['commits'][sha]) if sha else (None, None)


def make_handler(store: Store):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args):
            pass

        def _send(self, code, body=b'', headers=None, content_type='application/json'):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(code)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

        def _not_found(self, code):
            self._send(404, {'error': code}, {'X-Error-Code': code, 'X-Error-Message': code})

        def _body(self):
            n = int(self.headers.get('Content-Length') or 0)
            return self.rfile.read(n) if n else b''

        def _base(self):
            return f'http://{self.headers["Host"]}'

        def _split_api(self, parts):
            """/api/models/{org}/{name}/{action}/{rev...} -> repo_id, action, rest"""
            repo_id = '/'.join(parts[2:4])
            return repo_id, (parts[4] if len(parts) > 4 else ''), '/'.join(parts[5:])

        def do_POST(self):
            store.requests.append(('POST', self.path))
            if store.reject_tokens:  # a Hub that refuses the token (bad or expired)
                return self._send(401, {'error': 'Invalid credentials in Authorization header'})
            path = unquote(urlparse(self.path).path)
            parts = path.strip('/').split('/')
            body = self._body()
            with store.lock:
                if path == '/api/repos/create':
                    data = json.loads(body)
                    repo_id = data['name'] if not data.get('organization') else f'{data["organization"]}/{data["name"]}'
                    url = f'{self._base()}/{repo_id}'
                    created = store.create(repo_id)
                    return self._send(200 if created else 409, {'url': url, 'name': repo_id, 'id': repo_id,
                                                                **({} if created else {'error': 'exists'})})
                if path == '/api/validate-yaml':
                    return self._send(200, {'errors': [], 'warnings': []})
                if path.endswith('.git/info/lfs/objects/batch'):
                    data = json.loads(body)
                    objects = []
                    for obj in data['objects']:
                        entry = {'oid': obj['oid'], 'size': obj['size']}
                        if obj['oid'] not in store.lfs:
                            entry['actions'] = {'upload': {'href': f'{self._base()}/_lfs/{obj["oid"]}'}}
                        objects.append(entry)
                    return self._send(200, {'transfer': 'basic', 'objects': objects},
                                      content_type='application/vnd.git-lfs+json')
                if parts[:2] == ['api', 'models']:
                    repo_id, action, rest = self._split_api(parts)
                    if repo_id not in store.repos:
                        return self._not_found('RepoNotFound')
                    if action == 'preupload':
                        files = json.loads(body)['files']
                        return self._send(200, {'files': [{'path': f['path'], 'uploadMode': 'lfs' if
                                                           f['path'].endswith('.safetensors') else 'regular',
                                                           'shouldIgnore': False} for f in files]})
                    if action == 'branch':
                        repo = store.repos[repo_id]
                        if rest not in repo['branches']:
                            repo['branches'][rest] = repo['branches']['main']
                        return self._send(200, {})
                    if action == 'commit':
                        rev = rest or 'main'
                        repo = store.repos[repo_id]
                        if rev not in repo['branches']:
                            return self._not_found('RevisionNotFound')
                        files = dict(repo['commits'][repo['branches'][rev]])
                        summary = ''
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            key, value = item['key'], item['value']
                            if key == 'header':
                                summary = value.get('summary', '')
                            elif key == 'file':
                                files[value['path']] = base64.b64decode(value['content'])
                            elif key == 'lfsFile':
                                files[value['path']] = store.lfs[value['oid']]
                            elif key == 'deletedFile':
                                files.pop(value['path'], None)
                        sha = hashlib.sha1((summary + str(len(repo['commits'])) + repo_id).encode()).hexdigest()
                        repo['commits'][sha] = files
                        repo['branches'][rev] = sha
                        return self._send(200, {'commitUrl': f'{self._base()}/{repo_id}/commit/{sha}',
                                                'commitOid': sha, 'success': True})
            self._send(404, {'error': f'unhandled POST {path}'})

        def do_PUT(self):
            store.requests.append(('PUT', self.path))
            path = urlparse(self.path).path
            body = self._body()
            if path.startswith('/_lfs/'):
                oid = path.rsplit('/', 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._send(400, {'error': 'oid mismatch'})
                store.lfs[oid] = body
                return self._send(200, {})
            self._send(404, {'error': f'unhandled PUT {path}'})

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            store.requests.append((self.command, self.path))
            path = unquote(urlparse(self.path).path)
            parts = path.strip('/').split('/')
            if parts[:2] == ['api', 'models']:
                repo_id, action, rest = self._split_api(parts)
                if repo_id not in store.repos:
                    return self._not_found('RepoNotFound')
                rev = rest.split('/')[0] if action in ('revision', 'tree') and rest else 'main'
                sha, files = store.files(repo_id, rev)
                if sha is None:
                    return self._not_found('RevisionNotFound')
                if action == 'tree':
                    return self._send(200, [{'type': 'file', 'path': p, 'size': len(b),
                                             'oid': hashlib.sha1(b).hexdigest()} for p, b in sorted(files.items())])
                return self._send(200, {'id': repo_id, 'modelId': repo_id, 'sha': sha, 'private': False,
                                        'siblings': [{'rfilename': p} for p in sorted(files)], 'tags': []})
            if len(parts) >= 5 and parts[2] == 'resolve':
                repo_id, rev, file_path = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
                if repo_id not in store.repos:
                    return self._not_found('RepoNotFound')
                sha, files = store.files(repo_id, rev)
                if sha is None:
                    return self._not_found('RevisionNotFound')
                if file_path not in files:
                    return self._not_found('EntryNotFound')
                data = files[file_path]
                headers = {'X-Repo-Commit': sha, 'ETag': f'"{hashlib.sha1(data).hexdigest()}"'}
                if file_path.endswith('.safetensors'):
                    headers.update({'X-Linked-Etag': f'"{hashlib.sha256(data).hexdigest()}"',
                                    'X-Linked-Size': str(len(data))})
                return self._send(200, data, headers, content_type='application/octet-stream')
            self._send(404, {'error': f'unhandled GET {path}'})

    return Handler


class HubServer:
    def __init__(self):
        self.store = Store()
        self.store.reject_tokens = False
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), make_handler(self.store))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == '__main__':  # manual use: python tests/hub_server.py
    import time
    with HubServer() as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)
