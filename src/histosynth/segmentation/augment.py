"""Training-window augmentation for the HoVer-Net segmenter.

Every arm of an experiment is trained on augmented windows, so that synthetic
data has to beat an *augmented* real baseline, not a bare one. One call,
:func:`augment_window`, takes one training window — ``image`` uint8 (S, S, 3)
RGB, ``inst`` int32 instance ids, ``types`` uint8, ``valid`` bool (the pixels
that are real data, not padding) — and returns new arrays of the same shapes
and dtypes. It is a pure function of the ``numpy.random.Generator`` state it
is given; with every amount 0 it returns copies of the inputs and draws
nothing. The flips / 90° rotations are not here: the window sampler already
applies them.

The augmentations, in the order they are applied (each is skipped, and draws
nothing, when its amount is 0):

1. **Scale** (geometry; the only step that touches ``inst`` / ``types`` /
   ``valid``). A zoom factor ``z ~ U(1 - scale, 1 + scale)``; every array is
   resized to ``round(S * z)`` and centre-cropped (zoom in) or centre-padded
   (zoom out) back to S, so the zoom is about the window centre. The image is
   resized with ``cv2.INTER_LINEAR`` and padded by reflection
   (``cv2.BORDER_REFLECT``, the edge pixel repeated — numpy's ``symmetric``,
   as the window sampler pads); ``inst``, ``types`` and ``valid`` with
   ``cv2.INTER_NEAREST_EXACT`` and padded with 0 / False, so ``valid`` is
   False exactly on the padding (and where the input was already invalid).
   ``INTER_NEAREST_EXACT`` is nearest-neighbour with pixel-centre alignment,
   the same geometry as ``INTER_LINEAR``; plain ``INTER_NEAREST`` samples
   ``floor(x / z)`` and would shift the masks against the image by up to
   one pixel. Nearest-neighbour never invents a label: every output id is an
   input id, and the type at a pixel is the type at the input pixel its id
   came from (small nuclei can vanish when zooming out).
2. **HED stain jitter** (Tellez et al. 2018/2019). Ruifrok–Johnston colour
   deconvolution with scikit-image's ``hed_from_rgb`` / ``rgb_from_hed``
   matrices, in the units :func:`skimage.color.rgb2hed` gives (optical
   density ``OD = -ln(max(I / 255, 1e-6))`` divided by ``-ln(1e-6) ≈ 13.8``).
   Each of the H, E and D channels is scaled by ``U(1 - hed, 1 + hed)`` and
   shifted by ``U(-hed, hed) / 13.8`` in those units, i.e. by
   ``U(-hed, hed)`` in optical density — the amount of the original recipe,
   which ran on rgb2hed when it returned plain optical density (a shift of
   ``hed`` in today's units would be 13.8× stronger and turn the background
   blue/pink). Then back with the ``hed2rgb`` formula. It is implemented
   here in float32 numpy/OpenCV rather than by calling ``rgb2hed`` /
   ``hed2rgb`` (float64, ~7 ms a 256² window round trip): the optical
   density comes from a 256-entry lookup table, and deconvolve → jitter →
   reconvolve is linear in optical density, so it folds into one 3 × 4
   affine map (``cv2.transform``) followed by ``exp``. One difference from
   skimage: rgb2hed clamps negative stain amounts to 0, which makes its round
   trip lossy for colours outside the H/E/D cone; here they are kept, so a
   draw of scale 1 and shift 0 gives the input back.
3. **Colour** (``color = c``): brightness (multiply by ``U(1 - c, 1 + c)``),
   contrast (scale around the mean grey level of the window by
   ``U(1 - c, 1 + c)``), saturation (blend with the pixel's grey level,
   ``0.299 R + 0.587 G + 0.114 B``, by ``U(1 - c, 1 + c)``), always in this
   order. All three are affine in RGB, so they too fold into one 3 × 4 map.
4. **Blur**: with probability ``blur`` a Gaussian blur of the image, sigma
   ``U(0.5, 1.5)`` pixels (reflected border). The coin and the sigma are
   always both drawn, so the later draws do not depend on the coin.
5. **Noise**: additive Gaussian noise, independent per pixel and channel,
   with a standard deviation ``U(0, noise)`` in 0..1 intensity units (the
   normal values by Box–Muller from the generator's uniforms, twice as fast
   as ``Generator.standard_normal`` in float32).

Steps 2–5 change the image only. The image is carried in float32 (0..1)
from the first photometric step to the end and rounded and clipped to uint8
once. A 256² window with the defaults takes 2–3.5 ms on one core of a small
shared VM (the noise is a third of it; geometry alone ~0.3 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

from histosynth.errors import HistosynthError

__all__ = ["Augment", "augment_from_settings", "augment_window"]

# rgb2hed's units: optical density divided by -ln(1e-6)
_LOG_ADJUST = -math.log(1e-6)
# optical density of each uint8 intensity, clamped as rgb2hed clamps (I >= 1e-6)
_OD_LUT = (-np.log(np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6))).astype(np.float32).reshape(1, 256)
_UNIT_LUT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32).reshape(1, 256)
_NOISE_CHUNK = 16384  # float32 values of noise drawn at a time (64 KiB)
_HED_FROM_RGB = np.asarray(hed_from_rgb, np.float64)
_RGB_FROM_HED = np.asarray(rgb_from_hed, np.float64)
_GREY = np.array([0.299, 0.587, 0.114], np.float64)
# upper bound of each amount (the lower bound is 0)
_LIMITS = {"hed": 1.0, "color": 1.0, "scale": 0.5, "blur": 1.0, "noise": 1.0}


@dataclass(frozen=True)
class Augment:
    """Amounts of each augmentation of :func:`augment_window`; 0 switches one off.

    - ``hed``: HED stain jitter, scale ``U(1 - hed, 1 + hed)`` and optical-density shift ``U(-hed, hed)`` per
      channel, in [0, 1];
    - ``color``: brightness / contrast / saturation factors ``U(1 - color, 1 + color)``, in [0, 1];
    - ``scale``: zoom factor ``U(1 - scale, 1 + scale)`` about the window centre, in [0, 0.5];
    - ``blur``: probability of a Gaussian blur with sigma ``U(0.5, 1.5)``, in [0, 1];
    - ``noise``: largest standard deviation of Gaussian noise (0..1 intensities), in [0, 1].
    """

    hed: float = 0.05
    color: float = 0.1
    scale: float = 0.1
    blur: float = 0.2
    noise: float = 0.02

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            hi = _LIMITS[f.name]
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            if not ok or not 0.0 <= float(value) <= hi:
                raise HistosynthError(f"augment: {f.name} must be a number in [0, {hi:g}], got {value!r}")
            object.__setattr__(self, f.name, float(value))

    @property
    def enabled(self) -> bool:
        """Whether any amount is above 0."""
        return any(getattr(self, f.name) > 0 for f in fields(self))


def augment_from_settings(enabled: bool, hed: float, color: float, scale: float, blur: float,
                          noise: float) -> Augment:
    """The :class:`Augment` of a run's settings; all amounts 0 when ``enabled`` is false.

    The amounts are validated either way, so a bad value in the config is
    named even while augmentation is switched off.
    """
    aug = Augment(hed=hed, color=color, scale=scale, blur=blur, noise=noise)
    return aug if enabled else Augment(0.0, 0.0, 0.0, 0.0, 0.0)


def augment_window(image: np.ndarray, inst: np.ndarray, types: np.ndarray, valid: np.ndarray, aug: Augment,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One augmented training window ``(image uint8 (H, W, 3), inst int32, types uint8, valid bool)``.

    Geometry (scale) first, applied to all four arrays alike; then stain,
    colour, blur and noise on the image only (see the module docstring).
    New arrays are returned; the inputs are not modified. A pure function of
    ``rng``'s state; with ``aug.enabled`` false the result equals the input
    and ``rng`` is not drawn from.
    """
    image, inst, types, valid = _check(image, inst, types, valid)
    if not aug.enabled:
        return image.copy(), inst.copy(), types.copy(), valid.copy()

    if aug.scale > 0:
        z = float(rng.uniform(1.0 - aug.scale, 1.0 + aug.scale))
        image, inst, types, valid = _zoom(image, inst, types, valid, z)
    else:
        inst, types, valid = inst.copy(), types.copy(), valid.copy()

    img: np.ndarray | None = None  # float32 0..1 once a photometric step has run
    if aug.hed > 0:
        alpha = rng.uniform(1.0 - aug.hed, 1.0 + aug.hed, size=3)
        beta = rng.uniform(-aug.hed, aug.hed, size=3)
        img = _hed_jitter(image, alpha, beta)
    if aug.color > 0:
        b, c, s = rng.uniform(1.0 - aug.color, 1.0 + aug.color, size=3)
        img = _colour(_as_float(image) if img is None else img, float(b), float(c), float(s))
    if aug.blur > 0:
        coin, sigma = float(rng.random()), float(rng.uniform(0.5, 1.5))
        if coin < aug.blur:
            img = _as_float(image) if img is None else img
            cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, dst=img, borderType=cv2.BORDER_REFLECT_101)
    if aug.noise > 0:
        std = float(rng.uniform(0.0, aug.noise))
        img = _add_noise(_as_float(image) if img is None else img, std, rng)
    if img is not None:
        image = _to_uint8(img)
    elif aug.scale <= 0:
        image = image.copy()
    return image, inst, types, valid


