"""Instances: the label image and its object table do not depend on the blocks.

The oracle is the same procedure run on the whole image as one block (its
components are then whole by construction), and a synthetic image whose
objects are known: discs, some touching in pairs, some straddling the
corner where four blocks meet."""
import numpy as np
import pytest
import zarr

from tilerseg.errors import InputError
from tilerseg.instances import InstanceOptions, label


def discs(shape, centres, radii, soft: float = 2.0) -> np.ndarray:
    """P(foreground) (1, H, W): a soft edge around each disc."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    p = np.zeros(shape, np.float32)
    for (y, x), r in zip(centres, radii):
        d = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        p = np.maximum(p, 1 / (1 + np.exp(np.clip((d - r) / soft * 4, -50, 50))))
    return p[None]


def scene(shape=(700, 900), seed=0):
    """Separate discs, touching pairs (a narrow neck between two round
    nuclei) and two pairs on the corner where four 256-px blocks meet."""
    rng = np.random.default_rng(seed)
    centres, radii, truth = [], [], 0
    corners = ((256, 256), (512, 512))
    for y in range(40, shape[0] - 40, 75):
        for x in range(40, shape[1] - 40, 75):
            r = rng.uniform(9, 14)
            if min(max(abs(y - cy), abs(x - cx)) for cy, cx in corners) < 60:
                continue
            if rng.random() < 0.4:  # a touching pair: centres 1.7 radii apart
                a = rng.uniform(0, np.pi)
                dy, dx = 0.85 * r * np.sin(a), 0.85 * r * np.cos(a)
                centres += [(y - dy, x - dx), (y + dy, x + dx)]
                radii += [r, r]
                truth += 2
            else:
                centres.append((y + rng.uniform(-5, 5), x + rng.uniform(-5, 5)))
                radii.append(r)
                truth += 1
    for y, x in corners:  # straddling the corners of 256-px blocks
        centres += [(y - 9, x - 9), (y + 9, x + 9)]
        radii += [12, 12]
        truth += 2
    return discs(shape, centres, radii), truth


def run(p: np.ndarray, chunk, opts=InstanceOptions()):
    store = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=p.shape, chunks=(p.shape[0], chunk, chunk),
                            dtype=np.float32)
    store[:] = p
    out = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=p.shape[1:], chunks=(chunk, chunk),
                          dtype=np.uint32, fill_value=0)
    table = label(store, out, opts)
    return out[:], table


@pytest.fixture(scope="module")
def whole():
    p, truth = scene()
    return p, truth, run(p, max(p.shape))


@pytest.mark.parametrize("chunk", [256, 300, 512])
def test_labels_and_table_equal_the_whole_image_run(whole, chunk):
    p, _, (ref, ref_table) = whole
    got, table = run(p, chunk)
    assert got.dtype == np.uint32 and np.array_equal(got, ref)  # ids included
    for k in ("id", "area", "row", "col", "probability", "class"):
        assert np.array_equal(table[k], ref_table[k]), k


def test_objects_are_counted_split_and_numbered_in_raster_order(whole):
    from scipy import ndimage

    p, truth, (lab, table) = whole
    n = int(lab.max())
    assert n == truth == len(table["id"])  # touching pairs split, none split twice
    # ids in raster order of each object's first pixel
    values, first = np.unique(lab.ravel(), return_index=True)
    assert np.array_equal(values[1:], np.arange(1, n + 1)) and np.all(np.diff(first[1:]) > 0)
    # every object one 4-connected piece, areas and centroids as numpy counts them
    assert all(ndimage.label(lab == i)[1] == 1 for i in (1, n // 2, n))
    assert np.array_equal(np.bincount(lab.ravel())[1:], table["area"])
    cy = ndimage.center_of_mass(np.ones_like(lab), lab, np.arange(1, n + 1))
    assert np.allclose(np.array(cy), np.stack([table["row"], table["col"]], 1))


def test_seam_corner_objects_are_neither_duplicated_nor_cut(whole):
    """Objects on the corner where four 256-px blocks meet: each is one id, as
    in the whole-image run (no duplicate, no piece left at a seam)."""
    p, _, (ref, _) = whole
    got, _ = run(p, 256)
    for y, x in ((256, 256), (512, 512)):
        window = got[y - 25:y + 25, x - 25:x + 25]
        ids = np.unique(window[window > 0])
        assert len(ids) == 2 and np.array_equal(window, ref[y - 25:y + 25, x - 25:x + 25])


def test_a_component_larger_than_the_bound_is_refused_naming_where():
    p = np.zeros((1, 300, 300), np.float32)
    p[0, 20:250, 30:40] = 1  # a 230-px tall sliver
    with pytest.raises(InputError, match=r"10x230 px \(rows 20:250, cols 30:40\).*--max-object 100 px a side"):
        run(p, 128, InstanceOptions(max_side=100))


def test_boundary_class_separates_touching_cells():
    """A 3-class model (background, interior, boundary): touching cells
    separated by a line of boundary pixels are two objects, as the U-Net
    paper separates them; the boundary pixels join their nearer cell."""
    p = np.zeros((3, 64, 96), np.float32)
    p[0] = 1
    p[:, 10:50, 10:80] = np.array([0, 1, 0], np.float32)[:, None, None]
    p[:, 10:50, 44:46] = np.array([0, 0, 1], np.float32)[:, None, None]  # the wall between two cells
    lab, table = run(p, 32, InstanceOptions(boundary_class=2))
    assert lab.max() == 2 and np.array_equal(table["class"], [1, 1])
    assert (lab[10:50, 10:44] == 1).all() and (lab[10:50, 46:80] == 2).all()
    assert np.array_equal(lab, run(p, 96, InstanceOptions(boundary_class=2))[0])
