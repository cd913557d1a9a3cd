"""Decoding: prefill + steps reproduce the parallel forward (SPEC §6), padding, caps, state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import rwkvx_jax
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.config import ConfigError, preset
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder, greedy_tokens
from rwkvx_jax.model import RWKVX

TINY = preset("tiny")  # chunk 16, top-k 3, two sparse blocks
TOL = 1e-4  # whole-model fp32 parity, relative to the largest logit


@pytest.fixture(scope="module")
def tiny_params():
    return params_from_state_dict(random_state_dict(TINY, seed=7), TINY)


@pytest.fixture(scope="module")
def decoder(tiny_params):
    return Decoder(TINY, tiny_params, DecodeConfig(cache_size=64 * 16, prefill_chunk=48))


def _forward(params, tokens):
    return np.asarray(rwkvx_jax.forward(TINY, params, tokens))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _tokens(seed, batch, length):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length))


N_STEPS = 24
MAX_PROMPT = 300


@pytest.fixture(scope="module")
def long_sequence(tiny_params):
    """Two random sequences and their parallel-forward logits (causal: any prefix's logits)."""
    tokens = _tokens(0, 2, MAX_PROMPT + N_STEPS)
    return tokens, _forward(tiny_params, tokens)


@pytest.mark.parametrize("prompt_len", [1, 16, 49, 130, MAX_PROMPT])
def test_prefill_then_steps_equals_forward(decoder, long_sequence, prompt_len):
    """Sparse regime: T + n spans up to 21 chunks of 16, far beyond chunk * top_k = 48."""
    tokens, expected = long_sequence
    logits, state = decoder.prefill(tokens[:, :prompt_len])
    got = [np.asarray(logits)]
    for t in range(prompt_len, prompt_len + N_STEPS - 1):
        logits, state = decoder.step(tokens[:, t], state)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    assert _rel(got, expected[:, prompt_len - 1 : prompt_len + N_STEPS - 1]) < TOL
    assert np.asarray(state.lengths).tolist() == [prompt_len + N_STEPS - 1] * 2


def test_padding_never_changes_outputs(decoder, tiny_params):
    """Three prompts of different lengths in one batch equal each run alone, then stepping on."""
    prompts = [list(_tokens(1, 1, n)[0]) for n in (70, 5, 33)]
    cont = _tokens(2, 3, 12)
    logits, state = decoder.prefill(prompts)
    batch_logits = [np.asarray(logits)]
    for t in range(12):
        logits, state = decoder.step(cont[:, t], state)
        batch_logits.append(np.asarray(logits))
    # One forward over the right-padded sequences: causal, so padding cannot reach them.
    full = [np.concatenate([p, c]) for p, c in zip(prompts, cont, strict=True)]
    width = max(len(f) for f in full)
    expected = _forward(tiny_params, np.stack([np.pad(f, (0, width - len(f))) for f in full]))
    for i, prompt in enumerate(prompts):
        want = expected[i, len(prompt) - 1 : len(prompt) + 12]
        got = np.stack([b[i] for b in batch_logits])
        assert _rel(got, want) < TOL, f"row {i}"


def test_second_prefill_continues_unaligned_rows(decoder, tiny_params):
    """A prefill on a state whose rows have different, chunk-unaligned lengths."""
    tokens = _tokens(3, 2, 140)
    _, state = decoder.prefill([list(tokens[0, :37]), list(tokens[1, :90])])
    logits, state = decoder.prefill([list(tokens[0, 37:140]), list(tokens[1, 90:140])], state)
    expected = _forward(tiny_params, tokens)[:, -1]
    assert _rel(logits, expected) < TOL


def test_inactive_rows_keep_their_state(decoder, long_sequence):
    tokens, expected = long_sequence
    _, state = decoder.prefill(tokens[:, :30])
    for t in range(30, 40):
        _, state = decoder.step(tokens[:, t], state, valid=np.array([True, False]))
    assert np.asarray(state.lengths).tolist() == [40, 30]
    logits, _ = decoder.step(tokens[:, 30], state, valid=np.array([True, True]))
    assert _rel(np.asarray(logits)[1], expected[1, 30]) < TOL


def test_past_the_cap_memory_is_fixed_and_early_outputs_exact(tiny_params):
    """cache_size 64: exact up to 64 tokens; beyond, state shapes never change."""
    decoder = Decoder(TINY, tiny_params, DecodeConfig(cache_size=64, prefill_chunk=32))
    tokens = _tokens(5, 1, 110)
    logits, state = decoder.prefill(tokens[:, :60])
    shapes = [x.shape for x in jax.tree.leaves(state)]
    expected = _forward(tiny_params, tokens)
    assert _rel(logits, expected[:, 59]) < TOL
    for t in range(60, 110):
        logits, state = decoder.step(tokens[:, t], state)
        if t < 63:
            assert _rel(logits, expected[:, t]) < TOL
    assert [x.shape for x in jax.tree.leaves(state)] == shapes
    cache = state.blocks["moba_0"].cache
    assert int(cache.n_filled[0]) == 3  # 64 tokens = 3 slots + the open chunk
    assert np.isfinite(np.asarray(logits)).all()


def test_rwkv7_only_model_decodes():
    config = preset("tiny-rwkv7")
    params = params_from_state_dict(random_state_dict(config, seed=1), config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 40))
    decoder = Decoder(config, params)
    logits, state = decoder.prefill(tokens[:, :30])
    for t in range(30, 39):
        logits, state = decoder.step(tokens[:, t], state)
    expected = np.asarray(rwkvx_jax.forward(config, params, tokens))
    assert _rel(logits, expected[:, 38]) < TOL


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cache_size": 40}, "multiple of chunk_size"),
        ({"cache_size": 32}, "needs at least 2"),
        ({"eviction": "lru"}, "eviction must be one of"),
        ({"prefill_chunk": 0}, "positive int"),
        ({"kernel_layout": "column"}, "kernel_layout must be one of"),
    ],
)
def test_bad_decode_config_is_rejected(tiny_params, kwargs, match):
    with pytest.raises(ConfigError if "cache_size" not in kwargs else ValueError, match=match):
        Decoder(TINY, tiny_params, DecodeConfig(**kwargs))


