"""Model directories (HF Mixtral format) and training checkpoints."""
