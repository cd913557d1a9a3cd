"""Backend names shared by the kernel entry points, and "auto" resolved from the JAX platform."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "tpu", "gpu", "xla")


def resolve_backend(backend: str, *, kernel: str) -> str:
    """Maps "auto" to "tpu" / "gpu" / "xla" for the default device's platform.

    Args:
      backend: one of BACKENDS.
      kernel: the caller's name, for the error message.

    Returns:
      "tpu", "gpu" or "xla".

    Raises:
      ValueError: `backend` is not one of BACKENDS.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{kernel}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return platform_backend(jax.default_backend())


def platform_backend(platform: str) -> str:
    """The backend "auto" means on a JAX platform ("tpu", "gpu", "cuda", "rocm", "cpu", ...):
    "tpu", "gpu" or "xla"."""
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    # CPU (and anything else) runs the chunked pure-JAX form: Pallas kernels only run there in
    # interpret mode, which is a testing tool, hundreds of times slower.
    return "xla"
