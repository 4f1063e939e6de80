"""`python -m llada_trm.extras.harness ...` = `llada-trm-lm-eval ...`."""

from .cli import main

main()
