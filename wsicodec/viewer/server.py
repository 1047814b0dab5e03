"""The `wsicodec serve` web app: DeepZoom tiles of restored slides, their sources and an error heat-map.

    app = build_app(load_slides(["archive/"]))        # a Starlette app; uvicorn.run(app, host="127.0.0.1")

URLs (the layout of OpenSlide's deepzoom_server, so DeepZoom clients work unchanged):

    /                                         index: slides, thumbnails, ratio, model, quantiser
    /view/<name>                              OpenSeadragon viewer (scale bar, label/macro, side-by-side)
    /slides/<name>.dzi                        restored slide, DeepZoom descriptor
    /slides/<name>_files/<level>/<col>_<row>.jpeg
    /slides/<name>/thumbnail.jpeg, /slides/<name>/associated/<label|macro|...>.jpeg
    /sources/<name>.dzi, /sources/<name>_files/...   the original, through OpenSlide (when given)
    /diff/<name>.dzi, /diff/<name>_files/...          |restored - source| per pixel, mean over RGB, x4
    /static/...                               the viewer's own files (OpenSeadragon, pinned)

Names are looked up in a dict built at start-up, never joined into a path; anything unknown or out of range
is a 404. Blocking work (decoding, JPEG encoding) runs in worker threads bounded by a CapacityLimiter; the
encoded tiles stay in a count-bounded LRU cache (the decoded latent tiles have PzarrSlide's own caches).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from wsicodec.errors import WsicodecError
from wsicodec.viewer import OPENSEADRAGON_VERSION, STATIC_DIR

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
DIFF_GAIN = 4.0
ASSOCIATED_MAX = 600  # px, long side of label/macro images as served
THUMB_MAX = 256


class _TileNumber(Convertor):
    """A DeepZoom level, column or row in a URL: 1 to 18 digits. Longer numbers (a 5001-digit level, past
    Python's int-from-text limit) never match a route, so they are a 404 like any other unknown address."""

    regex = "[0-9]{1,18}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(int(value))


register_url_convertor("tilenum", _TileNumber())


# ---------------------------------------------------------------------------------------------- slides
@dataclass
class SlideEntry:
    """One served container, its description and (opened on first use) its slide and DeepZoom pyramids."""

    name: str
    path: Path
    info: dict
    source_path: Path | None = None
    slide_kwargs: dict = field(default_factory=dict)
    note: str = ""  # why there is no side-by-side view, when there is none
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _slide: object = None
    _dz: DeepZoomGenerator | None = None
    _source: openslide.OpenSlide | None = None
    _sdz: DeepZoomGenerator | None = None
    _source_checked: bool = False

    @property
    def slide(self):
        with self._lock:
            if self._slide is None:
                from wsicodec.reader import PzarrSlide

                self._slide = PzarrSlide(self.path, **self.slide_kwargs)
                self._dz = DeepZoomGenerator(self._slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=True)
            return self._slide

    @property
    def dz(self) -> DeepZoomGenerator:
        self.slide  # noqa: B018 - opens it
        return self._dz

    def source(self) -> openslide.OpenSlide | None:
        """The original slide when one was given and covers the same area as the restored one, else None."""
        with self._lock:
            if self._source_checked:
                return self._source
            self._source_checked = True
            if self.source_path is None:
                return None
            try:
                src = openslide.OpenSlide(str(self.source_path))
            except Exception as exc:  # noqa: BLE001 - a note on the page, not a crash
                self.note = f"the source {self.source_path.name} could not be opened: {' '.join(str(exc).split())}"
                return None
        restored = self.slide
        if not _same_extent(src, restored):
            self.note = (f"the source {self.source_path.name} ({src.dimensions[0]} x {src.dimensions[1]} px) does not "
                         f"cover the same area as the restored slide ({restored.dimensions[0]} x "
                         f"{restored.dimensions[1]} px); no side-by-side view")
            src.close()
            return None
        with self._lock:
            self._source = src
            # the whole slide, as compress archived it (from pixel 0,0; no bounds)
            self._sdz = DeepZoomGenerator(src, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
        return src

    def sdz(self) -> DeepZoomGenerator | None:
        return self._sdz if self.source() is not None else None

    def close(self) -> None:
        for s in (self._slide, self._source):
            if s is not None:
                try:
                    s.close()
                except Exception:  # noqa: BLE001
                    pass


def _mpp(slide) -> float | None:
    try:
        v = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X))
        return v if v > 0 and math.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _same_extent(src, restored, tol: float = 0.01) -> bool:
    """Both slides show the same physical area: equal dimensions, or equal within `tol` once scaled by µm/px."""
    if tuple(src.dimensions) == tuple(restored.dimensions):
        return True
    ms, mr = _mpp(src), _mpp(restored)
    if ms is None or mr is None:
        return False
    (ws, hs), (wr, hr) = src.dimensions, restored.dimensions
    # the restored grid is the source scaled and rounded to whole pixels: allow a pixel or 1 %
    return all(abs(a * ms - b * mr) <= max(tol * b * mr, 2 * mr) for a, b in ((ws, wr), (hs, hr)))


