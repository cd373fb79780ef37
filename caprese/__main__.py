"""`python -m caprese ...` (and `torchrun ... -m caprese ...`): the `caprese` command."""

import sys

from caprese.cli import main

sys.exit(main())
