"""``python -m histosynth``: the same CLI as the ``histosynth`` command."""

import sys

from histosynth.cli import main

sys.exit(main())
