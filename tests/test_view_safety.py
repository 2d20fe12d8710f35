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
    address, port = url.rstrip("/").split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(address.strip("[]"), int(port), timeout=20)
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


def _started(*paths):
    """``(process, url)`` of ``tilerseg view PATHS`` as a user starts it (its stderr is the oracle)."""
    from conftest import cli_process

    p = cli_process("view", *paths, "--no-browser")
    line = p.stdout.readline()
    assert line.startswith("tilerseg view: http://127.0.0.1:"), (line, p.stderr.read() if p.poll() else "")
    return p, line.split()[2]


def _stopped(p) -> str:
    """The process's stderr once it has been stopped."""
    p.terminate()
    try:
        return p.communicate(timeout=20)[1]
    finally:
        p.kill() if p.poll() is None else None


BAD = ["/api/features/2?x0=nan&y0=0&x1=500&y1=500", "/api/features/2?x0=0&y0=-inf&x1=500&y1=500",
       "/api/features/2?x0=0&y0=0&x1=inf&y1=500", "/api/features/2?x0=0&y0=0&x1=1e400&y1=500",
       "/api/features/2?x0=0&y0=0&x1=1e300&y1=500", "/api/features/2?x0=0&y0=0&x1=5&y1=5&limit=nan",
       "/api/features/2?x0=0&y0=0&x1=5&y1=5&limit=" + "9" * 5000, "/api/features/2?x0=0&y0=0&x1=5",
       "/api/features/" + "7" * 5000 + "?x0=0&y0=0&x1=5&y1=5", "/api/properties/" + "2" * 5000 + "/1",
       "/api/properties/2/" + "1" * 5000, "/api/properties/2/1.5", "/tiles/" + "1" * 5000 + "/0/0_0",
       "/tiles/1/" + "1" * 5000 + "/0_0", "/tiles/1/11/0_" + "9" * 5000, "/tiles/1/11/0_0?hide=" + "1" * 5000,
       "/tiles/1/11/0_0?band=nan", "/tiles/1/11/0_0?band=" + "9" * 5000, "/api/point?x=nan&y=3",
       "/api/point?x=inf&y=3", "/api/point?x=1&y=" + "9" * 5000, "/api/point?x=1"]


def test_malformed_queries_are_400_in_one_line_never_a_traceback(slide):
    p, url = _started(slide["image"], slide["ome"], slide["geojson"])
    host = f"127.0.0.1:{_port(url)}"
    try:
        for path in BAD:
            status, _, body = _get(url, path, host)
            assert status == 400 and b"\n" not in body.strip() and len(body) < 300, (path[:80], status, body[:200])
        assert _get(url, "/api/info", host)[0] == 200  # and the server still serves
    finally:
        err = _stopped(p)
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]


def _mixed_geojson(path, image_w: int) -> list:
    """A GeoJSON of polygons among other geometries, with the ids a user gave
    them (not their positions); returns the polygons' ids, in file order."""
    sq = lambda x, y, s=20: [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]  # noqa: E731
    feats = [({"type": "Polygon", "coordinates": sq(10, 10)}, 101),
             ({"type": "Point", "coordinates": [5, 5]}, 102),
             ({"type": "MultiPolygon", "coordinates": [sq(50, 50), sq(90, 50)]}, 103),
             ({"type": "LineString", "coordinates": [[0, 0], [9, 9]]}, 104),
             (None, 105),
             ({"type": "Polygon", "coordinates": []}, 106),
             ({"type": "Polygon", "coordinates": [[[0, 0], [1e308, 0], [0, 5], [0, 0]]]}, 107),
             ({"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [1, 1]},
                                                           {"type": "Polygon", "coordinates": sq(200, 200)}]}, 108),
             ({"type": "Polygon", "coordinates": sq(300, 300)}, 109),
             ({"type": "Point", "coordinates": [7, 7]}, 110)]  # a Point last: the case that ended in reduceat
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": i, "geometry": g, "properties": {"class": 1, "name": f"n{i}"}} for g, i in feats]}
    with open(path, "w") as f:
        json.dump(fc, f)
    return [101, 103, 108, 109]


def test_a_geojson_of_mixed_geometries_loads_its_polygons_and_counts_the_rest(slide, tmp_path, caplog):
    from tilerseg.view import open_view

    path = tmp_path / "mixed.geojson"
    want = _mixed_geojson(path, 1300)
    with caplog.at_level("WARNING", logger="tilerseg"):
        view = open_view([slide["image"], str(path)])
    try:
        layer = view.layers[0]
        assert layer.count == len(want)
        skipped = view.info()["layers"][0]["skipped"]
        assert sum(skipped.values()) == 6 and skipped["Point"] == 2 and skipped["LineString"] == 1, skipped
        assert any("skipped 6 features" in r.getMessage() for r in caplog.records)
        ids, total = layer.query(0, 0, 1300, 1100, 100)
        feats = layer.features(ids)
        assert total == 4 and [f[3] for f in feats] == want  # each polygon by its own id
        assert [len(f[2]) for f in feats] == [1, 2, 1, 1]
    finally:
        view.close()


