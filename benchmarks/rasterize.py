"""Benchmark: rasterizing nuclei onto tiles, and parsing the annotation files.

Generates N nucleus-like polygons (jittered ellipses, 20-40 vertices, radius
3-10 px) spread over a slide grid of 256-px tiles (~50 nuclei per tile) and
times, on the same polygon-tile pairs and in one run:

* ``histosynth.patches.rasterize.rasterize_tiles`` (exact closed-polygon convention,
  instance + type maps, overlap rule, per-tile info);
* a bare ``cv2.fillPoly`` loop (per pair, into its tile's int32 instance map,
  int32 vertices ``round(x - x0 - 0.5)``) - the floor to beat;
* a bare ``skimage.draw.polygon`` loop (on a subset when N is large).

It reports nuclei/s, the ratio to cv2, the peak RSS, and the fraction of
foreground pixels where cv2 / skimage disagree with ``rasterize_tiles``.

The parsing section writes the same polygons as a QuPath GeoJSON
FeatureCollection and as an Aperio ImageScope XML file and times, each in a
fresh child process (so that the peak RSS is the parse's own):
``json.load``, ``orjson.loads`` (gc disabled), a bare
``defusedxml.ElementTree.iterparse`` loop, and
``histosynth.io.annotations.read`` on both files when that exists.

    OMP_NUM_THREADS=1 python benchmarks/rasterize.py --n-nuclei 100000 --out results/bench-rasterize.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 256
CLASSES = ["Tumor", "Lymphocyte", "Stroma", "Necrosis", "Other"]


def maxrss_mb() -> float:
    """Peak RSS of this process (MB): VmHWM (resettable) on Linux, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def make_nuclei(n: int, seed: int = 0, per_tile: int = 50):
    """Jittered ellipses as ragged arrays: coords (M, 2), offsets (n+1,), types, grid side."""
    rng = np.random.default_rng(seed)
    n_tiles = max(1, int(np.ceil(n / per_tile)))
    side = int(np.ceil(np.sqrt(n_tiles)))
    extent = side * TILE
    cx = rng.uniform(0, extent, n)
    cy = rng.uniform(0, extent, n)
    nv = rng.integers(20, 41, n)
    radius = rng.uniform(3, 10, n)
    aspect = rng.uniform(0.6, 1.0, n)
    theta = rng.uniform(0, np.pi, n)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(nv, out=off[1:])
    owner = np.repeat(np.arange(n), nv)
    k = np.arange(off[-1]) - off[owner]
    # angles: evenly spaced with jitter (sorted, distinct: star-shaped => simple)
    ang = 2 * np.pi * (k + rng.uniform(-0.3, 0.3, len(k))) / nv[owner]
    rr = radius[owner] * (1 + 0.08 * rng.standard_normal(len(k)))
    ex = rr * np.cos(ang)
    ey = rr * aspect[owner] * np.sin(ang)
    c, s = np.cos(theta[owner]), np.sin(theta[owner])
    x = cx[owner] + c * ex - s * ey
    y = cy[owner] + s * ex + c * ey
    coords = np.column_stack([x, y])
    types = rng.integers(1, len(CLASSES) + 1, n).astype(np.uint8)
    return coords, off, types, side


def to_shapely(coords, off):
    import shapely

    n = len(off) - 1
    # close each ring: append its first vertex
    nv = np.diff(off)
    idx = np.concatenate([np.arange(off[-1]), off[:-1]])
    ring = np.concatenate([np.repeat(np.arange(n), nv), np.arange(n)])
    order = np.argsort(ring, kind="stable")
    rings = shapely.linearrings(coords[idx[order]], indices=ring[order])
    return shapely.polygons(rings)


def tile_pairs(packed, side: int):
    """The (tile, polygon) candidate pairs rasterize_tiles itself uses (untimed), tile-major."""
    from histosynth.patches.rasterize import _GridIndex

    pt, pp = _GridIndex(packed, TILE).query(np.array(tiles_of(side), dtype=np.float64))
    o = np.lexsort((pp, pt))
    return pt[o], pp[o]


# --------------------------------------------------------------------------- #
# rasterizers
# --------------------------------------------------------------------------- #
def tiles_of(side):
    return [(float(x * TILE), float(y * TILE), 1.0, TILE, TILE) for y in range(side) for x in range(side)]


