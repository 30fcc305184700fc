"""Offline tools (preprocess_data, train_tokenizer, inspect_dataset, blend_plan, ...), run as `python -m tools.NAME`."""
