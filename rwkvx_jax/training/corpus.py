"""The flat token stream a training run reads, from its `DataConfig.corpus`."""

from __future__ import annotations

import os

import numpy as np

from rwkvx_jax.data import (
    BinIdxTokens,
    chat_jsonl_tokens,
    jsonl_documents,
    pack_documents,
    stdlib_corpus_tokens,
)
from rwkvx_jax.tokenizer import WORLD_VOCAB_SIZE, ByteTokenizer, Tokenizer, tokenizer_for_vocab
from rwkvx_jax.training.config import DataConfig, TrainConfigError


def load_corpus(data: DataConfig, vocab_size: int):
    """The flat token stream of `data.corpus` (see `DataConfig`); chat records come as signed
    tokens (`rwkvx_jax.data.chat.split_scored`)."""
    corpus = data.corpus
    if corpus == "stdlib":
        if vocab_size < 256:
            raise TrainConfigError(
                f"data.corpus='stdlib' is bytes, but model.vocab_size={vocab_size}"
            )
        return stdlib_corpus_tokens(data.max_tokens)
    if corpus.endswith(".jsonl"):
        if not os.path.isfile(corpus):
            raise TrainConfigError(f"data.corpus={corpus!r}: no such jsonl file")
        tokenizer = _tokenizer(data.tokenizer, vocab_size)
        if data.records == "chat":
            # Signed tokens: the loss mask rides along; one conversation per window
            # (`rwkvx_jax.data.chat`).
            tokens = chat_jsonl_tokens(corpus, tokenizer, data.ctx)
            return tokens[: data.max_tokens] if data.max_tokens else tokens
        documents = jsonl_documents(corpus, tokenizer, data.jsonl_field)
        tokens = pack_documents(documents, np.int32)
        return tokens[: data.max_tokens] if data.max_tokens else tokens
    if not (os.path.isfile(corpus + ".bin") and os.path.isfile(corpus + ".idx")):
        raise TrainConfigError(
            f"data.corpus={corpus!r}: expected 'stdlib', a .jsonl file, or a binidx prefix with "
            f"{corpus}.bin and {corpus}.idx (RWKV-LM make_data output); not found"
        )
    return BinIdxTokens(corpus)


def _tokenizer(name: str, vocab_size: int) -> Tokenizer:
    """`DataConfig.tokenizer`: "bytes", "world", or "auto" (the one of the model's vocabulary)."""
    if name == "bytes":
        return ByteTokenizer()
    return tokenizer_for_vocab(WORLD_VOCAB_SIZE if name == "world" else vocab_size)
