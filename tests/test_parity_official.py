"""Parity with the authors' PyTorch runtimes on random checkpoints in the official layout.

`rwkv-x==0.2.7` (`rwkv_x.model_old.RWKV_X`) for RWKV-X, `rwkv==0.8.32` (RWKV_V7_ON=1) for plain
RWKV-7, both "cpu fp32". The sequences are shorter than chunk_size * top_k, where the official
prefill (dense below its 8000-token threshold) and our train semantics coincide (SPEC §4).
"""

import numpy as np
import pytest
import torch

import rwkvx_jax
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import write_pth
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.model import RWKVX

TOLERANCE = 1e-4  # max |Δlogit| / max |logit|, fp32 whole model (fixed; never loosened)

RWKVX_SHAPES = {
    "one-sparse-block": RWKVXConfig(
        vocab_size=301, n_embd=128, n_rwkv_layer=2, n_attn_layer=1,
        dim_w=16, dim_a=16, dim_v=8, dim_g=32,
    ),
    "two-sparse-blocks": RWKVXConfig(
        vocab_size=257, n_embd=192, n_rwkv_layer=4, n_attn_layer=2,
        dim_w=32, dim_a=16, dim_v=16, dim_g=48,
    ),
    "three-sparse-blocks-block0-v": RWKVXConfig(
        vocab_size=500, n_embd=128, n_rwkv_layer=6, n_attn_layer=3,
        dim_w=16, dim_a=32, dim_v=16, dim_g=16, block0_v_params=True,
    ),
}  # fmt: skip
RWKVX_SEEDS = {
    "one-sparse-block": 101,
    "two-sparse-blocks": 202,
    "three-sparse-blocks-block0-v": 303,
}


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _our_logits_and_states(config, state_dict, tokens):
    params = params_from_state_dict(state_dict, config)
    logits, states = RWKVX(config).apply({"params": params}, tokens[None], return_state=True)
    return np.asarray(logits[0]), states


@pytest.mark.parametrize("name", sorted(RWKVX_SHAPES))
def test_rwkvx_matches_official_runtime(name, tmp_path):
    from rwkv_x import model_old

    config = RWKVX_SHAPES[name]
    # A fixed seed per shape (hash(name) changed with every process: PYTHONHASHSEED).
    state_dict = random_state_dict(config, seed=RWKVX_SEEDS[name])
    path = tmp_path / "model.pth"
    write_pth(path, state_dict)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=37)

    official = model_old.RWKV_X(str(path), "cpu fp32")
    with torch.no_grad():
        expected, official_state = official.forward(tokens.tolist(), None, full_output=True)
    ours, our_states = _our_logits_and_states(config, state_dict, tokens)

    assert ours.shape == (len(tokens), config.vocab_size)
    error = _relative_error(ours, expected.numpy())
    assert error <= TOLERANCE, f"{name}: relative logit error {error:.2e}"
    # The recurrent states a decoder would carry match too.
    for i in range(config.n_rwkv_layer):
        theirs_wkv = official_state["rwkv"][3 * i + 1].numpy()
        ours_wkv = np.asarray(our_states[f"blocks_{i}"].wkv[0])
        assert _relative_error(ours_wkv, theirs_wkv) <= TOLERANCE, f"block {i} wkv state"


def test_converted_checkpoint_matches_official_runtime(tmp_path):
    """The whole user path: .pth -> convert_pth -> load -> forward."""
    from rwkv_x import model_old

    config = RWKVX_SHAPES["two-sparse-blocks"]
    path = tmp_path / "model.pth"
    write_pth(path, random_state_dict(config, seed=7, dtype="bfloat16"))
    rwkvx_jax.convert_pth(path, tmp_path / "converted")
    loaded_config, params = rwkvx_jax.load(tmp_path / "converted")
    assert loaded_config == config.replace(param_dtype="float32")
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(1, 29))
    ours = np.asarray(rwkvx_jax.forward(loaded_config, params, tokens))[0]
    with torch.no_grad():
        expected, _ = model_old.RWKV_X(str(path), "cpu fp32").forward(
            tokens[0].tolist(), None, full_output=True
        )
    assert _relative_error(ours, expected.numpy()) <= TOLERANCE


@pytest.mark.parametrize("block0_v", [False, True])
def test_rwkv7_matches_official_rwkv_package(block0_v, tmp_path):
    from rwkv.model import RWKV

    config = RWKVXConfig(
        vocab_size=333, n_embd=128, n_rwkv_layer=3,
        dim_w=16, dim_a=16, dim_v=16, dim_g=32, block0_v_params=block0_v,
    )  # fmt: skip
    state_dict = random_state_dict(config, seed=3)
    write_pth(tmp_path / "rwkv7.pth", state_dict)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=41)
    official = RWKV(model=str(tmp_path / "rwkv7"), strategy="cpu fp32")
    with torch.no_grad():
        expected, _ = official.forward(tokens.tolist(), None, full_output=True)
    ours, _ = _our_logits_and_states(config, state_dict, tokens)
    error = _relative_error(ours, expected.numpy())
    assert error <= TOLERANCE, f"relative logit error {error:.2e}"


def test_dropped_rwkv_block_quirk_matches_official(tmp_path):
    """L % A != 0: asked for explicitly, we reproduce the official runtime skipping block 4."""
    from rwkv_x import model_old

    config = RWKVX_SHAPES["two-sparse-blocks"].replace(
        n_rwkv_layer=5, allow_dropped_rwkv_blocks=True
    )
    state_dict = random_state_dict(config, seed=11)
    write_pth(tmp_path / "quirk.pth", state_dict)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, size=23)
    with torch.no_grad():
        expected, _ = model_old.RWKV_X(str(tmp_path / "quirk.pth"), "cpu fp32").forward(
            tokens.tolist(), None, full_output=True
        )
    ours, states = _our_logits_and_states(config, state_dict, tokens)
    assert "blocks_4" not in states
    assert _relative_error(ours, expected.numpy()) <= TOLERANCE
