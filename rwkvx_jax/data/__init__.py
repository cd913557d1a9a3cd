"""Training data: binidx token files, text corpora, sample windows and the grain pipeline."""

from rwkvx_jax.data.binidx import BinIdxError, BinIdxTokens, write_binidx
from rwkvx_jax.data.chat import chat_jsonl_tokens, chat_prompt, encode_chat, split_scored
from rwkvx_jax.data.corpora import (
    DocumentTokenizer,
    jsonl_documents,
    pack_documents,
    stdlib_corpus_tokens,
    stdlib_documents,
    stdlib_source_paths,
)
from rwkvx_jax.data.pipeline import make_train_dataset, make_train_iterator
from rwkvx_jax.data.windows import (
    ORDERS,
    TokenWindows,
    magic_prime,
    magic_prime_window,
    window_order,
)

__all__ = [
    "ORDERS",
    "BinIdxError",
    "BinIdxTokens",
    "DocumentTokenizer",
    "TokenWindows",
    "chat_jsonl_tokens",
    "chat_prompt",
    "encode_chat",
    "jsonl_documents",
    "magic_prime",
    "magic_prime_window",
    "make_train_dataset",
    "make_train_iterator",
    "pack_documents",
    "split_scored",
    "stdlib_corpus_tokens",
    "stdlib_documents",
    "stdlib_source_paths",
    "window_order",
    "write_binidx",
]
