"""Where training stages run: CUDA when visible (or asked for), else the CPU.

Every GPU rule passes its ``threads`` and the config's ``device`` here, so a
job never uses more cores than Snakemake gave it.
"""

from __future__ import annotations

import logging
import os

from histosynth.errors import HistosynthError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def select_device(requested: str = "auto", threads: int | None = None):
    """A ``torch.device`` for ``requested`` ('auto', 'cpu' or 'cuda'); sets torch's CPU threads.

    'cuda' when no GPU is visible is an error, not a silent fall-back.
    """
    import torch

    if requested not in DEVICES:
        raise HistosynthError(f"device must be one of {DEVICES}, got {requested!r}")
    if threads is not None:
        if threads < 1:
            raise HistosynthError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise HistosynthError(
            "device 'cuda' was requested but no CUDA GPU is visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "use device: auto or cpu"
        )
    device = torch.device("cuda" if (cuda and requested != "cpu") else "cpu")
    log.info("device %s (requested %s, threads %s)", device, requested, torch.get_num_threads())
    return device
