"""The one step loop (histosynth.training.StepLoop): cadence, log.csv, resume, settings, NaN stop."""

from __future__ import annotations

import os
import signal

import pandas as pd
import pytest
import torch

from histosynth.errors import HistosynthError, Terminated
from histosynth.models.checkpoint import read_torch_checkpoint
from histosynth.training import StepLoop, choose_precision, cpu_native_bf16, grad_scaler, precision_name

torch.set_num_threads(1)


def _read(path):
    return read_torch_checkpoint(path, "toy", 1, "toy")


class Kill(Exception):
    pass


def _toy(out_dir, total, settings=None, poison_at=None, kill_at=None, sigterm_at=None):
    """A linear model fitted by SGD through a StepLoop; returns (loop, model, checkpoint steps, run)."""
    settings = settings or {"lr": 0.1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        noise = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=settings["lr"])
        loop = StepLoop(out_dir, total=total, checkpoint_every=2, log_every=2, device=torch.device("cpu"),
                        settings=settings, keys=("lr",), reader=_read, required="optimizer",
                        columns=["step", "loss", "lr", "seconds"], scaler=grad_scaler(None),
                        generators={"noise": noise}, desc="toy", progress=False)
        if loop.ckpt is not None:
            model.load_state_dict(loop.ckpt["model"])
            opt.load_state_dict(loop.ckpt["optimizer"])
        saved = []

        def step_fn(step):
            if step == kill_at:
                raise Kill
            if step == sigterm_at:  # as Snakemake or SLURM would, in the middle of a step
                os.kill(os.getpid(), signal.SIGTERM)
            x = torch.randn(4, 3, generator=noise)
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            if step == poison_at:
                loss = loss * float("nan")
            values = loop.check_finite({"loss": loss})
            opt.zero_grad()
            loss.backward()
            opt.step()
            return values, settings["lr"]

        def contents():
            saved.append(loop.step)
            return {"format": "toy", "version": 1, "step": loop.step, "train": settings,
                    "model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}

        loop.run(step_fn, contents)
    return loop, model, saved


def test_cadence_log_and_exact_resume(tmp_path):
    loop, whole, saved = _toy(tmp_path / "whole", 7)
    assert saved == [2, 4, 6, 7] and loop.step == 7  # every checkpoint_every steps and at the last one
    log = pd.read_csv(tmp_path / "whole" / "log.csv")
    assert list(log.columns) == ["step", "loss", "lr", "seconds"] and list(log["step"]) == [2, 4, 6, 7]
    ckpt = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert list(ckpt)[-4:] == ["scaler", "rng", "log", "partial"] and set(ckpt["rng"]) == {"torch", "noise", "cuda"}

    with pytest.raises(Kill):
        _toy(tmp_path / "cut", 7, kill_at=5)  # killed after step 5, its last checkpoint the one of step 4
    loop, resumed, saved = _toy(tmp_path / "cut", 7)
    assert saved == [6, 7]  # it went on from step 4
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    pd.testing.assert_frame_equal(log.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "cut" / "log.csv").drop(columns="seconds"))


def test_sigterm_finishes_the_step_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """SIGTERM during step 3 (1-based): the step completes, checkpoint.pt of step 3 is written (not a checkpoint
    step, and half-way through a log row: both are every 2), Terminated names it; the rerun goes on from there to
    the weights and log of an uninterrupted run; the previous SIGTERM handler is back."""
    _, whole, _ = _toy(tmp_path / "whole", 7)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match=r"stopped by SIGTERM; training state saved to .*checkpoint.pt \(step 3\)"
                                         r": run the same command again to resume") as info:
        _toy(tmp_path / "cut", 7, sigterm_at=2)
    assert info.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    _, resumed, saved = _toy(tmp_path / "cut", 7)
    assert saved == [4, 6, 7]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "log.csv").drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "cut" / "log.csv").drop(columns="seconds"))


def test_other_settings_start_afresh(tmp_path, caplog):
    _toy(tmp_path, 3)
    with caplog.at_level("WARNING"):
        _, _, saved = _toy(tmp_path, 3, settings={"lr": 0.05})
    assert "other settings (lr)" in caplog.text and saved == [2, 3]


def test_nan_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(HistosynthError, match=r"non-finite loss \(loss=nan\) at step 4 .*checkpoint.pt \(step 2\)"):
        _toy(tmp_path, 6, poison_at=3)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_precision_names():
    assert precision_name(None) == "float32" and precision_name(torch.bfloat16) == "bf16"
    assert not grad_scaler(None).is_enabled()


def test_auto_precision_skips_the_probe_without_native_bf16(tmp_path):
    """A CPU whose flags lack bf16 trains in float32 without timing emulated bf16; one that has it is probed."""
    plain, native = tmp_path / "plain", tmp_path / "native"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_native_bf16(plain) is False and cpu_native_bf16(native) is True
    assert cpu_native_bf16(tmp_path / "missing") is None
    probed = []
    cpu = torch.device("cpu")
    assert choose_precision("auto", cpu, probed.append, cpuinfo=plain) is None and probed == []
    choose_precision("auto", cpu, probed.append, cpuinfo=native)
    assert probed == [None] * 3 + [torch.bfloat16] * 3  # a warm-up and two timed steps per dtype
    assert choose_precision("float32", cpu, probed.append, cpuinfo=native) is None
    assert choose_precision("bf16", cpu, probed.append, cpuinfo=plain) is torch.bfloat16  # asked for: obeyed
