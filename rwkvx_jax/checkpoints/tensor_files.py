"""Reading official `.pth` files without running pickled code; writing `.pth` and safetensors.

A `.pth` saved by `torch.save` is a zip holding `data.pkl` (a pickle describing tensors) and one
raw little-endian file per storage. The reader below unpickles `data.pkl` with an allow-list of
exactly the globals a state dict of tensors needs, and builds numpy arrays from the storages;
anything else in the pickle (a class, a function, an `os.system` call) is refused before it can
run. No torch is needed to read. Writing `.pth` uses torch (the format's owner); safetensors is
written directly, so bf16 needs no torch either.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from rwkvx_jax.atomic_files import write_atomically


class CheckpointFormatError(ValueError):
    """A checkpoint file is unreadable, unsafe or not what was expected; says which and why."""


_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands in for `torch.<X>Storage` inside the pickle: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Safe stand-in for `torch._utils._rebuild_tensor_v2`: a strided view, copied."""
    del unused  # requires_grad, backward hooks, metadata: irrelevant for weights.
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointFormatError(f"tensor with negative size {size} or stride {stride}")
    if size and min(size) == 0:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if storage_offset < 0 or last >= storage.size:
        raise CheckpointFormatError(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} reads past its "
            f"storage of {storage.size} elements (file truncated or corrupt)"
        )
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    del requires_grad, backward_hooks, unused
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointFormatError(
            f"{self._path}: the pickle references {module}.{name}, which a state dict of "
            "tensors never needs; refusing to load it (it could run code). Expected only "
            "tensors, storages and OrderedDict."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._path}: storage of unknown type {storage_type!r}")
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError as err:
                raise CheckpointFormatError(f"{self._path}: missing storage {member}") from err
            except (zipfile.BadZipFile, EOFError, OSError) as err:
                raise CheckpointFormatError(f"{self._path}: cannot read {member}: {err}") from err
            dtype = storage_type.dtype
            if len(raw) < int(numel) * dtype.itemsize:
                raise CheckpointFormatError(
                    f"{self._path}: storage {member} holds {len(raw)} bytes, expected "
                    f"{int(numel) * dtype.itemsize} (file truncated?)"
                )
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=int(numel))
        return self._storages[key]


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a `torch.save`d state dict as numpy arrays, without executing pickled code.

    Args:
      path: a `.pth` file in PyTorch's zip format (torch >= 1.6).

    Returns:
      key -> numpy array (bf16 as `ml_dtypes.bfloat16`), in the file's order.

    Raises:
      CheckpointFormatError: the file is missing, truncated, not a zip-format `.pth`, big-endian,
        not a flat dict of tensors, or its pickle references anything beyond tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise CheckpointFormatError(
            f"{path}: not a PyTorch zip-format checkpoint ({err}); the file may be truncated, "
            "or saved by torch < 1.6 (re-save it with a current torch.save)"
        ) from err
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                f"{path}: expected exactly one data.pkl in the archive, found {pickles}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode().strip()
            if order != "little":
                raise CheckpointFormatError(f"{path}: byte order {order!r}, expected 'little'")
        try:
            data = archive.read(pickles[0])
            result = _SafeUnpickler(data, archive, prefix, path).load()
        except CheckpointFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
            raise CheckpointFormatError(f"{path}: corrupt checkpoint pickle: {err}") from err
    if not isinstance(result, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(result).__name__}, expected a state dict (key -> tensor)"
        )
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointFormatError(
                f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor"
            )
    return dict(result)


def import_torch(purpose: str, hint: str = ""):
    """The torch module, or an ImportError saying that `purpose` needs it and how to install
    it (the CPU build the project is tested with; a plain `pip install torch` may pull a GPU
    build of several GB)."""
    try:
        import torch
    except ImportError:
        advice = f"; {hint}" if hint else ""
        raise ImportError(
            f"{purpose} needs PyTorch: pip install -e '.[torch]' (the CPU build, torch==2.13.0)"
            f"{advice}"
        ) from None
    return torch


def write_pth(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a state dict with `torch.save` (needs torch: `pip install -e '.[torch]'`).

    Writes to a temporary file beside `path` and renames, so a failure leaves nothing behind.
    """
    torch = import_torch("writing .pth files", "or export safetensors, which needs no torch")

    def to_torch(array: np.ndarray):
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(
                torch.bfloat16
            )
        return torch.from_numpy(np.ascontiguousarray(array))

    tensors = OrderedDict((k, to_torch(v)) for k, v in state_dict.items())
    write_atomically(path, lambda tmp: torch.save(tensors, tmp))


_SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.bool_): "BOOL",
}


def write_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a safetensors file (bf16 included) atomically; no torch needed."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    for key, array in state_dict.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {array.dtype} has no safetensors code")
        blob = array.tobytes()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format wants the data 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for blob in blobs:
                f.write(blob)

    write_atomically(path, write)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a safetensors file written by `write_safetensors` (any dtype it can write)."""
    codes = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        dtype = codes[info["dtype"]]
        out[key] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"]).copy()
    return out
