"""``python -m pipelines.gpu_check``: run the check (see ``pipelines.gpu_check.cli``)."""

import sys

from pipelines.gpu_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
