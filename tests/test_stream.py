"""A pyramidal TIFF is written while its blocks are computed (tilerseg.io.stream).

The oracle is the file written after the run from the same levels
(``write_pyramid_tiff``): the streamed file must have its bytes, and its
level-0 tiles must reach the disk before the last block is computed."""
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import cli
from tilerseg.io.base import ImageMeta
from tilerseg.io.writers import OutputInfo, Writer, _uid
from tilerseg.plan import Blocks

CHUNK = 512


def _source(arr: np.ndarray):
    """A plan-like source: blocks of CHUNK px on the last two axes, keyed (by, bx)."""
    H, W = arr.shape[-2:]
    rows = tuple(min(CHUNK, H - r) for r in range(0, H, CHUNK))
    cols = tuple(min(CHUNK, W - c) for c in range(0, W, CHUNK))
    lead = (slice(None),) * (arr.ndim - 2)

    def region(b):
        return (*lead, slice(b[0] * CHUNK, b[0] * CHUNK + rows[b[0]]), slice(b[1] * CHUNK, b[1] * CHUNK + cols[b[1]]))

    chunks = (*((n,) for n in arr.shape[:-2]), rows, cols)
    return SimpleNamespace(shape=arr.shape, chunks=chunks, dtype=arr.dtype, blocks=Blocks((len(rows), len(cols)), region))


def _noisy_labels(H, W, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, (H, W), dtype=np.uint8)  # tiles that do not compress to nothing: the file grows


def _reference(tmp_path, arr, info, fingerprint, name, ome=True):
    """The file written after the run: the same levels through write_pyramid_tiff."""
    import zarr

    from tilerseg.io.pyramid import build_levels
    from tilerseg.io.tiffout import write_pyramid_tiff
    from tilerseg.io.writers import compressors

    group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
    z = group.create_array("0", shape=arr.shape, chunks=arr.shape[:-2] + (CHUNK, CHUNK), dtype=arr.dtype,
                           compressors=compressors(arr.dtype),
                           fill_value=np.nan if info.probabilities else 255)
    z[...] = arr
    out = tmp_path / f"{name}.tif"
    write_pyramid_tiff(build_levels(group, info.probabilities), str(out), info.out_meta, info.kind(), ome=ome,
                       uid=_uid(fingerprint))
    return out.read_bytes()


@pytest.mark.parametrize("probabilities,suffix", [(False, ".ome.tif"), (True, ".ome.tif"), (False, ".tif")])
def test_tiles_reach_the_file_while_blocks_are_computed_and_the_bytes_are_the_post_run_ones(tmp_path, probabilities,
                                                                                           suffix):
    H, W = 2100, 1500  # 5 block rows of 512 px, odd edges
    lab = _noisy_labels(H, W)
    arr = np.stack([lab / 2.0, 1 - lab / 2.0]).astype(np.float32) if probabilities else lab
    meta = ImageMeta(shape=(H, W), bands=3, dtype=np.dtype("uint8"), format="test", mpp=0.5)
    info = OutputInfo(meta=meta, probabilities=probabilities, classes=3, class_names=("a", "b", "c"))
    fingerprint = {"fingerprint": "stream-test"}
    out = tmp_path / f"mask{suffix}"
    source = _source(arr)
    grew = []  # per block row: whether the partial file grew before the next row was computed

    def compute(src, z, marks):
        partial = writer._tmp_file
        for y in range(src.blocks.shape[0]):
            before = os.path.getsize(partial) if os.path.exists(partial) else 0
            for x in range(src.blocks.shape[1]):
                z[src.blocks[(y, x)]] = arr[src.blocks[(y, x)]]
                marks.mark((y, x))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (os.path.getsize(partial) if os.path.exists(partial) else 0) <= before:
                time.sleep(0.05)
            grew.append((os.path.getsize(partial) if os.path.exists(partial) else 0) > before)
        return "done"

    with Writer(str(out), probabilities=probabilities) as writer:
        assert writer.write(source, compute, info, fingerprint) == "done"
    # labels: every block row streams; probabilities: plane 0 streams, plane 1 follows plane 0 in the file
    assert all(grew[:-1]) if not probabilities else any(grew[:-1]), grew
    assert out.read_bytes() == _reference(tmp_path, arr, info, fingerprint, "ref", ome=suffix == ".ome.tif")
    assert not any(t.name == "tilerseg-tiff-stream" for t in threading.enumerate())


@pytest.mark.parametrize("probabilities", [False, True])
def test_levels_built_as_rows_become_final_equal_levels_built_after(tmp_path, probabilities):
    import zarr

    from tilerseg.io.pyramid import Levels, build_levels

    rng = np.random.default_rng(3)
    arr = rng.random((2, 1900, 1300)).astype(np.float32) if probabilities else _noisy_labels(1900, 1300)
    if probabilities:
        arr[:, :37] = np.nan
    arrays = {}
    for name in ("after", "rows"):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        g.create_array("0", shape=arr.shape, chunks=arr.shape[:-2] + (256, 256), dtype=arr.dtype)[...] = arr
        if name == "after":
            arrays[name] = build_levels(g, probabilities)
            continue
        levels = Levels(g, probabilities)
        built = []
        for rows in (0, 300, 511, 512, 1024, 1100, 1536, 1800):  # rows of level 0 final so far
            levels.advance(rows)
            built.append(list(levels.final))
        assert built[3][1] == 256 and built[4][1:3] == [512, 256]  # whole chunk rows as soon as they can be
        arrays[name] = levels.finish()
    assert len(arrays["after"]) == len(arrays["rows"]) == 4
    for a, b in zip(arrays["after"], arrays["rows"]):
        np.testing.assert_array_equal(a[...], b[...])


