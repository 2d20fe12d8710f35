"""Inputs by URL against real servers on 127.0.0.1: an HTTP range server
(tests/servers.py) and moto's standalone S3 server in a venv of its own.
Every test reads the same file locally and by URL and compares."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import data, textured_tiff
from servers import SECRET, MotoServer, RangeServer

FILES = ("cogeo.tif", "RGB.byte.tif", "small.svs", "tiled.tif", "pyramid.ome.tif")
BUCKET = "tilerseg-test"


def _ome_pyramid(path, shape=(1024, 768)) -> None:
    """A tiled pyramidal OME-TIFF (3 levels in SubIFDs) with a physical pixel size."""
    import tifffile

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        tif.write(img, subifds=2, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm",
                                            "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"}, **opts)
        for k in (2, 4):
            tif.write(img[::k, ::k], subfiletype=1, **opts)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("served")
    for name in ("cogeo.tif", "RGB.byte.tif"):
        shutil.copy(data(f"rasterio/{name}"), root / name)
    shutil.copy(data("openslide/small.svs"), root / "small.svs")
    textured_tiff(root / "tiled.tif", (1000, 1300), seed=1, periods=(37.0, 53.0), noise=30)
    _ome_pyramid(str(root / "pyramid.ome.tif"))
    import zarr

    z = zarr.create_array(str(root / "plain.zarr"), shape=(300, 260, 3), chunks=(128, 128, 3), dtype="uint16")
    z[:] = np.random.default_rng(5).integers(0, 4000, z.shape, dtype=np.uint16)
    return str(root)


@pytest.fixture(scope="module")
def http(files):
    srv = RangeServer(files)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3(files):
    """moto's S3 server holding FILES in a bucket; AWS_* set as a user would."""
    server = MotoServer()
    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=server.endpoint)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for name in FILES:
        fs.put_file(os.path.join(files, name), f"{BUCKET}/{name}")
    fs.put(os.path.join(files, "plain.zarr"), f"{BUCKET}/", recursive=True)
    yield server
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def _url(where: str, http, name: str) -> str:
    return f"{http.url}/{name}" if where == "http" else f"s3://{BUCKET}/{name}"


META = ("shape", "bands", "dtype", "crs", "transform", "nodata", "mpp", "levels", "level_mpp", "level")


@pytest.mark.parametrize("where", ["http", "s3"])
@pytest.mark.parametrize("name,level", [("cogeo.tif", 0), ("cogeo.tif", 2), ("RGB.byte.tif", 0), ("small.svs", 0),
                                        ("tiled.tif", 0), ("pyramid.ome.tif", 0), ("pyramid.ome.tif", 1),
                                        ("plain.zarr", 0)])