def test_bad_prompts_are_rejected(decoder):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        decoder.prefill([[1, 2, 300]])
    with pytest.raises(ValueError, match="lengths must be"):
        decoder.prefill(np.zeros((2, 4), np.int32), lengths=[5, 1])


def test_greedy_tokens_are_the_argmax_chain(decoder, tiny_params):
    """Plain argmax of the full forward at every step: no repetition penalty sneaks in."""
    prompt = [int(t) for t in _tokens(5, 1, 20)[0]]
    got = greedy_tokens(decoder, [prompt], 12)[0]
    tokens = list(prompt)
    forward = jax.jit(lambda p, t: RWKVX(TINY).apply({"params": p}, t))
    for _ in range(12):  # one padded shape: the model is causal, so the padding is never read
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(tokens)] = tokens
        logits = np.asarray(forward(tiny_params, jnp.asarray(padded)))
        tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
    assert got.tolist() == tokens[len(prompt) :]
    # The chain repeats tokens, so a default (penalised) sampler would have diverged from it.
    assert len(set(tokens[len(prompt) :])) < 12


def test_compiled_piece_and_step_never_copy_the_kv_cache(tiny_params):
    """Both jitted functions update the donated cache in place: a full-cache copy per call made
    prefill and decode cost grow with cache_size (found in both, and fixed). The step does not
    copy the open chunk either (it did, 8 times per sparse block: 60 of 93 ms per token at
    0.22B), and its temporaries grow with the slot count only by the chunk summaries (per-slot
    means and the eviction's similarities), not by the cached keys."""
    temps, cache_bytes = [], []
    for n_chunks, batch in ((40, 1), (40, 2), (80, 2)):
        dec = Decoder(TINY, tiny_params, DecodeConfig(cache_size=n_chunks * 16, prefill_chunk=48))
        state = dec.init_state(batch)
        cache = next(b.cache for b in state.blocks.values() if hasattr(b, "cache"))
        shape = lambda x: "f32[" + ",".join(map(str, x.shape)) + "]"
        tokens = jnp.zeros((batch, 48), jnp.int32)
        piece = dec._piece.lower(dec.weights, state, tokens, np.array([48, 30][:batch], np.int32))
        step = dec._step.lower(dec.weights, state, tokens[:, 0], jnp.ones(batch, bool)).compile()
        checks = (
            ("prefill piece", piece.compile(), [shape(cache.keys)]),
            ("step", step, [shape(cache.keys), shape(cache.open_keys)]),
        )
        for name, compiled, shapes in checks:
            lines = compiled.as_text().splitlines()
            copies = [line for line in lines if " copy(" in line and any(s in line for s in shapes)]
            assert not copies, f"{name} copies cache buffers:\n" + "\n".join(copies[:4])
        if batch == 2:
            temps.append(step.memory_analysis().temp_size_in_bytes)
            cache_bytes.append(2 * cache.keys.nbytes)
    growth = (temps[1] - temps[0]) / (cache_bytes[1] - cache_bytes[0])
    assert growth < 0.1, f"step temporaries {temps} grow with the cache {cache_bytes}"


