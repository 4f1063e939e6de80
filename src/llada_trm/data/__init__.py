"""GSM8K-style data: records and loaders, the generated tasks, the tokenizer, and SFT/generation batches.
This package re-exports nothing: import from the defining module."""
