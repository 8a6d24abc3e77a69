"""histosynth: synthetic (H&E image, nuclei mask) pairs from a few annotated slides."""

__version__ = "0.1.0"
