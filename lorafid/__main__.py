"""``python -m lorafid`` is the ``lorafid`` command."""

import sys

from lorafid.cli import main

sys.exit(main())
