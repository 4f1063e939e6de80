"""Backbone + recursive refiner: chunked selective refinement with per-chunk halting (`hybrid.model`; its
settings in `hybrid.config`). This package re-exports nothing: import from the defining module."""
