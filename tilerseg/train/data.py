"""Training data: image/mask pairs opened lazily as tilerseg readers, and
random crops that read only the window they need.

The same readers serve folders of small PNG/TIFF pairs and a few huge
slides, GeoTIFFs or zarr arrays with their masks; a mask may be stored at
any resolution of its image (it is sampled nearest-neighbour onto the
image's grid). Every crop is drawn from an RNG seeded by ``(seed, epoch,
index)``, so a run is reproducible, with any number of loader workers and
across a resume."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..io import open_reader
from ..io.base import Reader, read_padded
from ..io.open import IMAGE_EXT, SLIDE_EXT, TIFF_EXT
from .labels import SIDECAR_EXT, VECTOR_EXT
from .metrics import IGNORE

_KNOWN_EXT = IMAGE_EXT | SLIDE_EXT | TIFF_EXT | {".zarr", ".vrt", ".jp2", ".img"} | set(VECTOR_EXT)


@dataclass(frozen=True)
class Pair:
    image: str
    mask: str

    @property
    def name(self) -> str:
        return _stem(self.image)


def _stem(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in sorted(_KNOWN_EXT, key=len, reverse=True):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def _natural(name: str):
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _listing(path: str, what: str) -> list[str]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such {what} file or folder; {_made_by(path) or 'check the path'}")
    if os.path.isdir(path) and not path.rstrip("/").endswith(".zarr"):
        files = [os.path.join(path, f) for f in os.listdir(path)
                 if not f.startswith(".") and (os.path.isfile(os.path.join(path, f)) or f.endswith(".zarr"))]
        files = [f for f in files if (_stem(f) != os.path.basename(f) or f.endswith(".zarr"))
                 and not f.lower().endswith(SIDECAR_EXT)]  # a shapefile's .dbf/.shx/.prj are not masks
        if not files:
            raise InputError(f"{path}: no image files in this {what} folder")
        return sorted(files, key=lambda f: _natural(_stem(f)))
    return [path]


# data sets the repository's scripts fetch, by a folder name in their path: the command that makes them
FETCHED = {"isbi2012": "python scripts/fetch_isbi2012.py data/isbi2012 (the ISBI 2012 slices; held-out/ is "
                       "made by it too)"}


def _made_by(path: str) -> str:
    """``create it with ...`` for a path of a data set a script fetches, else ''."""
    parts = os.path.normpath(path).split(os.sep)
    name = next((p for p in parts if p in FETCHED), None)
    return f"create it with {FETCHED[name]}" if name else ""


def find_pairs(images, masks, *, mask_suffix: str = "") -> list[Pair]:
    """Match images to masks by name (``a.png`` ↔ ``a.png``/``a.tif``, or
    ``a_mask.png`` with ``mask_suffix="_mask"``). ``images``/``masks`` are a
    file, a folder, or lists of them; an unmatched image is an error."""
    img = [f for p in _as_list(images) for f in _listing(p, "image")]
    if len(img) > 1:  # QuPath projects keep slide.svs and slide.geojson side by side: the labels are no image
        img = [f for f in img if not f.lower().endswith(VECTOR_EXT)]
    msk = [f for p in _as_list(masks) for f in _listing(p, "mask")]
    if len(msk) > 1:  # masks in the images' folder: an image is not its own mask
        msk = [m for m in msk if m not in set(img)]
    if len(img) == 1 and len(msk) == 1:
        return [Pair(img[0], msk[0])]
    by_name = {}
    for m in msk:
        s = _stem(m)
        if mask_suffix and s.endswith(mask_suffix):
            s = s[: -len(mask_suffix)]
        by_name[s] = m
    pairs, missing = [], []
    for f in img:
        m = by_name.get(_stem(f))
        (pairs.append(Pair(f, m)) if m else missing.append(os.path.basename(f)))
    if missing:
        raise InputError(f"no mask for {len(missing)} image(s) ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}): masks are matched by file name"
                         + (f" with suffix {mask_suffix!r}" if mask_suffix else "") + "; check the mask folder")
    return pairs


def region_files(regions, pairs: list[Pair]) -> dict[str, str]:
    """Image name -> its vector file of known areas (``data.regions``):
    one file for one image, else matched by name like the masks. None or
    ``image`` give none (regions then come from the label files)."""
    if regions in (None, "image"):
        return {}
    files = [f for p in _as_list(regions) for f in _listing(p, "regions")]
    if len(files) == 1 and len(pairs) == 1:
        return {pairs[0].name: files[0]}
    by_name = {_stem(f): f for f in files}
    return {p.name: by_name[p.name] for p in pairs if p.name in by_name}


def open_sources(pairs: list[Pair], labels: "LabelMap", *, vector=None, regions: dict | None = None, level=None,
                 mpp=None, bands=None, opened: list | None = None) -> list["Source"]:
    """:class:`Source` of each pair, with its regions file (``regions``:
    image name -> file, from :func:`region_files` over all the pairs); on
    a bad pair, every source opened so far (and those in ``opened``) is
    closed before the error goes on."""
    files, out = regions or {}, []
    try:
        for p in pairs:
            out.append(Source(p, labels, level=level, mpp=mpp, bands=bands, vector=vector, regions=files.get(p.name)))
    except BaseException:
        for s in out + list(opened or []):
            s.close()
        raise
    return out


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def split(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split by image: a seeded shuffle, at least one image on each side."""
    if len(pairs) < 2:
        raise InputError(f"{len(pairs)} image(s): a train/validation split by image needs at least 2; "
                         "add images or give val_images/val_masks")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = min(len(pairs) - 1, max(1, int(round(val_fraction * len(pairs)))))
    val = sorted(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in set(val)], [pairs[i] for i in val]


