"""Faults: a write the disk refuses, SIGKILL and SIGTERM at the moment a checkpoint is written, two writers.

Every fault runs a real ``histosynth`` (or a writer) in a subprocess:

- a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored, so a write fails with
  EFBIG as on a full disk) on a patch set, a checkpoint and a CSV: the run
  fails with one line naming the output and the reason, leaves nothing that
  looks complete and no temporary file, and the same command without the
  limit then succeeds;
- for each training stage (train-dvae, train-gan, train-segmenter), a
  wrapper that replaces ``torch.save`` writes half of a checkpoint and kills
  its own process (SIGKILL), then SIGTERMs itself halfway through the next
  one: the first leaves the last good checkpoint, the second finishes the
  write and stops with the new one; the real CLI then resumes there and ends;
- two ``histosynth`` processes on one output: the second refuses by name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histosynth.cli import OUTPUTS, build_parser, main, output_of
from histosynth.io.lock import LockedError, lock_path, output_lock
from histosynth.io.patchset import PatchSetWriter, read_patchset

from .helpers import tissue_image, write_pyramid

torch.set_num_threads(1)

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _fsize_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run(argv: list[str], fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout, check=False,
                          preexec_fn=_fsize_limit(fsize) if fsize else None)


def histosynth(*args: object, fsize: int | None = None) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "histosynth", *map(str, args)], fsize)


def python(code: str, *args: object, fsize: int | None = None) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], fsize)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def leftovers(root: Path) -> list[str]:
    """Temporary files and lock files anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock"))


# -- a write the disk refuses ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_pyramid(tmp_path_factory.mktemp("slide") / "s.tif", tissue_image(512, 512), levels=1)


def test_a_patch_set_over_the_file_size_limit_fails_by_name_leaves_nothing_and_reruns(slide, tmp_path):
    out = tmp_path / "tiles" / "s"
    tile = ("tile", slide, out, "--size", "128", "--mpp", "0.25", "--max-background", "1", "--threads", "1")
    proc = histosynth(*tile, fsize=100_000)  # images.npy grows to 16 x 128 x 128 x 3 = 786 kB
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert line == f"error: {out}: cannot write: File too large [EFBIG] (no partial patch set left)"
    assert "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []
    proc = histosynth(*tile)
    assert proc.returncode == 0, proc.stderr
    assert len(read_patchset(out, require=("images",))) == 16 and leftovers(tmp_path) == []


def test_a_failed_rewrite_of_a_patch_set_keeps_the_old_one(tmp_path):
    """A set written again under a limit: the write fails, the old set stays whole (written by the same writer)."""
    code = """
        import sys, numpy as np
        from histosynth.io.patchset import PatchSetWriter
        n = int(sys.argv[2])
        with PatchSetWriter(sys.argv[1], arrays=("images",), patch_size=(64, 64)) as w:
            for i in range(n):
                w.add({"slide": "s", "x": 64 * i, "y": 0, "level": 0, "downsample": 1.0, "width": 64, "height": 64},
                      images=np.full((64, 64, 3), i, np.uint8))
    """
    out = tmp_path / "set"
    assert python(code, out, 3).returncode == 0
    proc = python(code, out, 40, fsize=200_000)
    assert proc.returncode == 1 and "WriteError" in proc.stderr and "File too large" in proc.stderr
    assert len(read_patchset(out)) == 3 and leftovers(tmp_path) == []


SAVE = """
    import sys, torch
    from histosynth.models.checkpoint import atomic_torch_save
    atomic_torch_save({"step": int(sys.argv[2]), "w": torch.zeros(int(sys.argv[3]))}, sys.argv[1])
"""


def test_a_checkpoint_over_the_limit_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert python(SAVE, path, 1, 1000).returncode == 0
    proc = python(SAVE, path, 2, 100_000, fsize=100_000)
    assert proc.returncode == 1
    assert f"histosynth.io.atomic.WriteError: {path}: cannot write: File too large [EFBIG]" in proc.stderr
    assert "unexpected pos" not in proc.stderr.splitlines()[-1]  # torch's RuntimeError is not what is reported
    assert torch.load(path, weights_only=True)["step"] == 1 and leftovers(tmp_path) == []
    assert python(SAVE, path, 2, 100_000).returncode == 0
    assert torch.load(path, weights_only=True)["step"] == 2


