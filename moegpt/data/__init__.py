"""Data pipeline: tokenizer, text/code sources, cached tokenization and packing, resumable sampler."""

from moegpt.data.dataset import (
    BlockView,
    MixtureData,
    build_mixture,
    cache_path,
    load_tokens,
    source_fingerprint,
    split_blocks,
    tokenize_source,
)
from moegpt.data.sampler import MixtureSampler, draws_per_source
from moegpt.data.sources import (
    Source,
    default_mixture,
    files_source,
    iter_documents,
    parse_mixture,
    shakespeare_source,
    stdlib_code_source,
)
from moegpt.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "BlockView",
    "MixtureData",
    "MixtureSampler",
    "Source",
    "Tokenizer",
    "build_mixture",
    "cache_path",
    "default_mixture",
    "draws_per_source",
    "files_source",
    "iter_documents",
    "load_tokens",
    "parse_mixture",
    "shakespeare_source",
    "source_fingerprint",
    "split_blocks",
    "stdlib_code_source",
    "tokenize_source",
]