def test_a_url_reads_as_the_local_file(files, http, s3, where, name, level):
    from tilerseg.io.open import open_reader

    local = open_reader(os.path.join(files, name), level=level)
    url = open_reader(_url(where, http, name), level=level)
    if name == "small.svs":  # local slides go to openslide, remote ones to tifffile: the same pixels and scale
        assert type(local).__name__ == "SlideReader" and type(url).__name__ == "TiffReader"
    for field in META:
        assert getattr(url.meta, field) == getattr(local.meta, field), field
    H, W = local.meta.shape
    a, va = local.read((0, H), (0, W))
    b, vb = url.read((0, H), (0, W))
    np.testing.assert_array_equal(a, b)
    assert (va is None) == (vb is None) and (va is None or np.array_equal(va, vb))
    win = ((H // 3, min(H, H // 3 + 77)), (W // 4, min(W, W // 4 + 91)))  # a window off the tile grid
    np.testing.assert_array_equal(local.read(*win)[0], url.read(*win)[0])


@pytest.mark.slow
def test_a_run_by_url_writes_what_the_local_run_writes(files, http, s3, tmp_path, tiny_model_dir, capsys):
    import zarr

    from tilerseg import cli

    outs = {}
    for where, src in (("local", os.path.join(files, "tiled.tif")), ("http", f"{http.url}/tiled.tif"),
                       ("s3", f"s3://{BUCKET}/tiled.tif")):
        out = tmp_path / f"{where}.zarr"
        assert cli.main(["run", src, "--weights", tiny_model_dir, "--halo", "24", "--tile", "512", "-o",
                         str(out), "--quiet"]) == 0
        printed = capsys.readouterr().out
        if where != "local":
            line = next(ln for ln in printed.splitlines() if ln.startswith("read "))
            size = os.path.getsize(os.path.join(files, "tiled.tif"))
            assert line.endswith(f"of {size / 1e6:.3g} MB from {src}"), line
            assert float(line.split()[1]) <= 1.3 * size / 1e6  # the whole image: each tile about once
        outs[where] = zarr.open_group(str(out), mode="r")
    for where in ("http", "s3"):
        np.testing.assert_array_equal(outs[where]["0"][:], outs["local"]["0"][:])
        meta = dict(outs[where].attrs["tilerseg"])
        assert meta["source"] == (f"{http.url}/tiled.tif" if where == "http" else f"s3://{BUCKET}/tiled.tif")


def test_the_fingerprint_is_the_servers_size_and_etag(files, http, s3, tmp_path):
    from tilerseg.io import remote

    for url in (f"{http.url}/tiled.tif", f"s3://{BUCKET}/tiled.tif"):
        shown, size, tag = remote.fingerprint(url)
        assert shown == url and size == os.path.getsize(os.path.join(files, "tiled.tif")) and tag
    for url in (f"{http.url}/plain.zarr", f"s3://{BUCKET}/plain.zarr"):  # a folder: its zarr.json's tag
        assert remote.fingerprint(url)[2]
    before = remote.fingerprint(f"{http.url}/small.svs")
    path = os.path.join(files, "small.svs")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))  # the server's ETag moves
    assert remote.fingerprint(f"{http.url}/small.svs")[2] != before[2]


def test_resume_and_the_ledger_work_on_urls(files, http, tmp_path, tiny_model_dir, capsys):
    from tilerseg import cli

    src = f"{http.url}/tiled.tif"
    args = ["run", src, "--weights", tiny_model_dir, "--halo", "24", "--tile", "512", "--quiet", "-o"]
    assert cli.main([*args, str(tmp_path / "outs") + "/"]) == 0
    ledger = [json.loads(ln) for ln in open(tmp_path / "outs" / "tilerseg-ledger.jsonl")]
    assert ledger[-1]["input"] == src and ledger[-1]["status"] == "done"
    capsys.readouterr()
    assert cli.main([*args, str(tmp_path / "outs") + "/", "--resume"]) == 0  # done in the ledger: skipped
    assert len(open(tmp_path / "outs" / "tilerseg-ledger.jsonl").readlines()) == 1


@pytest.mark.slow
def test_credentials_never_reach_logs_ledger_metadata_or_errors(files, http, tmp_path, tiny_model_dir, capsys):
    import zarr

    from tilerseg import cli

    host = http.url.split("://", 1)[1]
    signed = f"http://{host}/signed/tiled.tif?token={SECRET}"
    userinfo = f"http://user:{SECRET}@{host}/auth/tiled.tif"
    wrong = f"http://{host}/signed/tiled.tif?token=nope-{SECRET}x"
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{signed} a.zarr\n{userinfo} b.zarr\n{wrong} c.zarr\n")
    out = tmp_path / "outs"
    code = cli.main(["run", "--manifest", str(manifest), "--weights", tiny_model_dir, "--halo", "24", "--tile",
                     "512", "-o", str(out) + "/", "--quiet"])
    printed = capsys.readouterr()
    assert code == 1  # the wrong token failed, the others ran
    text = printed.out + printed.err + (out / "tilerseg-ledger.jsonl").read_text()
    for name in ("a.zarr", "b.zarr"):
        text += json.dumps(dict(zarr.open_group(str(tmp_path / name), mode="r").attrs))
        text += "".join(open(p, errors="replace").read() for p in (tmp_path / name).rglob("*.json"))
    assert cli.main(["info", signed]) == 0  # `tilerseg info` names the file too
    text += capsys.readouterr().out
    assert SECRET not in text
    assert f"http://{host}/signed/tiled.tif?***" in text and f"http://***@{host}/auth/tiled.tif" in text
    assert "access denied (403)" in printed.err and not (tmp_path / "c.zarr").exists()