def test_a_csv_over_the_limit_leaves_the_previous_one(tmp_path):
    code = """
        import sys, pandas as pd
        from histosynth.io.atomic import atomic_csv
        atomic_csv(pd.DataFrame({"x": range(int(sys.argv[2]))}), sys.argv[1])
    """
    path = tmp_path / "log.csv"
    assert python(code, path, 10).returncode == 0
    proc = python(code, path, 100_000, fsize=20_000)
    assert proc.returncode == 1
    assert f"WriteError: {path}: cannot write: File too large [EFBIG] (no partial file left)" in proc.stderr
    assert len(pd.read_csv(path)) == 10 and leftovers(tmp_path) == []
    assert python(code, path, 100_000).returncode == 0 and len(pd.read_csv(path)) == 100_000


@pytest.mark.slow
def test_a_training_stage_over_the_limit_stops_by_name_and_the_rerun_finishes(library, tmp_path):
    """train-dvae whose checkpoint cannot be written: one line naming checkpoint.pt; then it trains to the end."""
    out = tmp_path / "dvae"
    proc = histosynth(*DVAE(library, out), fsize=60_000)
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert line == f"error: {out / 'checkpoint.pt'}: cannot write: File too large [EFBIG] (no partial file left)"
    assert not (out / "checkpoint.pt").exists() and not (out / "dvae.pt").exists() and leftovers(tmp_path) == []
    proc = histosynth(*DVAE(library, out))
    assert proc.returncode == 0, proc.stderr
    assert torch.load(out / "dvae.pt", weights_only=True)["step"] == 15 and leftovers(tmp_path) == []