# -- helpers -----------------------------------------------------------------------------------------
def _check(image: np.ndarray, inst: np.ndarray, types: np.ndarray,
           valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four arrays as contiguous arrays of the contract dtypes; their shapes checked."""
    image, inst, types, valid = (np.asarray(a) for a in (image, inst, types, valid))
    if inst.ndim != 2 or image.shape != (*inst.shape, 3) or types.shape != inst.shape or valid.shape != inst.shape:
        raise HistosynthError(f"augment: expected image (H, W, 3) and inst / types / valid (H, W), got image "
                              f"{image.shape}, inst {inst.shape}, types {types.shape}, valid {valid.shape}")
    return (np.ascontiguousarray(image, np.uint8), np.ascontiguousarray(inst, np.int32),
            np.ascontiguousarray(types, np.uint8), np.ascontiguousarray(valid, bool))


def _fit(arr: np.ndarray, h: int, w: int, border: int) -> np.ndarray:
    """``arr`` centre-cropped or centre-padded (``border``, 0 when constant) to (h, w)."""
    ah, aw = arr.shape[:2]
    y0, x0 = max(ah - h, 0) // 2, max(aw - w, 0) // 2
    arr = arr[y0 : y0 + min(ah, h), x0 : x0 + min(aw, w)]
    top, left = max(h - ah, 0) // 2, max(w - aw, 0) // 2
    bottom, right = max(h - ah, 0) - top, max(w - aw, 0) - left
    if top or bottom or left or right:
        return cv2.copyMakeBorder(arr, top, bottom, left, right, border, value=0)
    return np.ascontiguousarray(arr)


def _zoom(image: np.ndarray, inst: np.ndarray, types: np.ndarray, valid: np.ndarray,
          z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All four arrays zoomed by ``z`` about the centre, same size (reflect / zero padding, valid False there)."""
    h, w = inst.shape
    nh, nw = max(1, round(h * z)), max(1, round(w * z))
    if (nh, nw) == (h, w):
        return image.copy(), inst.copy(), types.copy(), valid.copy()
    near = cv2.INTER_NEAREST_EXACT
    image = _fit(cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR), h, w, cv2.BORDER_REFLECT)
    inst = _fit(cv2.resize(inst, (nw, nh), interpolation=near), h, w, cv2.BORDER_CONSTANT)
    types = _fit(cv2.resize(types, (nw, nh), interpolation=near), h, w, cv2.BORDER_CONSTANT)
    valid = _fit(cv2.resize(valid.view(np.uint8), (nw, nh), interpolation=near), h, w, cv2.BORDER_CONSTANT)
    return image, inst, types, valid.astype(bool)