def run_ours(packed, types, side, check=None):
    from histosynth.patches.rasterize import rasterize_tiles

    n = 0
    fg = {}
    for t, (inst, _typ, info) in enumerate(rasterize_tiles(packed, types, tiles_of(side))):
        n += info["n_nuclei"]
        if check is not None and t in check:
            fg[t] = inst > 0
    return n, fg


def run_cv2(polys, side, pt, pp, check=None):
    import cv2

    starts = np.searchsorted(pt, np.arange(side * side + 1))
    fg = {}
    for t in range(side * side):
        y, x = divmod(t, side)
        origin = np.array([x * TILE + 0.5, y * TILE + 0.5])
        inst = np.zeros((TILE, TILE), np.int32)
        for j, i in enumerate(pp[starts[t] : starts[t + 1]]):
            p = np.round(polys[i] - origin).astype(np.int32)
            cv2.fillPoly(inst, [p], j + 1)
        if check is not None and t in check:
            fg[t] = inst > 0
    return fg


def run_skimage(polys, side, pt, pp, max_pairs, check=None):
    from skimage.draw import polygon

    starts = np.searchsorted(pt, np.arange(side * side + 1))
    fg = {}
    done = 0
    tiles_done = 0
    for t in range(side * side):
        if done >= max_pairs:
            break
        y, x = divmod(t, side)
        origin = np.array([x * TILE + 0.5, y * TILE + 0.5])
        inst = np.zeros((TILE, TILE), np.int32)
        for j, i in enumerate(pp[starts[t] : starts[t + 1]]):
            p = polys[i] - origin
            rr, cc = polygon(p[:, 1], p[:, 0], (TILE, TILE))
            inst[rr, cc] = j + 1
            done += 1
        tiles_done += 1
        if check is not None and t in check:
            fg[t] = inst > 0
    return done, tiles_done, fg


def mismatch(fg_ref: dict, fg: dict) -> float:
    keys = sorted(set(fg_ref) & set(fg))
    diff = sum(int(np.count_nonzero(fg_ref[k] != fg[k])) for k in keys)
    total = sum(int(np.count_nonzero(fg_ref[k])) for k in keys)
    return diff / max(total, 1)


