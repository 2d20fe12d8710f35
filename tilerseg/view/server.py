"""Start the viewer: bind the socket first (a busy ``--port`` is refused in
one line, port 0 takes a free one), then run uvicorn on it."""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from ..errors import InputError

log = logging.getLogger("tilerseg")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise InputError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise InputError(f"--port {port} is busy (another program listens there); pick another or leave "
                             "--port out for a free one") from None
        raise InputError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://{f'[{shown}]' if ':' in shown and not shown.startswith('[') else shown}:{port}/"


def _has_display() -> bool:
    """Whether a graphical browser can open here: on Linux only with a
    display (without one, Python's webbrowser may start a text browser in
    this terminal, in front of the server's output)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def check_port(port: int | None) -> int:
    """``--port``: 1..65535, or None for a free one (0 to the socket)."""
    if port is None:
        return 0
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: a port is 1..65535; leave --port out for a free one")
    return port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: a loopback
    address (127.0.0.0/8, ::1) or a name that resolves to loopback only."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def serve(view, *, host: str = "127.0.0.1", port: int | None = None, open_browser: bool = True, echo=print) -> None:
    """Serve ``view`` until interrupted (Ctrl-C, SIGTERM: a normal stop,
    said in one line); prints the URL on one line."""
    import uvicorn

    from .app import create_app

    try:
        sock = bind(host, check_port(port))
    except BaseException:
        view.close()
        raise
    if not is_loopback(host):
        log.warning("--host %s: the viewer is open to every machine that can reach this one, with the files "
                    "given here readable by anyone who finds the port; keep the default (127.0.0.1) and use an "
                    "SSH tunnel (ssh -L PORT:127.0.0.1:PORT host) unless that is what you want", host)
    url = url_of(sock, host)
    config = uvicorn.Config(create_app(view, host=host, port=sock.getsockname()[1]), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    echo(f"tilerseg view: {url} (Ctrl-C to stop)", flush=True)
    if open_browser and _has_display():
        import webbrowser

        webbrowser.open(url)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down, then raised the signal again: nothing was being written
        pass
    finally:
        sock.close()
        view.close()
    echo("tilerseg view: stopped", flush=True)
