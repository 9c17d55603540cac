"""``python -m pipelines.benchmark``: run the command line (see ``pipelines.benchmark.cli``)."""

import sys

from pipelines.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
