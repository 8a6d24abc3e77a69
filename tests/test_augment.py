"""histosynth.segmentation.augment: shapes, identity, determinism, geometry of the masks, photometric steps, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.color import hed2rgb, hed_from_rgb, rgb2hed

from histosynth.errors import HistosynthError
from histosynth.segmentation import augment as A
from histosynth.segmentation.augment import (
    Augment,
    augment_from_settings,
    augment_window,
)

OFF = Augment(0, 0, 0, 0, 0)
FIELDS = ("hed", "color", "scale", "blur", "noise")
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def window(size: int = 64, seed: int = 0, n_nuclei: int = 12, per_pixel_types: bool = False):
    """An H&E-like window: pink background, purple discs (instances 1..n), a type per nucleus, all valid."""
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[:h, :w]
    image = np.empty((h, w, 3), np.float64)
    image[:] = (235, 180, 215)
    inst = np.zeros((h, w), np.int32)
    types = np.zeros((h, w), np.uint8)
    for k in range(1, n_nuclei + 1):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(3, min(h, w) / 6))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        inst[disc] = k
        image[disc] = (110, 60, 160)
        types[disc] = rng.integers(1, 5)
    if per_pixel_types:  # types that vary inside a nucleus, to see that each pixel's pair travels together
        types = np.where(inst > 0, rng.integers(1, 6, size=(h, w)), 0).astype(np.uint8)
    image += rng.normal(0, 8, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, inst, types, np.ones((h, w), bool)


def state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


amounts = st.builds(
    Augment,
    hed=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    color=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    scale=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    blur=st.sampled_from([0.0, 0.5, 1.0]),
    noise=st.sampled_from([0.0, 0.02, 0.2, 1.0]),
)


# --------------------------------------------------------------------------- #
# the contract: shapes, dtypes, range, purity
# --------------------------------------------------------------------------- #
@HYP
@given(aug=amounts, h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_shapes_dtypes_and_inputs_untouched(aug, h, w, seed):
    image, inst, types, valid = window((h, w), seed=seed % 1000, n_nuclei=3)
    valid[: h // 3] = False
    ins = [a.copy() for a in (image, inst, types, valid)]
    for a in (image, inst, types, valid):
        a.flags.writeable = False  # an in-place write would raise
    out = augment_window(image, inst, types, valid, aug, np.random.default_rng(seed))
    for o, a, dtype in zip(out, ins, (np.uint8, np.int32, np.uint8, bool), strict=True):
        assert o.shape == a.shape and o.dtype == dtype
    for o, a in zip(out, (image, inst, types, valid), strict=True):
        assert not np.shares_memory(o, a)
    for a, b in zip((image, inst, types, valid), ins, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("aug", [OFF, augment_from_settings(False, 0.05, 0.1, 0.1, 0.2, 0.02)])
def test_disabled_is_identity_and_draws_nothing(aug):
    assert not aug.enabled
    image, inst, types, valid = window(48)
    valid[:, :5] = False
    rng = np.random.default_rng(7)
    before = state(rng)
    out = augment_window(image, inst, types, valid, aug, rng)
    assert state(rng) == before
    for o, a in zip(out, (image, inst, types, valid), strict=True):
        np.testing.assert_array_equal(o, a)
        assert o.dtype == a.dtype and not np.shares_memory(o, a)


def test_enabled_draws_from_rng():
    rng = np.random.default_rng(7)
    before = state(rng)
    augment_window(*window(32), Augment(), rng)
    assert state(rng) != before


@HYP
@given(aug=amounts, seed=st.integers(0, 2**63))
def test_same_seed_same_output(aug, seed):
    win = window(40, seed=3)
    a = augment_window(*win, aug, np.random.default_rng(seed))
    b = augment_window(*win, aug, np.random.default_rng(seed))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_different_seeds_differ():
    win = window(64)
    a = augment_window(*win, Augment(), np.random.default_rng(1))
    b = augment_window(*win, Augment(), np.random.default_rng(2))
    assert not np.array_equal(a[0], b[0])


@pytest.mark.parametrize("value", [0, 255])
def test_image_clipped_not_wrapped(value):
    """Saturated images stay saturated: out-of-range values are clipped to 0..255, never wrapped around."""
    image = np.full((64, 64, 3), value, np.uint8)
    inst, types, valid = np.zeros((64, 64), np.int32), np.zeros((64, 64), np.uint8), np.ones((64, 64), bool)
    at_end = 0
    for seed in range(10):
        # noise pushes about half of the pixels past the end of the range (wrapping would leave few at the end)
        out = augment_window(image, inst, types, valid, Augment(0, 0, 0, 0, 1.0), np.random.default_rng(seed))[0]
        assert out.dtype == np.uint8 and (out == value).mean() > 0.4
        # brightness x U(0, 2) of a uniform image: uniform, black stays black, white brighter than white is white
        out = augment_window(image, inst, types, valid, Augment(0, 1.0, 0, 0, 0), np.random.default_rng(seed))[0]
        assert out.min() == out.max()
        at_end += int(out[0, 0, 0]) == value
    assert at_end == 10 if value == 0 else at_end >= 3


# --------------------------------------------------------------------------- #
# geometry
# --------------------------------------------------------------------------- #
@HYP
@given(scale=st.sampled_from([0.1, 0.25, 0.5]), size=st.integers(8, 48), seed=st.integers(0, 2**32 - 1),
       per_pixel=st.booleans())
def test_scaled_labels_come_from_the_input(scale, size, seed, per_pixel):
    """Nearest-neighbour: every output id is an input id, and each pixel's (id, type, valid) is an input pixel's."""
    image, inst, types, valid = window(size, seed=seed % 997, n_nuclei=6, per_pixel_types=per_pixel)
    valid[: size // 4] = False
    _, o_inst, o_types, o_valid = augment_window(image, inst, types, valid, Augment(0, 0, scale, 0, 0),
                                                 np.random.default_rng(seed))
    assert set(np.unique(o_inst)) <= set(np.unique(inst)) | {0}
    seen = set(zip(inst.ravel().tolist(), types.ravel().tolist(), valid.ravel().tolist(), strict=True))
    seen.add((0, 0, False))  # the padding
    got = set(zip(o_inst.ravel().tolist(), o_types.ravel().tolist(), o_valid.ravel().tolist(), strict=True))
    assert got <= seen
    if not per_pixel:  # one type per nucleus: a nucleus' pixels keep exactly that type
        for k in np.unique(o_inst[o_inst > 0]):
            assert set(np.unique(o_types[o_inst == k])) == set(np.unique(types[inst == k]))


def _zoom_of(seed: int, scale: float) -> float:
    """The zoom factor augment_window draws: the first draw, U(1 - scale, 1 + scale)."""
    return float(np.random.default_rng(seed).uniform(1 - scale, 1 + scale))


@pytest.mark.parametrize("size", [(64, 64), (57, 40)])
def test_valid_false_exactly_on_padding(size):
    h, w = size
    image, _, types, valid = window(size, seed=4)
    inst = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)  # no background: 0 only where padded
    n_out = n_in = 0
    for seed in range(30):
        z = _zoom_of(seed, 0.4)
        o_img, o_inst, o_types, o_valid = augment_window(image, inst, types, valid, Augment(0, 0, 0.4, 0, 0),
                                                         np.random.default_rng(seed))
        nh, nw = round(h * z), round(w * z)
        if z >= 1:
            n_in += 1
            assert o_valid.all() and (o_inst > 0).all()
            continue
        n_out += 1
        top, left = (h - nh) // 2, (w - nw) // 2
        box = np.zeros((h, w), bool)
        box[top : top + nh, left : left + nw] = True
        np.testing.assert_array_equal(o_valid, box)  # a centred box of the zoomed size, False around it
        np.testing.assert_array_equal(o_inst > 0, box)
        assert (o_types[~box] == 0).all()
        # the image is padded by reflection (edge pixel repeated), not with a constant
        if top > 0:
            np.testing.assert_array_equal(o_img[top - 1], o_img[top])
        if left > 0:
            np.testing.assert_array_equal(o_img[:, left - 1], o_img[:, left])
    assert n_out > 3 and n_in > 3


def test_zoom_is_about_the_centre():
    """A nucleus at the centre stays at the centre; one off-centre moves away from (zoom in) or toward it."""
    h = 65
    image, inst, types, valid = window(h, n_nuclei=0)
    inst[30:35, 30:35] = 1
    inst[30:35, 50:55] = 2
    for seed in range(10):
        z = _zoom_of(seed, 0.3)
        _, o_inst, _, _ = augment_window(image, inst, types, valid, Augment(0, 0, 0.3, 0, 0),
                                         np.random.default_rng(seed))
        ys, xs = np.nonzero(o_inst == 1)
        assert abs(ys.mean() - 32) <= 1 and abs(xs.mean() - 32) <= 1
        ys, xs = np.nonzero(o_inst == 2)
        if len(xs):
            assert abs((xs.mean() - 32) - z * 20) <= 1.5 and abs(ys.mean() - 32) <= 1


def test_image_follows_the_masks():
    """After zooming, the image's dark nuclei still sit on the instance pixels."""
    image, inst, types, valid = window(96, seed=11, n_nuclei=10)
    for seed in range(5):
        o_img, o_inst, _, _ = augment_window(image, inst, types, valid, Augment(0, 0, 0.3, 0, 0),
                                             np.random.default_rng(seed))
        core = ndimage.binary_erosion(o_inst > 0, iterations=2)
        bg = ndimage.binary_erosion(o_inst == 0, iterations=2)
        assert o_img[core].mean() < 140 < o_img[bg].mean()


