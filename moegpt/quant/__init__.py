"""Weight-only quantization (int8 per channel, int4 per group): the schemes and their pure
quantize / dequantize functions (scheme.py), and quantized weights in a plain model (model.py)."""
