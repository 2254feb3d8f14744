"""``python -m lorafid`` is the ``lorafid`` command.

Run from the folder that holds a clone named ``lorafid``, Python takes that clone (a folder
without ``__init__.py``) for a namespace package called ``lorafid`` and imports nothing from
it. When that happened, the package this file belongs to is put first on the path instead.
"""

import sys
from pathlib import Path

if getattr(sys.modules.get("lorafid"), "__file__", None) is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for name in [n for n in sys.modules if n == "lorafid" or n.startswith("lorafid.")]:
        del sys.modules[name]

from lorafid.cli.commands import main  # after the path fix above

sys.exit(main())
