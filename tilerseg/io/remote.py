"""Inputs by URL: one place for opening, caching, counting and masking.

A URL (``https://``, ``s3://``, any fsspec scheme) is a path to
:func:`~tilerseg.io.open.open_reader`. Two transports sit under the same
readers:

* GeoTIFF/COG: GDAL's ``/vsicurl/`` and ``/vsis3/`` (its own block cache),
  configured here from the usual AWS variables (``AWS_ENDPOINT_URL`` for an
  S3-compatible store); the bytes it fetched come from GDAL's network
  statistics.
* everything else (TIFF, OME-TIFF, SVS through tifffile; zarr): fsspec,
  through :class:`RemoteFile`, a thread-safe file with one block cache that
  fetches only the byte ranges asked for and counts them.

Credentials never reach logs, the ledger, output metadata or error messages:
:func:`display` masks a URL's userinfo and query string, :func:`mask_text`
every URL in a text; the command line, the ledger and the output metadata
pass through them."""
from __future__ import annotations

import collections
import json
import os
import re
import threading
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError

os.environ.setdefault("CPL_VSIL_NETWORK_STATS_ENABLED", "YES")  # GDAL counts what it downloads (bytes_read)
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/@'\"]*@)?([^\s?#'\"]*)(\?[^\s#'\"]*)?")
_COUNT = collections.Counter()  # bytes fetched through fsspec in this process
_COUNT_LOCK = threading.Lock()


def is_url(path) -> bool:
    """A path with a scheme (``s3://``, ``https://``...); ``file://`` is local."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def display(url: str) -> str:
    """``url`` fit to print: userinfo and query string masked
    (``https://***@host/a.tif?***``)."""
    return mask_text(url)


def mask_text(text: str) -> str:
    """Every URL in ``text`` with its userinfo and query string masked."""
    def one(m):
        return m.group(1) + ("***@" if m.group(2) else "") + m.group(3) + ("?***" if m.group(4) else "")
    return _URL.sub(one, text) if "://" in text else text


def filesystem(url: str):
    """``(fsspec filesystem, path)`` for ``url``; an unknown scheme or a
    missing backend is one line naming the package to install."""
    import fsspec
    from fsspec.registry import known_implementations

    scheme = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **_timeouts(scheme))
    except (ImportError, ValueError) as err:
        known = known_implementations.get(scheme)
        if known:
            package = known["class"].split(".", 1)[0]
            raise InputError(f"{display(url)}: reading {scheme}:// needs the {package} package: "
                             f"pip install {package} (or pip install 'tilerseg[remote]' for S3)") from None
        raise InputError(f"{display(url)}: no fsspec backend knows the scheme {scheme}://; use https://, s3://, "
                         f"gs:// or az:// ({' '.join(str(err).split())[:120]})") from None


def timeout() -> float:
    """Seconds to wait for a server to connect or answer a read
    (``TILERSEG_REMOTE_TIMEOUT``, 30 by default): a server that hangs is
    an error, not a run that never ends."""
    return float(os.environ.get("TILERSEG_REMOTE_TIMEOUT", "30"))


def _timeouts(scheme: str) -> dict:
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout(),
                                                                   sock_read=timeout())}}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout(), "read_timeout": timeout(),
                                  "retries": {"max_attempts": 2}}}
    return {}


def fail(url: str, err: BaseException, doing: str = "cannot read it") -> InputError:
    """One line for a failed remote access: what the server said, and what to do."""
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    status = next((getattr(c, "status", None) for c in chain if isinstance(getattr(c, "status", None), int)), None)
    code = next((c.response.get("Error", {}).get("Code") for c in chain
                 if isinstance(getattr(c, "response", None), dict)), None)
    text = " ".join(" ".join(str(c) for c in chain).split())
    u = display(url)
    if isinstance(err, InputError):
        return err
    if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") \
            or isinstance(err, PermissionError) or "HTTP response code: 40" in text and ("401" in text or "403" in text):
        return InputError(f"{u}: access denied ({status or code or 'forbidden'}); check the credentials "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for S3, the token in the URL for "
                          "HTTP) and that they may read this object")
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404") or "HTTP response code: 404" in text \
            or (isinstance(err, FileNotFoundError) and status is None and not _network(text)):
        return InputError(f"{u}: not found on the server (404); check the URL")
    if "support range requests" in text or "ignores range" in text:
        return InputError(f"{u}: the server does not support HTTP range requests, so the image cannot be read "
                          "window by window; serve it from a server that does (nginx, S3), or copy it locally")
    if _network(text):
        return InputError(f"{u}: cannot reach the server ({_short(text, url)}); check the host name, the network and "
                          "AWS_ENDPOINT_URL, or retry later")
    return InputError(f"{u}: {doing} ({_short(text, url)})")


