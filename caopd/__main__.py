"""``python -m caopd``: the command line, also what ``torchrun ... -m caopd train ...`` launches."""
import sys

from caopd.cli import main

sys.exit(main())
