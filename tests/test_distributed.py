"""`--scheduler` on a dask cluster of worker processes equals the local run."""
import numpy as np
import pytest

from conftest import cli, data


@pytest.mark.slow
def test_scheduler_address_output_equals_local(tmp_path, tiny_model_dir):
    import zarr
    from distributed import LocalCluster

    src = data("rasterio/RGB.byte.tif")
    args = ["--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--quiet"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        r = cli("run", src, "-o", str(tmp_path / "d.zarr"), "--scheduler", cluster.scheduler_address, *args)
        assert r.returncode == 0, r.stderr
    r = cli("run", src, "-o", str(tmp_path / "l.zarr"), *args)
    assert r.returncode == 0, r.stderr
    a = zarr.open_array(str(tmp_path / "d.zarr" / "0"), mode="r")[...]
    b = zarr.open_array(str(tmp_path / "l.zarr" / "0"), mode="r")[...]
    assert np.array_equal(a, b) and (a == 255).any()
