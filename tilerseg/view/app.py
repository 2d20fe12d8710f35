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

import os
import re

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .layers import dumps

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
        p = request.path_params
        i = p["layer"]
        if not 0 <= i < len(layers) or getattr(layers[i], "kind", "") == "polygons":
            return not_found()
        layer = layers[i]
        try:
            hide = tuple(int(k) for k in request.query_params.get("hide", "").split(",") if k)
            band = int(request.query_params.get("band", 0))
        except ValueError:
            return Response("hide: class numbers separated by commas; band: a number", status_code=400)
        etag = f'"{layer.version}-{p["level"]}-{p["col"]}-{p["row"]}-{",".join(map(str, hide))}-{band}"'
        headers = {"Cache-Control": TILE_CACHE, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        found = layer.tile(p["level"], p["col"], p["row"], hide=hide, band=band)
        if found is None:
            return not_found("no such tile")
        body, media = found
        return Response(body, media_type=media, headers=headers)

    def point(request: Request):
        try:
            x, y = float(request.query_params["x"]), float(request.query_params["y"])
        except (KeyError, ValueError):
            return Response("x and y: level-0 pixel coordinates", status_code=400)
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
        for k, layer in enumerate(layers):
            if layer.kind == "polygons":
                continue
            v = layer.value(x, y, view.image.shape)
            out["layers"].append({"layer": k, **(v or {})})
        return JSONResponse(out, headers={"Cache-Control": "no-cache"})

    def features(request: Request):
        i = request.path_params["layer"]
        if not 0 <= i < len(layers) or layers[i].kind != "polygons":
            return not_found()
        q = request.query_params
        try:
            box = [float(q[k]) for k in ("x0", "y0", "x1", "y1")]
            limit = min(int(q.get("limit", MAX_FEATURES)), MAX_FEATURES)
        except (KeyError, ValueError):
            return Response("x0, y0, x1, y1: the view in level-0 pixels; limit: a number", status_code=400)
        ids, total = layers[i].query(*box, max(1, limit))
        return Response(dumps({"total": total, "features": layers[i].features(ids)}), media_type="application/json")

    def properties(request: Request):
        i, fid = request.path_params["layer"], request.path_params["fid"]
        if not 0 <= i < len(layers) or layers[i].kind != "polygons" or not 0 <= fid < layers[i].count:
            return not_found()
        return JSONResponse(layers[i].props.get(fid))

    routes = [Route("/", index), Route("/favicon.ico", lambda request: Response(status_code=204)), Route("/static/{name}", static), Route("/api/info", info),
              Route("/tiles/{layer:int}/{level:int}/{col:int}_{row:int}", tile), Route("/api/point", point),
              Route("/api/features/{layer:int}", features), Route("/api/properties/{layer:int}/{fid:int}", properties)]
    return Starlette(routes=routes, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_names(host), www_redirect=False),
        Middleware(_SamePort, port=port)])
