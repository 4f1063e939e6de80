"""Training: the recipe (`loop`: setup, the step, the optimiser, the run's state), the objective and the run's
masks (`objective`), what is logged (`metrics`), validation, the run directory, freezing, resume rules, health
checks, the phase-1 feature cache and sampler states. Checkpoint files are `llada_trm.run_checkpoint`.

Import names from the module that defines them (`from llada_trm.training.loop import Trainer, run_train`);
this package re-exports nothing.
"""