def _slide_name(path: Path) -> str:
    name = path.name
    for suffix in (".zip", ".pzarr"):
        name = name.removesuffix(suffix)
    return name


def load_slides(paths, *, source: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None,
                model: str | None = None, device: str | None = None) -> dict[str, SlideEntry]:
    """Containers named or found (recursively) in folders, by slide name; sources matched when given."""
    from wsicodec.format.container import Container
    from wsicodec.stats.report import find_containers

    found, skipped = find_containers(paths)
    if skipped:
        raise WsicodecError("; ".join(f"{s.path}: {s.reason}" for s in skipped))
    if not found:
        raise WsicodecError("no .pzarr containers to serve")
    if source is not None and len(found) != 1:
        raise WsicodecError(f"--source goes with a single container; {len(found)} were given (use --source-dir)")
    if source is not None and source_dir is not None:
        raise WsicodecError("give --source or --source-dir, not both")
    kwargs = {k: v for k, v in (("model", model), ("device", device)) if v is not None}
    entries: dict[str, SlideEntry] = {}
    for p in found:
        name = _slide_name(p)
        if name in entries:
            raise WsicodecError(f"two containers are named {name!r}: {entries[name].path} and {p}; serve them "
                                f"separately or rename one")
        info = Container.open(p).describe()
        entry = SlideEntry(name=name, path=p, info=info, slide_kwargs=kwargs)
        if source is not None:
            entry.source_path = Path(source)
            if not entry.source_path.exists():
                raise WsicodecError(f"no such source slide: {source}")
        elif source_dir is not None:
            recorded = (info.get("source") or {}).get("filename")
            candidate = Path(source_dir) / Path(str(recorded)).name if recorded else None
            if candidate is not None and candidate.exists():
                entry.source_path = candidate
            else:
                entry.note = f"no source {Path(str(recorded)).name if recorded else '(none recorded)'} in {source_dir}"
        entries[name] = entry
    return entries


# ---------------------------------------------------------------------------------------------- caches
class TileCache:
    """A thread-safe LRU of encoded tiles (bytes), bounded by count."""

    def __init__(self, capacity: int = 1024):
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    # a slide's colour profile (PzarrSlide and OpenSlide put it on their regions and thumbnails) goes into the
    # tile, so a colour-managed browser shows the restored and the source slide as their scanner meant
    img.save(buf, "JPEG", quality=quality, icc_profile=img.info.get("icc_profile"))
    return buf.getvalue()


def _hot_lut() -> np.ndarray:
    """black -> red -> yellow -> white, 256 x 3 uint8 (matplotlib's 'hot', in three ramps)."""
    x = np.arange(256, dtype=np.float32) / 255.0
    r = np.clip(x * 3.0, 0, 1)
    g = np.clip(x * 3.0 - 1.0, 0, 1)
    b = np.clip(x * 3.0 - 2.0, 0, 1)
    return (np.stack([r, g, b], 1) * 255 + 0.5).astype(np.uint8)


HOT = _hot_lut()


def _check_address(dz: DeepZoomGenerator, level: int, col: int, row: int) -> None:
    if not 0 <= level < dz.level_count:
        raise HTTPException(404)
    cols, rows = dz.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise HTTPException(404)


