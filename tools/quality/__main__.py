"""python -m tools.quality --help"""

import sys

from tools.quality.run import main

if __name__ == "__main__":  # spawned workers import this module again: only the command runs main
    sys.exit(main())
