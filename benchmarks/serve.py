"""Paint on demand: request latency of ``histosynth serve`` against the bare generator forward pass.

In one run, on the same generator checkpoint and the same masks:

- ``bare``: the generator alone, in this process: ``histosynth.models.pix2pix.generate`` on a conditioning
  tensor built once, ``--n`` times per side (median and p95 of the wall time);
- ``served``: a real server (``histosynth serve RESULTS --threads T``, uvicorn on 127.0.0.1, its own
  process) answering ``--n`` ``POST /api/paint`` per side for a mask it holds (a sampled one when the run
  has stats, else 60 drawn ellipses), timed at the client (urllib) from request to the last byte of the
  JSON with the image, the mask picture and the overlay as PNG data URLs;
- ``overhead`` = median(served) / median(bare) - 1 (the issue's target: <= 20 %);
- ``overhead_same_request`` = median over requests of (wall time at the client / the server's own painting
  time of that request, from its ``Server-Timing: paint;dur=`` header) - 1: the cost of HTTP, JSON, PNG
  encoding, queueing and threads around the painting, measured on the same request, so that load drifting
  between a bare pass and a request cannot move it;
- ``concurrent``: ``--concurrency`` paint requests at 256 px sent at once (``--rounds`` times), plus a
  ``GET /`` and a ``GET /api/info`` during each burst: failures (any non-200), their latencies, and the
  server's RSS (``/proc/PID/status`` VmRSS) after a warm-up and after the bursts.

The bare passes and the requests alternate (bare pass i, then request i), so that a change in the load of a
shared machine falls on both alike; they never run at the same time (the server is idle during a bare
pass, this process waits during a request; a pause of PAUSE s before each keeps the other side's spinning
OpenMP threads out of it). Without
``--results`` a results folder is made with a U-Net of the schema's default size (depth 7, width 32; three
types, two styles) with untrained weights: the time of a forward pass does not depend on the weights.

    python benchmarks/serve.py --threads 2 --out benchmarks/out/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: seconds of rest before each bare pass and each request: torch's OpenMP threads spin a while after their
#: work, and the other process's timed section must not start beside them
PAUSE = 0.3


def make_results(root: Path, depth: int, width: int) -> Path:
    """A results folder holding only models/gan/gan.pt: an untrained U-Net of the given size, 3 types, 2 styles."""
    from histosynth.config import schema_node
    from histosynth.gan.conditioning import conditioning_channels
    from histosynth.models.checkpoint import atomic_torch_save
    from histosynth.models.generators import build_generator
    from histosynth.models.pix2pix import gan_checkpoint_dict

    n_types = 3
    dropout = bool(schema_node("gan.dropout_at_inference")["default"])
    gen = build_generator({"kind": "unet", "in_ch": len(conditioning_channels(n_types, False)), "out_ch": 3,
                           "depth": depth, "width": width, "norm": "batch", "dropout_at_inference": dropout})
    out = root / "results" / "models" / "gan"
    out.mkdir(parents=True)
    atomic_torch_save(gan_checkpoint_dict(gen, options=["dark", "pale"],
                                          classes={1: "Epithelial", 2: "Lymphocyte", 3: "Spindle"},
                                          n_types=n_types, noise=False, step=0), out / "gan.pt")
    return root / "results"


def ellipses(side: int, n: int, n_types: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"kind": "ellipse", "cx": float(rng.uniform(0, side)), "cy": float(rng.uniform(0, side)),
             "rx": float(rng.uniform(4, 10)), "ry": float(rng.uniform(3, 8)), "angle": float(rng.uniform(0, 180)),
             "type": int(1 + i % n_types)} for i in range(n)]


def post(url: str, payload: dict, timeout: float = 600) -> tuple[int, dict, float]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            status = r.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    return status, json.loads(body or b"{}"), time.perf_counter() - t0


def paint_timed(url: str, payload: dict, timeout: float = 600) -> tuple[int, dict, float, float]:
    """POST /api/paint: status, body, the client's wall time and the server's own painting time (Server-Timing)."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        timing = r.headers.get("Server-Timing", "")
        status = r.status
    seconds = time.perf_counter() - t0
    server = float(timing.split("dur=")[1]) / 1000 if "dur=" in timing else float("nan")
    return status, json.loads(body or b"{}"), seconds, server


def get(url: str, timeout: float = 600) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as err:
        status = err.code
    return status, time.perf_counter() - t0


def summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "median_ms": round(float(np.median(ms)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "min_ms": round(float(ms.min()), 1), "max_ms": round(float(ms.max()), 1)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bare:
    """The generator of ``gan`` alone in this process: one forward pass per call on a mask of ``side`` px."""

    def __init__(self, gan: Path, threads: int):
        import torch

        from histosynth.models.pix2pix import load_gan

        torch.set_num_threads(threads)
        self.bundle = load_gan(gan)
        self.conds: dict[int, object] = {}

    def __call__(self, side: int, seed: int) -> float:
        from histosynth.gan.conditioning import build_conditioning
        from histosynth.models.pix2pix import generate
        from histosynth.serve.masks import draw_nuclei

        b = self.bundle
        if side not in self.conds:
            inst, types = draw_nuclei(ellipses(side, 60 * side * side // 256**2, b.n_types, side), side,
                                      {int(k): v for k, v in b.classes.items()}, np.zeros((0, 64, 64), bool))
            self.conds[side] = build_conditioning(inst[None], types[None], b.n_types, 0, len(b.options))
            generate(b, self.conds[side], seed=0)  # warm-up
        t0 = time.perf_counter()
        generate(b, self.conds[side], seed=seed)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, help="a finished run's results folder (default: a fresh one, see above)")
    ap.add_argument("--depth", type=int, default=7, help="U-Net levels of the fresh generator (schema default 7)")
    ap.add_argument("--width", type=int, default=32, help="its first-level width (schema default 32)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, of the bare pass and of the server")
    ap.add_argument("--n", type=int, default=50, help="requests (and bare passes) per side")
    ap.add_argument("--sides", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="bursts of --concurrency requests")
    ap.add_argument("--out", type=Path, help="JSON of the results")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    results = args.results or make_results(Path(tmp.name), args.depth, args.width)
    gan = results / "models" / "gan" / "gan.pt"
    report: dict = {"command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
                    "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads, "results": str(args.results or "fresh"),
                    "generator": {"depth": args.depth, "width": args.width} if not args.results else str(gan)}
    try:
        report["machine"] = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines() if "Model name" in line)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass

    bare = Bare(gan, args.threads)

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen([sys.executable, "-m", "histosynth", "serve", str(results), "--port", str(port),
                               "--threads", str(args.threads)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if get(base + "/api/info", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{server.stderr.read() if server.stderr else ''}")
            time.sleep(0.2)
        info = json.loads(urllib.request.urlopen(base + "/api/info").read())
        style = info["checkpoints"][0]["styles"][0]
        n_types = len(info["classes"])
        report["bare"], report["served"], report["overhead"], masks = {}, {}, {}, {}
        report["painting_inside_the_server"], report["overhead_same_request"] = {}, {}
        for side in args.sides:
            if info["sampling"]:
                status, body, _ = post(base + "/api/sample", {"side": side, "seed": 0})
            else:
                status, body, _ = post(base + "/api/paint", {
                    "side": side, "nuclei": ellipses(side, 60 * side * side // 256**2, n_types, side)})
            assert status == 200, body
            masks[side] = body["mask_id"]
            post(base + "/api/paint", {"side": side, "base": masks[side], "style": style})  # warm-up
            print(f"paint at {side} px: {args.n} bare passes and {args.n} requests, alternating ...", flush=True)
            times, bare_times, inside = [], [], []
            for i in range(args.n):
                time.sleep(PAUSE)
                bare_times.append(bare(side, i))
                time.sleep(PAUSE)
                status, body, seconds, server_paint = paint_timed(
                    base + "/api/paint", {"side": side, "base": masks[side], "style": style, "seed": i})
                assert status == 200, body
                times.append(seconds)
                inside.append(server_paint)
            report["bare"][side] = summary(bare_times)
            report["served"][side] = summary(times)
            report["painting_inside_the_server"][side] = summary(inside)
            report["overhead"][side] = round(report["served"][side]["median_ms"] / report["bare"][side]["median_ms"]
                                             - 1, 3)
            # the same request's wall time over the server's own painting time: not moved by load drift
            report["overhead_same_request"][side] = round(float(np.median(np.asarray(times) / np.asarray(inside)))
                                                          - 1, 3)

        print(f"{args.rounds} bursts of {args.concurrency} concurrent paints at 256 px ...", flush=True)
        side = 256 if 256 in masks else args.sides[0]
        rss_before = rss_mb(server.pid)
        failures, latencies, page, info_t, rss_rounds = 0, [], [], [], []
        for r in range(args.rounds):
            results_r: list[tuple[int, float]] = []
            lock = threading.Lock()

            def one(i: int, r: int = r, results_r: list = results_r, lock: threading.Lock = lock) -> None:
                try:
                    status, _, seconds = post(base + "/api/paint", {"side": side, "base": masks[side],
                                                                    "style": style, "seed": 1000 * r + i})
                except Exception:  # noqa: BLE001 - a dropped connection is a failure to count
                    status, seconds = 0, float("nan")
                with lock:
                    results_r.append((status, seconds))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.concurrency)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            page.append(get(base + "/")[1])
            info_t.append(get(base + "/api/info")[1])
            for t in threads:
                t.join()
            failures += sum(1 for s, _ in results_r if s != 200)
            latencies += [s for st, s in results_r if st == 200]
            rss_rounds.append(rss_mb(server.pid))
        report["concurrent"] = {"requests": args.rounds * args.concurrency, "failures": failures,
                                "paint": summary(latencies) if latencies else None,
                                "page_during_burst_ms": [round(t * 1000, 1) for t in page],
                                "info_during_burst_ms": [round(t * 1000, 1) for t in info_t],
                                "rss_mb_before": rss_before, "rss_mb_after_each_burst": rss_rounds}
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
