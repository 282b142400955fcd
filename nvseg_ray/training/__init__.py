"""Training and fine-tuning support: data lists, fold splits and label mappings (upstream §8)."""
