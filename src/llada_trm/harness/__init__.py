"""lm-evaluation-harness integration: the `llada_trm` model and the offline `gsm8k_local` task.

Needs the optional extra (`pip install 'llada-trm[eval]'`). lm-eval 0.4.13 discovers no external models (it
has no plugin entry-point group), so the model is registered when `llada_trm.harness.model` is imported:
`llada-trm-lm-eval` (= `python -m llada_trm.harness`) is lm-eval's own CLI with that import done and the
packaged tasks on `--include_path`. `likelihood` and `tasks` import without lm-eval. See docs/lm_eval.md.
"""

from __future__ import annotations

from .likelihood import greedy_matches, masked_counts, mc_log_likelihood, random_masks
from .tasks import DATA_ENV_VAR, DATA_METADATA_KEY, load_gsm8k_local, resolve_data_path, tasks_dir

__all__ = [
    "DATA_ENV_VAR",
    "DATA_METADATA_KEY",
    "greedy_matches",
    "load_gsm8k_local",
    "masked_counts",
    "mc_log_likelihood",
    "random_masks",
    "resolve_data_path",
    "tasks_dir",
]
