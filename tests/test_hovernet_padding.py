"""HoVer-Net with same padding: output = input, the same parameters, and a segmenter that trains, saves and predicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.errors import HistosynthError
from histosynth.models import hovernet as hn
from histosynth.segmentation import segmenter as sg
from histosynth.segmentation.augment import Augment

from tests.test_segmenter import _write_set

torch.set_num_threads(1)


@pytest.mark.parametrize("mode", hn.MODES)
@pytest.mark.parametrize("side", [32, 64, 136])
def test_same_padding_keeps_the_input_size(mode, side):
    net = hn.HoVerNet(n_types=2, mode=mode, width=8, units=(1, 1, 1, 1), padding="same").eval()
    assert net.output_size(side) == side and net.output_size((side, side + 8)) == (side, side + 8)
    with torch.no_grad():
        out = net(torch.zeros(1, 3, side, side + 8, dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "np": (1, 2, side, side + 8), "hv": (1, 2, side, side + 8), "tp": (1, 3, side, side + 8)}


@pytest.mark.parametrize("mode", hn.MODES)
def test_same_padding_has_the_same_parameters(mode):
    def shapes(padding):
        net = hn.HoVerNet(n_types=3, mode=mode, width=16, units=(1, 2, 1, 1), padding=padding)
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}

    assert shapes("same") == shapes("valid")


def test_same_padding_rejects_sides_that_are_not_multiples_of_8_and_unknown_paddings():
    net = hn.HoVerNet(width=8, units=(1, 1, 1, 1), padding="same")
    for side in (4, 100, 130):
        with pytest.raises(HistosynthError, match="multiple of 8"):
            net.output_size(side)
    with pytest.raises(HistosynthError, match="padding must be one of"):
        hn.HoVerNet(width=8, units=(1, 1, 1, 1), padding="reflect")


def test_valid_padding_is_still_the_paper_network():
    net = hn.HoVerNet(width=8, units=(1, 1, 1, 1))
    assert net.config["padding"] == "valid"
    assert net.output_size(256) == hn.OUTPUT_SIZE["fast"]


def test_a_same_padded_segmenter_trains_round_trips_and_predicts_any_size(tmp_path):
    real = _write_set(tmp_path / "real", "r", n=6, seed=1)
    report = sg.train_segmenter([real], tmp_path / "seg", width=8, units=(1, 1, 1, 1), padding="same",
                                input_size=48, batch_size=2, steps=4, val_every=2, device="cpu", threads=1,
                                precision="float32", augment=Augment(0, 0, 0, 0, 0), val_fraction=0.34)
    seg = sg.load_segmenter(tmp_path / "seg" / "model.pt")
    assert seg.arch["padding"] == "same" and seg.input_size == seg.output_size == 48
    assert report["steps"] == 4
    image = np.random.default_rng(0).integers(0, 255, (37, 70, 3), dtype=np.uint8)
    maps = sg.predict(seg, image)
    assert maps["np"].shape == (37, 70) and maps["hv"].shape == (2, 37, 70)
    assert np.isfinite(maps["hv"]).all() and ((maps["np"] >= 0) & (maps["np"] <= 1)).all()
    # only each window's centre is kept, so two overlaps agree wherever both windows saw full context
    a, b = sg.predict(seg, image, overlap=0), sg.predict(seg, image, overlap=8)
    assert np.allclose(a["np"][:8, :8], b["np"][:8, :8], atol=1e-5)