BAD = [
    ("404", lambda h: f"{h.url}/missing.tif", "not found on the server (404)"),
    ("403", lambda h: f"{h.url}/forbidden/tiled.tif", "access denied (403)"),
    ("401 bad password", lambda h: h.url.replace("://", "://user:wrong@") + "/auth/tiled.tif", "access denied (401)"),
    ("dns", lambda h: "http://no-such-host.invalid/a.tif", "cannot reach the server"),
    ("refused", lambda h: "http://127.0.0.1:9/a.tif", "cannot reach the server"),
    ("no ranges", lambda h: f"{h.url}/noranges/tiled.tif", "does not support HTTP range requests"),
    ("no ranges, COG", lambda h: f"{h.url}/noranges/cogeo.tif", "range requests"),
    ("truncated TIFF", lambda h: f"{h.url}/truncated/tiled.tif", "truncated"),
    ("truncated COG", lambda h: f"{h.url}/truncated/cogeo.tif", "truncated"),
    ("truncated SVS", lambda h: f"{h.url}/truncated/small.svs", "truncated"),
    ("no backend", lambda h: "gs://bucket/a.tif", "needs the gcsfs package: pip install gcsfs"),
    ("unknown scheme", lambda h: "nosuch://bucket/a.tif", "no fsspec backend knows the scheme nosuch://"),
    ("s3 404", lambda h: f"s3://{BUCKET}/missing.tif", "not found on the server (404)"),
    ("s3 no bucket", lambda h: "s3://no-such-bucket-36/a.tif", "not found on the server (404)"),
    ("mrxs", lambda h: f"{h.url}/slide.mrxs", "openslide reads only local files"),
]


