"""A local stand-in for the Hugging Face Hub (there is no Hub on this machine).

It serves one model folder under a repo id with the two endpoints the real
``huggingface_hub`` client uses to download: the model-info API and
``/{repo}/resolve/{revision}/{file}`` with the Hub's headers. The client code
under test (``huggingface_hub.snapshot_download``) is the real one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class LocalHub:
    def __init__(self, repo_id: str, files: dict[str, bytes], commit: str = "c" * 40):
        self.repo_id, self.files, self.commit = repo_id, files, commit
        self.requests: list[str] = []
        self.gated: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                if any(g in path for g in hub.gated):  # what the Hub answers without an accepted license
                    return self._send(b'{"error": "gated"}', "application/json", body, status=401, extra={
                        "X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."})
                info = f"/api/models/{hub.repo_id}"
                if path in (info, f"{info}/revision/main", f"{info}/revision/{hub.commit}"):
                    return self._send(json.dumps(hub.info()).encode(), "application/json", body)
                if path.startswith(f"{info}/tree/"):  # the file listing snapshot_download asks for
                    tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for n, d in sorted(hub.files.items())]
                    return self._send(json.dumps(tree).encode(), "application/json", body)
                prefix = f"/{hub.repo_id}/resolve/"
                if path.startswith(prefix):
                    rev, _, name = path[len(prefix):].partition("/")
                    if rev in ("main", hub.commit) and name in hub.files:
                        data = hub.files[name]
                        return self._send(data, "application/octet-stream", body, {
                            "X-Repo-Commit": hub.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
                self._send(json.dumps({"error": "not found"}).encode(), "application/json", body, status=404,
                           extra={"X-Error-Code": "RepoNotFound" if hub.repo_id not in path else "EntryNotFound"})

            def _send(self, data: bytes, ctype: str, body: bool, extra: dict | None = None, status: int = 200):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @classmethod
    def of_folder(cls, repo_id: str, folder: str | Path, extra: dict[str, bytes] | None = None) -> LocalHub:
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return cls(repo_id, {**files, **(extra or {})})

    def info(self) -> dict:
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "private": False,
                "siblings": [{"rfilename": n, "size": len(d)} for n, d in sorted(self.files.items())]}

    def close(self) -> None:
        self.server.shutdown()
