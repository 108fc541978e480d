"""A stand-in for the Hugging Face Hub HTTP API on 127.0.0.1: what huggingface_hub, transformers and peft ask.

Model repos only. Uploads are answered with uploadMode "regular", so files travel inside the commit payload
(no LFS, no xet). Every request is recorded in `hub.requests` as (method, path, token) for the tests to read.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_standin_write_token_0123456789"
USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file, what the Hub reports as its oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The commit a branch name (only `main`) or a commit sha points at."""
        if revision == "main":
            return self.commits[-1]
        return next((commit for commit in self.commits if commit[0] == revision), None)

    def commit(self, files: dict[str, bytes], summary: str) -> str:
        parent = self.commits[-1][0] if self.commits else ""
        digest = hashlib.sha1(f"{parent}\n{summary}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}:{git_blob_sha1(files[path])}\n".encode())
        self.commits.append((digest.hexdigest(), files))
        return digest.hexdigest()


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to its exception classes."""

    def __init__(self, status: int, message: str, code: str | None = None, **fields):
        super().__init__(message)
        self.status, self.code, self.fields = status, code, fields


class StandInHub:
    """The server and its state; `start()` serves it from a background thread, `url` is its HF_ENDPOINT."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.unrouted: list[tuple[str, str]] = []  # requests for an endpoint the stand-in does not have
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", self.model_info),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", self.preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", self.commit),
            ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", self.tree),
            ("POST", rf"/api/models/{REPO}/paths-info/(?P<revision>[^/]+)", self.paths_info),
            ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self.resolve),
            ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self.resolve),
        ]

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "StandInHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision, for the tests to inspect."""
        return self.repos[repo_id].snapshot(revision)[1]

    # --- access -----------------------------------------------------------------------------------------------

    def _require_write(self, request) -> None:
        if request.token != self.token:
            raise HubError(401, "Invalid username or password.")

    def _readable(self, request, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and request.token != self.token):
            raise HubError(401, "Repository not found", "RepoNotFound")  # the Hub hides private repos this way
        return repo

    def _snapshot(self, request, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        snapshot = self._readable(request, repo_id).snapshot(revision)
        if snapshot is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return snapshot

    # --- endpoints (each returns (status, headers, body)) -----------------------------------------------------

    def whoami(self, request):
        self._require_write(request)
        return _json({"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, request):
        self._require_write(request)
        payload = request.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "the stand-in Hub serves model repos only")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = Repo(private=payload.get("visibility", "private" if payload.get("private") else "public") != "public")
        repo.commit({".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[repo_id] = repo
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, request):
        content = request.json()["content"]
        match = re.match(r"---\n(.*?)\n---", content, re.S)
        try:
            yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as error:
            return _json({"errors": [{"message": str(error)}], "warnings": []}, status=400)
        return _json({"errors": [], "warnings": []})

    def model_info(self, request, repo, revision=None):
        sha, files = self._snapshot(request, repo, revision or "main")
        card = _card_metadata(files.get("README.md", b""))
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return _json({
            "_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
            "private": self.repos[repo].private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "lastModified": now, "createdAt": now, "tags": card.get("tags", []), "cardData": card,
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
            "siblings": [{"rfilename": path, "size": len(content)} for path, content in sorted(files.items())],
        })

    def preupload(self, request, repo, revision):
        self._require_write(request)
        _, files = self._snapshot(request, repo, revision)
        answers = [
            {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(files[item["path"]]) if item["path"] in files else None}
            for item in request.json()["files"]
        ]
        return _json({"files": answers, "commitOid": self.repos[repo].snapshot(revision)[0]})

    def commit(self, request, repo, revision):
        self._require_write(request)
        _, files = self._snapshot(request, repo, revision)
        files, summary = dict(files), ""
        for line in request.body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(422, f"the stand-in Hub takes files inline only, not {key!r}")
        sha = self.repos[repo].commit(files, summary)
        return _json({"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def tree(self, request, repo, revision, path=None):
        _, files = self._snapshot(request, repo, revision)
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        entries = _tree_entries(files, prefix, recursive)
        if path and not entries:
            raise HubError(404, f"{path} does not exist on main", "EntryNotFound")
        return _json(entries)

    def paths_info(self, request, repo, revision):
        _, files = self._snapshot(request, repo, revision)
        wanted = parse_qs(request.body.decode()).get("paths", [])
        entries = _tree_entries(files, "", recursive=True)
        return _json([entry for entry in entries if entry["path"] in wanted])

    def resolve(self, request, repo, revision, path):
        sha, files = self._snapshot(request, repo, revision)
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound")
        content = files[path]
        headers = {"ETag": f'"{git_blob_sha1(content)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        return _ranged(200, headers, content, request.headers.get("Range"))


# --- helpers ------------------------------------------------------------------------------------------------


def _json(value, status: int = 200):
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _ranged(status, headers, content: bytes, range_header: str | None):
    """Serve `Range: bytes=a-b` (the client resumes downloads with it)."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
    if not match:
        return status, headers, content
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else len(content) - 1
    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(content)}"}
    return 206, headers, content[start : end + 1]


def _tree_entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """Files and folders under `prefix`, as the tree API lists them."""
    entries, folders = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folders.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_sha1(files[path])})
    folder_entries = [{"type": "directory", "path": f, "size": 0, "oid": git_blob_sha1(f.encode())} for f in folders]
    return sorted(folder_entries, key=lambda e: e["path"]) + entries


def _card_metadata(readme: bytes) -> dict:
    match = re.match(r"---\n(.*?)\n---", readme.decode(errors="replace"), re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


@dataclass
class _Request:
    headers: dict
    query: dict
    body: bytes
    token: str | None

    def json(self):
        return json.loads(self.body or b"{}")


def _handler_for(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            authorization = self.headers.get("Authorization") or ""
            token = authorization.removeprefix("Bearer ") or None
            request = _Request(dict(self.headers), parse_qs(url.query), body, token)
            with hub.lock:
                hub.requests.append((self.command, url.path, token))
                status, headers, content = self._answer(request, url.path)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(content))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        def _answer(self, request, path):
            for method, pattern, endpoint in hub.routes:
                match = re.fullmatch(pattern, path)
                if method == self.command and match:
                    arguments = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    try:
                        return endpoint(request, **arguments)
                    except HubError as error:
                        headers = {"Content-Type": "application/json", "X-Error-Message": str(error)}
                        if error.code:
                            headers["X-Error-Code"] = error.code
                        return error.status, headers, json.dumps({"error": str(error), **error.fields}).encode()
            hub.unrouted.append((self.command, path))
            return 404, {"Content-Type": "application/json"}, b'{"error": "not served by the stand-in Hub"}'

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve

        def log_message(self, *args):
            pass

    return Handler
