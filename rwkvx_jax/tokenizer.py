"""Tokenizers: RWKV World (greedy longest byte match), byte-level, and streaming decode."""

from __future__ import annotations

import ast
import codecs
import contextlib
import functools
import gc
import importlib.resources
import numbers
import os
import re
from collections.abc import Iterable, Sequence

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536
BYTE_VOCAB_SIZE = 256
END_OF_DOCUMENT = 0

_ENCODE_CHUNK_BYTES = 1 << 20  # bounds the list of matched pieces held at once
_TERMINAL = -1  # trie key marking "a token ends here"


class VocabError(ValueError):
    """A vocabulary file is malformed; the message names the file and line."""


def load_world_vocab(path: str | os.PathLike | None = None) -> dict[int, bytes]:
    """Reads an RWKV World vocabulary file without executing it.

    Each line is `id repr(token) byte_length`, the token a Python str or bytes literal (str
    tokens stand for their UTF-8 bytes). Literals are parsed with `ast.literal_eval`.

    Args:
      path: the vocabulary file; defaults to the copy shipped in `rwkvx_jax/assets/`.

    Returns:
      {token id: token bytes} for ids 1..65535 present in the file.

    Raises:
      VocabError: naming the file and line of a bad id, literal, length, or duplicate, or a
        single byte that has no token (greedy matching needs all 256).
    """
    if path is None:
        resource = importlib.resources.files(__package__) / "assets" / WORLD_VOCAB_FILE
        name, text = str(resource), resource.read_text(encoding="utf-8")
    else:
        name = os.fspath(path)
        with open(name, encoding="utf-8") as f:
            text = f.read()
    vocab: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        token_id, token = _parse_vocab_line(line.rstrip("\r"), f"{name}:{line_number}")
        if token_id in vocab:
            raise VocabError(f"{name}:{line_number}: token id {token_id} appears twice")
        if token in seen:
            raise VocabError(
                f"{name}:{line_number}: token {token!r} already has id {seen[token]}; "
                "greedy matching needs each byte string once"
            )
        vocab[token_id] = token
        seen[token] = token_id
    missing = [byte for byte in range(256) if bytes([byte]) not in seen]
    if missing:
        raise VocabError(
            f"{name}: no single-byte token for byte(s) {', '.join(f'0x{b:02x}' for b in missing)}; "
            "every byte needs one so that any input can be encoded"
        )
    return vocab


def _parse_vocab_line(line: str, where: str) -> tuple[int, bytes]:
    id_field, _, rest = line.partition(" ")
    literal, _, length_field = rest.rpartition(" ")
    if not literal:
        raise VocabError(f"{where}: expected `id repr(token) length`, got {line!r}")
    try:
        token_id, length = int(id_field), int(length_field)
    except ValueError:
        raise VocabError(f"{where}: id and length must be integers, got {line!r}") from None
    if not 1 <= token_id < WORLD_VOCAB_SIZE:
        raise VocabError(f"{where}: token id {token_id} is outside [1, {WORLD_VOCAB_SIZE})")
    try:
        token = ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise VocabError(f"{where}: token is not a str or bytes literal: {literal!r} ({e})") from e
    if isinstance(token, str):
        try:
            token = token.encode("utf-8")
        except UnicodeEncodeError as e:
            raise VocabError(f"{where}: token {literal} has no UTF-8 encoding ({e})") from e
    elif not isinstance(token, bytes):
        raise VocabError(f"{where}: token must be a str or bytes literal, got {literal!r}")
    if len(token) != length:
        raise VocabError(
            f"{where}: token {literal} is {len(token)} bytes but the line says {length}"
        )
    if not token:
        raise VocabError(f"{where}: token {token_id} is empty")
    return token_id, token


def _id_list(ids: int | Iterable[int]) -> list[int]:
    if isinstance(ids, numbers.Integral):
        return [int(ids)]
    if hasattr(ids, "tolist"):  # numpy / jax arrays: one C call instead of per-element scalars
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else ids
    return ids if isinstance(ids, list) else list(ids)


