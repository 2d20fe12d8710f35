"""A run killed at any phase of making its output (the windows, the
instance pass, the conversion, between and after the moves into place)
resumes with --resume to the bytes of an uninterrupted run, for each kind
of output; and a resume never trusts a mark whose data is gone."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cli, textured_tiff

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("windows", "instances", "conversion", "converted", "between-moves", "moved")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("phases") / "img.tif"
    textured_tiff(path, (560, 560), seed=7, periods=(41.0, 29.0), noise=25)
    return str(path)


def _args(src, model, out, instances=True):
    return ["run", src, "--weights", model, "--tile", "256", "--halo", "72", "--batch-size", "1", "--quiet",
            "-o", str(out), *(["--instances", "--threshold", "0.6"] if instances else [])]


def _tree(path) -> dict:
    """Every file under ``path`` (or the file itself) and its bytes."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def _killed(phase, args) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "killat.py"), phase, *args], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == -9, (phase, r.returncode, r.stderr[-2000:])


_REFS: dict = {}


def _reference(tmp_path_factory, image, model, ext, instances=True):
    key = (ext, instances)
    if key not in _REFS:
        folder = tmp_path_factory.mktemp("ref")
        out = folder / f"ref{ext}"
        r = cli(*_args(image, model, out, instances))
        assert r.returncode == 0, r.stderr
        table = folder / "ref.csv"
        _REFS[key] = (_tree(out), table.read_text() if instances else None)
        if instances:
            assert _REFS[key][1].count("\n") > 3  # objects to lose
    return _REFS[key]


@pytest.mark.slow
@pytest.mark.parametrize("ext", [".ome.tif", ".geojson", ".zarr"])
@pytest.mark.parametrize("phase", PHASES)
def test_instance_run_killed_at_any_phase_resumes_to_the_uninterrupted_bytes(tmp_path, tmp_path_factory, image,
                                                                           tiny_model_dir, ext, phase):
    ref, table = _reference(tmp_path_factory, image, tiny_model_dir, ext)
    out = tmp_path / f"out{ext}"
    _killed(phase, _args(image, tiny_model_dir, out))
    assert (tmp_path / f".out{ext}.tilerseg").exists()
    r = cli(*_args(image, tiny_model_dir, out), "--resume")
    assert r.returncode == 0, r.stderr
    assert _tree(out) == ref
    assert (tmp_path / "out.csv").read_text() == table
    assert not (tmp_path / f".out{ext}.tilerseg").exists()
    ledger = (tmp_path / "tilerseg-ledger.jsonl").read_text().splitlines()
    assert '"status": "done"' in ledger[-1]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["windows", "moved"])
def test_zarr_run_killed_resumes_to_the_uninterrupted_bytes(tmp_path, tmp_path_factory, image, tiny_model_dir,
                                                             phase):
    """A plain .zarr output is its state's level 0 moved into place: killed
    after that move, the marks stay while their data has gone with it."""
    ref, _ = _reference(tmp_path_factory, image, tiny_model_dir, ".zarr", instances=False)
    out = tmp_path / "out.zarr"
    _killed(phase, _args(image, tiny_model_dir, out, instances=False))
    r = cli(*_args(image, tiny_model_dir, out, instances=False), "--resume")
    assert r.returncode == 0, r.stderr
    assert _tree(out) == ref


@pytest.mark.slow
def test_resume_recomputes_marked_blocks_whose_data_is_gone(tmp_path, tmp_path_factory, image, tiny_model_dir):
    """The marks promise data: a state folder whose computed chunks were
    lost (here removed) is computed again where they are missing, not
    written as empty."""
    ref, table = _reference(tmp_path_factory, image, tiny_model_dir, ".ome.tif")
    out = tmp_path / "out.ome.tif"
    state = tmp_path / ".out.ome.tif.tilerseg"
    _killed("conversion", _args(image, tiny_model_dir, out))
    stored = [os.path.join(root, f) for root, _, files in os.walk(state) for f in files
              if f"{os.sep}c{os.sep}" in os.path.join(root, f) and "work.zarr" not in root]
    assert len(stored) > 3
    for f in stored[::2]:
        os.remove(f)
    r = cli(*_args(image, tiny_model_dir, out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "have no data; computing them again" in r.stderr
    assert _tree(out) == ref and (tmp_path / "out.csv").read_text() == table


@pytest.mark.slow
def test_a_resume_may_change_the_instance_options_and_reuses_every_window(tmp_path, tmp_path_factory, image,
                                                                         tiny_model_dir):
    """--max-object too small refuses after the windows; the resume with it
    raised computes no window again (the probabilities do not depend on
    the objects' options) and gives the bytes of a run with it from the start."""
    ref, table = _reference(tmp_path_factory, image, tiny_model_dir, ".ome.tif")
    out = tmp_path / "out.ome.tif"
    r = cli(*_args(image, tiny_model_dir, out), "--max-object", "2")
    assert r.returncode == 1 and "raise --max-object" in r.stderr, r.stderr
    r = cli(*_args(image, tiny_model_dir, out), "--resume")
    assert r.returncode == 0, r.stderr
    assert _tree(out) == ref and (tmp_path / "out.csv").read_text() == table
    entry = json.loads((tmp_path / "tilerseg-ledger.jsonl").read_text().splitlines()[-1])
    assert entry["status"] == "done" and entry["windows_computed"] == 0