def _network(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in ("name or service not known", "cannot connect", "connect call failed", "timeout",
                                  "timed out", "temporary failure in name resolution", "could not resolve",
                                  "nodename nor servname", "connection refused", "couldn't resolve",
                                  "could not connect", "timeouterror", "read timed out"))


def _short(text: str, url: str = "") -> str:
    text = mask_text(text)
    return (text.replace(display(url), "").strip(" :") if url else text)[:200]


def stat(url: str) -> dict:
    """``{"size", "etag"}`` of the object at ``url`` from the server (ETag,
    else Last-Modified): what the resume fingerprint and the reader cache
    key on. Errors are one line (:func:`fail`)."""
    if strip_query(url).rstrip("/").lower().endswith(".zarr"):
        return _zarr_stat(url)
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except Exception as err:
        raise fail(url, err) from None
    if info.get("type") == "directory":
        return {"size": None, "etag": None, "directory": True}
    tag = next((str(info[k]) for k in ("ETag", "etag", "LastModified", "Last-Modified", "mtime", "last_modified")
                if info.get(k)), None)
    return {"size": info.get("size"), "etag": tag}


def _zarr_stat(url: str) -> dict:
    """A zarr store by URL is a folder, which HTTP cannot stat: its root
    metadata (``zarr.json``, else ``.zgroup``/``.zarray``) stands for it."""
    fs, path = filesystem(url)
    first = None
    for name in ("zarr.json", ".zgroup", ".zarray"):
        try:
            info = fs.info(f"{path.rstrip('/')}/{name}")
        except Exception as err:
            first = first or err
            continue
        tag = next((str(info[k]) for k in ("ETag", "LastModified", "Last-Modified", "mtime") if info.get(k)), None)
        return {"size": None, "etag": tag, "directory": True}
    raise fail(url, first) from None


def fingerprint(url: str) -> list:
    """The input's part of the resume fingerprint: the masked URL, the
    server's size and ETag (or last-modified)."""
    s = stat(url)
    return [display(url), s["size"], s["etag"]]


def count(n: int) -> None:
    with _COUNT_LOCK:
        _COUNT["bytes"] += n


def bytes_read() -> int:
    """Bytes this process fetched by URL so far: fsspec's (:class:`RemoteFile`)
    and GDAL's (its network statistics)."""
    return _COUNT["bytes"] + gdal_bytes()


def gdal_bytes() -> int:
    """What GDAL's /vsicurl/ and /vsis3/ downloaded in this process."""
    lib = _gdal()
    if lib is None:
        return 0
    import ctypes

    ptr = lib.VSINetworkStatsGetAsSerializedJSON(None)
    if not ptr:
        return 0
    try:
        stats = json.loads(ctypes.string_at(ptr).decode())
    finally:
        lib.VSIFree(ctypes.c_void_p(ptr))
    return int(sum(m.get("downloaded_bytes", 0) for m in stats.get("methods", {}).values()))


_LIB: list = []


def _gdal():
    """rasterio's libgdal, for the two network-statistics calls rasterio does not wrap."""
    if not _LIB:
        import ctypes
        import ctypes.util
        import glob

        import rasterio

        lib = None
        base = os.path.dirname(os.path.dirname(rasterio.__file__))
        found = glob.glob(os.path.join(base, "rasterio.libs", "libgdal*")) or [ctypes.util.find_library("gdal") or ""]
        try:
            lib = ctypes.CDLL(found[0])
            lib.VSINetworkStatsGetAsSerializedJSON.restype = ctypes.c_void_p
            lib.VSINetworkStatsGetAsSerializedJSON.argtypes = [ctypes.c_void_p]
        except (OSError, AttributeError, IndexError):
            lib = None
        _LIB.append(lib)
    return _LIB[0]


def gdal_path(url: str) -> str:
    """GDAL's name for ``url``: ``/vsis3/bucket/key``, ``/vsigs/``,
    ``/vsiaz/``, else ``/vsicurl/URL``."""
    scheme, rest = url.split("://", 1)
    vsi = {"s3": "vsis3", "gs": "vsigs", "gcs": "vsigs", "az": "vsiaz", "abfs": "vsiaz"}.get(scheme.lower())
    return f"/{vsi}/{rest}" if vsi else f"/vsicurl/{url}"


def gdal_options() -> dict:
    """GDAL configuration for remote reads: no directory listing on open,
    and an S3-compatible endpoint from ``AWS_ENDPOINT_URL`` (as boto reads it)."""
    opts = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MAX_RETRY": "1",
            "GDAL_HTTP_TIMEOUT": os.environ.get("GDAL_HTTP_TIMEOUT", str(int(timeout()))),
            "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": None}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and ("AWS_S3_ENDPOINT" not in os.environ or "AWS_S3_ENDPOINT" in _OURS):
        parts = urlsplit(endpoint)
        opts.update(AWS_S3_ENDPOINT=parts.netloc + parts.path.rstrip("/"),
                    AWS_HTTPS="NO" if parts.scheme == "http" else "YES", AWS_VIRTUAL_HOSTING="FALSE")
    return {k: v for k, v in opts.items() if v is not None}


