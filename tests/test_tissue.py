"""DEPAS tissue layouts: the networks, tissue masks from tiles, training / resume, sampling, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from histosynth.errors import HistosynthError
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.masks import tissue as ts
from histosynth.models import depas

torch.set_num_threads(1)

TINY = dict(size=(16, 32), nz=8, widths=(16, 8), ndf=4, batch_size=2)


def _row(i: int, h: int, w: int) -> dict:
    return {"slide": "s", "x": 0, "y": 0, "level": 0, "downsample": 1.0, "mpp": 0.5, "width": w, "height": h,
            "tissue_fraction": 1.0, "n_nuclei": 0, "source": f"p{i}"}


def _tiles(path, n=4, side=32, seed=0):
    """Tiles with a pink tissue blob on white (air) and a few white specks."""
    rng = np.random.default_rng(seed)
    with PatchSetWriter(path, arrays=("images",), patch_size=(side, side)) as w:
        for i in range(n):
            img = np.full((side, side, 3), 245, np.uint8)
            cy, cx = rng.integers(8, side - 8, 2)
            yy, xx = np.ogrid[:side, :side]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (side // 3) ** 2] = (200, 120, 170)
            w.add(_row(i, side, side), images=img)
    return path


def _tissue_set(path, labels, classes):
    labels = np.asarray(labels, np.uint8)
    with PatchSetWriter(path, arrays=("tissue",), patch_size=labels.shape[1:]) as w:
        for i, m in enumerate(labels):
            w.add(_row(i, *m.shape), tissue=m)
        w.report = {"tissue_classes": classes}
    return path


# -- networks ---------------------------------------------------------------------------------------
def test_annealing_schedules_are_the_papers():
    # delta: 1 at t=0, +1 per stage; T: 1 at t=0, /1.25 per stage; a stage is a tenth of the run by default
    assert depas.anneal_every_default(1000) == 100
    assert [depas.anneal_delta(t, 100) for t in (0, 99, 100, 999)] == [1.0, 1.0, 2.0, 10.0]
    assert depas.anneal_temperature(0, 100) == 1.0
    assert depas.anneal_temperature(250, 100) == pytest.approx(1 / 1.25 ** 2)


@pytest.mark.parametrize("n_labels", [2, 4])
def test_generator_shapes_nonsquare_and_discrete_at_inference(n_labels):
    torch.manual_seed(0)
    G = depas.TissueGenerator((16, 32), 8, (16, 8), n_labels)
    G.set_step(300, 100)  # stage 3
    out = G(torch.randn(3, 8))
    ch = 1 if n_labels == 2 else n_labels
    assert out.shape == (3, ch, 16, 32)
    if n_labels == 2:
        assert float(G.block.delta) == 4.0 and ((out > 0) & (out < 1)).all()
    else:
        assert float(G.block.temperature) == pytest.approx(1.25 ** -3)
        assert torch.allclose(out.sum(1), torch.ones(3, 16, 32), atol=1e-5)
    G.eval()
    hard = G(torch.randn(3, 8))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    if n_labels > 2:
        assert torch.equal(hard.sum(1), torch.ones(3, 16, 32))
    labels = G.labels(hard)
    assert labels.shape == (3, 16, 32) and int(labels.max()) < n_labels


def test_annealing_sharpens_the_sigmoid():
    block = depas.DiscreteAdaptive(1)
    x = torch.tensor([0.5])
    block.set_step(0, 10)
    soft = float(block(x))
    block.set_step(90, 10)
    assert float(block(x)) > soft > 0.5
    fixed = depas.DiscreteAdaptive(1, annealing=False)  # the DCGAN baseline keeps delta = 1
    fixed.set_step(90, 10)
    assert float(fixed(x)) == pytest.approx(soft)


def test_spatial_noise_changes_the_mask_dcgan_has_none():
    torch.manual_seed(0)
    G = depas.TissueGenerator((16, 32), 8, (16, 8), kind="depas", noise_init=1.0).eval()
    z = torch.randn(1, 8)
    a, b = G(z, torch.randn(1, 1, 16, 32)), G(z, torch.randn(1, 1, 16, 32))
    assert not torch.equal(a, b)  # the same z, another noise map: another layout
    base = depas.TissueGenerator((16, 32), 8, (16, 8), kind="dcgan").eval()
    assert base.noises is None and torch.equal(base(z), base(z))


def test_discriminators_three_scales_for_depas_one_for_dcgan():
    x = torch.rand(2, 1, 32, 64)
    assert [lg.shape for lg in depas.discriminator_for("depas", 1, (32, 64), 4)(x)] == [(2,)] * 3
    assert len(depas.discriminator_for("dcgan", 1, (32, 64), 4)(x)) == 1
    assert depas.discriminator_for("depas", 1, (32, 64), 4).factors == [1, 2, 4]
    with pytest.raises(HistosynthError, match="too small"):
        depas.discriminator_for("depas", 1, (8, 16), 4)


def test_bad_sizes_are_named():
    with pytest.raises(HistosynthError, match="divisible"):
        depas.TissueGenerator((18, 32), 8, (16, 8))
    with pytest.raises(HistosynthError, match="kind"):
        depas.TissueGenerator((16, 32), 8, (16, 8), kind="stylegan")


# -- masks from tiles -------------------------------------------------------------------------------
def test_tissue_mask_threshold_and_cleaning():
    img = np.full((40, 40, 3), 230, np.uint8)  # grey 230 > 204: air
    img[5:30, 5:30] = 150  # tissue
    img[10:12, 10:12] = 250  # a 4-px hole in the tissue -> filled
    img[35:37, 35:37] = 100  # a 4-px speck in the air -> removed
    m = ts.tissue_mask(img, min_area=10)
    assert m.dtype == np.uint8 and m[5:30, 5:30].all() and m.sum() == 25 * 25
    raw = ts.tissue_mask(img, min_area=0)
    assert raw[10, 10] == 0 and raw[35, 35] == 1
    edge = np.full((4, 4, 3), 204, np.uint8)
    assert ts.tissue_mask(edge, min_area=0).all()  # grey == 204 is tissue; only above is air
    assert ts.AIR_THRESHOLD == 204


def test_tissue_classes_mismatch_is_named(tmp_path):
    a = _tissue_set(tmp_path / "a", np.zeros((2, 16, 32)), {"1": "tumour", "2": "stroma"})
    b = _tissue_set(tmp_path / "b", np.zeros((2, 16, 32)), {"1": "tissue"})
    with pytest.raises(HistosynthError, match="tissue_classes") as err:
        ts.load_tissue_masks([a, b])
    assert str(b) in str(err.value)
    bad = _tissue_set(tmp_path / "c", np.full((1, 16, 32), 3), {"1": "tumour", "2": "stroma"})
    with pytest.raises(HistosynthError, match="label 3"):
        ts.load_tissue_masks([bad])


# -- training and sampling --------------------------------------------------------------------------
def test_train_resume_sample_and_class_check(tmp_path):
    tiles = _tiles(tmp_path / "tiles")
    out = tmp_path / "model"
    rep = ts.train_tissue([tiles], out, steps=6, checkpoint_every=3, log_every=2, sample_every=3, seed=1,
                          device="cpu", **TINY)
    assert rep["step"] == 6
    log = pd.read_csv(out / "log.csv")
    assert list(log["step"]) == [2, 4, 6] and {"G", "D_real", "D_fake", "delta"} <= set(log.columns)
    assert (out / "samples.png").stat().st_size > 0
    assert log["delta"].iloc[-1] > log["delta"].iloc[0]  # annealing every 6 // 10 -> 1 step: delta rises
    # a resumed run (killed after the step-3 checkpoint) ends with the same weights
    out2 = tmp_path / "model2"
    ts.train_tissue([tiles], out2, steps=3, checkpoint_every=3, log_every=2, sample_every=3, seed=1,
                    device="cpu", anneal_every=rep_anneal(6), **TINY)
    ts.train_tissue([tiles], out2, steps=6, checkpoint_every=3, log_every=2, sample_every=3, seed=1,
                    device="cpu", anneal_every=rep_anneal(6), **TINY)
    ts.train_tissue([tiles], tmp_path / "model3", steps=6, checkpoint_every=3, log_every=2, sample_every=3,
                    seed=1, device="cpu", anneal_every=rep_anneal(6), **TINY)
    w2 = torch.load(out2 / "tissue.pt", weights_only=True)["generator"]
    w3 = torch.load(tmp_path / "model3" / "tissue.pt", weights_only=True)["generator"]
    assert all(torch.equal(w2[k], w3[k]) for k in w3)

    ps_out = tmp_path / "synthetic"
    ts.sample_tissue(out / "tissue.pt", ps_out, n=5, seed=3)
    ps = read_patchset(ps_out, require=("tissue",))
    assert ps.tissue.shape == (5, 16, 32) and ps.tissue.dtype == np.uint8 and set(np.unique(ps.tissue)) <= {0, 1}
    assert ps.report["tissue_classes"] == {"1": "tissue"}
    again = tmp_path / "again"
    ts.sample_tissue(out / "tissue.pt", again, n=5, seed=3)
    assert np.array_equal(np.load(again / "tissue.npy"), np.load(ps_out / "tissue.npy"))  # deterministic by seed
    with pytest.raises(HistosynthError, match="tissue_classes") as err:
        ts.load_tissue_model(out / "tissue.pt", {1: "tumour", 2: "stroma"})
    assert "tissue.pt" in str(err.value)


def rep_anneal(steps: int) -> int:
    return depas.anneal_every_default(steps)


def test_multilabel_training_tiny(tmp_path):
    labels = np.zeros((3, 32, 32), np.uint8)
    labels[:, 4:20, 4:28] = 1
    labels[:, 20:30, 8:24] = 2
    src = _tissue_set(tmp_path / "ml", labels, {"1": "tumour", "2": "stroma"})
    rep = ts.train_tissue([src], tmp_path / "m", steps=2, log_every=1, sample_every=2, device="cpu", **TINY)
    assert rep["step"] == 2
    G, classes = ts.load_tissue_model(tmp_path / "m" / "tissue.pt")
    assert classes == {1: "tumour", 2: "stroma"} and G.n_labels == 3
    assert ts.generate(G, 2, 0).max() <= 2


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_train_and_sample_tissue(tmp_path, capsys):
    from histosynth.cli import OUTPUTS, build_parser, main, output_of

    tiles = _tiles(tmp_path / "tiles")
    out = tmp_path / "model"
    assert output_of(build_parser().parse_args(["train-tissue", str(tiles), str(out)])) == str(out)
    assert OUTPUTS["sample-tissue"] == "out_dir"
    rc = main(["train-tissue", str(tiles), str(out), "--size", "16", "32", "--nz", "8", "--widths", "16", "8",
               "--ndf", "4", "--steps", "2", "--batch-size", "2", "--log-every", "1", "--device", "cpu",
               "--kind", "dcgan"])
    assert rc in (0, None)
    assert {"tissue.pt", "samples.png", "log.csv"} <= {p.name for p in out.iterdir()}
    assert torch.load(out / "tissue.pt", weights_only=True)["config"]["generator"]["kind"] == "dcgan"
    rc = main(["sample-tissue", str(out / "tissue.pt"), str(tmp_path / "syn"), "--n", "3"])
    assert rc in (0, None) and np.load(tmp_path / "syn" / "tissue.npy").shape == (3, 16, 32)
    # a model trained on other labels than asked: one error line naming the key and the file, status 2
    rc = main(["sample-tissue", str(out / "tissue.pt"), str(tmp_path / "bad"), "--tissue-classes", "tumour=1",
               "stroma=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "tissue_classes" in err and "tissue.pt" in err and not (tmp_path / "bad").exists()


# -- nuclei only inside tissue ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_stats(tmp_path_factory):
    from histosynth.masks.stats import fit_stats
    from tests.test_stats import write_toy

    d = tmp_path_factory.mktemp("toy")
    ps = write_toy(d / "real", n_patches=20, seed=11, mode="clustered", counts={1: (14, 22), 2: (5, 10)})
    return fit_stats([ps], d / "stats", class_names={1: "Epithelial", 2: "Lymphocyte"}, calibrate=0,
                     figures=False)


@pytest.mark.parametrize("method", ["statistical", "uniform"])
def test_nuclei_only_on_tissue_and_counts_scale_with_tissue_area(toy_stats, method):
    from histosynth.masks.sampling import MaskSampler, sample_masks
    from histosynth.masks.shapes import ellipse_source

    s, n = 96, 40
    half = np.zeros((s, s), np.uint8)
    half[:, : s // 2] = 1
    blob = np.zeros((s, s), np.uint8)
    yy, xx = np.ogrid[:s, :s]
    blob[(yy - 40) ** 2 + (xx - 55) ** 2 < 30 ** 2] = 1
    full = np.ones((s, s), np.uint8)
    tissue = np.stack([half, blob, full, half])
    src = ellipse_source(toy_stats)
    out = sample_masks(toy_stats, src, n, s, seed=2, method=method, tissue=tissue)
    assert np.array_equal(out["tissue"], np.stack([tissue[i % 4] for i in range(n)]))
    on_air = (out["inst"] > 0) & (out["tissue"] == 0)
    assert not on_air.any()
    assert [r["tissue_fraction"] for r in out["rows"][:3]] == [0.5, pytest.approx(blob.mean()), 1.0]
    if method == "uniform":
        return  # the toy's ellipses as decoded (uniform: no fitted size) are so large that packing, not the
        # drawn count, limits the nuclei (hundreds dropped even without tissue): counts are checked on the other
    counts = np.array([r["n_nuclei"] for r in out["rows"]]) + 0.0
    f_real = MaskSampler(toy_stats, src, s).tissue_real
    n_full, n_half = counts[2::4].mean(), counts[0::4].mean()
    free = sample_masks(toy_stats, src, n, s, seed=2, method=method)
    n_free = np.mean([r["n_nuclei"] for r in free["rows"]])
    # the fitted density per tissue pixel: a full-tissue mask gets n_free / f_real, a half one half of it
    assert n_full == pytest.approx(n_free / f_real, rel=0.3)
    assert n_half == pytest.approx(0.5 * n_full, rel=0.3)
    assert out["dropped"] <= 0.05 * counts.sum()


def test_sample_masks_cli_with_tissue(toy_stats, tmp_path, capsys):
    import json

    from histosynth.cli import main

    (tmp_path / "stats.json").write_text(json.dumps(toy_stats))
    tissue = np.zeros((3, 64, 64), np.uint8)
    tissue[:, 10:50, 5:40] = 1
    tset = _tissue_set(tmp_path / "tissue", tissue, {"1": "tissue"})
    out = tmp_path / "masks"
    rc = main(["sample-masks", str(tmp_path / "stats.json"), "ellipses", str(out), "--n", "5", "--size", "64", "--n-shards", "1",
               "--tissue", str(tset)])
    assert rc in (0, None)
    ps = read_patchset(out, require=("inst", "types", "tissue"))
    assert ps.tissue.shape == (5, 64, 64) and not ((ps.inst > 0) & (ps.tissue == 0)).any()
    assert ps.report["tissue_masks"] == str(tset) and ps.report["tissue_classes"] == {"1": "tissue"}
    rc = main(["sample-masks", str(tmp_path / "stats.json"), "ellipses", str(tmp_path / "bad"), "--n", "2",
               "--size", "96", "--tissue", str(tset)])
    err = capsys.readouterr().err
    assert rc == 2 and "64x64" in err and str(tset) in err and not (tmp_path / "bad").exists()


def test_sample_masks_with_a_tissue_model(toy_stats, tmp_path):
    import json

    from histosynth.cli import main

    (tmp_path / "stats.json").write_text(json.dumps(toy_stats))
    tiles = _tiles(tmp_path / "tiles", side=32)
    ts.train_tissue([tiles], tmp_path / "model", size=(32, 32), nz=8, widths=(8, 4), ndf=4, batch_size=2, steps=2,
                    sample_every=2, device="cpu")
    model = tmp_path / "model" / "tissue.pt"
    outs = []
    for shards in ("1", "2"):  # mask i gets the model's draw i whatever the shard
        out = tmp_path / f"masks-{shards}"
        assert main(["sample-masks", str(tmp_path / "stats.json"), "ellipses", str(out), "--n", "4", "--size", "32",
                     "--n-shards", shards, "--seed", "5", "--tissue", str(model)]) in (0, None)
        outs.append(read_patchset(out, require=("tissue",)))
    G, _ = ts.load_tissue_model(model)
    want = ts.generate(G, 4, 5)
    assert np.array_equal(outs[0].tissue, want) and np.array_equal(outs[1].tissue, want[:2])
    assert not ((outs[0].inst > 0) & (outs[0].tissue == 0)).any()
