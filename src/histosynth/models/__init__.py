"""Networks: one module per model family, written to be read top to bottom.

- :mod:`histosynth.models.dvae` — the β-VAE (DVAE) of nucleus shapes.
"""
