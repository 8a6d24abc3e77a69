"""CLI of the page: ``histosynth serve RESULTS_DIR`` (draw or sample a mask, pick a style, see the H&E)."""

from __future__ import annotations

import argparse

from histosynth.cli._args import add_device
from histosynth.errors import HistosynthError

#: what ``serve`` needs beyond histosynth's own dependencies (the ``serve`` extra)
NEEDS = ("starlette", "uvicorn", "multipart")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page backed by a finished run's models: draw, sample or upload "
                                     "a mask, pick a style, see and download the painted H&E")
    p.add_argument("results", help="the results folder of a finished run (models/gan/gan.pt; optional: "
                                   "stats/stats.json, models/dvae/dvae.pt, library/nuclei.npz)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for painting (default 2)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body accepted (default 10)")
    add_device(p)
    p.set_defaults(func=_run_serve)


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def _run_serve(args: argparse.Namespace) -> None:
    missing = missing_modules()
    if missing:
        raise HistosynthError(f"histosynth serve needs {', '.join(missing)}: install the serve extra, "
                              "pip install 'histosynth[serve]'")
    if not 0 < args.port < 65536:
        raise HistosynthError(f"--port must be in 1..65535, got {args.port}")
    if args.threads < 1:
        raise HistosynthError(f"--threads must be at least 1, got {args.threads}")
    if not args.max_upload_mb > 0:
        raise HistosynthError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    from histosynth.serve.app import serve

    serve(args.results, host=args.host, port=args.port, threads=args.threads, device=args.device,
          max_upload_mb=args.max_upload_mb)
