"""The page and its JSON API (Starlette, ASGI; served by uvicorn).

Routes (all JSON unless said; every error is a 4xx with ``{"error": "<one message>"}``, shown on the
page; an unexpected one is a 500 with one line, its traceback only in the server's log):

- ``GET /``: the page; ``/static/...``: its script and style, from the package (nothing from a CDN).
- ``GET /api/info``: the run, its generator checkpoints (step, generator, styles, canvas sides), classes,
  whether sampling is on, the drawing shapes (PNG data URLs), the upload limit.
- ``POST /api/paint`` ``{"side", "base", "nuclei", "style", "checkpoint", "seed"}``: draws ``nuclei``
  over mask ``base`` (an id from sample / upload / an earlier paint, or null), paints it; returns the mask
  id, the mask, image and overlay (PNG data URLs) and what made the image (run, checkpoint, step, style).
- ``POST /api/sample`` ``{"side", "type_mix": {class: fraction}, "density", "seed", "method"}``: a mask from
  the fitted sampler; returns its id and picture.
- ``POST /api/upload`` (multipart: ``file``, optional ``types``, ``side``, ``type``): a label image or a
  GeoJSON read by the CLI's reader; returns its id and picture.
- ``GET /api/download?mask=&style=&checkpoint=&seed=``: the pair as a zip (image.png, inst.tif,
  types.tif, nuclei.geojson, info.json).

Request bodies over ``max_upload_mb`` are refused with 413 before they are read in full.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from histosynth.errors import HistosynthError
from histosynth.serve.masks import (
    data_url,
    draw_nuclei,
    mask_picture_url,
    overlay_picture,
    pair_zip,
    read_upload,
)
from histosynth.serve.run import Mask, RunModels

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: One worker thread paints, samples, reads uploads and encodes PNGs; the other requests wait in the event
#: loop, not in threads of their own, so memory stays flat. One, not more: each thread that runs torch
#: operations gets an OpenMP team of its own, and a second team spinning beside the first on the same cores
#: made every paint about twice as slow (measured: 92 ms in one thread, 199 ms from another).
WORKERS = 1
METHODS = ("statistical", "uniform")


class BadRequest(Exception):
    """A request the page cannot serve: ``status`` and one message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class TooLarge(Exception):
    pass


class LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (by Content-Length, or as it streams)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        mb = self.limit / 2**20
        message = f"the upload is larger than the server's limit of {mb:g} MB (--max-upload-mb)"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
                    return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(message)
            return msg

        started = False

        async def tracked_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracked_send)
        except TooLarge as err:
            if not started:
                await JSONResponse({"error": str(err)}, status_code=413)(scope, receive, send)


def _int(value: Any, what: str, low: int, high: int) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        out = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{what} must be an integer, got {value!r}") from None
    if not low <= out <= high:
        raise BadRequest(f"{what} must be in [{low}, {high}], got {out}")
    return out


