"""Helpers for the RKLLM runtime tests: simulator build, model files, a byte-level tokenizer."""
