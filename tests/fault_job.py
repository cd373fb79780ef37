"""Run a `caprese` command and SIGKILL it at its k-th file commit (tests/test_faults.py).

    python tests/fault_job.py KILL_AT COUNT_FILE caprese-arguments...

Every atomic write ends in os.replace; this wraps it so that the KILL_AT-th call kills the
process just before the finished temporary file is renamed into place (0: never). The number
of commits the run made is written to COUNT_FILE when it ends normally.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from caprese.cli import main

kill_at, count_file, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
real_replace = os.replace
commits = 0


def replace(source, target):
    global commits
    commits += 1
    if commits == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)


os.replace = replace
code = main(argv)
count_file.write_text(str(commits))
sys.exit(code)
