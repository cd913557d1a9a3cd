"""attention_mode="official" against `rwkv_x.model_old` beyond its dense threshold.

Both sides use small settings (chunk 16, threshold 48) so a few hundred tokens exercise the
chunk-local prefill, the head-shared top-3 decode and the KV compression of the official code.
"""

import jax
import numpy as np
import pytest
import torch

from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import write_pth
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.sparse.official import OfficialAttention

TOLERANCE = 1e-4  # max |Δlogit| / max |logit|, fp32 whole model
CONFIG = RWKVXConfig(
    vocab_size=211, n_embd=128, n_rwkv_layer=2, n_attn_layer=2,
    dim_w=16, dim_a=16, dim_v=8, dim_g=16, chunk_size=16, top_k=3,
)  # fmt: skip

CASES = {
    # name: (official settings, prompt length, decode steps)
    "dense-short": (OfficialAttention(short_threshold=48, decode_attn="topk"), 30, 10),
    "chunk-prefill-topk-decode": (
        OfficialAttention(short_threshold=48, decode_attn="topk"), 100, 24,
    ),
    "chunk-prefill-full-decode": (OfficialAttention(short_threshold=48), 90, 12),
    "kv-compression": (
        OfficialAttention(
            short_threshold=48, decode_attn="topk", kv_management=True,
            max_kv=80, window=16, min_kv=64,
        ),
        100, 20,
    ),
}  # fmt: skip


def _official_config(settings: OfficialAttention):
    from rwkv_x import model_old

    return model_old.RWKV_X_Config(
        attn_chunk_size=CONFIG.chunk_size,
        attn_topk=settings.top_k,
        short_sequence_criteria=settings.short_threshold,
        enable_kv_cache_management=settings.kv_management,
        max_kv_cache_size=settings.max_kv,
        kv_cache_window_size=settings.window,
        min_kv_cache_size=settings.min_kv,
        prefill_attn_mode=settings.prefill_attn,
        decoding_attn_mode="full" if settings.decode_attn == "full" else "new",
        head_size=CONFIG.head_size,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state_dict = random_state_dict(CONFIG, seed=11)
    path = tmp_path_factory.mktemp("official") / "model.pth"
    write_pth(path, state_dict)
    return path, params_from_state_dict(state_dict, CONFIG)


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_mode_matches_model_old(checkpoint, case):
    from rwkv_x import model_old

    settings, prompt_len, steps = CASES[case]
    path, params = checkpoint
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, prompt_len + steps)

    official = model_old.RWKV_X(str(path), "cpu fp32", config=_official_config(settings))
    expected = []
    with torch.no_grad():
        out, state = official.forward(tokens[:prompt_len].tolist(), None)
        expected.append(out.numpy().copy())
        for t in range(prompt_len, prompt_len + steps):
            out, state = official.forward(int(tokens[t]), state)
            expected.append(out.numpy().copy())

    decoder = Decoder(
        CONFIG, params,
        DecodeConfig(cache_size=512, attention_mode="official", official=settings),
    )  # fmt: skip
    logits, ours = decoder.prefill(tokens[None, :prompt_len])
    got = [np.asarray(logits[0])]
    for t in range(prompt_len, prompt_len + steps):
        logits, ours = decoder.step(tokens[t : t + 1], ours)
        got.append(np.asarray(logits[0]))
    got, expected = np.stack(got), np.stack(expected)
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert error < TOLERANCE, f"{case}: relative error {error:.2e}"


def test_official_mode_differs_from_train_semantics_past_threshold(checkpoint):
    """Sanity: the two modes are really different computations once prompts are long."""
    _, params = checkpoint
    tokens = np.random.default_rng(4).integers(0, CONFIG.vocab_size, (1, 100))
    official = Decoder(CONFIG, params, DecodeConfig(cache_size=512, attention_mode="official"))
    train = Decoder(CONFIG, params, DecodeConfig(cache_size=512))
    a, _ = official.prefill(tokens)
    b, _ = train.prefill(tokens)
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-3


def test_official_cache_overflow_is_an_error(checkpoint):
    _, params = checkpoint
    decoder = Decoder(CONFIG, params, DecodeConfig(cache_size=64, attention_mode="official"))
    with pytest.raises(ValueError, match="exceed cache_size 64"):
        decoder.prefill(np.zeros((1, 80), np.int32))


def test_rows_that_read_nothing_keep_their_flat_cache_bit_for_bit(checkpoint):
    """With KV compression on: a row stepped with valid=False, or given no tokens in a prefill,
    keeps every state array bit for bit, even when its cache is over max_kv (the official
    runtime compresses it at the start of the next call that reads a token, voting with that
    token's query, not with one the row never read)."""
    _, params = checkpoint
    settings = CASES["kv-compression"][0]
    decoder = Decoder(
        CONFIG, params,
        DecodeConfig(cache_size=512, attention_mode="official", official=settings),
    )  # fmt: skip
    tokens = np.random.default_rng(6).integers(0, CONFIG.vocab_size, (2, 96 + 14 + 16))
    over = settings.max_kv + 1  # row 1's cache is over max_kv: its next read compresses it
    _, state = decoder.prefill(tokens[:, :over], lengths=[70, over])
    before = {
        jax.tree_util.keystr(path): np.array(leaf, copy=True)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }

    def assert_row_1_unchanged():
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            old, new = before[jax.tree_util.keystr(path)][1], np.asarray(leaf)[1]
            bits = np.dtype(f"uint{8 * old.dtype.itemsize}")
            np.testing.assert_array_equal(new.view(bits), old.view(bits), err_msg=str(path))

    for t in range(14):  # row 0: 70 -> 84 tokens, compressed once past 80
        _, state = decoder.step(tokens[:, over + t], state, valid=np.array([True, False]))
    assert_row_1_unchanged()
    cache = state.blocks["moba_0"].cache
    assert np.asarray(cache.size).tolist() == [settings.min_kv + 3, over]  # row 0 compressed
    _, state = decoder.prefill(tokens[:, -16:], state, lengths=[16, 0])
    assert_row_1_unchanged()
