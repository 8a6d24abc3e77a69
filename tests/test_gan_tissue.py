"""The tissue conditioning channel (#16): +1 tissue / −1 air, trained from the crops' own tissue, translated from
tissue.npy (or the real patches' images), an error without it, old checkpoints unchanged, the config check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.config import validate_config
from histosynth.errors import HistosynthError
from histosynth.gan.conditioning import (
    build_conditioning,
    conditioning_channels,
    tissue_from_images,
)
from histosynth.gan.train import sample_batch, train_gan
from histosynth.gan.translate import paint, translate
from histosynth.io.patchset import PatchSetWriter, read_patchset
from histosynth.io.pool import load_pool
from histosynth.models.pix2pix import load_gan, read_gan_checkpoint

torch.set_num_threads(1)

SIZE = 32
AIR = 12  # the left AIR columns of every patch are glass: white, no nuclei
TINY = dict(crop=32, depth=3, width=4, batch_size=2, device="cpu", threads=1, precision="float32",
            sample_every=1000, log_every=1, steps=3, decay_steps=0, checkpoint_every=100)


def _write_set(path, n=3, seed=0, arrays=("images", "inst", "types"), tissue=None):
    """Pink tissue with purple discs (type 1 / 2) right of a white air strip; ``tissue``: the tissue.npy to write."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    with PatchSetWriter(path, arrays=arrays, patch_size=(SIZE, SIZE)) as w:
        for i in range(n):
            inst = np.zeros((SIZE, SIZE), np.int32)
            types = np.zeros((SIZE, SIZE), np.uint8)
            for k in range(1, 4):
                cy, cx, r = rng.integers(4, SIZE - 4), rng.integers(AIR + 4, SIZE - 4), rng.integers(2, 4)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                inst[disc] = k
                types[disc] = 1 + k % 2
            img = np.full((SIZE, SIZE, 3), (220, 160, 200), np.uint8)  # grey 182: tissue
            img[inst > 0] = (90, 40, 140)
            img[:, :AIR] = 245
            row = {"slide": "s", "x": 0, "y": i * SIZE, "level": 0, "downsample": 1.0, "mpp": 0.5,
                   "width": SIZE, "height": SIZE, "tissue_fraction": 1.0, "n_nuclei": 3, "source": "test"}
            data = {"images": img, "inst": inst, "types": types,
                    "tissue": tissue[i] if tissue is not None else None}
            w.add(row, **{a: data[a] for a in arrays})
        w.report = {"classes": {"1": "Epithelial", "2": "Lymphocyte"}}
    return path


def _layout(n=3):
    t = np.ones((n, SIZE, SIZE), np.uint8)
    t[:, :, :AIR] = 0
    return t


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return _write_set(tmp_path_factory.mktemp("real") / "set")


@pytest.fixture(scope="module")
def gans(real, tmp_path_factory):
    """(a GAN with the tissue channel, one without) trained 3 steps on the tiny set."""
    root = tmp_path_factory.mktemp("gans")
    train_gan([real], root / "with", tissue_channel=True, **TINY)
    train_gan([real], root / "without", **TINY)
    return root / "with" / "gan.pt", root / "without" / "gan.pt"


def test_the_channel_is_plus_one_on_tissue_minus_one_on_air():
    assert conditioning_channels(2, True, True) == ["foreground", "edges", "type_1", "type_2", "option", "tissue",
                                                    "noise"]
    assert conditioning_channels(2, False) == ["foreground", "edges", "type_1", "type_2", "option"]
    inst = np.zeros((8, 8), np.int32)
    inst[5:7, 5:7] = 1
    types = (inst > 0).astype(np.uint8)
    tissue = np.zeros((8, 8), np.uint8)
    tissue[4:] = 2  # any tissue label counts as tissue
    cond = build_conditioning(inst, types, 1, 0, 1, tissue=tissue)
    plain = build_conditioning(inst, types, 1, 0, 1)
    assert cond.shape == (1, 5, 8, 8) and torch.equal(cond[:, :4], plain)
    assert (cond[0, 4, 4:] == 1).all() and (cond[0, 4, :4] == -1).all()
    # noise stays last (the discriminator drops it)
    noisy = build_conditioning(inst, types, 1, 0, 1, noise=True, generator=torch.Generator().manual_seed(0),
                               tissue=tissue)
    assert torch.equal(noisy[:, 4], cond[:, 4]) and noisy.shape[1] == 6
    with pytest.raises(HistosynthError, match="tissue layouts"):
        build_conditioning(inst, types, 1, 0, 1, tissue=tissue[:4])


def test_tissue_from_images_is_air_where_the_glass_is(real):
    images = np.asarray(read_patchset(real).images)
    t = tissue_from_images(images)
    assert t.shape == images.shape[:3] and t.dtype == np.uint8
    assert (t[:, :, :AIR] == 0).all() and (t[:, :, AIR:] == 1).all()


