"""The β-VAE ("DVAE") of nucleus shapes, after the seed's section 5 and appendix C.

Input: a ``size`` × ``size`` (64) binary nucleus shape from the nuclei
library (:mod:`histosynth.masks.library`). Read top to bottom::

    Encoder   x (1, 64, 64)
              4 × DownBlock: conv 4×4 stride 2 → BatchNorm → ReLU    64 → 32 → 16 → 8 → 4
              flatten (+ one-hot type when conditional)
              two linear heads → mu, logvar (latent_dim, default 10)
    sample    z = mu + exp(logvar / 2) · eps
    Decoder   z (+ one-hot type when conditional)
              linear → 100 → ReLU → linear → 16 · 16 · 16 → ReLU → (16, 16, 16)
              UpBlock transposed conv stride 2 → BN → ReLU            16 → 32
              UpBlock transposed conv stride 1 → BN → ReLU            32
              UpBlock transposed conv stride 2 → BN → ReLU            32 → 64
              transposed conv stride 1 → 1 channel of logits          64

Loss (:func:`vae_loss`): binary cross-entropy with logits, summed over pixels
and averaged over the batch, plus β · KL(q(z|x) ‖ N(0, I)) with β > 1
(default 4) to push the latent dimensions apart (disentangle them).

Where this departs from the seed's appendix C, and why: the appendix lists
stride-1 encoder convolutions, yet a flattened size of "1096" and a 16 × 16
decoder start; we downsample with stride 2 (as its text implies) and read
"1096" as 16 · 16 · 16 = 4096. Its decoder ends in BatchNorm + ReLU, which
cannot produce logits; ours ends in a plain transposed convolution. Widths
are configurable (:class:`DVAEConfig`); the encoder default (32, 32, 64, 64)
is wider than the appendix's (16, 32, 32, 16) because it costs little (the
decoder dominates) and reconstructs small nuclei better.

Public API for the mask sampler: :func:`load_dvae`, :func:`sample_shapes`,
:func:`decode` (and :func:`encode`, :func:`sample_posterior_shapes`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from histosynth.errors import HistosynthError
from histosynth.io.labels import class_map_to_json, read_class_map
from histosynth.models.checkpoint import read_torch_checkpoint

#: the ``format`` entry of every DVAE checkpoint (final model and training checkpoint)
CHECKPOINT_FORMAT = "histosynth-dvae"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class DVAEConfig:
    """Everything that fixes the architecture; saved in every checkpoint."""

    latent_dim: int = 10
    size: int = 64
    enc_widths: tuple[int, ...] = (32, 32, 64, 64)
    hidden: int = 100
    dec_channels: int = 16
    dec_widths: tuple[int, ...] = (32, 32, 16)
    dec_strides: tuple[int, ...] = (2, 1, 2)
    type_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}")
        down = 2 ** len(self.enc_widths)
        if not self.enc_widths or self.size % down:
            raise ValueError(f"size {self.size} must be divisible by 2^{len(self.enc_widths)} (one per encoder block)")
        if len(self.dec_widths) != len(self.dec_strides) or any(s not in (1, 2) for s in self.dec_strides):
            raise ValueError("dec_widths and dec_strides need the same length and strides of 1 or 2")
        if self.size % math.prod(self.dec_strides):
            raise ValueError(
                f"size {self.size} must be divisible by the decoder's upsampling {math.prod(self.dec_strides)}"
            )
        if len(set(self.type_ids)) != len(self.type_ids):
            raise ValueError(f"type_ids repeat: {self.type_ids}")

    @property
    def conditional(self) -> bool:
        return bool(self.type_ids)

    @property
    def n_types(self) -> int:
        return len(self.type_ids)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DVAE config keys {sorted(unknown)}")
        return cls(**{k: tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v for k, v in data.items()})


# -- blocks -------------------------------------------------------------------------------
class DownBlock(nn.Module):
    """Conv 4×4 stride 2 → BatchNorm → ReLU: halves the side."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """Transposed conv (4×4 stride 2, or 3×3 stride 1) → BatchNorm → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        kernel = 4 if stride == 2 else 3
        self.block = nn.Sequential(
            nn.ConvTranspose2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """Shape (and type) → (mu, logvar)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        blocks, in_ch = [], 1
        for width in cfg.enc_widths:
            blocks.append(DownBlock(in_ch, width))
            in_ch = width
        self.features = nn.Sequential(*blocks, nn.Flatten())
        side = cfg.size // 2 ** len(cfg.enc_widths)
        n_features = in_ch * side * side + cfg.n_types
        self.fc_mu = nn.Linear(n_features, cfg.latent_dim)
        self.fc_logvar = nn.Linear(n_features, cfg.latent_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        if c is not None:
            h = torch.cat([h, c], dim=1)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    """Latent (and type) → logits (1, size, size)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.channels = cfg.dec_channels
        self.side = cfg.size // math.prod(cfg.dec_strides)
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.n_types, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden, self.channels * self.side * self.side),
            nn.ReLU(inplace=True),
        )
        blocks, in_ch = [], self.channels
        for width, stride in zip(cfg.dec_widths, cfg.dec_strides):
            blocks.append(UpBlock(in_ch, width, stride))
            in_ch = width
        self.up = nn.Sequential(*blocks)
        self.to_logits = nn.ConvTranspose2d(in_ch, 1, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is not None:
            z = torch.cat([z, c], dim=1)
        h = self.fc(z).view(-1, self.channels, self.side, self.side)
        return self.to_logits(self.up(h))


class DVAE(nn.Module):
    """The β-VAE; conditioned on the nucleus type when ``cfg.type_ids`` is not empty."""

    def __init__(self, cfg: DVAEConfig, classes: dict[int, str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.classes: dict[int, str] = dict(classes or {})
        self.mpp: float | None = None
        #: posterior (mu, logvar, types) of the training shapes, for sample_posterior_shapes
        self.posterior: dict[str, np.ndarray] | None = None

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    @property
    def conditional(self) -> bool:
        return self.cfg.conditional

    def one_hot(self, types: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """One-hot rows for type ids (None for an unconditional model)."""
        if not self.conditional:
            return None
        if types is None:
            raise HistosynthError(
                f"this DVAE is conditioned on the nucleus type: pass one type id per shape "
                f"(it knows {list(self.cfg.type_ids)})"
            )
        ids = np.asarray(types.cpu() if isinstance(types, torch.Tensor) else types).reshape(-1).astype(np.int64)
        if ids.size == 1 and n != 1:
            ids = np.full(n, ids[0])
        if ids.size != n:
            raise HistosynthError(f"{ids.size} type ids for {n} shapes")
        lookup = {t: k for k, t in enumerate(self.cfg.type_ids)}
        unknown = sorted(set(ids.tolist()) - set(lookup))
        if unknown:
            raise HistosynthError(f"type ids {unknown} unknown to this DVAE (it knows {list(self.cfg.type_ids)})")
        index = torch.as_tensor(np.array([lookup[t] for t in ids.tolist()], dtype=np.int64))
        device = next(self.parameters()).device
        return F.one_hot(index, self.cfg.n_types).float().to(device)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x, c)

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z, c)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of the reconstruction, mu and logvar."""
        mu, logvar = self.encode(x, c)
        z = self.reparameterize(mu, logvar, generator)
        return self.decode(z, c), mu, logvar


def init_output_bias(model: DVAE, foreground_fraction: float) -> None:
    """Start the output logits at the log-odds of the mean foreground fraction.

    Nuclei cover a few per cent of the frame; starting there instead of at 0.5
    spares the first epochs from learning "mostly background" and makes them
    useful (the hold-out Dice is non-zero after one epoch).
    """
    p = float(np.clip(foreground_fraction, 1e-3, 0.5))
    with torch.no_grad():
        model.decoder.to_logits.bias.fill_(math.log(p / (1 - p)))


def define_dvae(cfg: DVAEConfig | dict[str, Any] | None = None, classes: dict[int, str] | None = None,
                **overrides: Any) -> DVAE:
    """Build a DVAE from a config (object or dict) with keyword overrides."""
    if cfg is None:
        cfg = DVAEConfig(**overrides)
    else:
        base = cfg.to_dict() if isinstance(cfg, DVAEConfig) else dict(cfg)
        cfg = DVAEConfig.from_dict({**base, **overrides})
    return DVAE(cfg, classes)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, I)) per sample and latent dimension (B, D)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


#: the reconstruction terms of :func:`vae_loss`
RECONSTRUCTION_LOSSES = ("bce", "mse")


def vae_loss(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
    reconstruction: str = "bce",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, recon, kl): the reconstruction term summed over pixels, KL summed over dims, both batch means.

    ``reconstruction``: ``bce`` (binary cross-entropy with logits, for binary shapes) or ``mse`` (squared
    error of the sigmoid output, seed "Histological Image Synthesis Using Deep Learning"'s MSE + KL).
    """
    batch = x.shape[0]
    if reconstruction == "bce":
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / batch
    elif reconstruction == "mse":
        recon = F.mse_loss(torch.sigmoid(logits), x, reduction="sum") / batch
    else:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction!r}")
    kl = kl_divergence(mu, logvar).sum() / batch
    return recon + beta * kl, recon, kl


# -- checkpoints ---------------------------------------------------------------------------
def checkpoint_dict(model: DVAE, **extra: Any) -> dict[str, Any]:
    """What every DVAE checkpoint holds (CPU tensors), plus ``extra`` entries."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": model.cfg.to_dict(),
        "classes": class_map_to_json(model.classes),
        "latent_dim": model.latent_dim,
        "conditional": model.conditional,
        **extra,
    }


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one clear error for a missing, corrupt or foreign file."""
    return read_torch_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "DVAE")


