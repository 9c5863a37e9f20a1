"""Inference: text generation from a checkpoint."""