def test_the_cli_reports_an_environment_error_in_one_line_and_a_bug_as_a_bug(monkeypatch, capsys, tmp_path):
    import histosynth.cli.slides as slides_cli

    def refused(args):
        raise OSError(errno.EROFS, "Read-only file system", "/data/out/x.csv")

    monkeypatch.setattr(slides_cli, "_run_info", refused)
    assert main(["slide-info", "any.svs"]) == 2
    assert capsys.readouterr().err.strip() == "error: /data/out/x.csv: Read-only file system [EROFS]"

    import histosynth.cli.patches as patches_cli

    def full(args):  # a write names no file: the line names the command's output
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patches_cli, "_run_split", full)
    out = tmp_path / "split.csv"
    assert main(["split", str(out), "--slides", "a", "b"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out}: No space left on device [ENOSPC]"
    assert leftovers(tmp_path) == []  # the output's lock file is gone too

    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(slides_cli, "_run_info", bug)
    assert main(["slide-info", "any.svs"]) == 1
    assert "internal error (a bug in histosynth" in capsys.readouterr().err


# -- SIGKILL and SIGTERM at the moment a checkpoint is written ------------------------------------------------------
#: ``python -c HOOK MODE N histosynth-args...``: the CLI with ``torch.save`` replaced so that the N-th checkpoint
#: write of this process writes half of its bytes and then gets SIGKILL (kill), SIGTERM (term: the write goes on)
#: or two SIGTERMs (term2: the second stops at once)
HOOK = """
    import io, os, signal, sys, torch
    mode, at = sys.argv.pop(1), int(sys.argv.pop(1))
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):
        name = os.path.basename(getattr(getattr(f, "fh", None), "name", ""))
        if name.startswith(".checkpoint.pt.tmp-"):
            seen.append(name)
            if len(seen) == at:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                print(f"HOOK {mode} while writing step {obj['step']}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGTERM)
                if mode == "term2":
                    os.kill(os.getpid(), signal.SIGTERM)
                f.write(data[len(data) // 2 :])
                return
        real_save(obj, f, *args, **kwargs)

    torch.save = save
    from histosynth.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def hooked(mode: str, at: int, *args: object) -> subprocess.CompletedProcess:
    return python(HOOK, mode, at, *args)


def _write_pairs(path, slide, n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with PatchSetWriter(path, arrays=("images", "inst", "types"), patch_size=(size, size)) as w:
        for i in range(n):
            inst = np.zeros((size, size), np.int32)
            types = np.zeros((size, size), np.uint8)
            for k in range(1, 6):
                cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(3, 6)
                disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)
                inst[disc], types[disc] = k, 1 + k % 2
            img = np.full((size, size, 3), (230, 180, 210), np.uint8)
            img[inst > 0] = (120, 60, 150)
            w.add({"slide": slide, "x": i * size, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": size, "height": size, "tissue_fraction": 1.0, "n_nuclei": int(inst.max()),
                   "source": "test"}, images=img, inst=inst, types=types)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return [_write_pairs(root / "a", "slide-a", seed=1), _write_pairs(root / "b", "slide-b", seed=2)]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    from skimage.draw import ellipse

    rng = np.random.default_rng(0)
    n = 40
    shapes, types = np.zeros((n, 64, 64), np.uint8), np.zeros(n, np.uint8)
    for i in range(n):
        a = rng.uniform(6, 10)
        rr, cc = ellipse(32, 32, a, a * rng.uniform(0.4, 1.0), shape=(64, 64), rotation=rng.uniform(0, np.pi))
        shapes[i, rr, cc], types[i] = 1, 1 + i % 2
    path = tmp_path_factory.mktemp("lib") / "nuclei.npz"
    np.savez(path, shapes=shapes, types=types, areas=shapes.sum((1, 2)).astype(np.float32),
             scales=np.ones(n, np.float32), slides=np.array(["s"] * n), centroids=np.zeros((n, 2)),
             classes=np.asarray(json.dumps({"1": "round", "2": "long"})), mpp=np.asarray(0.5))
    return path


def DVAE(library, out):  # 36 training shapes in batches of 8: 5 steps an epoch, a checkpoint after each epoch
    return ("train-dvae", library, out, "--latent-dim", "2", "--epochs", "3", "--checkpoint-every", "1",
            "--batch-size", "8", "--min-steps", "0", "--enc-widths", "4", "4", "8", "8", "--dec-widths", "8", "4",
            "4", "--device", "cpu", "--threads", "1")


def GAN(pairs, out):
    return ("train-gan", *pairs, out, "--crop", "32", "--depth", "3", "--width", "4", "--steps", "6",
            "--decay-steps", "0", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "1",
            "--sample-every", "1000", "--device", "cpu", "--precision", "float32", "--threads", "1")


def SEGMENTER(pairs, out):
    return ("train-segmenter", pairs[0], out, "--arm", "real", "--no-augment", "--width", "8", "--units", "1", "1",
            "1", "1", "--input-size", "104", "--steps", "6", "--batch-size", "1", "--checkpoint-every", "2",
            "--log-every", "1", "--val-every", "2", "--device", "cpu", "--precision", "float32", "--threads", "1")


#: stage -> (arguments, final model file, checkpoint steps: the good one, the one being written at the kill,
#: the last)
STAGES = {
    "train-dvae": (DVAE, "dvae.pt", (5, 10, 15)),
    "train-gan": (GAN, "gan.pt", (2, 4, 6)),
    "train-segmenter": (SEGMENTER, "model.pt", (2, 4, 6)),
}


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["step"])


def _resumed_at(proc: subprocess.CompletedProcess) -> int:
    found = re.findall(r"resuming .* (?:at )?step (\d+)", proc.stderr)
    assert found, proc.stderr
    return int(found[-1])


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigkill_then_sigterm_mid_checkpoint_write_resume_from_the_last_good_checkpoint(stage, library, pairs,
                                                                                        tmp_path):
    make_args, final, (good, written, last) = STAGES[stage]
    out = tmp_path / "out"
    args = make_args(library if stage == "train-dvae" else pairs, out)

    # SIGKILL halfway through the second checkpoint: the first stays, the half-written one is only a temp file
    proc = hooked("kill", 2, *args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert f"HOOK kill while writing step {written}" in proc.stderr
    assert _step(out / "checkpoint.pt") == good
    [partial] = [p for p in out.iterdir() if p.name.startswith(".checkpoint.pt.tmp-")]
    assert 0 < partial.stat().st_size and not (out / final).exists()
    assert lock_path(out).exists()  # the dead process's lock file is left, and must not block the next run

    # the next run resumes from it; SIGTERM halfway through its first checkpoint: the write completes, it stops
    proc = hooked("term", 1, *args)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert _resumed_at(proc) == good
    assert f"HOOK term while writing step {written}" in proc.stderr
    assert error_lines(proc) == [(f"error: stopped by SIGTERM; training state saved to {out / 'checkpoint.pt'} "
                                  f"(step {written}): run the same command again to resume")]
    assert _step(out / "checkpoint.pt") == written and not (out / final).exists()
    assert f"removed {partial}, left by a writer that was killed" in proc.stderr
    assert not partial.exists() and leftovers(tmp_path) == []  # the killed run's temp file is gone

    # the real CLI resumes there and finishes
    proc = histosynth(*args)
    assert proc.returncode == 0, proc.stderr
    assert _resumed_at(proc) == written
    assert _step(out / "checkpoint.pt") == last and (out / final).is_file() and leftovers(tmp_path) == []
    log = pd.read_csv(out / "log.csv")
    assert log["step"].is_monotonic_increasing and int(log["step"].iloc[-1]) == last


def test_a_second_sigterm_mid_write_stops_at_once_keeping_the_previous_checkpoint(pairs, tmp_path):
    out = tmp_path / "gan"
    proc = hooked("term2", 2, *GAN(pairs, out))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert error_lines(proc) == [("error: stopped by SIGTERM twice: stopped at once, without a new checkpoint "
                                  "(the previous one is intact)")]
    assert _step(out / "checkpoint.pt") == 2 and leftovers(tmp_path) == []


def test_sigterm_from_outside_stops_a_stage_promptly_and_cleanly(slide, tmp_path):
    """A stage that is not training (tile) unwinds on SIGTERM: exit 143, no temporary set, no lock file."""
    code = """
        import sys, time
        import histosynth.io.patchset as ps
        real_add = ps.PatchSetWriter.add

        def add(self, row, **arrays):
            real_add(self, row, **arrays)
            if len(self) == 2:
                print("WRITING", flush=True)
                time.sleep(60)

        ps.PatchSetWriter.add = add
        from histosynth.cli import main
        sys.exit(main(sys.argv[1:]))
    """
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), "tile", str(slide), str(out), "--size",
                             "128", "--mpp", "0.25", "--max-background", "1", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == [f".s.tmp-{proc.pid}"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert [line for line in err.splitlines() if line.startswith("error:")] == ["error: stopped by SIGTERM"]
    assert not out.exists() and leftovers(tmp_path) == []


# -- two processes, one output ---------------------------------------------------------------------------------------
def test_every_command_names_its_output():
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    assert set(sub.choices) == set(OUTPUTS)
    args = build_parser().parse_args(["train-gan", "a", "b", "out"])
    assert output_of(args) == "out"
    assert output_of(build_parser().parse_args(["tile", "s.svs", "t"])) == "t"
    assert output_of(build_parser().parse_args(["slide-info", "s.svs"])) is None


def test_a_second_histosynth_on_the_same_output_refuses_by_name_and_the_first_finishes(slide, tmp_path):
    """The first tile run is held just before it renames its set into place; a second one on the same output
    refuses at once naming the first's pid; the first then finishes a whole set and removes its lock file."""
    code = """
        import sys
        import histosynth.io.patchset as ps
        real_exit = ps.PatchSetWriter.__exit__

        def exit(self, *exc):
            print("HOLDING", flush=True)
            sys.stdin.readline()
            return real_exit(self, *exc)

        ps.PatchSetWriter.__exit__ = exit
        from histosynth.cli import main
        sys.exit(main(sys.argv[1:]))
    """
    out = tmp_path / "tiles" / "s"
    tile = ("tile", slide, out, "--size", "128", "--mpp", "0.25", "--max-background", "1", "--threads", "1")
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, tile)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert first.stdout.readline().strip() == "HOLDING"
        assert lock_path(out) == tmp_path / "tiles" / ".s.lock" and lock_path(out).exists()
        second = histosynth(*tile)
        assert second.returncode == 2
        [line] = error_lines(second)
        assert line.startswith(f"error: {out}: another histosynth process (pid {first.pid}: histosynth tile ")
        assert line.endswith("is writing this output; wait for it to finish or stop it (its lock is released "
                             "when it ends)")
        _, err = first.communicate("go\n", timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert len(read_patchset(out, require=("images",))) == 16
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "index.csv", "report.json"]
    assert leftovers(tmp_path) == []