def model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> DVAE:
    """Rebuild the DVAE a checkpoint describes and load its weights (strictly)."""
    try:
        cfg = DVAEConfig.from_dict(dict(ckpt["config"]))
        model = DVAE(cfg, read_class_map(ckpt.get("classes") or {}, path))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise HistosynthError(f"checkpoint does not fit the DVAE architecture: {first}", path) from err
    return model


def load_dvae(path: str | os.PathLike, device: str | torch.device = "cpu") -> DVAE:
    """The trained DVAE of ``path`` (``dvae.pt`` or a training ``checkpoint.pt``) in eval mode on ``device``.

    ``model.classes`` (type id → name), ``model.latent_dim``,
    ``model.conditional`` and ``model.mpp`` (µm/px of the library shapes, or
    None) describe it.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    mpp = (ckpt.get("train") or {}).get("mpp")
    model.mpp = float(mpp) if mpp is not None else None  # resolution of the library it learned from
    post = ckpt.get("posterior")
    if (isinstance(post, dict) and {"mu", "logvar", "types"} <= set(post)
            and tuple(post["mu"].shape[1:]) == (model.latent_dim,)):
        model.posterior = {k: np.asarray(post[k]) for k in ("mu", "logvar", "types")}
    return model.to(device).eval()


# -- inference ---------------------------------------------------------------------------------
class _EvalMode:
    """Run a block with the model in eval mode and no autograd; restore the mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.was_training = model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _decode_batches(model: DVAE, z: torch.Tensor, types: np.ndarray | None, batch: int) -> np.ndarray:
    n = z.shape[0]
    size = model.cfg.size
    out = np.empty((n, size, size), dtype=np.float32)
    if n == 0:
        return out
    c_all = model.one_hot(types, n)
    device = next(model.parameters()).device
    with _EvalMode(model):
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            c = None if c_all is None else c_all[start:stop]
            logits = model.decode(z[start:stop].to(device), c)
            out[start:stop] = torch.sigmoid(logits)[:, 0].float().cpu().numpy()
    return out


