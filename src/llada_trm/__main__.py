"""`python -m llada_trm ...` is the `llada-trm` command."""

import sys

from llada_trm.cli import main

if __name__ == "__main__":
    sys.exit(main())