def _diff_tile(entry: SlideEntry, level: int, col: int, row: int) -> Image.Image:
    """|restored - source| (mean over RGB, x DIFF_GAIN, 'hot' colours) for one tile of the restored pyramid.

    The source is read at the same physical place and resampled to the restored tile's pixels, so the two
    need not share a resolution (the restored slide is at the archived µm/px, the source at its own).
    """
    dz, src = entry.dz, entry.source()
    restored = np.asarray(dz.get_tile(level, (col, row)).convert("RGB"), np.int16)
    h, w = restored.shape[:2]
    (x0, y0), slide_level, (lw, lh) = dz.get_tile_coordinates(level, (col, row))
    rs = entry.slide
    ds = rs.level_downsamples[slide_level]
    sx = src.dimensions[0] / rs.dimensions[0]
    sy = src.dimensions[1] / rs.dimensions[1]
    # the tile's area in source level-0 pixels, then the source level that covers it with enough pixels
    sw, sh = lw * ds * sx, lh * ds * sy
    want = min(sw / max(w, 1), sh / max(h, 1))
    s_level = src.get_best_level_for_downsample(max(want, 1.0))
    s_ds = src.level_downsamples[s_level]
    size = (max(1, math.ceil(sw / s_ds)), max(1, math.ceil(sh / s_ds)))
    region = src.read_region((int(round(x0 * sx)), int(round(y0 * sy))), s_level, size)
    bg = Image.new("RGBA", region.size, (255, 255, 255, 255))  # transparent (outside) as white, like a viewer
    source = np.asarray(Image.alpha_composite(bg, region).convert("RGB").resize((w, h), Image.BILINEAR), np.int16)
    err = np.abs(restored - source).mean(axis=2) * DIFF_GAIN
    return Image.fromarray(HOT[np.clip(err + 0.5, 0, 255).astype(np.uint8)], "RGB")