# --------------------------------------------------------------------------- #
# photometric steps
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("aug", [Augment(0.05, 0, 0, 0, 0), Augment(0, 0.1, 0, 0, 0), Augment(0, 0, 0, 1.0, 0),
                                 Augment(0, 0, 0, 0, 0.05), Augment(0.05, 0.1, 0, 0.2, 0.02)])
def test_photometric_changes_only_the_image(aug):
    image, inst, types, valid = window(64, seed=5)
    valid[40:] = False
    changed = 0
    for seed in range(5):
        o_img, o_inst, o_types, o_valid = augment_window(image, inst, types, valid, aug, np.random.default_rng(seed))
        np.testing.assert_array_equal(o_inst, inst)
        np.testing.assert_array_equal(o_types, types)
        np.testing.assert_array_equal(o_valid, valid)
        changed += not np.array_equal(o_img, image)
        assert np.abs(o_img.astype(int) - image).mean() < 40  # a jitter, not a different image
    assert changed >= 4


def test_blur_probability():
    image, inst, types, valid = window(32)
    blurred = sum(not np.array_equal(augment_window(image, inst, types, valid, Augment(0, 0, 0, 0.5, 0),
                                                    np.random.default_rng(seed))[0], image) for seed in range(60))
    assert 15 <= blurred <= 45
    assert all(np.array_equal(augment_window(image, inst, types, valid, Augment(0, 0, 0, 1e-9, 0),
                                             np.random.default_rng(seed))[0], image) for seed in range(20))


