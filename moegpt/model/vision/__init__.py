"""Flamingo-style vision for moegpt: an image tower, a Perceiver resampler and gated cross-attention,
joined to a text model from outside by ``add_vision``."""
