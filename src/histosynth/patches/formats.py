"""The export formats' names, importable without numpy, pandas or OpenCV.

The CLI builds ``histosynth export --format``'s choices from :data:`FORMATS`
when it builds its parser, for every command; :mod:`histosynth.patches.export`
(which describes each format) dispatches on the same tuple.
"""

#: the export formats, in the order the CLI offers them
FORMATS = ("png", "pannuke", "hovernet", "hovernet-mat", "geojson")
