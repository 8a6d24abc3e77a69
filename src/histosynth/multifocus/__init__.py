"""Multi-focus cells (seed "GAN-Based Method for Synthesizing Multi-focus Cell Images"): z-stacks in, MI-GAN.

- :mod:`.stackset` — the on-disk contract of cell stacks (``stacks.npy`` + ``index.csv`` + ``report.json``).
- :mod:`.zstack` — open a multi-plane slide (OME-TIFF with a Z axis, NDPI focal planes), read every plane.
- :mod:`.demo` — demo cytology z-stacks (Gaussian defocus PSF), ``histosynth demo-zstack``.
- :mod:`.stacks` — cells, best-focus planes and size x size x Z stacks, ``histosynth extract-stacks``.
- :mod:`.evaluate` — generated vs real stacks: FID / KID per focal plane, focus curve, outline consistency,
  each beside a real-vs-real floor, ``histosynth evaluate-stacks``.
- :mod:`.baselines` — the copy and blur baseline stack sets, ``histosynth stack-baselines``.
"""
