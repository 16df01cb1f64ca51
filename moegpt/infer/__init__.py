"""Inference: KV caches, sampling and generation."""
