"""Real servers on 127.0.0.1 for the remote-input tests.

:class:`RangeServer`: an HTTP/1.1 file server with single-range requests,
ETag and Last-Modified, that counts the bytes it sends. Some path prefixes
make it misbehave as real servers do:

* ``/noranges/NAME``: ignores ``Range`` (answers 200 with the whole file);
* ``/forbidden/NAME``: 403;
* ``/signed/NAME?token=SECRET``: 403 without the right token (a pre-signed URL);
* ``/auth/NAME``: basic authentication ``user:SECRET``, else 401;
* ``/truncated/NAME``: the file cut to half its size.

:func:`moto_server`: moto's standalone S3 server from a venv of its own
(moto[server] needs a botocore newer than s3fs's aiobotocore pins), created
on first use under ``~/.cache/tilerseg-tests`` (``TILERSEG_MOTO_VENV``).
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SECRET = "s3cr3t-t0ken"


class RangeServer:
    """Serve ``root`` on 127.0.0.1 (a free port) until :meth:`stop`."""

    def __init__(self, root: str):
        self.root, self.sent, self.requests = root, 0, 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head: bool):
                with server._lock:
                    server.requests += 1
                url = urlsplit(self.path)
                parts = url.path.lstrip("/").split("/", 1)
                mode = parts[0] if len(parts) == 2 and parts[0] in (
                    "noranges", "forbidden", "signed", "auth", "truncated") else ""
                name = parts[1] if mode else url.path.lstrip("/")
                if mode == "forbidden" or (mode == "signed" and parse_qs(url.query).get("token") != [SECRET]):
                    return self._status(403)
                if mode == "auth":
                    want = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()
                    if self.headers.get("Authorization") != want:
                        return self._status(401)
                path = os.path.join(server.root, name)
                if not os.path.isfile(path):
                    return self._status(404)
                st = os.stat(path)
                size = st.st_size // 2 if mode == "truncated" else st.st_size
                rng = self.headers.get("Range")
                start, end, code = 0, size, 200
                if rng and mode != "noranges" and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a) if a else max(0, size - int(b))
                    end = min(size, int(b) + 1) if a and b else size
                    if start >= size:
                        return self._status(416)
                    code = 206
                with open(path, "rb") as f:  # only the bytes asked for
                    f.seek(start)
                    body = f.read(end - start) if not head else b""
                    length = end - start
                self.send_response(code)
                self.send_header("Content-Length", str(length))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", '"' + hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest() + '"')
                self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
                if mode != "noranges":
                    self.send_header("Accept-Ranges", "bytes")
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                    with server._lock:
                        server.sent += len(body)

            def _status(self, code: int):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.sent = self.requests = 0

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def moto_venv() -> str:
    """The python of a venv holding moto[server], made once (serialised by a lock file)."""
    import fcntl

    root = os.environ.get("TILERSEG_MOTO_VENV") or os.path.expanduser("~/.cache/tilerseg-tests/moto-venv")
    py = os.path.join(root, "bin", "python")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ok = os.path.exists(py) and subprocess.run([py, "-c", "import moto.server, flask"],
                                                   capture_output=True).returncode == 0
        if not ok:
            subprocess.run([sys.executable, "-m", "venv", "--clear", root], check=True)
            subprocess.run([py, "-m", "pip", "install", "-q", "moto[server]>=5"], check=True, timeout=900)
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server on 127.0.0.1; :attr:`endpoint` is its URL."""

    def __init__(self, auth: bool = False):
        """``auth``: moto checks every request's credentials against its IAM
        (none exist, so any key is refused: 403 InvalidAccessKeyId)."""
        py = moto_venv()
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0") if auth else None
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto server exited at start")
                time.sleep(0.2)
        raise RuntimeError("moto server did not start in 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
