"""translate: a stand-in GAN paints toy masks; option rules, errors, determinism, atomic output, CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from histosynth.gan import translate as tr
from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.cli.gan import register as add_cli
from histosynth.gan.translate import assign_options, translate
from tests.test_stats import write_toy

torch.set_num_threads(1)

NUCLEUS = torch.tensor([0.45, 0.20, 0.55]).view(1, 3, 1, 1)
BACKGROUND = torch.tensor([0.95, 0.70, 0.85]).view(1, 3, 1, 1)


def fake_conditioning(inst, types, n_types, option, n_options, noise=False, generator=None):
    """Stand-in for build_conditioning: [fg, one-hot types, one-hot option, (noise)] in [-1, 1]."""
    inst = torch.as_tensor(np.asarray(inst, dtype=np.int64))
    types = torch.as_tensor(np.asarray(types, dtype=np.int64))
    n, h, w = inst.shape
    chans = [(inst > 0).float()[:, None]]
    chans += [(types == t).float()[:, None] for t in range(1, n_types + 1)]
    opt = torch.as_tensor(np.broadcast_to(np.asarray(option), (n,)).copy())
    chans += [(opt == k).float().view(n, 1, 1, 1).expand(n, 1, h, w) for k in range(n_options)]
    if noise:
        chans.append(torch.rand((n, 1, h, w), generator=generator))
    return torch.cat(chans, 1) * 2 - 1


class FakeGenerator(nn.Module):
    """Nuclei purple, background pink; option 1 darker; the noise channel adds a little jitter."""

    def __init__(self, n_types: int, n_options: int, noise: bool):
        super().__init__()
        self.n_types, self.n_options, self.noise = n_types, n_options, noise
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        fg = (c[:, :1] + 1) / 2
        img = fg * NUCLEUS + (1 - fg) * BACKGROUND
        if self.n_options > 1:
            dark = (c[:, 1 + self.n_types + 1:2 + self.n_types + 1] + 1) / 2
            img = img * (1 - 0.3 * dark)
        if self.noise:
            img = img + 0.05 * c[:, -1:]
        return (img * self.gain * 2 - 1).clamp(-1, 1)


@dataclass
class FakeBundle:
    generator: nn.Module
    options: list[str]
    classes: dict[int, str]
    n_types: int
    noise: bool
    config: dict[str, Any] = field(default_factory=dict)


def fake_generate(bundle, cond):
    return bundle.generator(cond)


def bundle(options=("pale", "dark"), noise=True, n_types=2, **config):
    return FakeBundle(FakeGenerator(n_types, len(options), noise), list(options),
                      {1: "Epithelial", 2: "Lymphocyte"}, n_types, noise, {"name": "fake", **config})


def run(b, masks, out, **kw):
    kw.setdefault("device", "cpu")
    return translate(b, masks, out, conditioner=fake_conditioning, generate_fn=fake_generate, **kw)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("tr") / "masks", n_patches=10, size=64, seed=4)


def test_translate_writes_full_patch_set(masks, tmp_path):
    out = tmp_path / "pairs"
    rep = run(bundle(), masks, out, batch=4)
    ps = read_patchset(out, require=("images", "inst", "types"))
    src = read_patchset(masks)
    assert ps.images.shape == (10, 64, 64, 3) and ps.images.dtype == np.uint8
    assert ps.inst.dtype == np.int32 and ps.types.dtype == np.uint8
    np.testing.assert_array_equal(ps.inst, src.inst)
    np.testing.assert_array_equal(ps.types, src.types)
    assert list(ps.index["option"]) == ["pale"] * 10  # default: the model's first option
    assert set(ps.index["source"]) == {"translate fake seed 0"}
    for col in src.index.columns:
        if col != "source":
            assert list(ps.index[col]) == list(src.index[col])
    fg = ps.inst > 0
    assert ps.images[fg][:, 0].mean() < 140 < ps.images[~fg][:, 0].mean()  # purple nuclei on pink
    assert rep["option_counts"] == {"pale": 10, "dark": 0} and rep["n"] == 10
    saved = json.loads((out / "report.json").read_text())
    assert saved["stage"] == "translate" and saved["mask_classes"]
    montage = tmp_path / "pairs.montage.png"
    assert montage.stat().st_size > 1000 and rep["montage"] == str(montage)


def test_option_rules():
    opts = ["pale", "dark", "blue"]
    assert set(assign_options(7, opts, None)) == {0}
    assert set(assign_options(7, opts, ["dark"])) == {1}
    mix = assign_options(9, opts, ["pale", "dark"], seed=3)
    assert np.bincount(mix, minlength=3).tolist() == [5, 4, 0] or np.bincount(mix, minlength=3).tolist() == [4, 5, 0]
    np.testing.assert_array_equal(mix, assign_options(9, opts, ["pale", "dark"], seed=3))
    assert np.bincount(assign_options(9, opts, ["all"]), minlength=3).tolist() == [3, 3, 3]
    assert np.bincount(assign_options(9, opts, ["pale", "pale", "blue"]), minlength=3).tolist() == [6, 0, 3]
    with pytest.raises(HistosynthError, match=r"unknown option.*purple.*trained with \['pale', 'dark', 'blue'\]"):
        assign_options(3, opts, ["purple"])
    with pytest.raises(HistosynthError, match="'all' cannot be combined"):
        assign_options(3, opts, ["all", "pale"])


def test_mix_and_all_in_translate(masks, tmp_path):
    run(bundle(), masks, tmp_path / "mix", options=["pale", "dark"], seed=1)
    ps = read_patchset(tmp_path / "mix")
    assert sorted(ps.index["option"].value_counts().tolist()) == [5, 5]
    dark = (ps.index["option"] == "dark").to_numpy()
    bg = (ps.inst == 0)
    assert ps.images[dark][bg[dark]].mean() < ps.images[~dark][bg[~dark]].mean() - 20
    run(bundle(), masks, tmp_path / "all", options=["all"], seed=1, montage=False)
    assert sorted(read_patchset(tmp_path / "all").index["option"].value_counts().tolist()) == [5, 5]
    assert not (tmp_path / "all.montage.png").exists()


def test_deterministic_and_batch_invariant(masks, tmp_path):
    b = bundle(noise=True)
    run(b, masks, tmp_path / "a", options=["all"], seed=7, batch=3, montage=False)
    run(b, masks, tmp_path / "b", options=["all"], seed=7, batch=16, montage=False)
    run(b, masks, tmp_path / "c", options=["all"], seed=8, batch=3, montage=False)
    a, bb, c = (read_patchset(tmp_path / k).images for k in "abc")
    np.testing.assert_array_equal(a, bb)
    assert not np.array_equal(a, c)


def test_bad_inputs_are_named_and_leave_nothing(masks, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HistosynthError, match="unknown option"):
        run(bundle(), masks, out, options=["purple"])
    with pytest.raises(HistosynthError, match="divisible by 256"):
        run(bundle(size_multiple=256), masks, out)
    with pytest.raises(HistosynthError, match="divisible by 256"):
        run(bundle(n_down=8), masks, out)
    with pytest.raises(HistosynthError, match=r"type id 2; the GAN knows type ids 1..1"):
        run(bundle(n_types=1), masks, out)
    inst_only = tmp_path / "inst_only"
    src = read_patchset(masks)
    with PatchSetWriter(inst_only, ("inst",), (64, 64)) as w:
        w.add(src.index.iloc[0].to_dict(), inst=src.inst[0])
    with pytest.raises(HistosynthError, match="no types.npy"):
        run(bundle(), inst_only, out)
    with pytest.raises(HistosynthError, match="batch"):
        run(bundle(), masks, out, batch=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inst_only"]


def test_failure_mid_run_leaves_nothing(masks, tmp_path):
    calls = []

    def flaky(b, cond):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("GPU fell over")
        return fake_generate(b, cond)

    with pytest.raises(RuntimeError, match="fell over"):
        translate(bundle(), masks, tmp_path / "out", batch=4, device="cpu",
                  conditioner=fake_conditioning, generate_fn=flaky)
    assert list(tmp_path.iterdir()) == []


def test_cli(monkeypatch, masks, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    seen = {}
    monkeypatch.setattr(tr, "translate", lambda *a, **k: seen.update(args=a, **k))
    args = parser.parse_args(["translate", "gan.pt", str(masks), str(tmp_path / "o"), "--mix", "--seed", "3"])
    args.func(args)
    assert seen["args"] == ("gan.pt", str(masks), str(tmp_path / "o")) and seen["options"] == ["all"]
    assert seen["seed"] == 3 and seen["batch"] == 16 and seen["montage"] is True
    args = parser.parse_args(["translate", "g", "m", "o", "--option", "pale", "--option", "dark", "--no-montage"])
    args.func(args)
    assert seen["options"] == ["pale", "dark"] and seen["montage"] is False
    args = parser.parse_args(["translate", "g", "m", "o", "--option", "pale", "--mix"])
    with pytest.raises(HistosynthError, match="--mix"):
        args.func(args)


def test_missing_checkpoint_is_named(masks, tmp_path):
    pytest.importorskip("histosynth.models.pix2pix", reason="the GAN module is not written yet")
    pytest.importorskip("histosynth.gan.conditioning", reason="the conditioning module is not written yet")
    with pytest.raises(HistosynthError, match="no such GAN checkpoint"):
        translate(tmp_path / "nope.pt", masks, tmp_path / "o", device="cpu")


def test_real_untrained_generator_through_a_checkpoint(masks, tmp_path):
    pix2pix = pytest.importorskip("histosynth.models.pix2pix", reason="the GAN module is not written yet")
    conditioning = pytest.importorskip("histosynth.gan.conditioning", reason="the conditioning module is not written yet")
    if not all(hasattr(pix2pix, n) for n in ("define_G", "gan_checkpoint_dict")):
        pytest.skip("histosynth.models.pix2pix has no generator builder / checkpoint writer")
    torch.manual_seed(0)
    in_ch = len(conditioning.conditioning_channels(2, True))
    gen = pix2pix.define_G(in_ch, depth=5, width=4, max_width=16)
    ckpt = pix2pix.gan_checkpoint_dict(gen, options=["pale", "dark"], classes={1: "Epithelial", 2: "Lymphocyte"},
                                       n_types=2, noise=True, step=0)
    torch.save(ckpt, tmp_path / "gan.pt")
    rep = translate(tmp_path / "gan.pt", masks, tmp_path / "a", options=["all"], batch=4, seed=2, device="cpu")
    translate(tmp_path / "gan.pt", masks, tmp_path / "b", options=["all"], batch=4, seed=2, device="cpu",
              montage=False)
    a, b = read_patchset(tmp_path / "a"), read_patchset(tmp_path / "b")
    assert a.images.shape == (10, 64, 64, 3) and a.images.std() > 0
    np.testing.assert_array_equal(a.images, b.images)
    assert rep["gan"].endswith("gan.pt") and set(a.index["source"]) == {"translate gan.pt seed 2"}
    gen8 = pix2pix.define_G(in_ch, depth=8, width=2, max_width=4)
    torch.save(pix2pix.gan_checkpoint_dict(gen8, options=["pale"], classes={1: "E", 2: "L"}, n_types=2, noise=True,
                                           step=0), tmp_path / "gan8.pt")
    with pytest.raises(HistosynthError, match="divisible by 256"):
        translate(tmp_path / "gan8.pt", masks, tmp_path / "c", device="cpu")