def _as_float(image: np.ndarray) -> np.ndarray:
    """uint8 → float32 in 0..1 (a lookup table: one new array)."""
    return cv2.LUT(image, _UNIT_LUT)


def _add_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``img`` plus N(0, std²) per pixel and channel, in place.

    Drawn a band of rows at a time, by :func:`_standard_normal`: a second
    whole-image float array costs more in page faults than the addition.
    """
    rows = max(1, _NOISE_CHUNK // max(1, img[0].size))
    for y in range(0, img.shape[0], rows):
        band = img[y : y + rows]
        cv2.scaleAdd(_standard_normal(rng, band.size).reshape(band.shape), std, band, dst=band)
    return img


def _standard_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` float32 N(0, 1) values by Box–Muller from ``rng``'s float32 uniforms.

    Twice as fast as ``rng.standard_normal(dtype=np.float32)`` here (the
    uniforms are cheap and OpenCV does log / sqrt / sin / cos); the 24-bit
    uniforms cut the tails at ~5.8 sigma, which does not matter for noise of
    a few grey levels.
    """
    half = (n + 1) // 2
    u = rng.random(2 * half, dtype=np.float32)
    radius, angle = u[:half], u[half:]
    np.subtract(np.float32(1.0), radius, out=radius)  # (0, 1]: log is finite
    cv2.log(radius, dst=radius)
    radius *= np.float32(-2.0)
    cv2.sqrt(radius, dst=radius)
    angle *= np.float32(2.0 * math.pi)
    x, y = cv2.polarToCart(radius, angle)
    return np.concatenate([x.ravel(), y.ravel()])[:n]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """float32 0..1 → uint8, rounded and clipped (``img`` is overwritten)."""
    img *= np.float32(255.0)
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _hed_jitter(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """HED stain jitter of a uint8 image → float32 0..1 (see the module docstring for the units).

    stains = OD / L @ hed_from_rgb; stains' = stains * alpha + beta / L; OD' = L * stains' @ rgb_from_hed,
    i.e. OD' = OD @ (hed_from_rgb diag(alpha) rgb_from_hed) + beta @ rgb_from_hed (L cancels).
    """
    od = cv2.LUT(image, _OD_LUT)
    lin = _HED_FROM_RGB @ np.diag(alpha) @ _RGB_FROM_HED  # row vectors: OD' = OD @ lin + off
    off = np.asarray(beta, np.float64) @ _RGB_FROM_HED
    # cv2.transform works on column vectors: dst = m[:, :3] @ src + m[:, 3]; negated so that exp gives I
    m = -np.concatenate([lin.T, off[:, None]], axis=1)
    cv2.transform(od, m.astype(np.float32), dst=od)
    return cv2.exp(od, dst=od)


def _colour(img: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    """Brightness ``b``, then contrast ``c`` around the mean grey, then saturation ``s``: one affine map."""
    mean_grey = float(np.asarray(cv2.mean(img)[:3]) @ _GREY)
    eye = np.eye(3)
    sat = s * eye + (1.0 - s) * np.outer(np.ones(3), _GREY)  # x -> s x + (1 - s) grey(x)
    # brightness: x -> b x (mean grey becomes b * mean); contrast: x -> c x + (1 - c) * b * mean
    lin = sat @ (c * b * eye)
    off = sat @ np.full(3, (1.0 - c) * b * mean_grey)
    m = np.concatenate([lin, off[:, None]], axis=1).astype(np.float32)
    return cv2.transform(img, m, dst=img)