def _float(value: Any, what: str, low: float, high: float) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{what} must be a number, got {value!r}") from None
    if not low <= out <= high:
        raise BadRequest(f"{what} must be in [{low:g}, {high:g}], got {out:g}")
    return out


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def create_app(results: str | Path, *, device: str = "cpu", max_upload_mb: float = 10.0) -> Any:
    """The ASGI app for the results folder ``results`` (models loaded now; see :class:`RunModels`)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    run = RunModels(results, device=device)
    limit = int(max_upload_mb * 2**20)
    import torch

    threads = torch.get_num_threads()  # as the CLI set them; a new thread would start with OpenMP's default
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="histosynth-paint",
                              initializer=torch.set_num_threads, initargs=(threads,))

    async def run_in_threadpool(fn: Any) -> Any:
        return await asyncio.wrap_future(pool.submit(fn))

    def side_of(value: Any, checkpoint: str | None = None) -> int:
        sides = run.describe(checkpoint or run.default)["sides"]
        side = _int(value, "side", 1, 4096)
        if side not in sides:
            raise BadRequest(f"side {side} px is not offered; this generator paints {sides}")
        return side

    def get_mask(key: Any) -> Mask:
        try:
            return run.mask(str(key))
        except KeyError:
            raise BadRequest(f"unknown mask {key!r} (the server keeps the last masks only: draw, sample or "
                             "upload again)", 404) from None

    def picture(key: str, mask: Mask) -> dict:
        return {"mask_id": key, "mask": mask_picture_url(mask), "n_nuclei": mask.n_nuclei,
                "origin": mask.origin, "side": int(mask.inst.shape[0])}

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request) -> Response:
        def build() -> dict:
            shapes, where = run.shapes
            return {"run": str(run.root), "checkpoints": [run.describe(n) for n in run.checkpoints],
                    "default": run.default,
                    "classes": {str(k): v for k, v in sorted(run.classes.items())},
                    "sampling": run.stats is not None, "shape_source": run.shape_source_name,
                    "methods": list(METHODS),
                    "shapes": [data_url((s.astype("uint8") * 255)) for s in shapes], "shapes_from": where,
                    "max_upload_mb": max_upload_mb}

        return JSONResponse(await anyio.to_thread.run_sync(build))  # not behind the queued paints

    async def paint(request: Request) -> Response:
        body = await _json(request)
        checkpoint = body.get("checkpoint") or None
        if checkpoint is not None and checkpoint not in run.checkpoints:
            raise BadRequest(f"unknown generator checkpoint {checkpoint!r}; this run has "
                             f"{', '.join(run.checkpoints)}")
        side = side_of(body.get("side", 256), checkpoint)
        seed = _int(body.get("seed", 0), "seed", 0, 2**31 - 1)
        base = None if body.get("base") in (None, "") else get_mask(body["base"])
        nuclei = body.get("nuclei") or []

        def work() -> dict:
            shapes, _ = run.shapes
            if base is not None and not nuclei:
                mask = base
            else:
                inst, types = draw_nuclei(nuclei, side, run.classes, shapes, base)
                mask = Mask(inst, types, "drawn" if base is None else f"{base.origin} + drawn")
            t0 = time.perf_counter()
            image, made = run.paint(mask, body.get("style") or None, checkpoint, seed)
            painted = time.perf_counter() - t0
            key = run.keep(mask)
            return {**picture(key, mask), "image": data_url(image), "overlay": data_url(overlay_picture(image, mask)),
                    **made}, painted

        result, painted = await run_in_threadpool(work)
        # the painting alone (conditioning + generator forward), for clients that measure the server's overhead
        return JSONResponse(result, headers={"Server-Timing": f"paint;dur={painted * 1000:.1f}"})

    async def sample(request: Request) -> Response:
        body = await _json(request)
        side = side_of(body.get("side", 256))
        density = _float(body.get("density", 1.0), "density", 0.05, 10.0)
        seed = _int(body.get("seed", 0), "seed", 0, 2**31 - 1)
        method = body.get("method", "statistical")
        if method not in METHODS:
            raise BadRequest(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        mix = body.get("type_mix") or {}
        if not isinstance(mix, dict):
            raise BadRequest("type_mix must be an object of class name -> fraction")
        mix = {str(k): _float(v, f"the share of {k}", 0.0, 1.0) for k, v in mix.items()}

        def work() -> dict:
            mask = run.sample(side, mix, density, seed, method)
            return picture(run.keep(mask), mask)

        return JSONResponse(await run_in_threadpool(work))

    async def upload(request: Request) -> Response:
        try:
            form = await request.form(max_files=2, max_fields=8, max_part_size=limit)
        except TooLarge:
            raise
        except Exception as err:  # noqa: BLE001 - a malformed multipart body is the client's
            raise BadRequest(f"could not read the upload form ({type(err).__name__}: {err})") from None
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise BadRequest("no file in the upload (field 'file')")
        side = side_of(form.get("side", 256))
        default_type = _int(form.get("type", min(run.classes) if run.classes else 1), "type", 1, 255)
        if default_type not in run.classes:
            raise BadRequest(f"type {default_type} is not a class of the model ({run.classes})")
        data = await file.read()
        types = form.get("types")
        types_data = None if types is None or isinstance(types, str) else await types.read()
        if types_data == b"":
            types_data = None

        def work() -> dict:
            mask = read_upload(data, file.filename or "upload", side, run.classes, types_data=types_data,
                               types_filename=getattr(types, "filename", "") or "types.png",
                               default_type=default_type)
            return picture(run.keep(mask), mask)

        return JSONResponse(await run_in_threadpool(work))

    async def download(request: Request) -> Response:
        q = request.query_params
        mask = get_mask(q.get("mask"))
        checkpoint = q.get("checkpoint") or None
        seed = _int(q.get("seed", "0"), "seed", 0, 2**31 - 1)

        def work() -> bytes:
            image, made = run.paint(mask, q.get("style") or None, checkpoint, seed)
            return pair_zip(image, mask, run.classes, made)

        data = await run_in_threadpool(work)
        name = f"histosynth-pair-{q.get('mask')}.zip"
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def bad_request(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status", 400)
        return JSONResponse({"error": str(exc)}, status_code=status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    async def too_large(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=413)

    async def bug(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(exc)))
        lines = str(exc).strip().splitlines()
        what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        return JSONResponse({"error": f"internal error (a bug in histosynth, please report it): {what}; "
                                      "the traceback is in the server's log"}, status_code=500)

    routes = [
        Route("/", page), Route("/api/info", info), Route("/api/paint", paint, methods=["POST"]),
        Route("/api/sample", sample, methods=["POST"]), Route("/api/upload", upload, methods=["POST"]),
        Route("/api/download", download), Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {HistosynthError: bad_request, BadRequest: bad_request, HTTPException: http_error,
                TooLarge: too_large, Exception: bug}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.run = run
    wrapped = LimitBody(app, limit)
    wrapped.run = run  # type: ignore[attr-defined]
    return wrapped


def serve(results: str | Path, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 2,
          device: str = "cpu", max_upload_mb: float = 10.0) -> None:
    """Run the page on ``host``:``port`` until interrupted (uvicorn, one process)."""
    import uvicorn

    from histosynth.device import select_device

    select_device(device, threads)
    app = create_app(results, device=device, max_upload_mb=max_upload_mb)
    log.info("serving %s on http://%s:%d/ (Ctrl-C stops)", results, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