def test_training_crops_get_their_tissue(real, tmp_path):
    pool = load_pool([real])
    imgs, inst, types, opts, layout = sample_batch(pool, 4, 32, 0, 3, tissue=True)
    assert np.array_equal(layout, tissue_from_images(imgs))
    assert all(np.array_equal(a, b) for a, b in zip(sample_batch(pool, 4, 32, 0, 3), (imgs, inst, types, opts)))
    # a set with tissue.npy: its layout, not the image's (here: all air)
    zero = np.zeros((3, SIZE, SIZE), np.uint8)
    with_npy = _write_set(tmp_path / "npy", arrays=("images", "inst", "types", "tissue"), tissue=zero)
    *_, layout = sample_batch(load_pool([with_npy]), 4, 32, 0, 3, tissue=True)
    assert not layout.any()


def test_train_gan_records_the_channel(gans):
    with_ch, without = gans
    ckpt = torch.load(with_ch, weights_only=True)
    assert ckpt["tissue"] is True and "tissue" in ckpt["config"]["train"]["channels"]
    assert ckpt["config"]["train"]["tissue_channel"] is True
    bundle = load_gan(with_ch)
    assert bundle.tissue and bundle.generator.config["in_ch"] == len(conditioning_channels(2, False, True))
    plain = torch.load(without, weights_only=True)
    assert "tissue" not in plain and not load_gan(without).tissue
    train = torch.load(with_ch.parent / "checkpoint.pt", weights_only=True)["train"]
    assert train["tissue_channel"] is True


def test_translate_with_tissue_npy_paints_air_differently(gans, tmp_path):
    layout = _layout()
    masks = _write_set(tmp_path / "masks", arrays=("inst", "types", "tissue"), tissue=layout)
    all_tissue = _write_set(tmp_path / "all", arrays=("inst", "types", "tissue"), tissue=np.ones_like(layout))
    report = translate(gans[0], masks, tmp_path / "out", device="cpu", montage=False)
    assert report["tissue"] == "tissue.npy"
    out = read_patchset(tmp_path / "out")
    assert out.images.shape == (3, SIZE, SIZE, 3)
    translate(gans[0], all_tissue, tmp_path / "out-all", device="cpu", montage=False)
    other = np.asarray(read_patchset(tmp_path / "out-all").images)
    assert not np.array_equal(np.asarray(out.images)[:, :, :AIR], other[:, :, :AIR])


def test_translate_without_tissue_npy_is_a_named_error(gans, tmp_path):
    masks = _write_set(tmp_path / "masks", arrays=("inst", "types"))
    with pytest.raises(HistosynthError, match=r"tissue\.npy.*sample-masks .*--tissue"):
        translate(gans[0], masks, tmp_path / "out", device="cpu", montage=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(HistosynthError, match="tissue layouts"):
        paint(load_gan(gans[0]), np.zeros((1, SIZE, SIZE), np.int32), np.zeros((1, SIZE, SIZE), np.uint8), [0])


def test_real_test_masks_take_tissue_from_their_images(gans, real, tmp_path):
    report = translate(gans[0], real, tmp_path / "out", device="cpu", montage=False)
    assert report["tissue"] == "images" and read_patchset(tmp_path / "out").images.shape == (3, SIZE, SIZE, 3)


def test_an_old_checkpoint_translates_as_before(gans, tmp_path):
    """A gan.pt written before the channel (no 'tissue', no 'tissue_channel'): no channel, tissue.npy ignored."""
    ckpt = torch.load(gans[1], weights_only=True)
    del ckpt["config"]["train"]["tissue_channel"]
    ckpt["config"]["train"]["channels"] = [c for c in ckpt["config"]["train"]["channels"] if c != "tissue"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert read_gan_checkpoint(old)["config"]["train"]["tissue_channel"] is False  # resumes as what it is
    assert not load_gan(old).tissue
    bare = _write_set(tmp_path / "bare", arrays=("inst", "types"))
    with_npy = _write_set(tmp_path / "npy", arrays=("inst", "types", "tissue"), tissue=_layout())
    a = translate(old, bare, tmp_path / "a", device="cpu", montage=False)
    translate(old, with_npy, tmp_path / "b", device="cpu", montage=False)
    assert "tissue" not in a
    assert np.array_equal(read_patchset(tmp_path / "a").images, read_patchset(tmp_path / "b").images)


def test_serve_paints_a_tissue_gan_as_all_tissue(gans, tmp_path):
    from histosynth.serve.run import Mask, RunModels

    (tmp_path / "models" / "gan").mkdir(parents=True)
    (tmp_path / "models" / "gan" / "gan.pt").write_bytes(gans[0].read_bytes())
    run = RunModels(tmp_path, device="cpu")
    inst = np.zeros((SIZE, SIZE), np.int32)
    inst[10:14, 10:14] = 1
    image, made = run.paint(Mask(inst, (inst > 0).astype(np.uint8), "drawn"), None, None)
    assert image.shape == (SIZE, SIZE, 3) and made["tissue"] == "all"
    want = paint(load_gan(gans[0]), inst[None], (inst > 0).astype(np.uint8)[None], [0],
                 tissue=np.ones((1, SIZE, SIZE), np.uint8))[0]
    assert np.array_equal(image, want)


def test_the_channel_needs_tissue_layouts_in_the_config():
    with pytest.raises(HistosynthError, match=r"gan\.tissue_channel.*tissue\.enabled"):
        validate_config({"gan": {"tissue_channel": True}})
    cfg = validate_config({"gan": {"tissue_channel": True}, "tissue": {"enabled": True}})
    assert cfg["gan"]["tissue_channel"] and not validate_config({})["gan"]["tissue_channel"]
