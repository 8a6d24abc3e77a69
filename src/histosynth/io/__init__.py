"""Input/output at the edges: slides, annotations, patch sets."""
