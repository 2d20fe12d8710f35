"""GPU-worker options of the predictor, checked on CPU: autocast
precision, torch.compile, and the out-of-memory retry with smaller batches."""
import logging
import shutil

import numpy as np
import pytest

from conftest import cli, data, tiny_unet
from tilerseg.errors import ModelError
from tilerseg.infer import Predictor

NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=255.0)


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(0, 255, (8, 128, 128, 3), dtype=np.uint8)


class OutOfMemoryAbove:
    """Wraps a model; raises torch's OutOfMemoryError for batches larger than ``limit``."""

    def __init__(self, model, limit):
        self.model, self.limit, self.calls = model, limit, []

    def __call__(self, x):
        import torch

        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_halves_the_batch_says_so_and_keeps_the_size(windows, caplog):
    ref = Predictor(tiny_unet(), **NORM)(windows)
    p = Predictor(tiny_unet(), **NORM)
    p._net = fake = OutOfMemoryAbove(p.model, limit=2)
    with caplog.at_level(logging.WARNING, logger="tilerseg.infer"):
        out = p(windows)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert p.max_batch == 2
    said = [r.getMessage() for r in caplog.records]
    assert any("out of GPU memory on a batch of 8 windows; retrying in batches of 4" in m for m in said), said
    fake.calls.clear()
    p(windows)  # later batches go straight to the size that fitted
    assert fake.calls == [2, 2, 2, 2]


def test_out_of_memory_on_one_window_is_one_clear_error(windows):
    p = Predictor(tiny_unet(), **NORM)
    p._net = OutOfMemoryAbove(p.model, limit=0)
    with pytest.raises(ModelError, match="single 128x128 window: use a smaller --tile, --precision"):
        p(windows[:1])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precision_is_close_to_fp32(windows, precision):
    ref = Predictor(tiny_unet(), **NORM)(windows)
    out = Predictor(tiny_unet(), **NORM, precision=precision)(windows)
    assert out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert 0 < err < 0.05, err  # really ran in lower precision, and still agrees


def test_unknown_precision_is_refused():
    with pytest.raises(ModelError, match="unknown --precision 'fp8'"):
        Predictor(tiny_unet(), **NORM, precision="fp8")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
def test_compiled_model_equals_eager(windows):
    ref = Predictor(tiny_unet(), **NORM)(windows[:2])
    out = Predictor(tiny_unet(), **NORM, compile=True)(windows[:2])
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_cli_precision_flag(tmp_path, tiny_model_dir):
    import zarr

    args = [data("rasterio/rgb-byte-tenth.tif"), "--weights", tiny_model_dir, "--tile", "256", "--halo", "72",
            "--probabilities", "--quiet"]  # small: bf16 is emulated (slow) on CPUs without AVX512-BF16
    for p in ("fp32", "bf16"):
        r = cli("run", *args, "--precision", p, "-o", str(tmp_path / f"{p}.zarr"))
        assert r.returncode == 0, r.stderr
    a, b = (zarr.open_array(str(tmp_path / f"{p}.zarr" / "0"), mode="r")[...] for p in ("fp32", "bf16"))
    ok = ~np.isnan(a)
    assert np.array_equal(ok, ~np.isnan(b)) and 0 < np.abs(a[ok] - b[ok]).max() < 0.05


def test_host_staging_reuses_one_buffer_per_thread_and_keeps_the_values():
    """The CUDA path's staging (issue 34), on host memory (no GPU here): each batch
    lands in its thread's one buffer, grown only for a larger batch, and each thread
    has its own, so a batch being copied is never overwritten by another thread."""
    import threading

    from tilerseg.infer import HostStaging

    rng = np.random.default_rng(0)
    s = HostStaging(pin=False)
    big, small = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((4, 64, 64, 3), (2, 32, 64, 3)))
    a = s.host(big)
    assert np.array_equal(a.numpy(), big)
    b = s.host(small)
    assert np.array_equal(b.numpy(), small) and b.data_ptr() == a.data_ptr()  # reused, not reallocated
    c = s.host(np.concatenate([big, big]))
    assert c.shape == (8, 64, 64, 3) and np.array_equal(c.numpy()[4:], big)
    other = []
    t = threading.Thread(target=lambda: other.append(s.host(small).data_ptr()))
    t.start()
    t.join()
    assert other[0] != c.data_ptr()
    f = s.host(rng.random((1, 8, 8, 3), dtype=np.float32))  # another dtype: its own buffer
    assert f.dtype.is_floating_point
