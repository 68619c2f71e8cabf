"""The bundle's entry point (scripts/bundle): the `execd` command, as `python -m execd` runs it."""

import sys

from execd.cli import main

if __name__ == "__main__":
    sys.exit(main())