_OURS: set = set()  # the GDAL variables apply_gdal_options set (the user's own are left alone)


def apply_gdal_options() -> None:
    """Put :func:`gdal_options` in the process environment, which GDAL
    reads at every request (not only at open, as rasterio.Env would);
    those set here follow ``AWS_ENDPOINT_URL`` when it changes."""
    for k, v in gdal_options().items():
        if k not in os.environ or k in _OURS:
            os.environ[k] = v
            _OURS.add(k)


BLOCK = 16 * 1024  # header reads (IFDs, tags, OME-XML): one request per run of 16 KiB blocks
CACHE_BYTES = 64 * 2 ** 20  # per open file; tiles read by neighbouring windows' halos come from here


class RemoteFile:
    """A read-only, thread-safe file over fsspec byte ranges.

    :meth:`pread` fetches exactly the bytes a tile needs (rounded to
    :data:`BLOCK`), keeps them in an LRU cache of :data:`CACHE_BYTES` so a
    tile under two windows' halos is fetched once, and checks the length
    the server sent (a server that ignores ``Range`` sends the whole
    object; a truncated one, less). ``seek``/``read``/``tell`` make it a
    file for tifffile's header parsing."""

    def __init__(self, url: str, size: int | None = None):
        self.url = url
        self.fs, self._path = filesystem(url)
        self.size = size if size is not None else stat(url)["size"]
        if self.size is None:
            raise InputError(f"{display(url)}: the server does not say the object's size (no Content-Length); "
                             "serve it from a server that does, or copy it locally")
        self._blocks: collections.OrderedDict = collections.OrderedDict()
        self._lock, self._pos, self.closed, self._held = threading.Lock(), 0, False, 0
        self.name = display(url)

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes at ``offset`` (fewer only at the end of the object)."""
        end = min(offset + n, self.size)
        if offset >= end:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        have = {}
        with self._lock:
            for b in range(first, last + 1):
                if b in self._blocks:
                    self._blocks.move_to_end(b)
                    have[b] = self._blocks[b]
        b = first
        while b <= last:  # one request per run of missing blocks
            if b in have:
                b += 1
                continue
            stop = b
            while stop + 1 <= last and stop + 1 not in have:
                stop += 1
            data = self._fetch(b * BLOCK, min((stop + 1) * BLOCK, self.size))
            for k in range(b, stop + 1):
                have[k] = data[(k - b) * BLOCK:(k - b + 1) * BLOCK]
            self._keep({k: have[k] for k in range(b, stop + 1)})
            b = stop + 1
        joined = b"".join(have[k] for k in range(first, last + 1))
        return joined[offset - first * BLOCK:end - first * BLOCK]

    def tile(self, n: int, offset: int) -> bytes:
        """A tile's ``n`` bytes at ``offset``, fetched exactly (no rounding
        to blocks: neighbours outside the windows are not fetched) and kept
        in the LRU cache, so a tile under two windows' halos is fetched once."""
        key = ("tile", offset, n)
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        data = self._fetch(offset, min(offset + n, self.size))
        self._keep({key: data})
        return data

    def check_ranges(self) -> None:
        """Fetch the last two bytes: a server that ignores ``Range`` sends
        the whole object, and is refused before any window is read."""
        self._fetch(max(0, self.size - 2), self.size)

    def _fetch(self, start: int, end: int) -> bytes:
        try:
            data = self.fs.cat_file(self._path, start=start, end=end)
        except Exception as err:
            raise fail(self.url, err) from None
        count(len(data))
        if len(data) > end - start:
            raise InputError(f"{display(self.url)}: the server does not support HTTP range requests (asked for "
                             f"bytes {start}-{end - 1}, it sent {len(data)}), so the image cannot be read window by "
                             "window; serve it from a server that does (nginx, S3), or copy it locally")
        if len(data) < end - start:
            raise InputError(f"{display(self.url)}: truncated: the server sent {len(data)} of bytes {start}-{end - 1} "
                             f"of a {self.size}-byte object; upload it again")
        return data

    def _keep(self, blocks: dict) -> None:
        with self._lock:
            self._held += sum(len(v) for k, v in blocks.items() if k not in self._blocks)
            self._blocks.update(blocks)
            while self._held > CACHE_BYTES and self._blocks:
                self._held -= len(self._blocks.popitem(last=False)[1])

    # the file protocol tifffile uses to parse the header
    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self.size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self._pos if n is None or n < 0 else n
        data = self.pread(n, self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        memoryview(buf).cast("B")[:len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self._blocks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def strip_query(url: str) -> str:
    """``url`` without userinfo and query: a name for files and outputs."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.hostname + (f":{p.port}" if p.port else "") if p.hostname else p.netloc,
                       p.path, "", ""))
