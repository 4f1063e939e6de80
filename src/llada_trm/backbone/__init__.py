"""The native LLaDA backbone: config, model, and Hugging Face-layout checkpoints with LLaDA's key names.

This package re-exports nothing: import from the defining module (`backbone.modeling`, `backbone.config`,
`backbone.checkpoint`)."""
