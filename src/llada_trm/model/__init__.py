"""The model: the LLaDA backbone, the refiners and the hybrid that joins them, with their weights on disk
(docs/architecture.md lists the modules). This package re-exports nothing: import from the defining module.
"""