# ---------------------------------------------------------------------------------------------- app
class TileStats:
    """Counts of tile requests by status (for tests, benchmarks and /stats.json)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_status: dict[int, int] = {}

    def add(self, status: int) -> None:
        with self.lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    @property
    def ok(self) -> int:
        return self.by_status.get(200, 0)


class _TileCounter:
    """ASGI middleware: count responses to tile URLs (…_files/…) by status."""

    def __init__(self, app, stats: TileStats):
        self.app = app
        self.stats = stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "_files/" not in scope.get("path", ""):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.stats.add(int(message["status"]))
            await send(message)

        return await self.app(scope, receive, counting_send)


def build_app(entries: dict[str, SlideEntry], *, workers: int | None = None, cache_tiles: int = 1024) -> Starlette:
    """The Starlette app serving `entries` (from :func:`load_slides`)."""
    workers = workers or min(4, os.cpu_count() or 1)
    limiter = anyio.CapacityLimiter(workers)
    cache = TileCache(cache_tiles)
    stats = TileStats()

    def entry_for(name: str) -> SlideEntry:
        entry = entries.get(name)
        if entry is None:
            raise HTTPException(404)
        return entry

    async def blocking(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    def jpeg_response(data: bytes, max_age: int = 3600) -> Response:
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": f"private, max-age={max_age}"})

    # ----- pages
    async def index(request: Request):
        return HTMLResponse(_index_html(entries))

    async def view(request: Request):
        entry = entry_for(request.path_params["name"])
        await blocking(entry.source)  # opens and checks the source, so the page knows whether to offer it
        slide = await blocking(lambda: entry.slide)
        return HTMLResponse(_view_html(entry, slide))

    # ----- DeepZoom
    def dz_kind(kind: str, entry: SlideEntry) -> DeepZoomGenerator:
        if kind == "sources":
            sdz = entry.sdz()
            if sdz is None:
                raise HTTPException(404)
            return sdz
        if kind == "diff" and entry.source() is None:
            raise HTTPException(404)
        return entry.dz  # slides and diff share the restored geometry

    async def dzi(request: Request):
        kind = request.url.path.split("/")[1]
        entry = entry_for(request.path_params["name"])
        dz = await blocking(dz_kind, kind, entry)
        return Response(dz.get_dzi("jpeg"), media_type="application/xml")

    async def tile(request: Request):
        kind = request.url.path.split("/")[1]
        p = request.path_params
        entry = entry_for(p["name"])
        level, col, row = p["level"], p["col"], p["row"]
        key = (kind, entry.name, level, col, row)
        data = cache.get(key)
        if data is None:
            def make() -> bytes | None:
                dz = dz_kind(kind, entry)
                _check_address(dz, level, col, row)
                try:
                    img = _diff_tile(entry, level, col, row) if kind == "diff" else dz.get_tile(level, (col, row))
                except ValueError:  # DeepZoomGenerator: invalid level or address
                    return None
                return _jpeg(img)

            data = await blocking(make)
            if data is None:
                raise HTTPException(404)
            cache.put(key, data)
        return jpeg_response(data)

    async def thumbnail(request: Request):
        entry = entry_for(request.path_params["name"])
        key = ("thumb", entry.name)
        data = cache.get(key)
        if data is None:
            data = await blocking(lambda: _jpeg(entry.slide.get_thumbnail((THUMB_MAX, THUMB_MAX)), 85))
            cache.put(key, data)
        return jpeg_response(data)

    async def associated(request: Request):
        entry = entry_for(request.path_params["name"])
        which = request.path_params["image"]

        def make() -> bytes | None:
            img = entry.slide.associated_images.get(which)
            if img is None:
                return None
            img = img.copy()
            img.thumbnail((ASSOCIATED_MAX, ASSOCIATED_MAX))
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return _jpeg(Image.alpha_composite(bg, img.convert("RGBA")), 85)

        data = await blocking(make)
        if data is None:
            raise HTTPException(404)
        return jpeg_response(data)

    async def stats_json(request: Request):
        return Response(json.dumps({"tiles": {str(k): v for k, v in stats.by_status.items()},
                                    "cache": {"size": len(cache), "capacity": cache.capacity,
                                              "hits": cache.hits, "misses": cache.misses}}),
                        media_type="application/json")

    async def not_found(request: Request, exc: Exception):
        code = getattr(exc, "status_code", 404)
        return PlainTextResponse("not found" if code == 404 else "error", status_code=code)

    async def server_error(request: Request, exc: Exception):
        return PlainTextResponse("internal error", status_code=500)

    async def refused(request: Request, exc: Exception):
        # a damaged or replaced container: say so (409 Conflict), never serve pixels it did not hold
        return PlainTextResponse(f"error: {' '.join(str(exc).split())}", status_code=409)

    tile_path = "_files/{level:tilenum}/{col:tilenum}_{row:tilenum}.jpeg"
    routes = [
        Route("/", index),
        Route("/view/{name}", view),
        Route("/stats.json", stats_json),
        Route("/slides/{name}/thumbnail.jpeg", thumbnail),
        Route("/slides/{name}/associated/{image}.jpeg", associated),
    ]
    for kind in ("slides", "sources", "diff"):
        routes += [Route(f"/{kind}/{{name}}.dzi", dzi), Route(f"/{kind}/{{name}}{tile_path}", tile)]
    routes.append(Mount("/static", app=StaticFiles(directory=STATIC_DIR, html=False), name="static"))

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, WsicodecError: refused,
                                                         500: server_error})
    app.add_middleware(_TileCounter, stats=stats)
    app.state.entries = entries
    app.state.cache = cache
    app.state.tile_stats = stats
    return app


# ---------------------------------------------------------------------------------------------- HTML
_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{background:#263238;color:#fff;padding:.6em 1em}header a{color:#fff;text-decoration:none}
table{border-collapse:collapse;margin:1em}td,th{padding:.4em .8em;border-bottom:1px solid #ccc;text-align:left}
td img{max-width:160px;max-height:120px;background:#fff}
"""


def _fmt_bytes(n) -> str:
    if not n:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return "?"


