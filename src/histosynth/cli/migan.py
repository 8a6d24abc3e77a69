"""MI-GAN (multi-focus cells): train-migan-g1, train-migan-g2, sample-stacks."""

from __future__ import annotations

import argparse

from histosynth.cli._args import add_device, add_option, add_seed, add_threads
from histosynth.errors import HistosynthError

_WGAN = (("--steps", "steps", int, "generator steps"), ("--lr", "lr", float, "Adam learning rate"),
         ("--n-critic", "n_critic", int, "critic steps per generator step"),
         ("--lambda-gp", "lambda_gp", float, "weight of the gradient penalty"),
         ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
         ("--log-every", "log_every", int, "steps per log.csv row"),
         ("--sample-every", "sample_every", int, "steps between samples.png"))


def _add_training(p: argparse.ArgumentParser) -> None:
    for flag, key, typ, text in _WGAN:
        add_option(p, flag, key=f"migan.{key}", type=typ, help=text)
    add_option(p, "--augment", key="migan.augment", help="a random flip / quarter turn of each cell")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="transfer learning: start generator and critic from this trained model (same architecture)")
    add_seed(p)
    add_device(p)
    add_threads(p, "migan")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint.pt")


def _add_train_g1(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-migan-g1", help="train MI-GAN's G1 (noise -> in-focus 64x64 cell image), WGAN-GP")
    p.add_argument("paths", nargs="+", metavar="PATH", help="stack sets (STACKS...), then OUT_DIR")
    add_option(p, "--batch-size", key="migan.batch_size", type=int, help="cells per batch")
    add_option(p, "--z-dim", key="migan.z_dim", type=int, help="noise size")
    add_option(p, "--width", key="migan.width", type=int, help="G1 width")
    add_option(p, "--critic-width", key="migan.critic_width", type=int, help="D1 first width")
    _add_training(p)
    p.set_defaults(func=_run_train_g1)


def _add_train_g2(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-migan-g2", help="train MI-GAN's G2 (best-focus image -> z-stack), 3-D WGAN-GP")
    p.add_argument("paths", nargs="+", metavar="PATH", help="stack sets (STACKS...), then OUT_DIR")
    p.add_argument("--g1", metavar="G1_PT", help="a trained g1.pt: samples.png also shows G2 on G1's images")
    add_option(p, "--batch-size", key="migan.g2_batch_size", type=int, help="cells per batch")
    add_option(p, "--width", key="migan.g2_width", type=int, help="G2 encoder / decoder width")
    add_option(p, "--code-channels", key="migan.code_channels", type=int, help="channels of the 3-D ResNet")
    add_option(p, "--res-blocks", key="migan.res_blocks", type=int, help="residual blocks of the 3-D ResNet")
    add_option(p, "--critic-width", key="migan.g2_critic_width", type=int, help="D2 first width")
    add_option(p, "--lambda-l1", key="migan.lambda_l1", type=float, help="weight of L1 to the real stack")
    _add_training(p)
    p.set_defaults(func=_run_train_g2)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-stacks", help="synthetic cell z-stacks: noise -> G1 -> G2 -> a stack set")
    p.add_argument("g1", metavar="G1", help="g1.pt from train-migan-g1")
    p.add_argument("g2", metavar="G2", help="g2.pt from train-migan-g2")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the stack set to write")
    add_option(p, "--n", key="migan.sample_n", type=int, help="stacks to write")
    p.add_argument("--g1-out", metavar="STACKS",
                   help="also write G1's images, row for row, as one-plane stacks (the baselines' base images)")
    add_option(p, "--batch-size", key="migan.g2_batch_size", type=int, help="stacks generated at once")
    add_seed(p)
    add_device(p)
    add_threads(p, "migan")
    p.set_defaults(func=_run_sample)


def _progress(args: argparse.Namespace) -> bool | None:
    return getattr(args, "progress", False) or None


def _split(args: argparse.Namespace, stage: str) -> tuple[list[str], str]:
    if len(args.paths) < 2:
        raise HistosynthError(f"{stage} needs at least one stack set and the output folder")
    *sets, out = args.paths
    return sets, out


def _common(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "n_critic": args.n_critic,
            "lambda_gp": args.lambda_gp, "augment": args.augment, "init_from": args.init_from, "seed": args.seed,
            "device": args.device, "threads": args.threads, "checkpoint_every": args.checkpoint_every,
            "log_every": args.log_every, "sample_every": args.sample_every, "resume": args.resume,
            "progress": _progress(args)}


def _run_train_g1(args: argparse.Namespace) -> None:
    from histosynth.multifocus.train import train_g1

    sets, out = _split(args, "train-migan-g1")
    train_g1(sets, out, z_dim=args.z_dim, width=args.width, critic_width=args.critic_width, **_common(args))


def _run_train_g2(args: argparse.Namespace) -> None:
    from histosynth.multifocus.train import train_g2

    sets, out = _split(args, "train-migan-g2")
    train_g2(sets, args.g1, out, width=args.width, code_channels=args.code_channels, res_blocks=args.res_blocks,
             critic_width=args.critic_width, lambda_l1=args.lambda_l1, **_common(args))


def _run_sample(args: argparse.Namespace) -> None:
    from histosynth.multifocus.train import sample_stacks

    sample_stacks(args.g1, args.g2, args.out_dir, args.n, args.seed, batch_size=args.batch_size,
                  device=args.device, threads=args.threads, g1_out=args.g1_out)


def register(sub: argparse._SubParsersAction) -> None:
    _add_train_g1(sub)
    _add_train_g2(sub)
    _add_sample(sub)
