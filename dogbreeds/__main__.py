"""`python -m dogbreeds ...`: the same as the `dogbreeds` command."""

import sys

from dogbreeds.cli import main

sys.exit(main())
