"""Megatron "binidx" token files (`prefix.bin` + `prefix.idx`) as RWKV-LM's make_data.py writes.

Layout of `prefix.idx` (all little-endian, no padding):

    offset 0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9   uint64    version, always 1
    offset 17  uint8     dtype code of the .bin tokens (1 uint8, 2 int8, 3 int16, 4 int32,
                         5 int64, 8 uint16; 6 and 7 are float types, not token types)
    offset 18  uint64    number of items N (make_data writes one item per document)
    offset 26  uint64    number of doc_idx entries M (N + 1: [0, 1, ..., N])
    offset 34  int32[N]  item sizes in tokens
               int64[N]  byte offset of each item in .bin
               int64[M]  doc_idx: item index where each document starts, then N

`prefix.bin` is the items' tokens back to back in the dtype above. make_data.py appends the
end-of-document token 0 to every document, so the .bin is one flat stream of documents each
ending in 0, which is how the trainer reads it (the item boundaries are not used for sampling).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8

# Megatron's dtype codes restricted to integer types (6 and 7 are float64/float32 in Megatron).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    8: np.dtype("<u2"),
}


class BinIdxError(ValueError):
    """A binidx file pair is malformed; the message names the file and what was expected."""


def _dtype_code(dtype: np.dtype) -> int:
    dtype = np.dtype(dtype).newbyteorder("<")
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    names = ", ".join(str(d) for d in DTYPE_CODES.values())
    raise ValueError(f"binidx token dtype {dtype} is not one of {names}")


def _checked_tokens(document: Sequence[int], index: int, dtype: np.dtype) -> np.ndarray:
    if isinstance(document, (bytes, bytearray, memoryview)):
        document = np.frombuffer(document, dtype=np.uint8)  # bytes are byte-level token ids
    tokens = np.asarray(document)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise ValueError(
            f"document {index}: expected a 1-D sequence of integer token ids, got "
            f"shape {tokens.shape} dtype {tokens.dtype}"
        )
    info = np.iinfo(dtype)
    if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
        raise ValueError(
            f"document {index}: token ids span [{tokens.min()}, {tokens.max()}], outside "
            f"[{info.min}, {info.max}] of the .bin dtype {dtype}"
        )
    return tokens.astype(dtype)


def _index_bytes(sizes: np.ndarray, dtype: np.dtype) -> bytes:
    num_items = len(sizes)
    pointers = np.zeros(num_items, dtype="<i8")
    np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(num_items + 1, dtype="<i8")
    header = MAGIC + struct.pack("<QBQQ", VERSION, _dtype_code(dtype), num_items, len(doc_idx))
    return header + sizes.astype("<i4").tobytes() + pointers.tobytes() + doc_idx.tobytes()


def write_binidx(
    prefix: str | os.PathLike,
    documents: Iterable[Sequence[int]],
    dtype: np.dtype | type = np.uint16,
) -> int:
    """Writes documents to `prefix.bin` and `prefix.idx`, one item per document.

    Tokens are written exactly as given: to match make_data.py, each document should already end
    with the end-of-document token 0 (`jsonl_documents` and `stdlib_documents` do). Both files are
    written to temporary siblings and renamed into place, so a failure leaves no partial pair.

    Args:
      prefix: path without the `.bin`/`.idx` suffix; its directory must exist.
      documents: token-id sequences (or `bytes`, read as byte tokens), streamed: never all held
        in memory.
      dtype: token dtype of the .bin file; uint16 holds the 65,536-entry RWKV World vocabulary.

    Returns:
      The total number of tokens written.

    Raises:
      ValueError: a document is not 1-D integers, or holds ids that do not fit `dtype`.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    _dtype_code(dtype)  # fail before writing anything
    prefix = os.fspath(prefix)
    directory, name = os.path.split(os.path.abspath(prefix))
    temp_paths = []
    try:
        sizes = []
        fd, bin_temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".bin.tmp")
        temp_paths.append(bin_temp)
        with os.fdopen(fd, "wb") as bin_file:
            for index, document in enumerate(documents):
                tokens = _checked_tokens(document, index, dtype)
                if tokens.size >= 2**31:
                    raise ValueError(f"document {index}: {tokens.size} tokens exceed int32 sizes")
                bin_file.write(tokens.tobytes())
                sizes.append(tokens.size)
        fd, idx_temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".idx.tmp")
        temp_paths.append(idx_temp)
        sizes = np.asarray(sizes, dtype=np.int64)
        with os.fdopen(fd, "wb") as idx_file:
            idx_file.write(_index_bytes(sizes, dtype))
        os.replace(bin_temp, prefix + ".bin")
        os.replace(idx_temp, prefix + ".idx")
        temp_paths.clear()
        return int(sizes.sum())
    finally:
        for path in temp_paths:
            if os.path.exists(path):
                os.remove(path)