def decode(model: DVAE, z: np.ndarray, types: np.ndarray | None = None, batch: int = 1024) -> np.ndarray:
    """Probabilities float32 (n, size, size) of the shapes of latent vectors ``z`` (n, latent_dim)."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != model.latent_dim:
        raise HistosynthError(f"z must have shape (n, {model.latent_dim}), got {z.shape}")
    return _decode_batches(model, torch.from_numpy(np.ascontiguousarray(z)), types, batch)


def encode(model: DVAE, shapes: np.ndarray, types: np.ndarray | None = None,
           batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) float32 (n, latent_dim) of binary shapes (n, size, size)."""
    shapes = np.asarray(shapes)
    n = len(shapes)
    c_all = model.one_hot(types, n)
    device = next(model.parameters()).device
    mus, logvars = [], []
    with _EvalMode(model):
        for start in range(0, n, batch):
            x = torch.from_numpy(shapes[start : start + batch].astype(np.float32)).unsqueeze(1).to(device)
            c = None if c_all is None else c_all[start : start + batch]
            mu, logvar = model.encode(x, c)
            mus.append(mu.float().cpu().numpy())
            logvars.append(logvar.float().cpu().numpy())
    empty = np.zeros((0, model.latent_dim), np.float32)
    return (np.concatenate(mus) if mus else empty), (np.concatenate(logvars) if logvars else empty)


