"""Tiling math against numpy: padding, grid coverage, tile validation."""
import numpy as np
import pytest

from tilerseg.errors import TileError
from tilerseg.geometry import Grid, block_layout, pad_index, validate_tile


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("pad", [0, 1, 5, 40])
def test_pad_index_matches_numpy(mode, n, pad):
    a = np.arange(1, n + 1)
    idx, inside = pad_index(np.arange(-pad, n + pad), n, mode)
    got = a[idx] if inside is None else np.where(inside, a[idx], 0)
    assert np.array_equal(got, np.pad(a, pad, mode=mode))


def test_grid_covers_image_once_with_stride_aligned_windows():
    g = Grid((1000, 1300), tile=512, halo=96, stride=8, block=(2, 2))
    assert g.crop == 320 and g.n_windows == (4, 5)
    cover = np.zeros((1000, 1300), int)
    for r in g.regions():
        cover[slice(*r.out_rows), slice(*r.out_cols)] += 1
        for wy, wx in r.windows:
            # window origin in padded coordinates is a multiple of the stride
            assert (wy * g.crop) % 8 == 0 and (wx * g.crop) % 8 == 0
        # the read reaches exactly halo beyond the windows' crops
        assert r.read_rows[0] == r.windows[0][0] * g.crop - 96
    assert (cover == 1).all()
    assert sum(g.chunks[0]) == 1000 and sum(g.chunks[1]) == 1300


def test_validate_tile_names_nearest_valid_values():
    validate_tile(512, 64, 32)
    with pytest.raises(TileError, match="use --tile 480 or 512"):
        validate_tile(500, 64, 32)
    with pytest.raises(TileError, match="--halo 64 or 80"):
        validate_tile(512, 70, 32)
    with pytest.raises(TileError, match="no centre crop"):
        validate_tile(256, 128, 32)


def test_block_layout_holds_a_batch():
    for b in (1, 2, 3, 4, 6, 8, 16):
        ky, kx = block_layout(b)
        assert ky * kx == b and ky <= kx
