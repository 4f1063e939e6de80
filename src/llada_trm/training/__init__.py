"""Training: the recipe (`loop`: setup, the loop, its state), the objective and the run's masks
(`objective`), AdamW, the schedule and the EMA (`optim`), what is logged (`metrics`), validation, the run
directory, checkpoint files, freezing and LoRA, health checks, the phase-1 feature cache and sampler states.

Import names from the module that defines them (`from llada_trm.training.loop import Trainer, run_train`);
this package re-exports nothing.
"""