def bench_raster(n: int, seed: int, skimage_max: int) -> dict:
    from histosynth.patches.rasterize import pack_polygons

    t = time.perf_counter()
    coords, off, types, side = make_nuclei(n, seed)
    geoms = to_shapely(coords, off)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    packed = pack_polygons(geoms)
    t_pack = time.perf_counter() - t
    polys = [coords[off[i] : off[i + 1]] for i in range(n)]
    pt, pp = tile_pairs(packed, side)
    check = set(range(0, side * side, max(1, side * side // 100)))  # ~100 tiles compared
    gc.collect()
    rss_gen = maxrss_mb()
    resettable = reset_peak()
    rss0 = maxrss_mb()

    t = time.perf_counter()
    n_vis, fg_ours = run_ours(packed, types, side, check)
    t_ours = time.perf_counter() - t
    rss_ours = maxrss_mb()

    t = time.perf_counter()
    fg_cv2 = run_cv2(polys, side, pt, pp, check)
    t_cv2 = time.perf_counter() - t

    t = time.perf_counter()
    sk_pairs, sk_tiles, fg_sk = run_skimage(polys, side, pt, pp, skimage_max, check)
    t_sk = time.perf_counter() - t
    sk_nuclei = n * sk_tiles / (side * side)

    res = {
        "n_nuclei": n,
        "n_tiles": side * side,
        "n_pairs": int(len(pp)),
        "n_vertices": int(len(coords)),
        "generate_s": t_gen,
        "pack_s": t_pack,
        "n_visible_instances": int(n_vis),
        "ours_s": t_ours,
        "ours_nuclei_per_s": n / t_ours,
        "cv2_s": t_cv2,
        "cv2_nuclei_per_s": n / t_cv2,
        "ratio_to_cv2": t_cv2 / t_ours,
        "skimage_s": t_sk,
        "skimage_tiles": sk_tiles,
        "skimage_nuclei_per_s": sk_nuclei / t_sk if t_sk > 0 else None,
        "cv2_fg_mismatch": mismatch(fg_ours, fg_cv2),
        "skimage_fg_mismatch": mismatch(fg_ours, fg_sk),
        "rss_peak_generate_mb": rss_gen,
        "rss_peak_resettable": resettable,
        "rss_before_mb": rss0,
        "rss_after_ours_mb": rss_ours,
        "rss_peak_mb": maxrss_mb(),
    }
    del geoms, packed, polys
    gc.collect()
    return res


# --------------------------------------------------------------------------- #
# parsing
# --------------------------------------------------------------------------- #
def write_geojson(path: Path, coords, off, types):
    import orjson

    feats = []
    for i in range(len(off) - 1):
        ring = coords[off[i] : off[i + 1]]
        ring = np.vstack([ring, ring[:1]]).round(2).tolist()
        feats.append(
            {
                "type": "Feature",
                "id": f"{i:08x}-0000-4000-8000-000000000000",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": CLASSES[types[i] - 1], "color": [200, 0, 0]},
                    "isLocked": False,
                },
            }
        )
    path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": feats}))


def write_imagescope(path: Path, coords, off, types):
    with open(path, "w") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<Annotations MicronsPerPixel="0.252000">\n')
        rid = 0
        for k, name in enumerate(CLASSES, start=1):
            f.write(
                f'<Annotation Id="{k}" Name="{name}" ReadOnly="0" NameReadOnly="0" '
                f'LineColorReadOnly="0" Incremental="0" Type="4" LineColor="65280" '
                f'Visible="1" Selected="0" MarkupImagePath="" MacroName="">\n'
                '<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>\n<Regions>\n'
                "<RegionAttributeHeaders/>\n"
            )
            for i in np.flatnonzero(types == k):
                rid += 1
                ring = coords[off[i] : off[i + 1]]
                f.write(
                    f'<Region Id="{rid}" Type="0" Zoom="1" Selected="0" ImageLocation="" '
                    f'ImageFocus="-1" Length="0" Area="0" LengthMicrons="0" AreaMicrons="0" '
                    f'Text="" NegativeROA="0" InputRegionId="0" Analyze="1" DisplayId="{rid}">\n'
                    "<Attributes/>\n<Vertices>\n"
                )
                f.write("".join(f'<Vertex X="{x:.2f}" Y="{y:.2f}" Z="0"/>\n' for x, y in ring))
                f.write("</Vertices>\n</Region>\n")
            f.write("</Regions>\n<Plots/>\n</Annotation>\n")
        f.write("</Annotations>\n")


CHILD = r"""
import gc, json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
import numpy as np
n = None
if kind == "noop":
    pass
elif kind == "json.load":
    import json as J
    t = time.perf_counter()
    with open(path, "rb") as f:
        d = J.load(f)
    n = len(d["features"])
elif kind == "orjson.loads":
    import orjson
    gc.disable()
    t = time.perf_counter()
    with open(path, "rb") as f:
        d = orjson.loads(f.read())
    n = len(d["features"])
elif kind == "iterparse":
    from array import array
    from defusedxml.ElementTree import iterparse
    t = time.perf_counter()
    xy = array("d")
    offs = array("q", [0])
    names = []
    n = 0
    for ev, el in iterparse(path, events=("end",)):
        tag = el.tag
        if tag == "Vertex":
            xy.append(float(el.get("X")))
            xy.append(float(el.get("Y")))
        elif tag == "Region":
            offs.append(len(xy) // 2)
            n += 1
            el.clear()
        elif tag == "Annotation":
            el.clear()
    coords = np.frombuffer(xy).reshape(-1, 2)
elif kind == "annotations.read":
    from histosynth.io import annotations
    t = time.perf_counter()
    d = annotations.read(path)
    try:
        n = len(d)
    except TypeError:
        n = None
if kind == "noop":
    t = time.perf_counter()
dt = time.perf_counter() - t
def peak_mb():
    # VmHWM: this process image's own peak (ru_maxrss would include the
    # parent's RSS at fork/exec time on Linux)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"s": dt, "n": n, "maxrss_mb": peak_mb()}))
"""


def run_child(kind: str, path: Path) -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, env=env
    )
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_parse(n: int, seed: int) -> dict:
    coords, off, types, _ = make_nuclei(n, seed)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        gj = Path(tmp) / "nuclei.geojson"
        xml = Path(tmp) / "nuclei.xml"
        write_geojson(gj, coords, off, types)
        write_imagescope(xml, coords, off, types)
        out["geojson_mb"] = gj.stat().st_size / 2**20
        out["xml_mb"] = xml.stat().st_size / 2**20
        out["noop"] = run_child("noop", gj)
        out["json.load"] = run_child("json.load", gj)
        out["orjson.loads"] = run_child("orjson.loads", gj)
        out["iterparse"] = run_child("iterparse", xml)
        try:
            import histosynth.io.annotations as ann

            has_read = hasattr(ann, "read")
        except ImportError:
            has_read = False
        if has_read:
            out["annotations.read(geojson)"] = run_child("annotations.read", gj)
            out["annotations.read(xml)"] = run_child("annotations.read", xml)
        else:
            out["annotations.read"] = {"skipped": "histosynth.io.annotations.read not available yet"}
    return out


# --------------------------------------------------------------------------- #
def print_raster(r: dict):
    n = r["n_nuclei"]
    print(
        f"\nrasterize: {n} nuclei, {r['n_tiles']} tiles of {TILE} px, {r['n_pairs']} nucleus-tile pairs, "
        f"{r['n_vertices']} vertices (pack_polygons {r['pack_s']:.3f} s)"
    )
    print(f"{'method':<34}{'seconds':>9}{'nuclei/s':>11}{'vs cv2':>8}{'fg mismatch':>13}")
    print(
        f"{'histosynth rasterize_tiles':<34}{r['ours_s']:>9.2f}{r['ours_nuclei_per_s']:>11.0f}"
        f"{r['ratio_to_cv2']:>7.2f}x{'(reference)':>13}"
    )
    print(
        f"{'cv2.fillPoly loop (inst only)':<34}{r['cv2_s']:>9.2f}{r['cv2_nuclei_per_s']:>11.0f}"
        f"{1.0:>7.2f}x{r['cv2_fg_mismatch']:>12.2%} "
    )
    sk = r["skimage_nuclei_per_s"] or 0.0
    label = f"skimage.draw.polygon ({r['skimage_tiles']} tiles)"
    print(
        f"{label:<34}{r['skimage_s']:>9.2f}{sk:>11.0f}{sk / r['cv2_nuclei_per_s']:>7.2f}x"
        f"{r['skimage_fg_mismatch']:>12.2%} "
    )
    print(
        f"peak RSS: {r['rss_peak_generate_mb']:.0f} MB after generating the polygons; "
        f"{r['rss_before_mb']:.0f} MB before rasterize_tiles, peak {r['rss_after_ours_mb']:.0f} MB during "
        f"(+{r['rss_after_ours_mb'] - r['rss_before_mb']:.0f} MB); {r['rss_peak_mb']:.0f} MB peak at the end"
    )


def print_parse(p: dict, n: int):
    print(
        f"\nparse: {n} nuclei, GeoJSON {p['geojson_mb']:.1f} MB, ImageScope XML {p['xml_mb']:.1f} MB "
        f"(each in a fresh child; empty child peak RSS {p['noop'].get('maxrss_mb', 0):.0f} MB)"
    )
    print(f"{'parser':<30}{'seconds':>9}{'peak RSS MB':>13}")
    for k, v in p.items():
        if not isinstance(v, dict) or k == "noop":
            continue
        if "s" in v:
            print(f"{k:<30}{v['s']:>9.2f}{v['maxrss_mb']:>13.0f}")
        else:
            print(f"{k:<30}  {v.get('skipped') or v.get('error')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-nuclei", type=int, default=100_000)
    ap.add_argument("--also-1m", action="store_true", help="also rasterize 1,000,000 nuclei")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skimage-max-pairs",
        type=int,
        default=20_000,
        help="time skimage on the first tiles up to this many pairs",
    )
    ap.add_argument("--skip-parse", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    results = {"threads": os.environ.get("OMP_NUM_THREADS"), "raster": [], "parse": None}
    sizes = [args.n_nuclei] + ([1_000_000] if args.also_1m and args.n_nuclei != 1_000_000 else [])
    for n in sizes:
        r = bench_raster(n, args.seed, args.skimage_max_pairs)
        results["raster"].append(r)
        print_raster(r)
    if not args.skip_parse:
        p = bench_parse(args.n_nuclei, args.seed)
        results["parse"] = p
        print_parse(p, args.n_nuclei)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