def test_a_failed_run_stops_the_stream_and_leaves_no_tiff(tmp_path):
    lab = _noisy_labels(1600, 1200)
    meta = ImageMeta(shape=lab.shape, bands=3, dtype=np.dtype("uint8"), format="test")
    info = OutputInfo(meta=meta, probabilities=False, classes=3, class_names=("a", "b", "c"))
    out = tmp_path / "mask.ome.tif"
    source = _source(lab)

    def compute(src, z, marks):
        for x in range(src.blocks.shape[1]):
            z[src.blocks[(0, x)]] = lab[src.blocks[(0, x)]]
            marks.mark((0, x))
        deadline = time.monotonic() + 20
        while not os.path.exists(writer._tmp_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(writer._tmp_file)  # the stream had started writing
        raise RuntimeError("worker lost")

    with Writer(str(out)) as writer:
        with pytest.raises(RuntimeError, match="worker lost"):
            writer.write(source, compute, info, {"fingerprint": "x"})
    assert not out.exists() and not os.path.exists(writer._tmp_file)
    assert not any(t.name == "tilerseg-tiff-stream" for t in threading.enumerate())
    # the finished block row is kept for --resume, as for any output
    assert (tmp_path / ".mask.ome.tif.tilerseg" / "done" / "0.0").exists()


@pytest.mark.slow
def test_a_run_to_ome_tiff_streams_and_equals_its_zarr(tmp_path, tiny_model_dir, monkeypatch):
    """Through the CLI: the TIFF is written by the stream, and has the
    pixels of the same run written as OME-Zarr."""
    import tifffile
    import zarr

    from tilerseg.io import stream
    from tilerseg.synthetic import write_tiff

    finished = []
    finish = stream.TiffStream.finish
    monkeypatch.setattr(stream.TiffStream, "finish", lambda self: finished.append(finish(self)) or finished[-1])
    src = tmp_path / "in.tif"
    write_tiff(str(src), (1300, 1100))
    args = ["run", str(src), "--weights", str(tiny_model_dir), "--tile", "256"]
    r = cli(*args, "-o", str(tmp_path / "m.ome.tif"))
    assert r.returncode == 0, r.stderr
    assert len(finished) == 1
    r = cli(*args, "-o", str(tmp_path / "m.ome.zarr"))
    assert r.returncode == 0, r.stderr
    assert len(finished) == 1  # a zarr output has no TIFF to stream
    with tifffile.TiffFile(str(tmp_path / "m.ome.tif")) as tif:
        got = tif.series[0].levels[0].asarray()
    np.testing.assert_array_equal(got, zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")["0"][...])


@pytest.mark.parametrize("probabilities", [False, True])
def test_a_zarr_output_builds_its_levels_while_blocks_are_computed(tmp_path, probabilities):
    """Issue 34: a .zarr output's levels were all read back and built after the last
    block. They are built as block rows land now: level 1's first chunk row exists
    before the last block row is computed, and every level equals the post-run build."""
    import zarr

    from tilerseg.io.pyramid import build_levels

    H, W = 2100, 1500
    lab = _noisy_labels(H, W)
    arr = np.stack([lab / 2.0, 1 - lab / 2.0]).astype(np.float32) if probabilities else lab
    meta = ImageMeta(shape=(H, W), bands=3, dtype=np.dtype("uint8"), format="test", mpp=0.5)
    info = OutputInfo(meta=meta, probabilities=probabilities, classes=3, class_names=("a", "b", "c"))
    out = tmp_path / "mask.zarr"
    source = _source(arr)
    early = []

    def compute(src, z, marks):
        ny, nx = src.blocks.shape
        for y in range(ny):
            for x in range(nx):
                z[src.blocks[(y, x)]] = arr[src.blocks[(y, x)]]
                marks.mark((y, x))
            if y == ny - 2:  # level 1's first chunk row needs level 0's first 1024 rows: there by now
                one = zarr.open_group(writer._tmp_zarr, mode="r")["1"]
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and one.nchunks_initialized == 0:
                    time.sleep(0.05)
                early.append(one.nchunks_initialized)
        return "done"

    with Writer(str(out), probabilities=probabilities) as writer:
        assert writer.write(source, compute, info, {"fingerprint": "zarr-stream"}) == "done"
    assert early and early[0] > 0, "no level chunk was built before the last block row"
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w")
    ref.create_array("0", shape=arr.shape, chunks=arr.shape[:-2] + (CHUNK, CHUNK), dtype=arr.dtype,
                     fill_value=np.nan if probabilities else 255)[...] = arr
    got = zarr.open_group(str(out), mode="r")
    levels = build_levels(ref, probabilities)
    assert sorted(got.array_keys()) == [str(k) for k in range(len(levels))]
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(got[str(k)][...], level[...])
    assert not any(t.name == "tilerseg-level-stream" for t in threading.enumerate())
