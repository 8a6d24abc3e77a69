"""CLI of the tissue-layout family (seed 002, DEPAS): train-tissue, sample-tissue."""

from __future__ import annotations

import argparse

from histosynth.cli._args import add_device, add_option, add_seed, add_threads
from histosynth.errors import HistosynthError


def _tissue_classes(items: list[str] | None) -> dict[int, str] | None:
    """``--tissue-classes NAME=ID ...`` → {id: name} (None: whatever the data / model holds)."""
    if not items:
        return None
    from histosynth.io.labels import parse_class_map, read_class_map

    return read_class_map(parse_class_map(items), "--tissue-classes")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tissue", help="train the DEPAS tissue-layout generator (or the DCGAN baseline) on "
                                            "tissue masks of tile patch sets")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="tile patch sets (images; or sets with tissue.npy) followed by the output folder "
                        "(tissue.pt, samples.png, log.csv, checkpoint.pt)")
    add_option(p, "--kind", key="tissue.kind", help="depas or the plain dcgan baseline")
    add_option(p, "--size", key="tissue.size", type=int, nargs=2, metavar=("H", "W"), help="mask height and width")
    add_option(p, "--nz", key="tissue.nz", type=int, help="latent size")
    add_option(p, "--widths", key="tissue.widths", type=int, nargs="+", help="generator channels per layer")
    add_option(p, "--ndf", key="tissue.ndf", type=int, help="discriminator width")
    add_option(p, "--steps", key="tissue.steps", type=int, help="optimizer steps")
    add_option(p, "--batch-size", key="tissue.batch_size", type=int, help="batch size")
    add_option(p, "--lr", key="tissue.lr", type=float, help="Adam learning rate")
    add_option(p, "--anneal-every", key="tissue.anneal_every", type=int,
               help="steps per annealing stage (0: a tenth of the steps)")
    add_option(p, "--noise-init", key="tissue.noise_init", type=float, help="initial spatial-noise weight")
    add_option(p, "--min-area", key="tissue.min_area", type=int, help="specks / holes under this many px removed")
    add_option(p, "--checkpoint-every", key="tissue.checkpoint_every", type=int, help="steps between checkpoints")
    add_option(p, "--log-every", key="tissue.log_every", type=int, help="steps per log.csv row")
    add_option(p, "--sample-every", key="tissue.sample_every", type=int, help="steps between samples.png")
    add_seed(p)
    add_device(p)
    add_threads(p, "tissue")
    p.add_argument("--tissue-classes", nargs="+", metavar="NAME=ID",
                   help="the tissue labels asked for (default: those of the patch sets; tiles give tissue=1)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint.pt")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from histosynth.masks.tissue import train_tissue

    if len(args.paths) < 2:
        raise HistosynthError("train-tissue needs at least one patch set and the output folder")
    *sets, out = args.paths
    train_tissue(sets, out, kind=args.kind, size=tuple(args.size), nz=args.nz, widths=tuple(args.widths),
                 ndf=args.ndf, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 anneal_every=args.anneal_every, noise_init=args.noise_init, min_area=args.min_area,
                 classes=_tissue_classes(args.tissue_classes), seed=args.seed, device=args.device,
                 threads=args.threads, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                 sample_every=args.sample_every, resume=args.resume,
                 progress=getattr(args, "progress", False) or None)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-tissue", help="draw tissue masks from a tissue model (a patch set with tissue.npy)")
    p.add_argument("model", help="tissue.pt from train-tissue")
    p.add_argument("out_dir", help="output patch set (tissue.npy + index.csv + report.json)")
    add_option(p, "--n", key="tissue.n", type=int, help="number of masks")
    add_seed(p)
    add_threads(p, "tissue")
    p.add_argument("--tissue-classes", nargs="+", metavar="NAME=ID",
                   help="refuse a model trained on other tissue labels than these")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    from histosynth.masks.tissue import sample_tissue

    sample_tissue(args.model, args.out_dir, args.n, seed=args.seed, classes=_tissue_classes(args.tissue_classes),
                  threads=args.threads)


def register(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_sample(sub)