class LabelMap:
    """Mask values to class indices (uint8, :data:`IGNORE` = not counted).

    ``values[k]`` is the mask value of class ``k``; values not listed are
    ignored. Without ``values``: for two classes any non-zero value is class
    1; otherwise value ``k`` is class ``k``. ``ignore`` is a mask value that
    marks unannotated pixels (sparse annotation)."""

    def __init__(self, classes: int, values: Sequence[int] | None = None, ignore: int | None = None):
        self.classes, self.ignore = classes, ignore
        self.instance_ids = False  # the mask holds object ids (0 = background): see Source.check_values
        self.values = tuple(int(v) for v in values) if values is not None else None
        if self.values is not None and len(self.values) != classes:
            raise InputError(f"mask_values {list(self.values)} name {len(self.values)} classes, but there are "
                             f"{classes} class names: give one mask value per class")

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        m = np.asarray(mask).astype(np.int64)  # one band: (h, w), or (z, y, x) for volumes
        out = np.full(m.shape, IGNORE, np.uint8)
        if self.instance_ids:  # objects parted by a line of background, as a membrane map's truth
            from ..splitting import parted

            out[:] = parted(m) > 0 if m.ndim == 2 else m > 0
        elif self.values is not None:
            for k, v in enumerate(self.values):
                out[m == v] = k
        elif self.classes == 2:
            out[:] = (m != 0)
        else:
            keep = (m >= 0) & (m < self.classes)
            out[keep] = m[keep]
        if self.ignore is not None:
            out[m == self.ignore] = IGNORE
        return out

    def named(self) -> set[int] | None:
        """The mask values that name a class or the ignore value; None:
        any value up to one non-zero (two classes without ``values``)."""
        extra = {self.ignore} if self.ignore is not None else set()
        if self.values is not None:
            return set(self.values) | extra
        if self.classes == 2:
            return None
        return set(range(self.classes)) | extra

    def as_dict(self) -> dict:
        return {"values": list(self.values) if self.values is not None else None, "ignore": self.ignore}


def mask_values(reader: Reader, rows: int = 1024) -> set[int]:
    """Every value of a mask's first band, read a strip of rows at a time."""
    H, W = reader.meta.shape[:2]
    found: set[int] = set()
    for r in range(0, H, rows):
        m, _ = reader.read((r, min(r + rows, H)), (0, W))
        found.update(int(v) for v in np.unique(m[..., 0] if m.ndim == 3 else m))
    return found


