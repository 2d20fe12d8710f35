"""TIFF outputs from the zarr levels of a result, written tile by tile.

* Pyramidal OME-TIFF (``.ome.tif``): OME-XML with the physical pixel size;
  the reduced levels are stored twice, as SubIFDs of the full-resolution
  image (the OME pyramid that Bio-Formats, QuPath and tifffile read) and
  in the main IFD chain (the levels openslide reads from a generic tiled
  TIFF). Masks compress to little, so the copy costs a few percent.
* Pyramidal TIFF (``.tif`` without georeference): the main-chain layout
  only, with the result's description as JSON.
* Cloud Optimized GeoTIFF (``.tif`` with georeference): a tiled GeoTIFF
  copied by GDAL's COG driver, which adds overviews and orders the file.

Label masks carry a colour table, so viewers show classes in colour."""
from __future__ import annotations

import json
import os

import numpy as np

from .base import LABEL_NODATA, ImageMeta, probability_bytes

TILE = 256


def _windows(z, tile: int):
    """Yield ``(row0, col0, block)`` over ``z`` (``(..., H, W)``) in strips
    one tile high and about one zarr chunk wide (whole tiles), so each chunk
    is decoded a few times at most and memory stays at one strip-chunk."""
    H, W = z.shape[-2:]
    step = max(1, z.chunks[-1] // tile) * tile
    for r0 in range(0, H, tile):
        for c0 in range(0, W, step):
            yield r0, c0, np.asarray(z[..., r0:r0 + tile, c0:c0 + step])


def _tiles(z, fill, imap=map, convert=None, ready=None):
    """Every ``TILE`` x ``TILE`` tile of ``z`` in TIFF order (plane, row,
    column), padded with ``fill`` at the right and bottom edges, passed
    through ``convert`` (e.g. probabilities to uint8) when given, and
    zlib-compressed as tifffile would (same bytes). ``imap`` reads and
    compresses strips of tiles in parallel and yields them in order (the
    engine's :func:`~tilerseg.engine.thread_map`); the default is serial.
    ``ready(r0, r1, c0, c1)``, when given, is called (in the consumer's
    thread, before a strip is handed to ``imap``) and returns once that
    region of ``z`` is computed: a streamed write."""
    planes = range(z.shape[0]) if z.ndim == 3 else [None]
    H, W = z.shape[-2:]
    step = max(1, z.chunks[-1] // TILE) * TILE

    def strips():
        for k in planes:
            for r0 in range(0, H, TILE):
                for c0 in range(0, W, step):
                    if ready is not None:
                        ready(r0, min(r0 + TILE, H), c0, min(c0 + step, W))
                    yield k, r0, c0

    for tiles in imap(lambda strip: _encoded_strip(z, fill, step, convert, *strip), strips()):
        yield from tiles


def _encoded_strip(z, fill, step: int, convert, k, r0: int, c0: int) -> list[bytes]:
    """The compressed tiles of one strip, one tile high and ``step`` wide."""
    import tifffile

    encode = tifffile.TIFF.COMPRESSORS[8]  # tifffile's own deflate encoder: the bytes it would write
    block = np.asarray((z if k is None else _Plane(z, k))[..., r0:r0 + TILE, c0:c0 + step])
    block = convert(block) if convert else block
    out = []
    for x in range(0, block.shape[1], TILE):
        tile = np.full((TILE, TILE), fill, block.dtype)
        part = block[:, x:x + TILE]
        tile[:part.shape[0], :part.shape[1]] = part
        out.append(encode(tile))
    return out


class _Plane:
    """One band of a (K, H, W) zarr array, sliced lazily."""

    def __init__(self, z, k):
        self.z, self.k, self.shape, self.chunks = z, k, z.shape[1:], z.chunks[1:]

    def __getitem__(self, idx):
        return self.z[(self.k,) + tuple(i for i in idx if i is not Ellipsis)]


def colormap(classes: int) -> np.ndarray:
    """A TIFF palette (3, 256) uint16 of :func:`~tilerseg.io.pyramid.palette`."""
    from .pyramid import palette

    return palette(classes).T.astype(np.uint16) * 257


OME_UNITS = {"meter": "m", "micrometer": "µm"}  # physical_pixel's UDUNITS names -> OME's UnitsLength


def _ome_xml(shape, dtype, meta: ImageMeta, probabilities: bool, channel_names, description: str,
             uid: str | None = None) -> str:
    import tifffile

    K = shape[0] if len(shape) == 3 else 1
    kw = {"Name": "mask", "Description": description}
    if meta.mpp:
        kw.update(PhysicalSizeX=meta.mpp, PhysicalSizeY=meta.mpp)  # µm is OME's default unit
    else:
        from .pyramid import physical_pixel

        size, unit = physical_pixel(meta)
        if size and unit in OME_UNITS:  # a georeferenced raster whose CRS has a linear unit: its pixel size
            kw.update(PhysicalSizeX=size[1], PhysicalSizeXUnit=OME_UNITS[unit], PhysicalSizeY=size[0],
                      PhysicalSizeYUnit=OME_UNITS[unit])
    if channel_names:
        kw["Channel"] = {"Name": list(channel_names)}
    ome = tifffile.OmeXml(**({"UUID": uid} if uid else {}))
    ome.addimage(np.dtype(dtype), (K, *shape[-2:]) if K > 1 else shape[-2:],
                 (K, 1, 1, *shape[-2:], 1), axes="CYX" if K > 1 else "YX", **kw)
    return ome.tostring()


def write_pyramid_tiff(levels: list, path: str, meta: ImageMeta, kind: dict, *, ome: bool,
                       uid: str | None = None, imap=map) -> None:
    """Write ``levels`` (zarr arrays, finest first) as a tiled pyramidal TIFF.
    ``uid``: the OME UUID (random if None; tilerseg derives it from the
    run's settings, so that a resumed run writes the same bytes). ``imap``:
    how tiles are read and compressed (see :func:`_tiles`); tifffile
    writes the compressed tiles in order as they come."""
    stream_pyramid_tiff(levels[0], [z.shape for z in levels], lambda: levels, path, meta, kind, ome=ome, uid=uid,
                        imap=imap)


def stream_pyramid_tiff(z0, shapes: list, rest, path: str, meta: ImageMeta, kind: dict, *, ome: bool,
                        uid: str | None = None, imap=map, ready=None) -> None:
    """:func:`write_pyramid_tiff` while level 0 is being computed: its tiles
    are written as ``ready(r0, r1, c0, c1)`` (see :func:`_tiles`) releases
    them, then ``rest()`` gives all the levels, of ``shapes`` (waiting for
    them to be built; its first is ``z0``). The bytes are those of
    :func:`write_pyramid_tiff`: the file is written in the same order, only
    sooner."""
    import tifffile

    probabilities = kind["kind"] == "probabilities"
    instances = kind["kind"] == "instances"  # uint32 object ids, 0 = none: grey, no palette
    as_bytes = probabilities and kind.get("dtype") == "uint8"
    fill = np.nan if probabilities and not as_bytes else 0 if instances else LABEL_NODATA
    dtype = np.dtype(np.uint8) if as_bytes else z0.dtype
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    nbytes = sum(np.prod(shape) * dtype.itemsize for shape in shapes)
    description = json.dumps({"tilerseg": kind})
    K = z0.shape[0] if z0.ndim == 3 else 1
    common = dict(tile=(TILE, TILE), compression="zlib", metadata=None, dtype=dtype,
                  planarconfig="separate" if K > 1 else None)
    if probabilities or instances:
        common["photometric"] = "minisblack"
    else:
        common.update(photometric="palette", colormap=colormap(kind["classes"]))
    levels = []

    def res(k):
        if not meta.mpp:
            return {}
        px = 1e4 / (meta.mpp * 2 ** k)  # pixels per centimetre
        return {"resolution": (px, px), "resolutionunit": "CENTIMETER"}

    def put(tw, k, **kw):
        if k and not levels:
            levels.extend(rest())
            if [tuple(z.shape) for z in levels] != shapes:
                raise ValueError(f"levels {[z.shape for z in levels]} are not the pyramid of {z0.shape}")
        z = levels[k] if k else z0
        tw.write(_tiles(z, fill, imap, probability_bytes if as_bytes else None, ready if k == 0 else None),
                 shape=z.shape if K > 1 else z.shape[-2:], **common, **res(k), **kw)

    with tifffile.TiffWriter(path, bigtiff=nbytes * (2 if ome else 1) > 2**31 - 2**26) as tw:
        if ome:
            xml = _ome_xml(z0.shape, dtype, meta, probabilities, kind["band_names"] if probabilities else (),
                           description, uid)
            put(tw, 0, description=xml, subifds=len(shapes) - 1)
            for k in range(1, len(shapes)):
                put(tw, k, subfiletype=1)
        else:
            put(tw, 0, description=description)
        for k in range(1, len(shapes)):
            put(tw, k, subfiletype=1)


def write_cog(z, path: str, meta: ImageMeta, kind: dict, *, threads: str = "ALL_CPUS") -> None:
    """Write ``z`` (labels (H, W) or probabilities (K, H, W)) as a COG with
    the input's CRS and transform; nodata is 255 for labels, NaN for
    probabilities. GDAL builds the overviews (nearest for labels, average
    for probabilities) with a bounded cache."""
    import rasterio
    import rasterio.shutil
    from rasterio.transform import Affine
    from rasterio.windows import Window

    probabilities = kind["kind"] == "probabilities"
    instances = kind["kind"] == "instances"  # uint32 object ids; 0 (no object) is nodata to GIS tools
    as_bytes = probabilities and kind.get("dtype") == "uint8"
    K = z.shape[0] if z.ndim == 3 else 1
    H, W = z.shape[-2:]
    staging = path + ".staging.tif"
    floats = probabilities and not as_bytes
    profile = dict(driver="GTiff", height=H, width=W, count=K,
                   dtype="float32" if floats else "uint32" if instances else "uint8", crs=meta.crs,
                   transform=Affine(*meta.transform), nodata=float("nan") if floats else 0 if instances else LABEL_NODATA,
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    try:
        with rasterio.Env(GDAL_CACHEMAX=64):
            with rasterio.open(staging, "w", **profile) as dst:
                for r0, c0, block in _windows(z, 512):
                    block = block if block.ndim == 3 else block[None]
                    block = probability_bytes(block) if as_bytes else block
                    dst.write(block, window=Window(c0, r0, block.shape[-1], block.shape[-2]))
                dst.update_tags(TILERSEG=json.dumps(kind))
                if probabilities:
                    for k, name in enumerate(kind["band_names"][:K]):
                        dst.set_band_description(k + 1, name)
                elif instances:
                    dst.set_band_description(1, "object id")
                else:
                    from .pyramid import palette

                    dst.write_colormap(1, {k: (*map(int, rgb), 255) for k, rgb in enumerate(palette(kind["classes"]))})
            rasterio.shutil.copy(staging, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, NUM_THREADS=threads,
                                 OVERVIEWS="IGNORE_EXISTING", BIGTIFF="IF_SAFER",
                                 RESAMPLING="AVERAGE" if probabilities else "NEAREST")
    finally:
        if os.path.exists(staging):
            os.remove(staging)