def test_kernel_layouts_decode_alike(tiny_params):
    """Layout "out_in" (the CPU default: every Dense kernel but the head's kept transposed, read
    through an interceptor) decodes like the as-trained "in_out", and the compiled step reads
    the transposed kernels as they lie: computing x @ kernel.T instead makes XLA transpose every
    kernel inside the batch-1 step (this check then fails), slower than no layout change."""
    prompt, steps = _tokens(3, 2, 40), _tokens(4, 2, 6)
    outputs = {}
    for layout in ("in_out", "out_in"):
        dc = DecodeConfig(cache_size=8 * 16, prefill_chunk=32, kernel_layout=layout)
        dec = Decoder(TINY, tiny_params, dc)
        logits, state = dec.prefill(prompt)
        got = [np.asarray(logits)]
        # Batch 1: the matrix-vector form, where XLA materialised the transposes.
        if layout == "out_in":
            one = dec.init_state(1)
            step_hlo = dec._step.lower(dec.weights, one, steps[:1, 0], jnp.ones(1, bool))
        for t in range(steps.shape[1]):
            logits, state = dec.step(steps[:, t], state)
            got.append(np.asarray(logits))
        outputs[layout] = np.stack(got)
        weights = dec.weights
    assert _rel(outputs["out_in"], outputs["in_out"]) < 1e-5
    moved, flat = weights.transposed, traverse_util.flatten_dict(tiny_params)
    assert set(moved) == {
        "/".join(path[:-1]) for path in flat if path[-1] == "kernel" and path[0] != "head"
    }
    for name, kernel in moved.items():
        original = flat[(*name.split("/"), "kernel")]
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(original).T)
    assert "key" not in weights.rest["blocks_0"]["att"]  # its only parameter moved
    text = step_hlo.compile().as_text()
    shapes = {f"f32[{a},{b}]" for x in moved.values() for a, b in (x.shape, x.shape[::-1])}
    transposing = [
        line
        for line in text.splitlines()
        if (" transpose(" in line or " copy(" in line)
        and any(s in line.split("=")[1] for s in shapes)
    ]
    assert not transposing, "\n".join(transposing[:3])
    # Prepared weights are shared, not copied again.
    assert Decoder(TINY, weights, DecodeConfig(cache_size=8 * 16)).weights is weights


def _host_copy(state):
    """Every leaf of a state, with its path, copied to the host (a donated state's buffers get
    reused)."""
    return {
        jax.tree_util.keystr(path): np.array(leaf, copy=True)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }


def _assert_row_unchanged(before, state, row, open_rows=None):
    """Row `row` of every leaf (lengths, WKV states, shifts, every cache array) is the same,
    bit for bit. With `open_rows`, the open chunks are compared on their first `open_rows` rows
    only, the rows that hold keys (`ChunkKVCache`: a prefill writes its padding's keys past
    them, where nothing reads)."""
    after = _host_copy(state)
    assert after.keys() == before.keys()
    for path, old in before.items():
        old, new = old[row], after[path][row]
        if open_rows is not None and path.endswith((".open_keys", ".open_values")):
            old, new = old[:, :open_rows], new[:, :open_rows]
        bits = np.dtype(f"uint{8 * old.dtype.itemsize}")
        np.testing.assert_array_equal(new.view(bits), old.view(bits), err_msg=path)


def test_rows_that_read_nothing_keep_their_state_bit_for_bit(decoder):
    """Past the cache cap (63 slots of 16 tokens, evicting): a row stepped with valid=False
    keeps every state array bit for bit, and a row given no tokens in a prefill every array
    but its open chunks' unused rows, while the other row reads on, completes a chunk and
    evicts one. Row 1 is one token short of completing a chunk, so absorbing an ignored token
    would complete one and evict another."""
    tokens = _tokens(6, 2, 1103 + 6 + 20)
    _, state = decoder.prefill(tokens[:, :1103], lengths=[1100, 1103])
    slots = lambda: np.array(state.blocks["moba_0"].cache.chunk_ids)
    before, slots_before = _host_copy(state), slots()
    assert (slots_before >= 0).all()  # both rows' slots are full
    for t in range(6):  # row 0: 1100 -> 1106 tokens, completing chunk 68
        _, state = decoder.step(tokens[:, 1103 + t], state, valid=np.array([True, False]))
    _assert_row_unchanged(before, state, row=1)
    assert 68 in slots()[0] and 68 not in slots_before[0]  # row 0 did evict
    _, state = decoder.prefill(tokens[:, 1109:], state, lengths=[20, 0])
    _assert_row_unchanged(before, state, row=1, open_rows=1103 % TINY.chunk_size)
    assert np.asarray(state.lengths).tolist() == [1126, 1103]
