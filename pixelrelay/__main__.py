"""``python -m pixelrelay ...`` is the ``pixelrelay`` command."""

import sys

from pixelrelay.producer.cli import main

sys.exit(main())