class Source:
    """One image and its labels. The image is read at ``level``/``mpp``
    (as ``tilerseg run`` would); the labels, a raster mask or a vector file
    (:mod:`.labels`), come onto that grid one window at a time. ``vector``
    (:class:`.labels.VectorOptions`) says how a vector file names classes
    and known areas; ``regions`` is a vector file of known areas."""

    def __init__(self, pair: Pair, labels: LabelMap, *, level=None, mpp=None, bands=None, vector=None,
                 regions: str | None = None):
        from .labels import open_labels

        self.pair, self.labels = pair, labels
        self.image: Reader = open_reader(pair.image, level=level, mpp=mpp, bands=tuple(bands) if bands else None)
        try:
            self.mask = open_labels(pair.mask, self.image.meta, labels, vector, pair.image, regions)
        except BaseException:
            self.image.close()
            raise

    def check_values(self, instances: bool = False) -> None:
        """Refuse raster mask values that name no class (``tilerseg eval``:
        a value taken as another class changes every score). With
        ``instances`` (``eval --instances``) and two classes, a mask of
        more values than the classes name is read as object ids (0 =
        background): touching objects are then parted by a line of
        background, as the challenge's truth is. Vector labels name their
        classes, checked when they are read."""
        from .labels import RasterLabels

        if not isinstance(self.mask, RasterLabels):
            return
        named = self.labels.named()
        found = mask_values(self.mask.reader)
        if named is None:
            unknown = sorted(v for v in found if v != 0)[1:] if len([v for v in found if v != 0]) > 1 else []
        else:
            unknown = sorted(found - named)
        if not unknown:
            return
        if instances and self.labels.classes == 2:
            self.labels = copy.copy(self.labels)
            self.labels.instance_ids = True
            self.mask.labelmap = self.labels
            return
        shown = ", ".join(str(v) for v in unknown[:8]) + (f" ... ({len(unknown)} values)" if len(unknown) > 8 else "")
        what = (f"mask_values {sorted(self.labels.values)} name the classes" if self.labels.values is not None else
                "without mask_values, 0 is background and one other value the object class")
        raise InputError(f"{self.pair.mask}: mask values {shown} name no class ({what}): give --mask-values "
                         "(one value per class), or with --instances a mask of object ids")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.meta.shape

    @property
    def known_area(self) -> float:
        """Pixels whose labels are known (crops are drawn in proportion)."""
        return self.mask.known_area

    def position(self, rng, size):
        """A crop origin where labels are known, or None: anywhere."""
        return self.mask.position(rng, size)

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(h, w, bands)`` and labels ``(h, w)`` at ``(y, x)``;
        windows reaching past the border are mirrored (both alike)."""
        data, valid = read_padded(self.image, (y, y + h), (x, x + w), "reflect")
        labels = self.mask.window(y, x, h, w)
        if valid is not None:
            labels[~valid] = IGNORE
        return data, labels

    def crop(self, pos, size) -> tuple[np.ndarray, np.ndarray]:
        return self.read(pos[0], pos[1], size[0], size[1])

    def truth(self, ranges) -> np.ndarray:
        """Class labels of an output block (validation)."""
        (r0, r1), (c0, c1) = ranges
        return self.mask.window(r0, c0, r1 - r0, c1 - c0)

    def close(self) -> None:
        self.image.close()
        self.mask.close()


class VolumeSource:
    """A volume (TIFF stack, OME-TIFF with Z, 3-D zarr) and its label
    volume of the same shape; crops are mirror-padded past the border."""

    def __init__(self, pair: Pair, labels: LabelMap):
        from ..io.volume import VolumeReader

        self.pair, self.labels = pair, labels
        self.image = VolumeReader(pair.image)
        self.mask = VolumeReader(pair.mask)
        if self.mask.meta.shape != self.image.meta.shape:
            raise InputError(f"{pair.mask}: label volume is {self.mask.meta.shape} (z, y, x), the image "
                             f"{pair.image} is {self.image.meta.shape}: they must match")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image.meta.shape

    @property
    def known_area(self) -> float:
        return float(np.prod(self.shape))

    def position(self, rng, size):
        return None

    def crop(self, pos, size) -> tuple[np.ndarray, np.ndarray]:
        from ..io.volume import read_padded3

        ranges = [(p, p + n) for p, n in zip(pos, size)]
        return read_padded3(self.image, ranges, "reflect"), self.truth(ranges)

    def truth(self, ranges) -> np.ndarray:
        from ..io.volume import read_padded3

        return self.labels(read_padded3(self.mask, ranges, "reflect")[..., 0])

    def close(self) -> None:
        self.image.close()
        self.mask.close()


class CropDataset:
    """Random ``crop``-sized training samples from ``sources`` (a map-style
    torch dataset of ``length`` items per epoch).

    An image is chosen with probability proportional to its area, then a
    position; with probability ``foreground`` the crop must hold a pixel of
    a class other than 0 (up to 20 draws). Samples are float32 images scaled
    to [0, 1], augmented, then normalised with ``mean``/``std``."""

    def __init__(self, sources: list, *, crop, length: int, seed: int, scale: float,
                 mean, std, augment=None, foreground: float = 0.0, weight_map=None):
        self.dims = len(sources[0].shape)
        self.size = tuple(int(c) for c in crop) if isinstance(crop, (list, tuple)) else (int(crop),) * self.dims
        self.sources, self.length, self.seed = sources, length, seed
        self.scale = float(scale)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.augment, self.foreground, self.weight_map = augment, foreground, weight_map
        area = np.array([s.known_area for s in sources], np.float64)  # sparse labels: by labelled area
        self.p = area / area.sum()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw crop (image in [0, 1], labels) before augmentation."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        src = self.sources[int(rng.choice(len(self.sources), p=self.p))]
        want_fg = rng.random() < self.foreground
        for _ in range(20 if want_fg else 1):
            pos = src.position(rng, self.size) or [int(rng.integers(0, max(n - c, 0) + 1))
                                                   for n, c in zip(src.shape, self.size)]
            data, labels = src.crop(pos, self.size)
            if not want_fg or ((labels > 0) & (labels != IGNORE)).any():
                break
        return data.astype(np.float32) / self.scale, labels

    def __getitem__(self, index: int):
        import torch

        image, labels = self.sample(index)
        if self.augment is not None:
            # per-sample seed: the same crop gets the same transform in any worker, after a resume too
            aug_rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            self.augment.set_random_seed(int(aug_rng.integers(2 ** 31)))
            if self.dims == 2:
                out = self.augment(image=image, mask=labels)
                image, labels = out["image"], out["mask"]
            else:  # the same 2-D transform on every slice; albumentations has no flip along z: done here
                out = self.augment(images=image, masks=labels)
                image, labels = out["images"], out["masks"]
                if aug_rng.random() < 0.5:
                    image, labels = image[::-1], labels[::-1]
        image = (image - self.mean) / self.std
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), np.float32))
        y = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        if self.weight_map is None:
            return x, y
        return x, y, torch.from_numpy(self.weight_map(labels))


def sample_stats(sources: list[Source], scale: float, n: int = 64, crop: int = 256, seed: int = 0):
    """Per-band mean and std of pixels (scaled to [0, 1]) over ``n`` random
    crops of the training images: the normalisation ``auto`` records."""
    rng = np.random.default_rng(seed)
    total = sq = count = 0
    for _ in range(n):
        src = sources[int(rng.integers(len(sources)))]
        size = [min(crop if len(src.shape) == 2 or i else crop // 4, s) for i, s in enumerate(src.shape)]
        pos = [int(rng.integers(0, s - c + 1)) for s, c in zip(src.shape, size)]
        data, labels = src.crop(pos, size)
        px = data.reshape(-1, data.shape[-1]).astype(np.float64) / scale
        px = px[(labels != IGNORE).ravel()] if (labels != IGNORE).any() else px
        total = total + px.sum(0)
        sq = sq + (px ** 2).sum(0)
        count += len(px)
    if not count:
        raise InputError("the training images hold no valid pixels")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)
