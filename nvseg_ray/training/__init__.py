"""Training and fine-tuning support: data lists, fold splits and label mappings.

The recipe and where it differs from upstream: docs/upstream.md, Training and evaluation.
"""
