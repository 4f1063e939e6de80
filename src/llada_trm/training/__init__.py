"""Training: the recipe (`loop`), the objective and the run's masks (`objective`), logging (`metrics`),
validation, the run directory, freezing, resume rules, health checks and the phase-1 feature cache.
This package re-exports nothing: import from the defining module.
"""
