"""`caprese` under torchrun, with one rank killed on request (tests/test_distributed.py).

    torchrun ... tests/dist_job.py caprese-arguments...

With KILL_RANK and KILL_AT set, rank KILL_RANK SIGKILLs itself as it collates its
KILL_AT-th training micro-batch: a rank lost in the middle of the E2E stage.
"""

from __future__ import annotations

import os
import signal
import sys

import caprese.distillation.trainer as trainer
from caprese.cli import main

if os.environ.get("KILL_RANK") == os.environ.get("RANK", "0"):
    collate, calls = trainer.collate, [0]

    def dying_collate(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return collate(*args, **kwargs)

    trainer.collate = dying_collate
sys.exit(main(sys.argv[1:]))