class Tokenizer:
    """Shared decoding for table-driven tokenizers; subclasses supply `encode_bytes`.

    Attributes:
      vocab_size: number of token ids; valid ids are [0, vocab_size).
      end_of_document: the id separating documents in training data (0).
    """

    vocab_size: int
    end_of_document: int = END_OF_DOCUMENT

    def __init__(self, id_to_bytes: Sequence[bytes]):
        self._id_to_bytes = list(id_to_bytes)
        self.vocab_size = len(self._id_to_bytes)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of a byte string (any bytes, not only UTF-8)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes.

        Raises:
          TypeError: text is not a str.
          UnicodeEncodeError: text holds lone surrogates (no UTF-8 form).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}; use encode_bytes()")
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids: int | Iterable[int]) -> bytes:
        """The bytes of a token id sequence, concatenated.

        Raises:
          ValueError: an id is outside [0, vocab_size); names the id and its position.
        """
        ids = _id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            position, bad = next((i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size)
            raise ValueError(
                f"token id {bad} at position {position} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        return b"".join(map(self._id_to_bytes.__getitem__, ids))

    def decode(self, ids: int | Iterable[int]) -> str:
        """Text of a token id sequence; bytes that are not valid UTF-8 become U+FFFD.

        Raises:
          ValueError: an id is outside [0, vocab_size).
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder for ids that arrive one (or a few) at a time."""
        return StreamingDecoder(self)


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer: greedy longest match over a 65,536-entry byte vocabulary.

    Id 0 is end-of-document and decodes to nothing; ids 1..65529 come from the vocabulary file,
    and ids the file does not use (65530..65535 for `rwkv_vocab_v20230424.txt`) also decode to
    nothing, so `decode` accepts any id a 65,536-way head can emit.

    Encoding runs in the `re` engine: the vocabulary trie is written as a regular expression
    in which every node lists its continuations (distinct first bytes, so at most one can go on)
    and, where a token ends, an empty alternative last. The engine therefore descends as far as
    the input follows the trie and backs up to the deepest token end: the longest match. The
    pattern is compiled on first use (about a second), so decode-only users never pay for it.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        """Loads the vocabulary.

        Args:
          vocab_path: an RWKV World vocabulary file; defaults to the one shipped with rwkvx_jax.
        """
        vocab = load_world_vocab(vocab_path)
        table = [b""] * WORLD_VOCAB_SIZE
        for token_id, token in vocab.items():
            table[token_id] = token
        super().__init__(table)
        self._token_ids = {token: token_id for token_id, token in vocab.items()}
        self._max_token_bytes = max(map(len, vocab.values()))
        self._chunk_bytes = _ENCODE_CHUNK_BYTES

    @functools.cached_property
    def _matcher(self) -> re.Pattern[bytes]:
        with _gc_paused():
            return re.compile(_longest_match_pattern(self._token_ids))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of a byte string: at each position, the longest vocabulary token there.

        Raises:
          TypeError: data is a str (use `encode`).
        """
        if isinstance(data, str):
            raise TypeError("encode_bytes() takes bytes, got str; use encode()")
        data = bytes(data)
        findall, token_id = self._matcher.findall, self._token_ids.__getitem__
        ids: list[int] = []
        start, size, chunk = 0, len(data), self._chunk_bytes
        while size - start > chunk:
            end = start + chunk
            pieces = findall(data, start, end)
            # A match that began within max_token_bytes of `end` may have been cut short by it:
            # drop those and match again from the first of them.
            kept, tail = len(pieces), 0
            while tail + len(pieces[kept - 1]) < self._max_token_bytes:
                kept -= 1
                tail += len(pieces[kept])
            del pieces[kept:]
            ids.extend(map(token_id, pieces))
            start = end - tail
        ids.extend(map(token_id, findall(data, start)))
        return ids


@contextlib.contextmanager
def _gc_paused():
    # Parsing the ~250 kB pattern makes about a million short-lived parser objects; cyclic GC
    # passes over them (none are cycles) more than double the compile time.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _longest_match_pattern(tokens: Iterable[bytes]) -> bytes:
    """A bytes regex whose leftmost match at any position is the longest token there."""
    root: dict = {}
    for token in tokens:
        node = root
        for byte in token:
            node = node.setdefault(byte, {})
        node[_TERMINAL] = True
    leaf = {_TERMINAL: True}

    subtree_tokens: dict[int, int] = {}

    def count(node: dict) -> int:
        total = sum(count(child) for key, child in node.items() if key != _TERMINAL)
        subtree_tokens[id(node)] = total + (_TERMINAL in node)
        return subtree_tokens[id(node)]

    def escaped(byte: int) -> bytes:
        return re.escape(bytes([byte]))

    def continuation(node: dict) -> bytes:
        # Busiest branches first: the engine tries alternatives in order, and subtree size is a
        # fair proxy for how often a branch is taken.
        children = sorted(
            ((key, child) for key, child in node.items() if key != _TERMINAL),
            key=lambda item: (-subtree_tokens[id(item[1])], item[0]),
        )
        branches = [
            escaped(byte) + continuation(child) for byte, child in children if child != leaf
        ]
        # Continuations that complete a token and go no further share one character set.
        last_bytes = [escaped(byte) for byte, child in children if child == leaf]
        if len(last_bytes) > 1:
            branches.append(b"[" + b"".join(last_bytes) + b"]")
        elif last_bytes:
            branches.append(last_bytes[0])
        if not branches:
            return b""
        if _TERMINAL in node:
            if len(branches) == 1 and last_bytes:  # one byte or one set: an optional atom
                return branches[0] + b"?"
            return b"(?:" + b"|".join(branches) + b"|)"
        return branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"

    count(root)
    return continuation(root)


class ByteTokenizer(Tokenizer):
    """Bytes as tokens, for tiny models with a 256-entry vocabulary: id = byte value.

    `end_of_document` is 0, the same id as the NUL byte, which does not occur in text corpora;
    `decode` maps every id, 0 included, back to its byte, so any byte string round-trips.
    """

    def __init__(self):
        """Builds the 256-entry table."""
        super().__init__([bytes([byte]) for byte in range(BYTE_VOCAB_SIZE)])

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of a byte string: its byte values.

        Raises:
          TypeError: data is a str (use `encode`).
        """
        if isinstance(data, str):
            raise TypeError("encode_bytes() takes bytes, got str; use encode()")
        return list(bytes(data))


class StreamingDecoder:
    """Turns token ids into text as they arrive, never splitting a multi-byte UTF-8 character.

    Bytes that may still become a valid character are held back until the next `push` (or
    `flush`); bytes that cannot become one are emitted as U+FFFD. The pieces returned by
    `push` calls and a final `flush` concatenate to `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        """Starts an empty stream.

        Args:
          tokenizer: supplies the id -> bytes table.
        """
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Adds one id or a sequence of ids; returns the text they complete (may be empty).

        Raises:
          ValueError: an id is outside the tokenizer's vocabulary.
        """
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Ends the stream: returns held-back bytes (as U+FFFD, they were incomplete)."""
        return self._utf8.decode(b"", final=True)


@functools.cache
def tokenizer_for_vocab(vocab_size: int) -> Tokenizer:
    """The tokenizer for a model's vocabulary size (one shared instance per size).

    Args:
      vocab_size: the model's embedding rows: 65536 (RWKV World) or 256 (bytes).

    Raises:
      ValueError: no tokenizer for that size; names the supported ones.
    """
    if vocab_size == WORLD_VOCAB_SIZE:
        return WorldTokenizer()
    if vocab_size == BYTE_VOCAB_SIZE:
        return ByteTokenizer()
    raise ValueError(
        f"no tokenizer for vocab_size={vocab_size}; supported: {WORLD_VOCAB_SIZE} (RWKV World, "
        f"{WORLD_VOCAB_FILE}), {BYTE_VOCAB_SIZE} (bytes)"
    )
