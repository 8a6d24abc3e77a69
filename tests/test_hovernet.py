"""HoVer-Net: network sizes, targets, loss, post-processing (histosynth.models.hovernet)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from histosynth.errors import HistosynthError
from histosynth.models import hovernet as hn
from histosynth.models.hovernet import (
    HoVerNet,
    center_crop,
    crop_to_output,
    hovernet_loss,
    hovernet_targets,
    msge_loss,
    postprocess,
    sobel_kernels,
    type_map,
)

torch.set_num_threads(1)
TINY = {"width": 8, "units": (1, 1, 1, 1)}


def _shapes_on_meta(mode: str, side: int, n_types=None, **kw) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = HoVerNet(n_types, mode, **{**TINY, **kw})
        out = model(torch.zeros(1, 3, side, side))
    return {k: tuple(v.shape) for k, v in out.items()}


# -- network ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,side,out", [("fast", 256, 164), ("original", 270, 80)])
def test_documented_sizes(mode, side, out):
    assert hn.INPUT_SIZE[mode] == side and hn.OUTPUT_SIZE[mode] == out
    model = HoVerNet(3, mode, **TINY)
    assert model.output_size(side) == out and model.output_size((side, side)) == (out, out)
    shapes = _shapes_on_meta(mode, side, n_types=3)
    assert shapes == {"np": (1, 2, out, out), "hv": (1, 2, out, out), "tp": (1, 4, out, out)}


@pytest.mark.parametrize("mode,side", [("fast", 96), ("fast", 104), ("original", 198)])
def test_forward_on_small_inputs(mode, side):
    torch.manual_seed(0)
    model = HoVerNet(2, mode, **TINY)
    out_side = model.output_size(side)
    x = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    out = model(x)
    assert set(out) == {"np", "hv", "tp"}
    assert out["np"].shape == (2, 2, out_side, out_side) and out["tp"].shape == (2, 3, out_side, out_side)
    assert all(torch.isfinite(v).all() for v in out.values())
    model.eval()
    with torch.no_grad():  # uint8 input is divided by 255: the same as float input in [0, 1]
        a, b = model(x), model(x.float() / 255)
    assert torch.allclose(a["hv"], b["hv"])


def test_tp_head_only_with_types():
    for n in (None, 0):
        model = HoVerNet(n, "fast", **TINY)
        assert set(model.decoders) == {"np", "hv"} and model.n_types == 0
    assert _shapes_on_meta("fast", 256) == {"np": (1, 2, 164, 164), "hv": (1, 2, 164, 164)}
    assert HoVerNet(5, "fast", **TINY).decoders["tp"].head[-1].out_channels == 6


def test_architecture_follows_the_paper():
    with torch.device("meta"):
        model = HoVerNet(None, "original", width=64)
        assert model(torch.zeros(1, 3, 270, 270))["hv"].shape == (1, 2, 80, 80)
    enc = model.encoder
    assert [len(s.units) for s in enc.stages] == [3, 4, 6, 3]
    assert [s.last[0].num_features for s in enc.stages] == [256, 512, 1024, 2048]
    assert enc.stem[0].kernel_size == (7, 7) and enc.stem[0].stride == (1, 1) and enc.stem[0].padding == (0, 0)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert enc.conv_bot.out_channels == 1024
    assert [s.units[0].body[2].stride for s in enc.stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert isinstance(enc.stages[0].units[0].preact, torch.nn.Identity)  # the first unit is not pre-activated
    assert isinstance(enc.stages[1].units[1].preact, torch.nn.Sequential)
    br = model.decoders["np"]
    assert len(br.u3.dense.units) == 8 and len(br.u2.dense.units) == 4
    assert br.u3.conva.kernel_size == (5, 5) and br.u3.dense.units[0].block[-1].groups == 4
    assert br.u3.dense.out_ch == 512 and br.u2.dense.out_ch == 256 and br.u1.out_channels == 64
    assert HoVerNet(None, "fast", width=64).decoders["hv"].u3.conva.kernel_size == (3, 3)
    n_params = sum(p.numel() for p in model.parameters())
    assert 43e6 < n_params < 46e6  # np + hv branches; 54.7 M with a TP branch
    # the config rebuilds the same network
    with torch.device("meta"):
        again = HoVerNet(**model.config)
    assert sum(p.numel() for p in again.parameters()) == n_params


def test_bad_network_arguments():
    for kw in ({"mode": "slow"}, {"width": 12}, {"width": 0}, {"units": (1, 1, 1)}, {"units": (1, 0, 1, 1)},
               {"dense_units": (8,)}, {"n_types": -1}):
        with pytest.raises(HistosynthError):
            HoVerNet(**{**TINY, **kw})
    model = HoVerNet(None, "fast", **TINY)
    for side in (64, 88, 90):
        with pytest.raises(HistosynthError, match="cannot take"):
            model.output_size(side)
    with pytest.raises(HistosynthError):
        model(torch.zeros(1, 1, 104, 104))


def test_autocast_bf16_on_cpu():
    torch.manual_seed(0)
    model = HoVerNet(2, "fast", **TINY)
    x = torch.rand(1, 3, 104, 104)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["np"].dtype == torch.bfloat16
    inst = np.zeros((1, 104, 104), np.int32)
    inst[0, 45:60, 45:60] = 1
    t = hovernet_targets(inst, inst.astype(np.uint8) * 2, 12)
    loss, parts = hovernet_loss(out, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.stem[0].weight.grad is not None


def test_init_is_kaiming_and_zero_biases():
    model = HoVerNet(2, "fast", width=16, units=(1, 1, 1, 1))
    w = model.encoder.stages[2].units[0].body[0].weight  # 1×1, fan-out = out channels
    assert w.std().item() == pytest.approx(np.sqrt(2.0 / w.shape[0]), rel=0.1)
    assert all(float(b.head[-1].bias.detach().abs().max()) == 0 for b in model.decoders.values())


# -- targets ----------------------------------------------------------------------------------------
def test_targets_on_a_rectangle():
    inst = np.zeros((32, 40), np.int32)
    inst[10:20, 20:25] = 7  # 10 rows, 5 columns
    types = np.full_like(inst, 3, dtype=np.uint8)  # type everywhere: background is set to 0
    t = hovernet_targets(inst, types)
    assert t["np"].dtype == np.uint8 and (t["np"] == (inst > 0)).all()
    assert t["hv"].shape == (2, 32, 40) and t["hv"].dtype == np.float32
    h, v = t["hv"]
    for row in range(10, 20):
        assert np.allclose(h[row, 20:25], [-1, -0.5, 0, 0.5, 1])
    assert np.allclose(v[10:20, 22], (np.arange(10, 20) - 14.5) / 4.5)
    assert h[inst == 0].max() == 0 and v[inst == 0].max() == 0
    assert (t["tp"] == np.where(inst > 0, 3, 0)).all()
    # cropped to an output size, and batched
    c = hovernet_targets(inst[None].repeat(2, 0), types[None].repeat(2, 0), (16, 20))
    assert c["hv"].shape == (2, 2, 16, 20) and c["np"].shape == (2, 16, 20)
    assert np.array_equal(c["hv"][1], t["hv"][:, 8:24, 10:30])
    assert set(hovernet_targets(inst)) == {"np", "hv"}


def test_targets_per_nucleus_and_side():
    inst = np.zeros((64, 64), np.int32)
    cv2.circle(inst, (20, 20), 8, 1, -1)
    cv2.ellipse(inst, (40, 42), (12, 5), 30, 0, 360, 5, -1)  # ids need not be contiguous
    inst[2, 60] = 9  # one pixel: its map is 0
    hv = hovernet_targets(inst)["hv"]
    for i in (1, 5):
        m = inst == i
        for ch in range(2):
            assert hv[ch][m].min() == pytest.approx(-1) and hv[ch][m].max() == pytest.approx(1)
    assert hv[:, 2, 60].tolist() == [0, 0]
    ys, xs = np.nonzero(inst == 1)  # symmetric disc: antisymmetric maps
    assert np.allclose(hv[0, ys, xs], -hv[0, ys, 40 - xs], atol=1e-6)
    assert np.allclose(hv[1, ys, xs], -hv[1, 40 - ys, xs], atol=1e-6)


def test_targets_reject_bad_input():
    for bad in (np.zeros(5, np.int32), np.zeros((4, 4), np.float32), -np.ones((4, 4), np.int32)):
        with pytest.raises(HistosynthError):
            hovernet_targets(bad)
    with pytest.raises(HistosynthError):
        hovernet_targets(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.uint8))
    with pytest.raises(HistosynthError):
        hovernet_targets(np.zeros((4, 4), np.int32), output_size=6)


# -- loss -------------------------------------------------------------------------------------------
def _perfect_outputs(t: dict, n_classes: int = 3, scale: float = 50.0) -> dict[str, torch.Tensor]:
    npt = torch.as_tensor(t["np"]).long()
    tpt = torch.as_tensor(t["tp"]).long()
    return {"np": scale * (torch.nn.functional.one_hot(npt, 2).permute(0, 3, 1, 2).float() - 0.5),
            "hv": torch.as_tensor(t["hv"]).clone(),
            "tp": scale * (torch.nn.functional.one_hot(tpt, n_classes).permute(0, 3, 1, 2).float() - 0.5)}


def _two_discs(side: int = 48) -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((2, side, side), np.int32)
    cv2.circle(inst[0], (15, 20), 9, 1, -1)
    cv2.circle(inst[0], (32, 20), 9, 2, -1)
    cv2.circle(inst[1], (24, 30), 6, 1, -1)
    types = np.where(inst == 1, 1, np.where(inst == 2, 2, 0)).astype(np.uint8)
    return inst, types


def test_loss_is_zero_on_perfect_outputs():
    t = hovernet_targets(*_two_discs())
    total, parts = hovernet_loss(_perfect_outputs(t), t)
    assert set(parts) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"}
    assert parts["hv_mse"] == 0 and parts["hv_msge"] == 0
    assert float(total) < 1e-3
    # a wrong HV map costs; the other terms are finite and positive for random outputs
    out = _perfect_outputs(t)
    out["hv"] = out["hv"] + 0.1 * torch.randn_like(out["hv"])
    _, parts = hovernet_loss(out, t)
    assert parts["hv_mse"] > 0 and parts["hv_msge"] > 0
    rnd = {k: torch.randn_like(v) for k, v in _perfect_outputs(t).items()}
    total, parts = hovernet_loss(rnd, t)
    assert torch.isfinite(total) and all(float(v) > 0 for v in parts.values())


def test_loss_weights_valid_mask_and_gradients():
    torch.manual_seed(0)
    t = hovernet_targets(*_two_discs())
    out = {k: torch.randn_like(v).requires_grad_() for k, v in _perfect_outputs(t).items()}
    total, parts = hovernet_loss(out, t)
    total.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in out.values())
    doubled, _ = hovernet_loss(out, t, weights={"hv_mse": 2.0, "tp_dice": 0.0})
    assert doubled.item() == pytest.approx(total.item() + float(parts["hv_mse"]) - float(parts["tp_dice"]), rel=1e-5)
    full, _ = hovernet_loss(out, t, valid=np.ones((2, 48, 48), bool))
    assert full.item() == pytest.approx(total.item(), rel=1e-5)
    # outside the valid mask nothing counts
    valid = np.zeros((2, 48, 48), bool)
    valid[:, :, :24] = True
    out2 = {k: v.detach().clone() for k, v in out.items()}
    for v in out2.values():
        v[..., 24:] = 1e3
    _, p1 = hovernet_loss(out, t, valid=valid)
    _, p2 = hovernet_loss(out2, t, valid=valid)
    for k in ("np_ce", "np_dice", "hv_mse", "tp_ce", "tp_dice"):
        assert float(p1[k]) == pytest.approx(float(p2[k]), rel=1e-5)


def test_loss_rejects_bad_input():
    t = hovernet_targets(*_two_discs())
    out = _perfect_outputs(t)
    with pytest.raises(HistosynthError, match="unknown"):
        hovernet_loss(out, t, weights={"bce": 1})
    with pytest.raises(HistosynthError, match="crop"):
        hovernet_loss(out, {k: v[..., 1:, 1:] for k, v in t.items()})
    with pytest.raises(HistosynthError, match="'tp'"):
        hovernet_loss(out, {k: t[k] for k in ("np", "hv")})
    with pytest.raises(HistosynthError, match="classes"):
        hovernet_loss({**out, "tp": out["tp"][:, :2]}, t)
    with pytest.raises(HistosynthError):
        hovernet_loss({"np": out["np"]}, t)


def test_gradient_kernels_and_msge_direction():
    kx, ky = sobel_kernels(5)
    assert kx.shape == (5, 5) and torch.equal(ky, kx.T)
    ramp = torch.arange(20.0).repeat(20, 1)[None, None]  # increases along x
    gx = torch.nn.functional.conv2d(ramp, kx[None, None])
    gy = torch.nn.functional.conv2d(ramp, ky[None, None])
    assert torch.allclose(gx, torch.full_like(gx, 12.0)) and gy.abs().max() < 1e-4
    # the horizontal channel is differentiated along x: a change along y of channel 0 costs nothing inside
    true = torch.zeros(1, 2, 20, 20)
    pred = true.clone()
    pred[0, 0] = torch.arange(20.0)[:, None] * 0.1  # varies along y only
    focus = torch.zeros(1, 20, 20)
    focus[0, 5:15, 5:15] = 1
    assert float(msge_loss(pred, true, focus)) == pytest.approx(0.0, abs=1e-6)
    pred[0, 0] = pred[0, 0].T.contiguous()  # now along x
    assert float(msge_loss(pred, true, focus)) > 0.1
    with pytest.raises(HistosynthError):
        sobel_kernels(4)


def test_tiny_network_overfits_one_patch():
    torch.manual_seed(0)
    model = HoVerNet(2, "fast", **TINY)
    side = 96
    out_side = model.output_size(side)
    inst = np.zeros((1, side, side), np.int32)
    cv2.circle(inst[0], (44, 48), 5, 1, -1)
    cv2.circle(inst[0], (53, 48), 5, 2, -1)
    types = np.where(inst > 0, inst, 0).astype(np.uint8)
    img = torch.full((1, 3, side, side), 0.9)
    img[0, :, torch.as_tensor(inst[0] > 0)] = torch.tensor([0.3, 0.1, 0.5])[:, None]
    t = crop_to_output(hovernet_targets(inst, types), model)
    assert t["np"].shape == (1, out_side, out_side)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = hovernet_loss(model(img), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and min(losses[-5:]) < 0.5 * losses[0]


# -- post-processing --------------------------------------------------------------------------------
def _perfect(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = hovernet_targets(inst)
    return t["np"].astype(np.float32), t["hv"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _matches(pred: np.ndarray, true: np.ndarray) -> list[float]:
    """The best IoU of every true instance among the predictions."""
    out = []
    for i in range(1, int(true.max()) + 1):
        m = true == i
        ids = np.unique(pred[m])
        out.append(max([_iou(pred == j, m) for j in ids if j] or [0.0]))
    return out


def test_postprocess_splits_touching_discs():
    inst = np.zeros((96, 128), np.int32)
    cv2.circle(inst, (40, 48), 14, 1, -1)
    cv2.circle(inst, (66, 48), 14, 2, -1)  # overlapping the first: they touch along a chord
    cv2.circle(inst, (88, 44), 10, 3, -1)  # a third one, touching the second
    cv2.circle(inst, (20, 85), 6, 4, -1)  # an isolated small one
    assert ndimage.label(inst > 0)[1] == 2
    pred, types = postprocess(*_perfect(inst))
    assert types is None and pred.dtype == np.int32
    assert pred.max() == 4 and set(np.unique(pred)) == {0, 1, 2, 3, 4}  # ids 1..n
    assert min(_matches(pred, inst)) > 0.9


def test_postprocess_majority_vote_types():
    inst = np.zeros((64, 96), np.int32)
    cv2.circle(inst, (30, 32), 12, 1, -1)
    cv2.circle(inst, (53, 32), 12, 2, -1)
    cv2.circle(inst, (80, 12), 7, 3, -1)
    tmap = np.zeros(inst.shape, np.int64)
    tmap[inst == 1] = 2
    tmap[(inst == 1) & (np.arange(96)[None] < 24)] = 1  # a minority of type 1
    tmap[inst == 2] = 3
    tmap[(inst == 2) & (np.arange(64)[:, None] < 30)] = 0  # most of it background: the typed minority wins
    tmap[inst == 3] = 0  # no typed pixel: type 0
    tp_prob = np.eye(4, dtype=np.float32)[tmap].transpose(2, 0, 1)
    pred, types = postprocess(*_perfect(inst), tp_prob)
    got = {}
    for i in (1, 2, 3):
        ids, counts = np.unique(pred[inst == i], return_counts=True)
        got[i] = types[int(ids[np.argmax(counts)])]
    assert got == {1: 2, 2: 3, 3: 0}
    assert set(types) == set(range(1, int(pred.max()) + 1))
    tm = type_map(pred, types)
    assert tm.dtype == np.uint8 and tm[32, 30] == 2 and tm[0, 0] == 0
    # ties and untyped instances: the one rule of histosynth.io.labels.instance_types (tests/test_labels.py)


def _reference_postprocess(np_prob, hv):
    """The official __proc_np_hv with scipy / skimage and one watershed over the whole image."""
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    blb = remove_small_objects(ndimage.label(np_prob >= 0.5)[0], max_size=9) > 0
    blb = blb.astype(np.int32)
    h = cv2.normalize(hv[0], None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F)
    v = cv2.normalize(hv[1], None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F)
    sh = 1 - cv2.normalize(cv2.Sobel(h, cv2.CV_64F, 1, 0, ksize=21), None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F)
    sv = 1 - cv2.normalize(cv2.Sobel(v, cv2.CV_64F, 0, 1, ksize=21), None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F)
    overall = np.clip(np.maximum(sh, sv) - (1 - blb), 0, None)
    dist = -cv2.GaussianBlur((1.0 - overall) * blb, (3, 3), 0)
    marker = np.clip(blb - (overall >= 0.4), 0, None)
    marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    marker = remove_small_objects(ndimage.label(marker)[0], max_size=9)
    return watershed(dist, marker, mask=blb)


def _same_partition(a, b) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_postprocess_equals_the_official_procedure():
    rng = np.random.default_rng(1)
    inst = np.zeros((160, 160), np.int32)
    for k in range(1, 40):
        c = rng.uniform(8, 152, 2).astype(int)
        cv2.ellipse(inst, tuple(int(x) for x in c), (int(rng.integers(5, 11)), int(rng.integers(4, 9))),
                    float(rng.uniform(0, 180)), 0, 360, k, -1)
    # a ring nucleus with a separate one in its hole: a marker spans two blobs after hole filling
    cv2.circle(inst, (130, 130), 20, 50, -1)
    cv2.circle(inst, (130, 130), 12, 0, -1)
    cv2.circle(inst, (130, 130), 5, 51, -1)
    np_prob, hv = _perfect(inst)
    # a noisy prediction, not only perfect maps
    noisy_np = np.clip(np_prob * 0.8 + rng.uniform(0, 0.3, np_prob.shape), 0, 1).astype(np.float32)
    noisy_hv = (hv + rng.normal(0, 0.1, hv.shape)).astype(np.float32)
    for a, b in ((np_prob, hv), (noisy_np, noisy_hv)):
        ours, _ = postprocess(a, b)
        assert _same_partition(ours, _reference_postprocess(a, b))


def test_postprocess_edge_cases_and_parameters():
    empty, types = postprocess(np.zeros((20, 20), np.float32), np.zeros((2, 20, 20), np.float32),
                               np.zeros((3, 20, 20), np.float32))
    assert empty.max() == 0 and types == {}
    inst = np.zeros((40, 40), np.int32)
    cv2.circle(inst, (20, 20), 8, 1, -1)
    inst[2:4, 2:4] = 2  # under min_size: dropped
    pred, _ = postprocess(*_perfect(inst))
    assert pred.max() == 1 and pred[2, 2] == 0
    pred, _ = postprocess(*_perfect(inst), sobel_size=5, min_size=1, min_marker_size=1, open_size=1)
    assert pred.max() == 2


def test_postprocess_rejects_bad_input():
    good_np, good_hv = np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float32)
    nan = good_hv.copy()
    nan[0, 1, 1] = np.nan
    cases = [
        (np.zeros((1, 8, 8), np.float32), good_hv, None, {}),
        (good_np, np.zeros((8, 8, 2), np.float32), None, {}),
        (good_np, nan, None, {}),
        (np.full((8, 8), np.nan, np.float32), good_hv, None, {}),
        (good_np + 3.0, good_hv, None, {}),  # logits, not probabilities
        (good_np, good_hv, np.zeros((8, 8), np.float32), {}),
        (good_np, good_hv, np.zeros((1, 8, 8), np.float32), {}),
        (good_np, good_hv, None, {"sobel_size": 4}),
        (good_np, good_hv, None, {"blur_size": 2}),
        (good_np.astype(np.int64), good_hv, None, {}),
    ]
    for a, b, c, kw in cases:
        with pytest.raises(HistosynthError):
            postprocess(a, b, c, **kw)


def test_center_crop():
    x = np.arange(100).reshape(10, 10)
    assert np.array_equal(center_crop(x, 4), x[3:7, 3:7])
    assert center_crop(torch.zeros(2, 3, 9, 9), (5, 3)).shape == (2, 3, 5, 3)
    with pytest.raises(HistosynthError):
        center_crop(x, 11)


def test_postprocess_sizes_scale_with_the_resolution():
    """The official sizes at 0.25 um/px; at 0.5 um/px kernels halve (odd, >= 3) and areas quarter."""
    from histosynth.models.hovernet import sizes_at
    from histosynth.models.hovernet.postprocess import OFFICIAL_SIZES

    assert sizes_at(None) == sizes_at(0.25) == OFFICIAL_SIZES
    assert sizes_at(0.5) == {"sobel_size": 11, "open_size": 3, "min_size": 3, "min_marker_size": 3}
    assert sizes_at(0.125)["sobel_size"] == 31 and sizes_at(0.125)["min_size"] == 40  # cv2's largest Sobel
    assert sizes_at(2.0) == {"sobel_size": 3, "open_size": 3, "min_size": 1, "min_marker_size": 1}
    for bad in (0, -1, float("nan")):
        with pytest.raises(HistosynthError, match="mpp"):
            sizes_at(bad)


def test_small_touching_nuclei_at_20x_need_the_scaled_sizes():
    """Two touching 5-px-radius discs (20x nuclei) with perfect maps: the 40x sizes erase their markers."""
    inst = np.zeros((48, 48), np.int32)
    yy, xx = np.mgrid[:48, :48]
    inst[(yy - 24) ** 2 + (xx - 19) ** 2 <= 25] = 1
    inst[((yy - 24) ** 2 + (xx - 28) ** 2 <= 25) & (inst == 0)] = 2
    t = hn.hovernet_targets(inst)
    prob = (t["np"] > 0).astype(np.float32)
    scaled, _ = hn.postprocess(prob, t["hv"].astype(np.float32), **hn.sizes_at(0.5))
    assert len(np.unique(scaled[scaled > 0])) == 2
    official, _ = hn.postprocess(prob, t["hv"].astype(np.float32))
    assert len(np.unique(official[official > 0])) < 2
