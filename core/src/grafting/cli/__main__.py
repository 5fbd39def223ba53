"""``python -m grafting.cli``: the same as the ``grafting`` command."""

import sys

from grafting.cli import main

sys.exit(main())
