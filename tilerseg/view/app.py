"""The viewer's ASGI app (Starlette): one page, its bundled assets, tiles,
values under the cursor and polygons per view.

No URL names a file: layers are numbered (0 is the image, then the outputs
in command-line order) and static assets come from a fixed list read at
start, so nothing outside the files given on the command line can be
reached (``..``, absolute paths and symlinks all end in 404). Tiles carry
``Cache-Control`` and an ``ETag`` (the file's size and modification time,
also in the tile URLs as ``v=``, so a rewritten output gets new URLs).

Every request must name this server in its ``Host`` header (the loopback
names and the ``--host`` given, with the port it listens on): a web page on
any other origin can point its own name at 127.0.0.1 (DNS rebinding) and
would otherwise read the slide through the browser, and slides are patient
data. No CORS header is sent, so other origins cannot read answers either."""
from __future__ import annotations

import logging
import math
import os
import re

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import ReadError
from .layers import dumps

log = logging.getLogger("tilerseg")

STATIC = os.path.join(os.path.dirname(__file__), "static")
ASSETS = {"openseadragon.min.js": "text/javascript", "viewer.js": "text/javascript", "viewer.css": "text/css",
          "LICENSE-openseadragon.txt": "text/plain"}
TILE_CACHE = "public, max-age=86400"
_HOST = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[^:\[\]/@]+)(?::(\d{1,5}))?")  # name or [IPv6], then :port
MAX_FEATURES = 5000  # polygons sent for one view at most (the largest first); the page says how many it left out


def allowed_names(host: str) -> list[str]:
    """The host names that name this server: ``127.0.0.1``, ``localhost``,
    ``[::1]`` and ``host`` (for ``0.0.0.0``/``::``: this machine's name and
    addresses, which another machine would type)."""
    import socket

    names = {"127.0.0.1", "localhost", "::1", host.lower()}
    if host in ("0.0.0.0", "::", ""):
        me = socket.gethostname()
        names |= {me.lower(), socket.getfqdn().lower()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(me, None)}
        except OSError:
            pass
    names -= {"0.0.0.0", "::", ""}
    return sorted(f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names)


class _SamePort:
    """With Starlette's TrustedHostMiddleware (the name): refuse (400, one
    line) a ``Host`` header with another port than this server's, and say
    which address to open (an SSH tunnel from another local port is told to
    use the same port at both ends)."""

    def __init__(self, app, port: int):
        self.app, self.port = app, port

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            raw = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            m = _HOST.fullmatch(raw)
            if m is None or int(m[1] or 80) != self.port:
                text = (f"Host {(raw or '')[:100]!r} is not this viewer's address: open http://127.0.0.1:{self.port}/ "
                        f"(through an SSH tunnel, the same port at both ends: ssh -L {self.port}:127.0.0.1:"
                        f"{self.port} host)")
                await Response(text, status_code=400, media_type="text/plain")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BadRequest(Exception):
    """A query or path the viewer's page never sends: answered 400, one line."""


_INT = re.compile(r"-?[0-9]{1,12}")
_LIMIT = 1e15  # |coordinate| in a query: beyond it a number is a mistake, not a place


def _int(text: str, why: str) -> int:
    if not _INT.fullmatch(text):
        raise BadRequest(why)
    return int(text)


def _ints(params, *names) -> list[int]:
    return [_int(params[k], f"{k}: a whole number of at most 12 digits") for k in names]


def _number(q, key: str, why: str) -> float:
    """A finite query number: NaN, infinities, huge or missing values are refused."""
    text = q.get(key, "")
    try:
        v = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and abs(v) <= _LIMIT):
        raise BadRequest(why)
    return v


async def _bad_request(request: Request, err: BadRequest) -> Response:
    return Response(str(err), status_code=400, media_type="text/plain")


LOGGED = 20  # damaged places of one file that are logged


def _damaged_handler():
    """A window of a damaged file: 422 with the reader's one line, logged
    once per place (a page asks for it again on every pan), and for the
    first ``LOGGED`` places of a file only (the cursor readout asks per pixel)."""
    told: set = set()
    per_file: dict = {}

    async def damaged(request: Request, err: ReadError) -> Response:
        text = str(err)
        where = text.split(": could not decode", 1)[0]
        if text not in told and per_file.get(where, 0) < LOGGED:
            told.add(text)
            per_file[where] = per_file.get(where, 0) + 1
            last = per_file[where] == LOGGED
            log.warning("%s%s", text, " (further damaged places of this file are not logged)" if last else "")
        return Response(text, status_code=422, media_type="text/plain", headers={"Cache-Control": "no-cache"})

    return damaged


