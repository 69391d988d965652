"""``python3 -m bluegreen.cli``: bluegreenctl (as bluegreen.service's ExecReload= runs it)."""

import sys

from bluegreen.cli import main

sys.exit(main())
