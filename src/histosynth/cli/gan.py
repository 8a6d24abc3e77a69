"""CLI of the gan family: train-gan, translate, evaluate-images."""

from __future__ import annotations

import argparse

from histosynth.cli._args import add_training_args, parse_pairs, slide_option
from histosynth.errors import HistosynthError


def _add_train_gan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-gan", help="train Optional pix2pix (masks + option layer -> H&E patches)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="PATCH_SETS... OUT_DIR (patch sets with images, "
                   "inst and types; the output folder: gan.pt, log.csv, samples.png, checkpoint.pt)")
    p.add_argument("--options", nargs="+", default=None, metavar="SLIDE=NAME",
                   help="the option (stain style / domain) of each slide; others get 'default'")
    p.add_argument("--crop", type=int, default=128, help="training crop side, divisible by 2**depth (default 128)")
    p.add_argument("--depth", type=int, default=7, help="U-Net levels (default 7; the paper's is 8 at 256 px)")
    p.add_argument("--width", type=int, default=32, help="U-Net first-level channels (default 32; paper 64)")
    p.add_argument("--norm", choices=("batch", "instance"), default="batch", help="default batch")
    p.add_argument("--disc", choices=("patch", "global", "multiscale"), default="patch", help="discriminator (default patch)")
    p.add_argument("--num-d", type=int, default=2, help="scales of the multiscale discriminator (default 2)")
    p.add_argument("--ndf", type=int, default=None, help="discriminator width (default: --width)")
    p.add_argument("--gan-mode", choices=("vanilla", "lsgan", "hinge"), default="lsgan", help="default lsgan")
    p.add_argument("--lambda-l1", type=float, default=100.0, help="weight of the L1 term (default 100)")
    p.add_argument("--lambda-fm", type=float, default=10.0,
                   help="weight of feature matching, multiscale only (default 10)")
    p.add_argument("--noise", action="store_true", help="add a noise channel to the generator input")
    p.add_argument("--no-dropout-at-inference", dest="dropout_at_inference", action="store_false",
                   help="switch dropout off when generating (pix2pix keeps it on)")
    p.add_argument("--steps", type=int, default=2000, help="steps at constant lr (default 2000)")
    p.add_argument("--decay-steps", type=int, default=2000,
                   help="steps of linear lr decay to 0 (default 2000)")
    p.add_argument("--batch-size", type=int, default=4, help="default 4")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    p.add_argument("--sample-every", type=int, default=500, help="steps between samples.png (default 500)")
    add_training_args(p, checkpoint_every=500)
    p.set_defaults(func=_run_train_gan)


def _run_train_gan(args: argparse.Namespace) -> None:
    from histosynth.gan.train import train_gan
    from histosynth.patches.annotate import parse_class_map

    if len(args.paths) < 2:
        raise HistosynthError("train-gan needs at least one patch set and an output folder")
    train_gan(args.paths[:-1], args.paths[-1], options=parse_pairs(args.options, "an option") or None,
              crop=args.crop, depth=args.depth, width=args.width, norm=args.norm, disc=args.disc, num_d=args.num_d,
              ndf=args.ndf, gan_mode=args.gan_mode, lambda_l1=args.lambda_l1, lambda_fm=args.lambda_fm,
              noise=args.noise, dropout_at_inference=args.dropout_at_inference, steps=args.steps,
              decay_steps=args.decay_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              device=args.device, threads=args.threads, sample_every=args.sample_every,
              checkpoint_every=args.checkpoint_every, log_every=args.log_every, precision=args.precision,
              classes=parse_class_map(args.classes), resume=args.resume,
              progress=getattr(args, "progress", False) or None)


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="paint synthetic masks into H&E images with the GAN (image+inst+types)")
    p.add_argument("gan", help="GAN checkpoint (gan.pt from train-gan)")
    p.add_argument("masks", help="mask patch set (inst.npy + types.npy), e.g. a sample-masks shard")
    p.add_argument("out_dir", help="output patch set (images + inst + types)")
    p.add_argument("--option", action="append", dest="options", metavar="NAME",
                   help="stain/domain option; repeat for a balanced seeded mix (a name twice = twice the share); "
                        "'all' = every option of the model; default: the model's first option")
    p.add_argument("--mix", action="store_true", help="same as --option all")
    p.add_argument("--batch", type=int, default=16, help="masks per generator call (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for the option mix, noise and dropout (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--montage", dest="montage_path", help="montage PNG path (default OUT_DIR.montage.png)")
    p.add_argument("--no-montage", action="store_true", help="do not write the montage")
    p.set_defaults(func=_run_translate)


def _run_translate(args: argparse.Namespace) -> None:
    from histosynth.gan.translate import translate

    options = list(args.options or [])
    if args.mix:
        if options and options != ["all"]:
            raise HistosynthError("--mix cannot be combined with --option names (it means --option all)")
        options = ["all"]
    translate(args.gan, args.masks, args.out_dir, options=options or None, batch=args.batch, seed=args.seed,
              device=args.device, threads=args.threads, montage=not args.no_montage,
              montage_path=args.montage_path, progress=getattr(args, "progress", False))


def _add_evaluate_images(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-images", help="stain realism, mask consistency and a mean-colour baseline "
                                               "of generated vs real images (evaluation.json + figure.png)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="GENERATED... OUT_DIR")
    p.add_argument("--real", nargs="+", required=True, help="real patch sets (images + inst)")
    p.add_argument("--real-masks-translated", nargs="+", dest="translated",
                   help="the real masks painted by the GAN (paired with --real by slide, x, y)")
    p.add_argument("--real-options", nargs="+", type=slide_option, default=[], metavar="SLIDE=OPTION",
                   help="real slide → stain domain, for the option × domain table")
    p.add_argument("--max-samples", type=int, default=200_000,
                   help="pixels pooled per collection and region (default 200000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fid", action="store_true", help="do not try FID/KID")
    p.add_argument("--fid-max-images", type=int, default=5000,
                   help="images per side for FID/KID, drawn by --seed when there are more (default 5000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the FID/KID Inception network runs (default auto)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for FID/KID (default 1)")
    p.set_defaults(func=_run_evaluate_images)


def _run_evaluate_images(args: argparse.Namespace) -> None:
    from histosynth.gan.evaluate import evaluate_images

    if len(args.paths) < 2:
        raise HistosynthError("evaluate-images takes GENERATED... OUT_DIR (with --real REAL...)")
    evaluate_images(args.paths[:-1], args.real, args.paths[-1], real_options=dict(args.real_options),
                    translated=args.translated, max_samples=args.max_samples, seed=args.seed, fid=not args.no_fid,
                    fid_max_images=args.fid_max_images, device=args.device, threads=args.threads)


def register(sub: argparse._SubParsersAction) -> None:
    _add_train_gan(sub)
    _add_translate(sub)
    _add_evaluate_images(sub)
