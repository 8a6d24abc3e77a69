"""Networks only, written to be read top to bottom, plus their checkpoint files.

- :mod:`histosynth.models.dvae` — the β-VAE (DVAE) of nucleus shapes.
- :mod:`histosynth.models.pix2pix` — the Optional pix2pix discriminators, losses and GAN checkpoints.
- :mod:`histosynth.models.generators` — the mask → H&E generators by name (``gan.generator``):
  :mod:`~histosynth.models.unet` (the pix2pix U-Net), :mod:`~histosynth.models.pix2pixhd`,
  :mod:`~histosynth.models.spade`; what they share is in :mod:`~histosynth.models.gan_layers`.
- :mod:`histosynth.models.hovernet` — HoVer-Net: ``net`` (the network), ``targets``, ``loss``, ``postprocess``.
- :mod:`histosynth.models.checkpoint` — atomic checkpoint writes and the one ``weights_only`` reader.

Nothing here imports a stage: models sit below every stage family (tests/test_layers.py).
"""