class BinIdxTokens:
    """Memory-mapped flat token stream of a binidx pair: all documents back to back.

    Supports `len()` (total tokens), integer indexing and slicing (numpy views of the map, in the
    file's dtype) and `np.asarray`. Pickles by path, so it can cross process boundaries.

    Args:
      prefix: path without the `.bin`/`.idx` suffix.

    Raises:
      FileNotFoundError: either file is missing.
      BinIdxError: bad magic, version or dtype code, or an .idx/.bin size that disagrees with the
        header (a truncated or foreign file).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        self.dtype, num_items, num_doc_idx = self._read_header(idx_path)
        expected_idx_bytes = HEADER_BYTES + num_items * (4 + 8) + num_doc_idx * 8
        idx_bytes = os.path.getsize(idx_path)
        if idx_bytes != expected_idx_bytes:
            raise BinIdxError(
                f"{idx_path}: {idx_bytes} bytes, expected {expected_idx_bytes} for {num_items} "
                f"items and {num_doc_idx} doc_idx entries (truncated or corrupt index)"
            )
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sizes = self._index_array(index, "<i4", HEADER_BYTES, num_items)
        self.pointers = self._index_array(index, "<i8", HEADER_BYTES + 4 * num_items, num_items)
        self.doc_idx = self._index_array(index, "<i8", HEADER_BYTES + 12 * num_items, num_doc_idx)
        expected_bin_bytes = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != expected_bin_bytes:
            state = "is truncated" if bin_bytes < expected_bin_bytes else "has trailing bytes"
            raise BinIdxError(
                f"{bin_path}: {bin_bytes} bytes, expected {expected_bin_bytes} "
                f"({expected_bin_bytes // self.dtype.itemsize} {self.dtype} tokens per "
                f"{idx_path}); the .bin {state}"
            )
        if bin_bytes:
            self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:  # mmap refuses empty files
            self._tokens = np.zeros(0, dtype=self.dtype)

    @staticmethod
    def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[: len(MAGIC)] != MAGIC:
            raise BinIdxError(
                f"{idx_path}: magic {header[: len(MAGIC)]!r}, expected {MAGIC!r} "
                "(not a Megatron MMIDIDX index)"
            )
        if len(header) < HEADER_BYTES:
            raise BinIdxError(
                f"{idx_path}: {len(header)}-byte header, expected {HEADER_BYTES} (truncated)"
            )
        version, code, num_items, num_doc_idx = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise BinIdxError(f"{idx_path}: version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise BinIdxError(
                f"{idx_path}: dtype code {code}, expected an integer token type "
                f"{sorted(DTYPE_CODES)} ({', '.join(map(str, DTYPE_CODES.values()))})"
            )
        return DTYPE_CODES[code], num_items, num_doc_idx

    @staticmethod
    def _index_array(index, dtype: str, offset: int, count: int) -> np.ndarray:
        if not count:
            return np.zeros(0, dtype=dtype)
        return np.frombuffer(index, dtype=dtype, count=count, offset=offset)

    @property
    def num_documents(self) -> int:
        """Number of items in the index (one per document for make_data.py files)."""
        return len(self.sizes)

    def document(self, index: int) -> np.ndarray:
        """Tokens of item `index` (including its end-of-document token), a view of the map."""
        start = int(self.pointers[index]) // self.dtype.itemsize
        return self._tokens[start : start + int(self.sizes[index])]

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, key):
        return self._tokens[key]

    def __array__(self, dtype=None, copy=None):
        if dtype is None or np.dtype(dtype) == self.dtype:
            return np.array(self._tokens, copy=True) if copy else self._tokens
        return self._tokens.astype(dtype)

    def __reduce__(self):
        return type(self), (self.prefix,)

    def __repr__(self) -> str:
        return f"BinIdxTokens({self.prefix!r}: {len(self)} {self.dtype} tokens)"