def test_hed_matches_skimage():
    """Deconvolve / jitter / reconvolve equals skimage's rgb2hed -> jitter -> hed2rgb (where rgb2hed does not clamp)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha, beta = np.array([1.04, 0.97, 1.01]), np.array([0.03, -0.02, 0.01])
    mine = np.clip(A._hed_jitter(image, alpha, beta), 0, 1)
    ref = hed2rgb(rgb2hed(image) * alpha + beta / -math.log(1e-6))  # shift U(-hed, hed) in optical density
    stains = (np.log(np.maximum(image / 255.0, 1e-6)) / math.log(1e-6)) @ hed_from_rgb
    inside = (stains >= 0).all(axis=-1)
    assert inside.mean() > 0.05
    np.testing.assert_allclose(mine[inside], ref[inside], atol=1e-5)
    # no jitter: the input back (skimage's own round trip would clamp the pixels outside the H/E/D cone)
    np.testing.assert_allclose(A._hed_jitter(image, np.ones(3), np.zeros(3)) * 255, image, atol=1e-2)


def test_hed_moves_the_stains():
    """More haematoxylin (H scaled up) makes nuclei darker in H; the other channels are untouched in stain space."""
    image, *_ = window(64, seed=2)
    out = np.clip(A._hed_jitter(image, np.array([1.3, 1.0, 1.0]), np.zeros(3)), 0, 1)
    h_in, h_out = rgb2hed(image)[..., 0], rgb2hed(out)[..., 0]
    assert h_out.mean() > 1.2 * h_in.mean()


def test_colour_formula():
    rng = np.random.default_rng(1)
    img = rng.random((16, 16, 3), dtype=np.float32)
    b, c, s = 1.08, 0.93, 1.05
    grey = np.array([0.299, 0.587, 0.114])
    x = img * b
    m = (x @ grey).mean()
    x = (x - m) * c + m
    g = (x @ grey)[..., None]
    x = g + s * (x - g)
    np.testing.assert_allclose(A._colour(img.copy(), b, c, s), x, atol=1e-5)


def test_standard_normal():
    z = A._standard_normal(np.random.default_rng(0), 200_001)
    assert z.shape == (200_001,) and z.dtype == np.float32 and np.isfinite(z).all()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((np.abs(z) > 1.96).mean() - 0.05) < 0.003


def test_noise_strength():
    """Noise std is U(0, noise) in 0..1 units: on mid-grey the spread of the difference stays below noise * 255."""
    image = np.full((96, 96, 3), 128, np.uint8)
    inst, types, valid = np.zeros((96, 96), np.int32), np.zeros((96, 96), np.uint8), np.ones((96, 96), bool)
    stds = [np.std(augment_window(image, inst, types, valid, Augment(0, 0, 0, 0, 0.04), np.random.default_rng(s))[0]
                   .astype(float) - 128) for s in range(20)]
    assert max(stds) < 0.04 * 255 * 1.05
    assert max(stds) > 0.02 * 255  # some draws near the top of the range


# --------------------------------------------------------------------------- #
# settings and validation
# --------------------------------------------------------------------------- #
def test_defaults_and_enabled():
    assert Augment() == Augment(0.05, 0.1, 0.1, 0.2, 0.02)
    assert Augment().enabled and not OFF.enabled
    for name in FIELDS:
        assert Augment(**{f: 0.0 for f in FIELDS} | {name: 0.01}).enabled


def test_from_settings():
    assert augment_from_settings(True, 0.1, 0.2, 0.3, 0.4, 0.05) == Augment(0.1, 0.2, 0.3, 0.4, 0.05)
    assert augment_from_settings(False, 0.1, 0.2, 0.3, 0.4, 0.05) == OFF
    with pytest.raises(HistosynthError, match="scale"):
        augment_from_settings(False, 0.1, 0.2, 0.9, 0.4, 0.05)


@pytest.mark.parametrize(("name", "value"), [
    ("hed", -0.01), ("hed", 1.5), ("color", -1), ("color", 2.0), ("scale", 0.51), ("scale", -0.1),
    ("blur", 1.01), ("blur", float("nan")), ("noise", 3), ("noise", float("inf")), ("hed", "0.1"), ("blur", True),
])
def test_out_of_range_raises(name, value):
    with pytest.raises(HistosynthError) as err:
        Augment(**{name: value})
    assert name in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize("name", FIELDS)
def test_bounds_are_inclusive(name):
    top = 0.5 if name == "scale" else 1.0
    assert getattr(Augment(**{name: top}), name) == top
    assert getattr(Augment(**{name: 0}), name) == 0.0


def test_shape_mismatch_raises():
    image, inst, types, valid = window(16)
    with pytest.raises(HistosynthError, match="inst"):
        augment_window(image, inst[:8], types, valid, Augment(), np.random.default_rng(0))
    with pytest.raises(HistosynthError):
        augment_window(image[..., :1], inst, types, valid, Augment(), np.random.default_rng(0))
