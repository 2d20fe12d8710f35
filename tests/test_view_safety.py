"""tilerseg view against what a hostile page or a damaged file sends it: a
``Host`` that is not the viewer's (DNS rebinding), other origins, malformed
queries and files, a bad port. Real servers on 127.0.0.1 (uvicorn, as
``tilerseg view`` runs it) and raw HTTP, so that nothing is set for us."""
import http.client
import json
import socket

import pytest

pytest.importorskip("starlette")

import viewdata  # noqa: E402

pytestmark = pytest.mark.xdist_group("view")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return viewdata.slide_set(tmp_path_factory.mktemp("viewsafe"))


@pytest.fixture(scope="module")
def url(slide):
    yield from viewdata.serve([slide["image"], slide["ome"], slide["geojson"]])


def _get(url: str, path: str, host: str | None = None, headers: dict | None = None, method: str = "GET"):
    """``(status, headers, body)`` of one raw request to the server at ``url``, ``Host`` as given."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


PATHS = ["/", "/api/info", "/tiles/1/11/0_0?hide=0", "/tiles/0/11/0_0", "/static/viewer.js",
         "/api/point?x=10&y=10", "/api/features/2?x0=0&y0=0&x1=500&y1=500", "/api/properties/2/0"]


@pytest.mark.parametrize("path", PATHS)
def test_the_viewers_own_addresses_are_served(url, path):
    p = _port(url)
    for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}", f"LOCALHOST:{p}"):
        status, _, _ = _get(url, path, host)
        assert status == 200, (host, path, status)


@pytest.mark.parametrize("path", PATHS)
def test_another_host_is_refused_on_every_url(url, path):
    """A page of evil.example whose name now resolves to 127.0.0.1 sends
    ``Host: evil.example:PORT``: nothing of the slide may come back."""
    p = _port(url)
    for host in (f"evil.example:{p}", "evil.example", f"127.0.0.1.evil.example:{p}", f"127.0.0.1:{p + 1}",
                 f"localhost:{p}0", f"[::2]:{p}", "", f"127.0.0.1:{p}@evil.example", "127.0.0.1", None):
        status, headers, body = _get(url, path, host)
        assert status == 400, (host, path, status)
        assert len(body) < 400 and b"\n" not in body.strip() and b"Traceback" not in body, body
        assert "access-control-allow-origin" not in headers


def test_a_refused_port_says_which_address_to_open(url):
    p = _port(url)
    status, _, body = _get(url, "/", f"localhost:{p + 1}")
    assert status == 400 and f"http://127.0.0.1:{p}/".encode() in body and f"ssh -L {p}:".encode() in body


def test_no_cors_header_lets_another_origin_read(url):
    p = _port(url)
    for method, extra in (("GET", {}), ("OPTIONS", {"Access-Control-Request-Method": "GET"})):
        status, headers, _ = _get(url, "/api/info", f"127.0.0.1:{p}", {"Origin": "http://evil.example", **extra},
                                  method)
        assert not any(k.startswith("access-control-") for k in headers), (method, headers)
        assert method == "GET" and status == 200 or status in (400, 405)


def test_every_address_also_answers_to_this_machines_name(slide):
    name = socket.gethostname()
    for url in viewdata.serve([slide["image"]], host="0.0.0.0"):
        p = _port(url)
        assert _get(url, "/api/info", f"{name}:{p}")[0] == 200
        assert _get(url, "/api/info", f"127.0.0.1:{p}")[0] == 200
        assert _get(url, "/api/info", f"evil.example:{p}")[0] == 400


def test_a_path_escape_is_still_404_with_the_right_host(url):
    p = _port(url)
    for path in ("/static/..%2F__init__.py", "/static/%2e%2e%2fapp.py", "/etc/passwd", "/tiles/9/0/0_0"):
        assert _get(url, path, f"127.0.0.1:{p}")[0] == 404, path
