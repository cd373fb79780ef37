import sys

from caprese.cli import main

sys.exit(main())
