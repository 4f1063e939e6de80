"""Masked diffusion: LLaDA's forward process and its loss (`diffusion.forward_process`) and its sampler
(`diffusion.sampler`). This package re-exports nothing: import from the defining module."""
