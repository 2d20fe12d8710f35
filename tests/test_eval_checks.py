"""`tilerseg eval` scores only labels that fit their image: the same size
(or a level's), values the classes name, and object ids read as objects
with --instances. The oracle: the same truth written as a plain 0/255
mask, and the error lines themselves."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    """A 128 px image, its touching objects as 16-bit ids, and the same
    objects parted by a line of background as a 0/255 mask."""
    root = tmp_path_factory.mktemp("evalchecks")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (128, 128), np.uint8)
    ids = np.zeros((128, 128), np.uint16)
    for k, (y, x) in enumerate([(10, 10), (10, 40), (60, 20), (70, 70), (100, 100)], 1):
        ids[y:y + 30, x:x + 30] = 300 + k  # overlapping squares: the later one wins; they touch
    parted = ids.copy()
    right = (ids[:, :-1] > 0) & (ids[:, 1:] > 0) & (ids[:, :-1] != ids[:, 1:])
    down = (ids[:-1] > 0) & (ids[1:] > 0) & (ids[:-1] != ids[1:])
    parted[:, :-1][right] = 0
    parted[:-1][down] = 0
    for sub in ("image", "ids", "binary", "small", "values"):
        (root / sub).mkdir()
    Image.fromarray(img).save(root / "image" / "a.png")
    Image.fromarray(ids).save(root / "ids" / "a.png")
    Image.fromarray(((parted > 0) * 255).astype(np.uint8)).save(root / "binary" / "a.png")
    Image.fromarray(((ids[:125, :125] > 0) * 255).astype(np.uint8)).save(root / "small" / "a.png")
    v = np.zeros((128, 128), np.uint8)
    v[:, 30:] = 7
    v[:, 60:] = 128
    v[:, 90:] = 255
    Image.fromarray(v).save(root / "values" / "a.png")
    return root


def _eval(root, masks, model, *extra):
    return cli("eval", "--weights", model, str(root / "image"), str(root / masks), "--tile", "128", "--halo", "16",
               *extra)


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    from conftest import tiny_unet

    path = tmp_path_factory.mktemp("models") / "grey"
    tiny_unet(in_channels=1).save_pretrained(str(path))
    return str(path)


def test_a_mask_of_another_size_is_refused_naming_both(em, grey_model):
    r = _eval(em, "small", grey_model)
    assert r.returncode == 1 and "mask is 125x125 px" in r.stderr and "is 128x128" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_values_no_class_names_are_refused_and_listed(em, grey_model):
    r = _eval(em, "values", grey_model)
    assert r.returncode == 1 and "mask values 128, 255 name no class" in r.stderr, r.stderr
    r = _eval(em, "values", grey_model, "--mask-values", "0,255")
    assert r.returncode == 1 and "mask values 7, 128 name no class" in r.stderr, r.stderr
    r = _eval(em, "ids", grey_model)
    assert r.returncode == 1 and "name no class" in r.stderr and "--instances" in r.stderr


def test_instance_ids_are_scored_as_their_objects(em, grey_model):
    """16-bit ids with --instances score as the same objects drawn parted
    in a 0/255 mask: the same figures, not one blob per touching group."""
    got = json.loads(_eval(em, "ids", grey_model, "--instances", "--json").stdout)
    want = json.loads(_eval(em, "binary", grey_model, "--instances", "--json").stdout)
    assert got["overall"] == want["overall"] and got["instances"]["overall"] == want["instances"]["overall"]


def test_eval_instances_json_holds_the_figures_the_table_prints(em, grey_model):
    """Scripts and CI read --json: its objects' figures are the printed row's."""
    printed = _eval(em, "binary", grey_model, "--instances")
    assert printed.returncode == 0, printed.stderr
    row = next(ln for ln in printed.stdout.splitlines() if ln.startswith("objects (--instances)"))
    pixel, rand, warping, splits, mergers, objects = row.split()[-6:]
    rep = json.loads(_eval(em, "binary", grey_model, "--instances", "--json").stdout)
    o = rep["instances"]["overall"]
    assert (f"{o['pixel_error']:.4f}", f"{o['adapted_rand_error']:.4f}", f"{o['warping_error']:.6f}") == \
        (pixel, rand, warping)
    assert (o["splits"], o["mergers"], o["objects"]) == (int(splits), int(mergers), int(objects))
    assert {d["image"] for d in rep["instances"]["images"]} == {"a"}


def test_a_tilerseg_mask_of_another_image_is_refused(em, grey_model, tmp_path):
    """Issue 38 item 20: a mask that `tilerseg run` wrote records its input
    (size and bytes); over another image of a size it fits, it is refused,
    and over its own image it is scored."""
    other = tmp_path / "other.png"
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 255, (128, 128), np.uint8)).save(other)
    for src, ok in ((other, False), (em / "image" / "a.png", True)):
        masks = tmp_path / f"masks-{ok}"
        masks.mkdir()
        r = cli("run", str(src), "--weights", grey_model, "--tile", "128", "--halo", "16", "-o", str(masks / "a.tif"))
        assert r.returncode == 0, r.stderr
        r = cli("eval", "--weights", grey_model, str(em / "image"), str(masks), "--tile", "128", "--halo", "16")
        if ok:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 1 and "a mask tilerseg wrote for another image" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
