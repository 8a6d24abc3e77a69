"""HoVer-Net: moved to :mod:`histosynth.models.hovernet.net` (split into net / targets / loss / postprocess next)."""

from histosynth.models.hovernet.net import *  # noqa: F401,F403