def test_a_lock_left_by_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from histosynth.io.lock import output_lock
        with output_lock(sys.argv[1], command="holder"):
            print("LOCKED", flush=True)
            time.sleep(60)
    """), str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        taken = rf"{out}: another histosynth process \(pid {holder.pid}: holder\)"
        with pytest.raises(LockedError, match=taken), output_lock(out):
            pass
        holder.kill()
        holder.wait(timeout=20)
    finally:
        holder.kill()
    assert lock_path(out).exists()  # SIGKILL: the file stays, the kernel released the lock
    with output_lock(out) as path:
        assert path == lock_path(out) and f"pid={os.getpid()}" in path.read_text()
    assert not lock_path(out).exists()


def test_what_dead_writers_left_is_swept_once_the_lock_is_held(tmp_path):
    from histosynth.io.atomic import sweep_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.csv").write_text("step\n1\n")
    stale = [out / f".samples.png.tmp-{pid}", out / f".checkpoint.pt.tmp-{pid}", tmp_path / f".run.tmp-{pid}",
             out / f".overlay.png.tmp-{pid}.png"]
    live = [out / f".log.csv.tmp-{os.getpid()}", tmp_path / f".other.tmp-{pid}", out / "notes.tmp-1"]
    for path in stale + live:
        path.write_bytes(b"partial")
    (tmp_path / f".run.tmp-{pid}").unlink()
    (tmp_path / f".run.tmp-{pid}").mkdir()  # a patch set's temporary folder
    assert sorted(sweep_stale_temps(out)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live) and (out / "log.csv").exists()