class _NoTraceback:
    """The last resort: anything else that fails in a request is one log
    line and a 500 with that line, never a traceback on the terminal."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as err:
            if scope["type"] != "http":
                raise
            text = f"internal error on {scope.get('path', '')[:200]}: {type(err).__name__}: " \
                   f"{' '.join(str(err).split())[:300]}"
            log.error("%s", text)
            if not started:
                await Response(text, status_code=500, media_type="text/plain")(scope, receive, send)


def create_app(view, *, host: str = "127.0.0.1", port: int) -> Starlette:
    """The app serving ``view`` (a :class:`tilerseg.view.View`) on
    ``host:port``: requests naming another address are refused."""
    layers = [view.image, *view.layers]
    root = os.path.realpath(STATIC)
    assets = {name: os.path.join(root, name) for name in ASSETS  # a symlink leading out of the folder is not served
              if os.path.isfile(os.path.join(root, name)) and os.path.dirname(os.path.realpath(
                  os.path.join(root, name))) == root}

    def not_found(what: str = "not found") -> Response:
        return Response(what, status_code=404, media_type="text/plain")

    def index(request: Request):
        return FileResponse(os.path.join(root, "index.html"), media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    def static(request: Request):
        name = request.path_params["name"]
        if name not in assets:
            return not_found()
        return FileResponse(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=3600"})

    def info(request: Request):
        return Response(dumps(view.info()), media_type="application/json", headers={"Cache-Control": "no-cache"})

    def tile(request: Request):
        i, level, col, row = _ints(request.path_params, "layer", "level", "col", "row")
        if not 0 <= i < len(layers) or getattr(layers[i], "kind", "") == "polygons":
            return not_found()
        layer = layers[i]
        q = request.query_params
        hide = tuple(_int(k, "hide: class numbers separated by commas") for k in q.get("hide", "").split(",") if k)
        band = _int(q.get("band", "0"), "band: a band number")
        etag = f'"{layer.version}-{level}-{col}-{row}-{",".join(map(str, hide))}-{band}"'
        headers = {"Cache-Control": TILE_CACHE, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        found = layer.tile(level, col, row, hide=hide, band=band)
        if found is None:
            return not_found("no such tile")
        body, media = found
        return Response(body, media_type=media, headers=headers)

    def point(request: Request):
        q = request.query_params
        x, y = (_number(q, k, "x and y: level-0 pixel coordinates, finite numbers") for k in ("x", "y"))
        H, W = view.image.shape
        if not (0 <= x < W and 0 <= y < H):
            return JSONResponse({"inside": False})
        col, row = int(x), int(y)
        out = {"inside": True, "col": col, "row": row, "layers": []}
        m = view.image.meta
        if m.mpp:
            out["um"] = [(col + 0.5) * m.mpp, (row + 0.5) * m.mpp]
        elif m.transform is not None and m.georeferenced:
            a, b, c, d, e, f = m.transform[:6]
            out["map"] = [a * (col + 0.5) + b * (row + 0.5) + c, d * (col + 0.5) + e * (row + 0.5) + f]
            out.update(view.lonlat(*out["map"]))
        for k, layer in enumerate(layers):
            if layer.kind == "polygons":
                continue
            v = layer.value(x, y, view.image.shape)
            out["layers"].append({"layer": k, **(v or {})})
        return Response(dumps(out), media_type="application/json", headers={"Cache-Control": "no-cache"})

    def features(request: Request):
        (i,) = _ints(request.path_params, "layer")
        if not 0 <= i < len(layers) or layers[i].kind != "polygons":
            return not_found()
        q = request.query_params
        why = "x0, y0, x1, y1: the view in level-0 pixels, finite numbers; limit: a whole number"
        box = [_number(q, k, why) for k in ("x0", "y0", "x1", "y1")]
        limit = min(_int(q.get("limit", str(MAX_FEATURES)), why), MAX_FEATURES)
        ids, total = layers[i].query(*box, max(1, limit))
        return Response(dumps({"total": total, "features": layers[i].features(ids)}), media_type="application/json")

    def properties(request: Request):
        i, fid = _ints(request.path_params, "layer", "fid")
        if not 0 <= i < len(layers) or layers[i].kind != "polygons" or not 0 <= fid < layers[i].count:
            return not_found()
        return Response(dumps(layers[i].props.get(fid)), media_type="application/json")

    def find(request: Request):
        (i,) = _ints(request.path_params, "layer")
        own = request.query_params.get("id", "")
        if not 0 <= i < len(layers) or layers[i].kind != "polygons" or not 0 < len(own) <= 200:
            return not_found()
        at = layers[i].find(own)
        if at is None or not layers[i].count:
            return not_found(f"no feature with id {own[:50]} in {layers[i].info()['name']}")
        box = [float(v[at]) for v in (layers[i].x0, layers[i].y0, layers[i].x1, layers[i].y1)]
        return Response(dumps({"position": at, "id": layers[i].own_id(at), "box": box}), media_type="application/json")

    def object_row(request: Request):
        i, oid = _ints(request.path_params, "layer", "oid")
        if not 0 <= i < len(layers) or layers[i].kind != "instances":
            return not_found()
        row = layers[i].table.row(oid)
        if row is None:
            return not_found(f"no object {oid} in {layers[i].table.path}" if layers[i].table.exists else
                             f"no object table beside {os.path.basename(layers[i].path)}")
        return Response(dumps(row), media_type="application/json")

    routes = [Route("/", index), Route("/favicon.ico", lambda request: Response(status_code=204)), Route("/static/{name}", static), Route("/api/info", info),
              Route("/tiles/{layer}/{level}/{col}_{row}", tile), Route("/api/point", point),
              Route("/api/features/{layer}", features), Route("/api/properties/{layer}/{fid}", properties),
              Route("/api/object/{layer}/{oid}", object_row), Route("/api/find/{layer}", find)]
    return Starlette(routes=routes, exception_handlers={BadRequest: _bad_request, ReadError: _damaged_handler()}, middleware=[
        Middleware(_NoTraceback),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_names(host), www_redirect=False),
        Middleware(_SamePort, port=port)])
