"""The kernel backends, named once: configs, the model's dispatch and the kernel entries all use
these names, and "auto" is resolved here from the JAX platform."""

from __future__ import annotations

import enum

import jax


class Backend(enum.StrEnum):
    """Which implementation of a kernel runs.

    AUTO: the Pallas kernel of the platform (TPU or GPU), XLA_CHUNKED elsewhere (CPU).
    REFERENCE: the plain-JAX oracle (`lax.scan` / dense masked attention): slow, for tests.
    XLA_CHUNKED: the chunked, matmul-based pure-JAX form (the CPU path).
    PALLAS_TPU / PALLAS_GPU: the Pallas kernels (Mosaic / Triton).
    """

    AUTO = "auto"
    REFERENCE = "reference"
    XLA_CHUNKED = "xla_chunked"
    PALLAS_TPU = "pallas_tpu"
    PALLAS_GPU = "pallas_gpu"


BACKENDS = tuple(backend.value for backend in Backend)
PALLAS_BACKENDS = (Backend.PALLAS_TPU, Backend.PALLAS_GPU)
# Names the kernel entries took before the vocabulary was one: refused, with the new name.
_RENAMED = {"tpu": Backend.PALLAS_TPU, "gpu": Backend.PALLAS_GPU, "xla": Backend.XLA_CHUNKED}


def check_backend(backend: str, *, what: str = "backend") -> Backend:
    """The `Backend` named `backend`.

    Args:
      backend: one of BACKENDS.
      what: the caller's name (a kernel or a config field), for the error message.

    Raises:
      ValueError: `backend` is not one of BACKENDS (a former short name says its new one).
    """
    if isinstance(backend, str) and backend in _RENAMED:
        raise ValueError(
            f"{what}: backend {backend!r} is now called {_RENAMED[backend].value!r} "
            f"(backends: {', '.join(BACKENDS)})"
        )
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    return Backend(backend)


def resolve_backend(backend: str, *, what: str = "backend") -> Backend:
    """`check_backend`, with "auto" replaced by the backend of the default device's platform."""
    backend = check_backend(backend, what=what)
    if backend != Backend.AUTO:
        return backend
    return platform_backend(jax.default_backend())


def platform_backend(platform: str) -> Backend:
    """The backend "auto" means on a JAX platform ("tpu", "gpu", "cuda", "rocm", "cpu", ...),
    also one that is not this host's (ahead-of-time compilation for a TPU slice)."""
    if platform == "tpu":
        return Backend.PALLAS_TPU
    if platform in ("gpu", "cuda", "rocm"):
        return Backend.PALLAS_GPU
    # CPU (and anything else) runs the chunked pure-JAX form: Pallas kernels only run there in
    # interpret mode, which is a testing tool, hundreds of times slower.
    return Backend.XLA_CHUNKED
