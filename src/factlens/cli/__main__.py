"""``python -m factlens.cli`` (e.g. under ``torchrun``)."""

import sys

from factlens.cli import main

sys.exit(main())