def _tiles(url, host, layer: int, info: dict) -> dict:
    """Status of every tile of layer ``layer`` at every level: {status: count}."""
    L = info["image"] if layer == 0 else info["layers"][layer - 1]
    out = {}
    for dz in range(L["minLevel"], L["maxLevel"] + 1):
        f = 2 ** (L["maxLevel"] - dz)
        h, w = -(-L["height"] // f), -(-L["width"] // f)
        for r in range(-(-h // 256)):
            for c in range(-(-w // 256)):
                status, _, body = _get(url, f"/tiles/{layer}/{dz}/{c}_{r}", host)
                out[status] = out.get(status, 0) + 1
                if status != 200:
                    assert status == 422 and b"damaged" in body and b"\n" not in body.strip(), (status, body)
    return out


def _truncated_slide(tmp_path) -> str:
    """A tiled, JPEG-compressed pyramidal TIFF cut at 60 %: some tiles are gone."""
    from tilerseg import synthetic

    whole = tmp_path / "whole.tif"
    synthetic.write_tiff(str(whole), (1500, 1700), levels=3, compression="jpeg", mpp=0.5)
    data = whole.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:len(data) * 6 // 10])
    return str(cut)


@pytest.mark.parametrize("which", ["corrupt", "truncated"])
def test_damaged_tiles_are_422_with_one_log_line_each_never_a_traceback(tmp_path, which):
    from conftest import data

    path = data("rasterio/corrupt.tif") if which == "corrupt" else _truncated_slide(tmp_path)
    p, url = _started(path)
    host = f"127.0.0.1:{_port(url)}"
    try:
        info = json.loads(_get(url, "/api/info", host)[2])
        first = _tiles(url, host, 0, info)
        again = _tiles(url, host, 0, info)  # the page asks again on every pan: no second log line
        assert first == again and first.get(422, 0) > 0 and first.get(200, 0) > 0 and set(first) == {200, 422}, first
    finally:
        err = _stopped(p)
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    damaged = [line for line in err.splitlines() if "could not decode" in line]
    assert 0 < len(damaged) <= first[422] and len(set(damaged)) == len(damaged), err[-2000:]


def test_a_truncated_svs_is_refused_at_start_in_one_line(tmp_path):
    from conftest import cli, data

    src = open(data("openslide/small.svs"), "rb").read()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(src[:1500])
    r = cli("view", str(cut), "--no-browser")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cut.svs" in r.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "0", "65536"])
def test_a_port_outside_1_to_65535_is_refused_naming_the_port(slide, port):
    from conftest import cli

    r = cli("view", slide["image"], "--port", port, "--no-browser")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"--port {port}: a port is 1..65535" in r.stderr, \
        r.stderr


def test_another_loopback_address_gets_no_open_to_every_machine_warning(slide):
    from conftest import cli_process

    p = cli_process("view", slide["image"], "--host", "127.0.0.2", "--no-browser")
    try:
        line = p.stdout.readline()
        assert line.startswith("tilerseg view: http://127.0.0.2:"), line
        assert _get(line.split()[2], "/api/info", line.split()[2][len("http://"):].rstrip("/"))[0] == 200
    finally:
        err = _stopped(p)
    assert "every machine" not in err, err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_stopping_the_viewer_says_so_not_runs_resume_advice(slide, sig):
    import signal

    p, url = _started(slide["image"])
    assert _get(url, "/api/info", f"127.0.0.1:{_port(url)}")[0] == 200
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, (p.returncode, err)
    assert "tilerseg view: stopped" in out and "--resume" not in err and "no output" not in err, (out, err)
    assert "Traceback" not in err, err


def test_the_readout_over_a_damaged_place_is_422_and_the_log_stays_short(tmp_path):
    """The cursor asks per pixel: 60 damaged pixels give 60 answers of 422
    but at most 20 log lines, the last saying that the rest are not logged."""
    from conftest import data

    p, url = _started(data("rasterio/corrupt.tif"))
    host = f"127.0.0.1:{_port(url)}"
    try:
        for k in range(60):
            status, _, body = _get(url, f"/api/point?x={800 + k}&y=900", host)
            assert status == 422 and b"could not decode" in body, (status, body[:200])
    finally:
        err = _stopped(p)
    lines = [line for line in err.splitlines() if "could not decode" in line]
    assert len(lines) == 20 and "further damaged places of this file are not logged" in lines[-1], err[-1500:]
    assert "Traceback" not in err