@pytest.mark.parametrize("case,url,said", BAD, ids=[b[0] for b in BAD])
def test_bad_remote_input_is_one_line_and_writes_nothing(http, s3, tmp_path, tiny_model_dir, capsys, case, url, said):
    from tilerseg import cli

    if case == "mrxs":
        with open(os.path.join(http.root, "slide.mrxs"), "wb") as f:
            f.write(b"x" * 100)
    src = url(http)
    out = tmp_path / "m.zarr"
    code = cli.main(["run", src, "--weights", tiny_model_dir, "--halo", "24", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    assert said in lines[0] and "Traceback" not in err
    assert "wrong" not in lines[0]  # a password in the URL stays masked
    assert not out.exists() and not list(tmp_path.glob(".m.zarr*"))


def _tile_bytes(page, rows, cols) -> int:
    """Stored bytes of the tiles of ``page`` that the window touches."""
    th, tw = page.tilelength, page.tilewidth
    nx = -(-page.imagewidth // tw)
    return sum(page.databytecounts[ty * nx + tx] for ty in range(rows[0] // th, (rows[1] - 1) // th + 1)
               for tx in range(cols[0] // tw, (cols[1] - 1) // tw + 1))


@pytest.mark.parametrize("where", ["http", "s3"])
@pytest.mark.parametrize("name", ["tiled.tif", "pyramid.ome.tif", "cogeo.tif"])
def test_transfer_is_bounded_by_the_tiles_the_windows_cover(files, http, s3, where, name):
    """Windows of a quarter of the image (with overlapping halos) fetch at
    most 1.3x the bytes of the tiles they cover, each tile about once."""
    import tifffile

    from tilerseg.io import remote
    from tilerseg.io.open import open_reader

    with tifffile.TiffFile(os.path.join(files, name)) as tif:
        page = tif.pages[0]
        H, W = page.imagelength, page.imagewidth
        region = ((0, H // 2), (W // 2, W))
        need = _tile_bytes(page, *region)
        probe = _tile_bytes(page, (0, 1), (0, 1))
    fresh = f"fresh-{where}-{name}"  # a name no earlier test read: GDAL's cache of that file is empty
    shutil.copy(os.path.join(files, name), os.path.join(files, fresh))
    if where == "s3":
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).put_file(os.path.join(files, fresh), f"{BUCKET}/{fresh}")
    start = remote.bytes_read()
    reader = open_reader(_url(where, http, fresh))
    before = remote.bytes_read()  # the header and the probe's pixel: not window bytes
    step, halo = 160, 24
    for y in range(region[0][0], region[0][1], step):
        for x in range(region[1][0], region[1][1], step):
            rows = (max(y - halo, region[0][0]), min(y + step + halo, region[0][1]))
            cols = (max(x - halo, region[1][0]), min(x + step + halo, region[1][1]))
            reader.read(rows, cols)
    fetched = remote.bytes_read() - before
    assert need <= fetched + (before - start) and fetched <= 1.3 * need, (fetched, need, before - start)
    assert before - start <= 128 * 1024 + probe  # the header (IFDs: a few 16 KiB blocks) and the probe's tile


@pytest.mark.slow
def test_dask_workers_open_the_url_themselves(files, http, tmp_path, tiny_model_dir, capsys):
    """A LocalCluster with worker processes: each worker reads the URL; the
    client fetches only the header and the probe, the output equals the local run's."""
    import zarr
    from distributed import Client, LocalCluster

    from tilerseg import cli
    from tilerseg.io import remote

    src = f"{http.url}/tiled.tif"
    assert cli.main(["run", os.path.join(files, "tiled.tif"), "--weights", tiny_model_dir, "--halo", "24",
                     "--tile", "256", "-o", str(tmp_path / "local.zarr"), "--quiet"]) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client_before = remote.bytes_read()
        workers_before = sum(client.run(remote.bytes_read).values())
        assert cli.main(["run", src, "--weights", tiny_model_dir, "--halo", "24", "--tile", "256", "--scheduler",
                         cluster.scheduler_address, "-o", str(tmp_path / "remote.zarr"), "--quiet"]) == 0
        on_workers = sum(client.run(remote.bytes_read).values()) - workers_before
        by_worker = client.run(remote.bytes_read)
    here = remote.bytes_read() - client_before
    size = os.path.getsize(os.path.join(files, "tiled.tif"))
    assert on_workers >= 0.9 * size and here < 0.2 * size, (on_workers, here, size)
    assert sum(1 for v in by_worker.values() if v) == 2  # both workers read
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")["0"][:],
                                  zarr.open_group(str(tmp_path / "local.zarr"), mode="r")["0"][:])


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["ome.tif", "tif", "geojson", "gpkg"])
def test_file_outputs_by_url_are_uploaded_whole(files, http, s3, tmp_path, tiny_model_dir, capsys, monkeypatch,
                                                ext):
    """-o s3://.../mask.EXT: written in the staging folder, uploaded once
    complete; the object reads as the local run's file; nothing stays behind."""
    import s3fs
    import tifffile

    from tilerseg import cli

    monkeypatch.setenv("TILERSEG_STAGING", str(tmp_path / "staging"))
    src = "cogeo.tif" if ext == "tif" else "tiled.tif"  # .tif: a COG, georeferenced from the input
    common = ["--weights", tiny_model_dir, "--halo", "24", "--tile", "512", "--quiet"]
    local = tmp_path / f"local.{ext}"
    assert cli.main(["run", os.path.join(files, src), *common, "-o", str(local)]) == 0
    url = f"s3://{BUCKET}/out/mask-{ext}.{ext}"
    assert cli.main(["run", f"s3://{BUCKET}/{src}", *common, "-o", url]) == 0
    said = capsys.readouterr()
    assert f"wrote {url}:" in said.out
    assert f"written first to {tmp_path / 'staging'}" in said.err and "room needed there" in said.err
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    got = tmp_path / f"got.{ext}"
    fs.get_file(url, str(got))
    if ext == "geojson":
        a, b = (json.loads(p.read_text()) for p in (local, got))
        assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]] and a["features"]
    elif ext == "gpkg":
        import fiona

        a, b = ([dict(f.geometry) for f in fiona.open(str(p))] for p in (local, got))
        assert a == b and a
    else:
        with tifffile.TiffFile(local) as ta, tifffile.TiffFile(got) as tb:
            assert len(ta.series[0].levels) == len(tb.series[0].levels)
            np.testing.assert_array_equal(ta.asarray(), tb.asarray())
    assert not any(p.is_file() for p in (tmp_path / "staging").rglob("*"))  # the local copy went
    assert cli.main(["run", f"s3://{BUCKET}/{src}", *common, "-o", url]) == 1  # exists: not replaced
    assert "already exists" in capsys.readouterr().err


def test_a_failed_run_leaves_nothing_at_the_output_url(http, s3, tmp_path, tiny_model_dir, capsys, monkeypatch):
    import s3fs

    from tilerseg import cli

    monkeypatch.setenv("TILERSEG_STAGING", str(tmp_path / "staging"))
    url = f"s3://{BUCKET}/out/failed.ome.tif"
    assert cli.main(["run", f"{http.url}/truncated/tiled.tif", "--weights", tiny_model_dir, "-o", url, "--quiet"]) == 1
    assert "truncated" in capsys.readouterr().err
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(url)
    assert not any(p.is_file() for p in (tmp_path / "staging").rglob("*"))


def test_a_server_that_never_answers_times_out_in_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A listening socket that accepts and says nothing: the run ends after
    TILERSEG_REMOTE_TIMEOUT with one line, instead of hanging."""
    import socket
    import time

    from tilerseg import cli

    monkeypatch.setenv("TILERSEG_REMOTE_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        t0 = time.perf_counter()
        code = cli.main(["run", f"http://127.0.0.1:{s.getsockname()[1]}/a.tif", "--weights", tiny_model_dir,
                         "-o", str(tmp_path / "m.zarr"), "--quiet"])
        took = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "cannot reach the server" in err[0], err
    assert took < 20 and not (tmp_path / "m.zarr").exists()


def test_two_runs_on_one_output_url_are_refused(tmp_path, monkeypatch):
    from tilerseg.errors import OutputError
    from tilerseg.io.writers import Writer

    monkeypatch.setenv("TILERSEG_STAGING", str(tmp_path))
    for url in ("memory://locks/out.zarr", "memory://locks/out.ome.tif"):
        with Writer(url):
            with pytest.raises(OutputError, match="already|another|running|lock"):
                with Writer(url):
                    pass
        with Writer(url):  # released: free again
            pass


@pytest.mark.slow
def test_a_killed_url_run_resumes_only_into_the_same_object(files, http, tmp_path, tiny_model_dir):
    """kill -9 mid-run on an input by URL; --resume after the object changed
    (its ETag moved) is refused, after it is back as it was it continues,
    computing fewer windows, to the bytes of an uninterrupted run."""
    import signal
    import time

    import zarr

    from conftest import cli, cli_process

    path = os.path.join(files, "resume.tif")
    textured_tiff(path, (1200, 1200), seed=7, periods=(41.0, 29.0), noise=25)
    url = f"{http.url}/resume.tif"
    args = [url, "--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--batch-size", "1", "--quiet"]
    out, marks = tmp_path / "out.zarr", tmp_path / ".out.zarr.tilerseg" / "done"
    proc = cli_process("run", *args, "-o", str(out))
    t0 = time.time()
    while not (marks.is_dir() and len(os.listdir(marks)) >= 5):
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before it was interrupted"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(os.listdir(marks))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # replaced on the server: another ETag
    r = cli("run", *args, "-o", str(out), "--resume")
    assert r.returncode == 1 and "other settings (input)" in r.stderr, r.stderr
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same object again
    r = cli("run", *args, "-o", str(out), "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    entry = [json.loads(ln) for ln in open(tmp_path / "tilerseg-ledger.jsonl")][-1]
    assert entry["status"] == "done" and entry["windows_computed"] == entry["windows_total"] - finished
    ref = tmp_path / "ref.zarr"
    assert cli("run", path, *args[1:], "-o", str(ref)).returncode == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], zarr.open_group(str(ref), mode="r")["0"][:])


def test_bad_s3_credentials_are_one_line(s3, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """moto with its IAM checks on: the key is unknown, S3 answers 403."""
    from tilerseg import cli

    import s3fs

    strict = MotoServer(auth=True)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps filesystems by options: none for the old endpoint
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"wrong-{SECRET}")
        code = cli.main(["run", f"s3://{BUCKET}/tiled.tif", "--weights", tiny_model_dir, "-o",
                         str(tmp_path / "m.zarr"), "--quiet"])
    finally:
        strict.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "access denied" in err[0] and SECRET not in err[0], err
    assert not (tmp_path / "m.zarr").exists()