def sample_shapes(
    model: DVAE,
    n: int,
    types: np.ndarray | None,
    sigma: float = 0.5,
    seed: int = 0,
    batch: int = 1024,
    threshold: float = 0.5,
) -> np.ndarray:
    """``n`` random shapes, bool (n, size, size): decode z ~ N(0, sigma² I), sigmoid > threshold.

    ``types`` (one type id per shape, or one for all) is needed by a
    conditional model and ignored by an unconditional one. The latent vectors
    come from a CPU ``torch.Generator`` seeded with ``seed``, so the result
    depends only on (model, n, types, sigma, seed), not on ``batch`` or the device
    (up to floating-point differences between devices).
    """
    if n < 0:
        raise HistosynthError(f"n must be >= 0, got {n}")
    if sigma < 0:
        raise HistosynthError(f"sigma must be >= 0, got {sigma}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(int(n), model.latent_dim, generator=gen) * float(sigma)
    return _decode_batches(model, z, types, batch) > threshold


def sample_posterior_shapes(
    model: DVAE,
    n: int,
    types: np.ndarray | None = None,
    seed: int = 0,
    batch: int = 1024,
    threshold: float = 0.5,
    noise: float = 1.0,
) -> np.ndarray:
    """``n`` shapes drawn from the aggregate posterior of the training library, bool (n, size, size).

    Each shape decodes z = mu_i + noise · exp(logvar_i / 2) · eps for a random
    training shape i (of the requested type, when ``types`` is given; any type
    otherwise). The prior N(0, sigma² I) of :func:`sample_shapes` under-draws
    the rarer shapes (elongated spindle nuclei sit in its tails); this follows
    the library's own mix of shapes while still making new ones. Needs a
    ``dvae.pt`` written by :func:`histosynth.masks.dvae.train_dvae` (it stores
    the posterior of every training shape). Deterministic given ``seed``.
    """
    bank = getattr(model, "posterior", None)
    if not bank:
        raise HistosynthError("this DVAE has no stored posterior (load a dvae.pt written by train-dvae)")
    if n < 0:
        raise HistosynthError(f"n must be >= 0, got {n}")
    mu = torch.as_tensor(bank["mu"], dtype=torch.float32)
    std = torch.exp(0.5 * torch.as_tensor(bank["logvar"], dtype=torch.float32))
    bank_types = np.asarray(bank["types"])
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand(int(n), generator=gen, dtype=torch.float64).numpy()
    eps = torch.randn(int(n), model.latent_dim, generator=gen)
    if types is None:
        idx = np.minimum((u * len(mu)).astype(np.int64), len(mu) - 1)
    else:
        want = np.asarray(types).reshape(-1).astype(np.int64)
        if want.size == 1 and n != 1:
            want = np.full(n, want[0])
        if want.size != n:
            raise HistosynthError(f"{want.size} type ids for {n} shapes")
        idx = np.empty(n, dtype=np.int64)
        for t in np.unique(want):
            pool = np.flatnonzero(bank_types == t)
            if not len(pool):
                raise HistosynthError(f"type id {int(t)} has no shape in the DVAE's training library "
                                      f"(it has {sorted(set(bank_types.tolist()))})")
            sel = want == t
            idx[sel] = pool[np.minimum((u[sel] * len(pool)).astype(np.int64), len(pool) - 1)]
    z = mu[idx] + float(noise) * std[idx] * eps
    cond = bank_types[idx] if types is None else want
    return _decode_batches(model, z, cond if model.conditional else None, batch) > threshold
