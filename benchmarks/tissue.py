"""DEPAS vs a plain DCGAN: tissue masks of each against real held-out tissue masks (seed 002's Table 1, on a CPU).

    python benchmarks/tissue.py TILES_DIR OUT_DIR [--train SLIDE ...] [--steps 1000]

TILES_DIR holds one tile patch set per slide (``histosynth tile`` output, e.g. of ``histosynth demo-slides``).
The tissue masks of the tiles (grey > 204 = air, specks / holes < 64 px removed:
:func:`histosynth.masks.tissue.tissue_mask`) are halved by area averaging (> 0.5 = tissue) so that a CPU run
can take many steps; the ``--train`` slides' masks train both models (the same steps, batch, seed, lr, crop
size 64 x 128 — non-square, as the paper's 512 x 1024), the other slides' masks, cut into the top and bottom
64 x 128 halves, are the real reference. Each model then draws as many masks as the reference holds.

Measured, each synthetic set against the reference:

- per mask: tissue fraction, number of 8-connected tissue components, boundary length per area (tissue
  pixels with a 4-neighbour of air, over all pixels);
- KS = the two-sample Kolmogorov-Smirnov statistic (scipy), KL = KL(real || synthetic) of 20-bin histograms
  on the pooled range (+1e-3 per bin, normalised); the KL, 2-D KS, PCA and Fréchet maths are the library's
  (:mod:`histosynth.masks.realism`, which ``evaluate-masks`` uses for nuclei masks);
- a 2-D projection of the masks (area-averaged to 16 x 32, flattened): PCA fitted on the real and both
  synthetic sets together (the runs recorded in docs/ predate scikit-learn as a dependency; kept PCA so
  that the numbers stay comparable), KS averaged over the two axes, KL of the 2-D histogram (10 x 10 bins);
- FD = the Fréchet distance of Gaussians fitted to a 16-component PCA of the same 16 x 32 vectors — the FID
  formula on pixel features, NOT the paper's FID (no Inception network: nothing is downloaded).

Writes OUT_DIR/{depas,dcgan}/ (the models), OUT_DIR/tissue.json (the numbers) and OUT_DIR/masks.png
(real | DEPAS | DCGAN); prints the table in Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.stats import ks_2samp

from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.masks import tissue as ts
from histosynth.masks.realism import frechet, kl_1d, kl_2d, ks_2d, pca_fit, project


def half_masks(images: np.ndarray) -> np.ndarray:
    """Tissue masks of the tiles at half resolution (area average > 0.5)."""
    out = []
    for im in images:
        m = ts.tissue_mask(im).astype(np.float32)
        out.append((cv2.resize(m, (m.shape[1] // 2, m.shape[0] // 2), interpolation=cv2.INTER_AREA) > 0.5))
    return np.stack(out).astype(np.uint8)


def write_tissue_set(path: Path, masks: np.ndarray) -> Path:
    h, w = masks.shape[1:]
    with PatchSetWriter(path, arrays=("tissue",), patch_size=(h, w)) as wr:
        for i, m in enumerate(masks):
            wr.add({"slide": "real", "x": 0, "y": 0, "level": 0, "downsample": 2.0, "mpp": 1.0, "width": w,
                    "height": h, "tissue_fraction": float(m.mean()), "n_nuclei": 0, "source": f"m{i}"}, tissue=m)
        wr.report = {"tissue_classes": {"1": "tissue"}}
    return path


def statistics(masks: np.ndarray) -> dict[str, np.ndarray]:
    frac, comps, boundary = [], [], []
    for m in masks:
        m = (m > 0).astype(np.uint8)
        frac.append(m.mean())
        comps.append(cv2.connectedComponents(m, connectivity=8)[0] - 1)
        air = np.pad(m == 0, 1, constant_values=False)
        edge = (m > 0) & (air[:-2, 1:-1] | air[2:, 1:-1] | air[1:-1, :-2] | air[1:-1, 2:])
        boundary.append(edge.sum() / m.size)
    return {"tissue_fraction": np.array(frac), "components": np.array(comps, float),
            "boundary_per_area": np.array(boundary)}


def small(masks: np.ndarray) -> np.ndarray:
    return np.stack([cv2.resize(m.astype(np.float32), (32, 16), interpolation=cv2.INTER_AREA).ravel()
                     for m in masks])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tiles_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--train", nargs="+", default=["demo-000", "demo-001", "demo-002", "demo-003"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = sorted(p for p in Path(args.tiles_dir).iterdir() if (p / "index.csv").exists())
    train = [p for p in sets if p.name in args.train]
    test = [p for p in sets if p.name not in args.train]
    train_masks = np.concatenate([half_masks(read_patchset(p, require=("images",)).images) for p in train])
    test_tiles = np.concatenate([half_masks(read_patchset(p, require=("images",)).images) for p in test])
    h = test_tiles.shape[1] // 2
    real = np.concatenate([test_tiles[:, :h], test_tiles[:, h:]])  # 64 x 128 halves
    train_set = write_tissue_set(out / "train-tissue", train_masks)
    settings = dict(size=(real.shape[1], real.shape[2]), nz=64, widths=(64, 32, 16, 8), ndf=16, steps=args.steps,
                    batch_size=8, lr=2e-4, seed=args.seed, device="cpu", threads=1,
                    checkpoint_every=args.steps, log_every=50, sample_every=args.steps, progress=False)
    synth, timing = {}, {}
    for kind in ("depas", "dcgan"):
        t0 = time.perf_counter()
        rep = ts.train_tissue([train_set], out / kind, kind=kind, **settings)
        timing[kind] = {"seconds": round(time.perf_counter() - t0, 1),
                        "seconds_per_step": round(rep["seconds_per_step"], 3)}
        G, _ = ts.load_tissue_model(out / kind / "tissue.pt")
        synth[kind] = ts.generate(G, len(real), args.seed + 1)
    # real vs itself would be 0: the train masks (cut the same way) are a reference "real vs real" row
    th = train_masks.shape[1] // 2
    synth["real (train slides)"] = np.concatenate([train_masks[:, :th], train_masks[:, th:]])
    stats_real = statistics(real)
    feats = {k: small(v) for k, v in synth.items()}
    f_real = small(real)
    basis = pca_fit(np.concatenate([f_real, feats["depas"], feats["dcgan"]]), 16)

    def proj(f: np.ndarray, k: int) -> np.ndarray:
        return project(f, (basis[0], basis[1][:k]))

    rows = {}
    for name, masks in synth.items():
        st = statistics(masks)
        p2r, p2s = proj(f_real, 2), proj(feats[name], 2)
        rows[name] = {
            **{f"KS {k}": float(ks_2samp(stats_real[k], st[k]).statistic) for k in stats_real},
            **{f"KL {k}": kl_1d(stats_real[k], st[k]) for k in stats_real},
            "KS PCA-2D": ks_2d(p2r, p2s)[0],
            "KL PCA-2D": kl_2d(p2r, p2s),
            "FD PCA-16": frechet(proj(f_real, 16), proj(feats[name], 16)),
            "mean tissue fraction": float(st["tissue_fraction"].mean()),
            "mean components": float(st["components"].mean()),
        }
    result = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
              "train_slides": [p.name for p in train], "test_slides": [p.name for p in test],
              "train_masks": int(len(train_masks)), "real_masks": int(len(real)),
              "real_mean_tissue_fraction": float(stats_real["tissue_fraction"].mean()),
              "real_mean_components": float(stats_real["components"].mean()),
              "settings": {k: v for k, v in settings.items() if k != "progress"}, "timing": timing, "rows": rows}
    (out / "tissue.json").write_text(json.dumps(result, indent=2, default=str))
    plot(real, synth, out / "masks.png")
    cols = list(next(iter(rows.values())))
    print("| vs real test masks | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    print(json.dumps({k: result[k] for k in ("real_masks", "train_masks", "real_mean_tissue_fraction",
                                             "real_mean_components", "timing")}))


def plot(real: np.ndarray, synth: dict[str, np.ndarray], path: Path, n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("real (test)", real), ("DEPAS", synth["depas"]), ("DCGAN", synth["dcgan"])]
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 3.3))
    for r, (name, arr) in enumerate(rows):
        for i in range(n):
            axes[r][i].imshow(arr[i * len(arr) // n], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[r][i].set_xticks([])
            axes[r][i].set_yticks([])
        axes[r][0].set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
