"""``histosynth serve RESULTS_DIR``: a local page to paint tissue on demand.

Draw nuclei (or sample a mask from the fitted statistics, or upload one), pick a style and a generator
checkpoint, see the H&E beside the mask and an overlay, and download the pair. :mod:`.run` loads the
run's models, :mod:`.masks` turns drawings and uploads into masks, :mod:`.app` is the Starlette app;
the page itself (vanilla JS, no CDN) is in ``static/``. Nothing imports this package but the CLI.
"""
