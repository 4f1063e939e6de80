"""Atomic result files (`llada_trm.io`): an interrupted evaluation leaves the previous file or none, never a
truncated JSON that a later `plot` or comparison would misread."""

from __future__ import annotations

from llada_trm.io import write_json, write_jsonl, write_text_atomic

__all__ = ["write_json", "write_jsonl", "write_text_atomic"]
