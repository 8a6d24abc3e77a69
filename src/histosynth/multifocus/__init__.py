"""Multi-focus cells (seed "GAN-Based Method for Synthesizing Multi-focus Cell Images"): z-stacks in, MI-GAN.

- :mod:`.stackset` — the on-disk contract of cell stacks (``stacks.npy`` + ``index.csv`` + ``report.json``).
"""
