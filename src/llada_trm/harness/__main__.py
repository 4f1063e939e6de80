"""`python -m llada_trm.harness ...` = `llada-trm-lm-eval ...`."""

from .cli import main

main()
