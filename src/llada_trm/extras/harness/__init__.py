"""lm-evaluation-harness integration: the `llada_trm` model and the offline `gsm8k_local` task.

Needs the optional extra (`pip install 'llada-trm[eval]'`). lm-eval 0.4.13 discovers no external models (it
has no plugin entry-point group), so the model is registered when `llada_trm.extras.harness.model` is
imported: `llada-trm-lm-eval` (= `python -m llada_trm.extras.harness`) is lm-eval's own CLI (`harness.cli`)
with that import done and the packaged tasks on `--include_path`. `likelihood` (LLaDA's Monte-Carlo
log-likelihood) and `tasks` (the offline GSM8K task) import without lm-eval. See docs/lm_eval.md.
"""
