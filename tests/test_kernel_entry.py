"""Public kernel entry points: `pallas_kernels.wkv7`, `pallas_kernels.topk_chunk_attention`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.backends import BACKENDS, Backend, resolve_backend
from pallas_kernels.topk_attention import topk_chunk_attention_reference
from pallas_kernels.wkv7 import wkv7_chunked, wkv7_reference


def _wkv_inputs(T=40, H=2, N=16):
    keys = jax.random.split(jax.random.key(0), 5)
    shape = (1, T, H, N)
    r, k, v = (jax.random.normal(keys[i], shape) for i in range(3))
    w = -0.6065 * jax.nn.sigmoid(jax.random.normal(keys[3], shape))
    kk = jax.random.normal(keys[4], shape)
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    return r, w, k, v, -kk, 0.5 * kk


def test_auto_is_xla_chunked_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_backend("auto") == "xla_chunked"
    assert resolve_backend("pallas_gpu") == Backend.PALLAS_GPU == "pallas_gpu"


def test_one_vocabulary_for_configs_dispatch_and_kernels():
    """The config fields, the model's dispatch and the kernel entries take the same names."""
    from rwkvx_jax import config, ops

    assert config.WKV_BACKENDS == config.ATTENTION_BACKENDS == ops.BACKENDS == BACKENDS
    assert BACKENDS == ("auto", "reference", "xla_chunked", "pallas_tpu", "pallas_gpu")


@pytest.mark.parametrize(("old", "new"), [("xla", "xla_chunked"), ("gpu", "pallas_gpu")])
def test_former_kernel_names_say_their_new_name(old, new):
    with pytest.raises(ValueError, match=f"backend '{old}' is now called '{new}'"):
        pallas_kernels.wkv7(*_wkv_inputs(), backend=old)


def test_auto_of_another_platform():
    """What "auto" means on a device that is not this host's (AOT compilation for a TPU)."""
    from rwkvx_jax import ops

    platforms = ("tpu", "gpu", "cuda", "rocm", "cpu")
    assert [ops.platform_backend(p) for p in platforms] == [
        "pallas_tpu", "pallas_gpu", "pallas_gpu", "pallas_gpu", "xla_chunked"
    ]  # fmt: skip


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of .*'cuda'"):
        pallas_kernels.wkv7(*_wkv_inputs(), backend="cuda")
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match="topk_chunk_attention: backend"):
        pallas_kernels.topk_chunk_attention(q, q, q, chunk_size=4, topk=2, backend="mosaic")


def test_wkv7_package_is_callable_and_keeps_its_submodules():
    args = _wkv_inputs()
    y, s = pallas_kernels.wkv7(*args)
    y_chunked, s_chunked = wkv7_chunked(*args)
    np.testing.assert_array_equal(y, y_chunked)
    np.testing.assert_array_equal(s, s_chunked)
    y_ref, _ = wkv7_reference(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(jnp.abs(y_ref).max()))
    assert pallas_kernels.wkv7.reference.wkv7_reference is wkv7_reference


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu", "reference"])
def test_wkv7_kernels_through_the_entry_point(backend):
    args = _wkv_inputs(T=40, H=1, N=16 if backend == "pallas_gpu" else 64)
    options = {} if backend == "reference" else {"interpret": True, "chunk_size": 16}
    y, s = pallas_kernels.wkv7(*args, backend=backend, **options)
    y_ref, s_ref = wkv7_reference(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(jnp.abs(y_ref).max()))
    np.testing.assert_allclose(s, s_ref, atol=1e-5 * float(jnp.abs(s_ref).max()))


@pytest.mark.parametrize("backend", ["xla_chunked", "pallas_gpu", "pallas_tpu", "reference"])
def test_topk_attention_through_the_entry_point(backend):
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (1, 64, 2, 32)) for key in keys)
    kwargs = {"interpret": True} if backend.startswith("pallas") else {}
    out = pallas_kernels.topk_chunk_attention(
        q, k, v, chunk_size=16, topk=2, backend=backend, **kwargs
    )
    want = topk_chunk_attention_reference(q, k, v, chunk_size=16, top_k=2)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_model_dispatch_reaches_the_pallas_kernels(backend, interpreted_kernels):
    """rwkvx_jax.ops maps the config's backend names onto the kernels (run here in interpret
    mode, which the model never asks for: the fixture patches the calls to add it)."""
    from rwkvx_jax import ops
    from rwkvx_jax.config import preset

    calls = interpreted_kernels
    assert ops.resolve_backend("auto") == "xla_chunked"  # CPU
    preset("tiny", wkv_backend=backend, attention_backend=backend)  # accepted by the config

    args = _wkv_inputs(T=20, H=1, N=64)
    y, _ = ops.wkv7(*args, backend=backend)
    y_ref, _ = wkv7_reference(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(jnp.abs(y_ref).max()))
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 48, 1, 32)) for i in range(3))
    out = ops.topk_chunk_attention(q, k, v, chunk_size=16, top_k=2, backend=backend)
    want = topk_chunk_attention_reference(q, k, v, chunk_size=16, top_k=2)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    kernel = backend.removeprefix("pallas_")
    assert calls == [f"wkv7_{kernel}", f"topk_chunk_attention_{kernel}"]