def _index_html(entries: dict[str, SlideEntry]) -> str:
    rows = []
    for name, e in sorted(entries.items()):
        info = e.info
        q = quote(name, safe="")
        grid = info.get("grid") or {}
        size = f"{grid.get('width', '?')} x {grid.get('height', '?')} px"
        mpp = (info.get("resolution") or {}).get("archived_mpp")
        ratio = info.get("ratio")
        quant = info.get("quantizer") or {}
        qtext = f"{quant.get('kind') or '?'}" + (f" ({quant['levels']} levels)" if quant.get("levels") else "")
        rows.append(
            f"<tr><td><a href='/view/{q}'><img src='/slides/{q}/thumbnail.jpeg' alt='' loading='lazy'></a></td>"
            f"<td><a href='/view/{q}'>{html.escape(name)}</a></td><td>{size}"
            f"{f' at {mpp:.3g} µm/px' if mpp else ''}</td>"
            f"<td>{_fmt_bytes(info.get('container_bytes'))}</td>"
            f"<td>{f'{ratio:.1f}x' if ratio else '?'}</td>"
            f"<td>{html.escape(str((info.get('model') or {}).get('id') or '?'))}</td>"
            f"<td>{html.escape(qtext)}</td></tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>wsicodec slides</title>"
            f"<style>{_STYLE}</style></head><body><header><b>wsicodec</b> &mdash; {len(entries)} slide(s)</header>"
            f"<table><tr><th></th><th>slide</th><th>size</th><th>container</th><th>ratio</th><th>model</th>"
            f"<th>quantiser</th></tr>{''.join(rows)}</table></body></html>")


def _view_html(entry: SlideEntry, slide) -> str:
    q = quote(entry.name, safe="")
    has_source = entry._sdz is not None
    assoc = [k for k in ("label", "macro") if k in slide.associated_images]
    config = {
        "name": entry.name,
        "dzi": f"/slides/{q}.dzi",
        "source": f"/sources/{q}.dzi" if has_source else None,
        "diff": f"/diff/{q}.dzi" if has_source else None,
        "mpp": _mpp(slide),
        "sourceMpp": _mpp(entry._source) if has_source else None,
        "osd": "/static/openseadragon/images/",
    }
    side = ("<div class='pane'><div class='title'>source (OpenSlide)</div><div id='source' class='osd'></div>"
            "<div class='bar' id='bar-source'><div></div><span></span></div></div>") if has_source else ""
    note = f"<p class='note'>{html.escape(entry.note)}</p>" if entry.note else ""
    toggle = "<label><input type='checkbox' id='diff'> error heat-map (|restored − source| ×4)</label>" \
        if has_source else ""
    images = "".join(f"<figure><img src='/slides/{q}/associated/{k}.jpeg' alt='{k}'><figcaption>{k}</figcaption>"
                     f"</figure>" for k in assoc)
    cfg = json.dumps(config).replace("<", "\\u003c")
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(entry.name)} - wsicodec</title>
<style>{_STYLE}
main{{display:flex;gap:4px;height:calc(100vh - 3em)}}.pane{{flex:1;position:relative;display:flex;flex-direction:column}}
.osd{{flex:1;background:#000}}.title{{position:absolute;z-index:5;left:6px;top:4px;color:#fff;
background:rgba(0,0,0,.5);padding:1px 6px;font-size:13px}}
.bar{{position:absolute;z-index:5;left:10px;bottom:10px;color:#fff;background:rgba(0,0,0,.55);padding:3px 6px;
font-size:12px}}.bar div{{height:4px;background:#fff;margin-bottom:2px}}
aside{{width:220px;overflow:auto;padding:4px}}aside img{{max-width:100%;background:#fff}}
figure{{margin:0 0 8px 0}}.note{{color:#a33;font-size:13px}}header label{{margin-left:2em}}
</style></head><body>
<header><a href='/'>wsicodec</a> / <b>{html.escape(entry.name)}</b> {toggle}</header>
<main><div class='pane'><div class='title'>restored ({html.escape(str(slide.properties.get('wsicodec.model', '')))})</div>
<div id='restored' class='osd'></div><div class='bar' id='bar-restored'><div></div><span></span></div></div>
{side}<aside>{note}{images}</aside></main>
<script src='/static/openseadragon/openseadragon.min.js?v={OPENSEADRAGON_VERSION}'></script>
<script>const CFG = {cfg};</script>
<script src='/static/viewer.js'></script>
</body></html>"""
