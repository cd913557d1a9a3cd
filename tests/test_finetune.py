"""Fine-tuning: LoRA and state tuning on a frozen base, chat records, exports, sharding, resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import REFERENCE_KERNELS, SMALL_RUN, check_kill_9_and_ctrl_c_resume

from rwkvx_jax import generate, training
from rwkvx_jax import sharding as shd
from rwkvx_jax.checkpoints.adapters import (
    AdapterError,
    apply_adapter,
    apply_adapter_file,
    load_adapter,
    save_adapter,
)
from rwkvx_jax.checkpoints.conversion import load_checkpoint_params
from rwkvx_jax.checkpoints.directory import load_params, save_params
from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import write_pth, write_safetensors
from rwkvx_jax.data.chat import chat_pieces, chat_prompt, encode_chat, split_scored
from rwkvx_jax.decoding.decoder import DecodeConfig, Decoder
from rwkvx_jax.decoding.state_files import load_state, read_state_metadata
from rwkvx_jax.model import RWKVX
from rwkvx_jax.tokenizer import ByteTokenizer
from rwkvx_jax.training import train
from rwkvx_jax.training.config import TrainConfig, TrainConfigError, apply_overrides
from rwkvx_jax.training.finetune import FinetuneProgram, tree_bytes
from rwkvx_jax.training.losses import masked_mean
from rwkvx_jax.training.state_tuning import initial_states, with_initial_states

METHODS = ("lora", "state")
# The LoRA run also trains the small vectors, and the state run the token shifts: every
# option's gradient path is exercised.
METHOD_OPTIONS = {
    "lora": ["finetune=lora", "lora.rank=4", "lora.train_vectors=true"],
    "state": ["finetune=state", "state_tuning.token_shift=true"],
}
RUN = [*SMALL_RUN, *REFERENCE_KERNELS]


def finetune_config(tmp_path, method: str, *overrides: str) -> TrainConfig:
    return apply_overrides(
        TrainConfig(),
        [*RUN, f"workdir={tmp_path}", "init_checkpoint=unused", *METHOD_OPTIONS[method],
         *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random base model in the official layout (every matrix non-zero, unlike a fresh init
    whose output projections start at zero), as host params and as a converted folder."""
    config = finetune_config(tmp_path_factory.mktemp("cfg"), "lora").model
    state_dict = random_state_dict(config, seed=3)
    params = params_from_state_dict(state_dict, config, "float32")
    folder = tmp_path_factory.mktemp("base") / "params"
    save_params(folder, config, params)
    return config, params, str(folder), state_dict


def _batches(n, batch=8, ctx=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (n, batch, ctx + 1)).astype(np.int32)
    # Half the tokens are context only (negative: no loss on them), as in chat records.
    return np.where(rng.random(tokens.shape) < 0.5, tokens, -1 - tokens)


def _program(config, mesh=None):
    mesh = mesh or shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return FinetuneProgram.create(config, config.model, mesh)


def _run(program, params, batches):
    state = program.init_state(params)
    losses = []
    for tokens in batches:
        state, metrics = program.step(state, program.global_batch(tokens))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """runs(method): three steps of that method on one device, on fixed batches (made once)."""
    made = {}

    def run(method):
        if method not in made:
            config = finetune_config(tmp_path_factory.mktemp("run"), method)
            batches = _batches(3)
            program = _program(config)
            state, losses = _run(program, base[1], batches)
            made[method] = (config, program, state, losses, batches)
        return made[method]

    return run


# ----------------------------------------------------------------------------- chat data


def test_chat_records_score_the_answers_only():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi\n\nthere "},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    pieces = chat_pieces(record)
    assert "".join(t for t, _ in pieces) == (
        "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello!\n\n"
    )
    assert [t for t, scored in pieces if scored] == [" Hello!\n\n"]
    tokens = encode_chat(record, ByteTokenizer())
    ids, scored = split_scored(tokens)
    text = bytes(np.asarray(ids)[:-1].tolist()).decode()
    assert text == "".join(t for t, _ in pieces) and int(ids[-1]) == 0  # end of document
    assert bytes(np.asarray(ids)[np.asarray(scored)].tolist()) == b" Hello!\n\n"
    # The prompt at inference is exactly the context an answer follows in training.
    assert chat_prompt("Hi") == "User: Hi\n\nAssistant:"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "x"}, 'a list "messages"'),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 must be"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ],
)
def test_bad_chat_records_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        encode_chat(record, ByteTokenizer(), "f.jsonl:3")


def test_masked_mean_is_the_mean_over_scored_tokens():
    losses = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.asarray([[True, False, True], [False, False, True]])
    assert float(masked_mean(losses, mask)) == pytest.approx((1 + 3 + 6) / 3)
    assert float(masked_mean(losses, jnp.zeros_like(mask))) == 0.0


def test_the_example_chat_file_trains(tmp_path, base):
    """docs/examples/chat.jsonl through the corpus reader: answers scored, the rest context."""
    from rwkvx_jax.training.corpus import load_corpus

    config = finetune_config(tmp_path, "lora", "data.corpus=docs/examples/chat.jsonl",
                             "data.records=chat")  # fmt: skip
    tokens = load_corpus(config.data, config.model.vocab_size)
    ids, scored = (np.asarray(x) for x in split_scored(tokens))
    answers = bytes(ids[scored].tolist()).decode()
    assert (
        answers
        == " Paris.\n\n Air scatters blue light more than red light.\n\n Hello!\n\n Goodbye!\n\n"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune=lora"], "adapts a checkpoint: set init_checkpoint="),
        (["data.corpus=a.jsonl", "data.records=chat"], "set finetune=lora or finetune=state"),
        (["finetune=lora", "init_checkpoint=x", "lora.targets=att.query"], "lora.targets"),
        (["finetune=state", "init_checkpoint=x", "stage=stage1"], "use stage=pretrain"),
    ],
)
def test_finetune_config_errors(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        apply_overrides(TrainConfig(), overrides)


# ----------------------------------------------------------------------------- the step


@pytest.mark.parametrize("method", METHODS)
def test_untrained_adapter_and_state_are_the_base_model_exactly(base, method, tmp_path):
    config, params, _, _ = base
    program = _program(finetune_config(tmp_path, method))
    trained = program.method.init(params, jax.random.key(0))
    tokens = jnp.asarray(np.abs(_batches(1)[0]))[:, :-1]
    model = RWKVX(config)
    want = model.apply({"params": params}, tokens)
    with program.method.forward_context():
        got = model.apply({"params": program.method.model_params(params, trained)}, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("method", METHODS)
def test_steps_train_only_the_adapter_or_state(runs, base, method):
    config, program, state, losses, _ = runs(method)
    # The base passes through bit for bit.
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(base[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert losses[-1] < losses[0]
    # The gradient is taken of the trained part alone: its tree is the trained part's.
    with program.forward_context():
        grads = jax.grad(program.finetune_loss)(state["trained"], state["params"], _batches(1)[0])
    assert jax.tree.structure(grads) == jax.tree.structure(state["trained"])
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
    # Adam's two moments of the trained part, plus step counters: nothing for the base.
    sizes = program.state_bytes()
    assert sizes["trained"] < sizes["params"] / 10
    assert 2 * sizes["trained"] <= sizes["opt_state"] <= 2 * sizes["trained"] + 64
    assert tree_bytes(state["opt_state"]) == sizes["opt_state"]


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "state"])
def test_remat_keeps_the_gradients_of_the_trained_part(runs, method):
    """The learnt state enters the block call before remat wraps it (`initial_states` is
    entered first), so under every remat policy it is an argument of the rematerialised block
    and gets its gradient; LoRA's adapted params reach the blocks as their params."""
    config, _, state, _, batches = runs(method)
    grads = {}
    for policy in ("none", "ordered"):
        program = _program(config.replace(remat=policy))
        with program.forward_context():
            grad_fn = jax.jit(jax.grad(program.finetune_loss))
            grads[policy] = grad_fn(state["trained"], state["params"], batches[0])
    for got, want in zip(jax.tree.leaves(grads["ordered"]), jax.tree.leaves(grads["none"]),
                         strict=True):  # fmt: skip
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0 and float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale


@pytest.mark.aot
def test_aot_compile_of_a_lora_step_for_a_tpu_slice(tmp_path):
    """`train.py --aot-topology` with finetune=lora compiles the fine-tuning step (bf16,
    remat=ordered) for a v5p slice. Needs the TPU compiler: `pip install -e '.[aot]'`."""
    devices = training.tpu_topology_devices("v5p:2x2x1")
    config = finetune_config(
        tmp_path, "lora", "mesh=1,2,2", "data.batch_size=4", "model.dtype=bfloat16",
        "remat=ordered",
    )  # fmt: skip
    program, compiled = training.aot_compile(config, devices)
    assert isinstance(program, FinetuneProgram)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2)])
def test_sharded_steps_match_one_device(runs, base, method, mesh_shape):
    config, _, _, losses, batches = runs(method)
    program = _program(config, shd.make_mesh(mesh_shape))
    _, sharded_losses = _run(program, base[1], batches)
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1)])
def test_sharded_steps_match_one_device_every_layout(runs, base, method, mesh_shape):
    test_sharded_steps_match_one_device(runs, base, method, mesh_shape)


# ----------------------------------------------------------------------------- exports


def test_adapter_file_merged_and_unmerged_agree(runs, base, tmp_path):
    config, program, state, _, _ = runs("lora")
    model_config, params, _, _ = base
    adapter = jax.device_get(state["trained"])
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, model_config, adapter, rank=config.lora.rank, alpha=config.lora.alpha)
    loaded, scale = load_adapter(path, model_config)
    assert scale == config.lora.alpha / config.lora.rank
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapter), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.asarray(np.abs(_batches(1)[0]))[:, :-1]
    forward = jax.jit(lambda p: RWKVX(model_config).apply({"params": p}, tokens))
    unmerged = forward(program.method.model_params(state["params"], state["trained"]))
    merged = forward(apply_adapter_file(path, model_config, params))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(unmerged - forward(params)))) > 1e-3  # it did change
    with pytest.raises(AdapterError, match="shape hash"):
        load_adapter(path, model_config.replace(n_embd=256))


def test_adapter_leaves_must_fit_the_base(base):
    _, params, _, _ = base
    kernel = {"kernel": {"lora_a": np.zeros((128, 4)), "lora_b": np.zeros((4, 64))}}
    with pytest.raises(AdapterError, match="blocks_0.att.key.kernel is \\[128, 128\\]"):
        apply_adapter(params, {"lora": {"blocks_0": {"att": {"key": kernel}}}}, 1.0)
    with pytest.raises(AdapterError, match="no kernel blocks_0.att.query.kernel"):
        apply_adapter(params, {"lora": {"blocks_0": {"att": {"query": kernel}}}}, 1.0)


def test_files_that_are_not_adapters_are_named(tmp_path, base):
    config = base[0]
    with pytest.raises(AdapterError, match="no such adapter file"):
        load_adapter(tmp_path / "missing.safetensors", config)
    (tmp_path / "bytes.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(AdapterError, match="not a safetensors adapter file"):
        load_adapter(tmp_path / "bytes.safetensors", config)
    write_safetensors(tmp_path / "weights.safetensors", {"x": np.zeros(2, np.float32)})
    with pytest.raises(AdapterError, match="format None, expected 'rwkvx-jax-lora-adapter'"):
        load_adapter(tmp_path / "weights.safetensors", config)


def _cli_run(tmp_path, base_path, method, *extra):
    config = apply_overrides(
        TrainConfig(),
        [*RUN, f"workdir={tmp_path}", f"init_checkpoint={base_path}", *METHOD_OPTIONS[method],
         "steps=3", "checkpoint.export=true", "data.max_tokens=4000", *extra],
    )  # fmt: skip
    return config, train(config, progress=False, log=lambda _: None)


def test_lora_run_exports_the_merged_model_and_the_adapter(base, tmp_path, capsys):
    """train(finetune=lora) from a converted folder: export/params and export/model.pth hold
    the merged model, export/adapter.safetensors the adapter; all give one model."""
    model_config, params, folder, _ = base
    config, result = _cli_run(tmp_path, folder, "lora")
    tokens = jnp.asarray(np.abs(_batches(1)[0]))[:2, :-1]
    forward = jax.jit(lambda p: RWKVX(model_config).apply({"params": p}, tokens))
    adapted = forward(result.inference()[0])
    _, merged = load_params(tmp_path / "export" / "params")
    _, from_pth = load_checkpoint_params(tmp_path / "export" / "model.pth")
    on_base = apply_adapter_file(tmp_path / "export" / "adapter.safetensors", model_config, params)
    for other in (merged, from_pth, on_base):
        np.testing.assert_allclose(forward(other), adapted, atol=1e-5, rtol=0)
    adapter = str(tmp_path / "export" / "adapter.safetensors")
    argv = ["--checkpoint", folder, "--adapter", adapter, "--prompt", "ab",
            "--max-new-tokens", "2", "--temperature", "0", "--prefill-chunk", "16"]  # fmt: skip
    assert generate.main(argv) == 0, capsys.readouterr().err


def test_state_run_exports_a_state_that_decoding_reads(base, tmp_path, capsys):
    """train(finetune=state) from an official .pth: export/state.npz is a decode state that
    `Decoder` continues exactly as the training forward reads from the learnt state, and that
    `generate --state-in` runs with."""
    model_config, params, folder, state_dict = base
    pth = tmp_path / "base.pth"
    write_pth(pth, state_dict)
    config, result = _cli_run(tmp_path / "run", pth, "state")
    path = tmp_path / "run" / "export" / "state.npz"
    assert read_state_metadata(path)["extra"]["tuned"] == "state tuning"
    state = load_state(path, model_config)
    tokens = np.abs(_batches(1)[0])[:2, :20]
    trained = result.state["trained"]
    with initial_states():
        tuned = with_initial_states(params, trained)
        want = RWKVX(model_config).apply({"params": tuned}, jnp.asarray(tokens))[:, -1]
    decoder = Decoder(model_config, params, DecodeConfig(prefill_chunk=32))
    got, _ = decoder.prefill(tokens, jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), state))
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
    without, _ = decoder.prefill(tokens)
    assert float(jnp.max(jnp.abs(without - want))) > 1e-3 * scale  # the state matters

    save_params(tmp_path / "base", model_config, params)
    argv = ["--checkpoint", str(tmp_path / "base"), "--state-in", str(path), "--prompt", "ab",
            "--max-new-tokens", "3", "--temperature", "0", "--prefill-chunk", "16"]  # fmt: skip
    assert generate.main(argv) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- learning


def _fixed_style_chat(path, n: int, seed: int) -> None:
    """Questions of random letters; every answer is "OK!" (a style the base never writes)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            question = "".join(rng.choice(list("abcdefgh"), rng.integers(3, 9)))
            record = {"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": "OK!"}]}  # fmt: skip
            f.write(json.dumps(record) + "\n")


# Each method's learning rate and the answer loss it reaches in 60 steps. State tuning takes
# large steps, as in RWKV-PEFT (the state's entries are far from 1 in trained models).
LEARNING = {"lora": ("2e-2", 0.05), "state": ("1.0", 0.3)}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_a_fixed_answer_style(base, tmp_path, method):
    """On chat records whose answers are always "OK!", each method takes the answer loss from
    the base's ~6.5 nats per byte below its threshold (`LEARNING`) in 60 steps, and greedy
    answers to new questions become " OK!" where the base's are not; the base params stay as
    they were.

    The base is the random one with its time mixes' output projections 10x larger: in random
    weights they add ~0.1 of the residual stream's scale, and the learnt state, which acts
    through them only, can then barely steer the model (the loss went from 6.7 to 3.8 in 60
    steps); trained RWKV models write strongly from their WKV states.
    """
    model_config, params, _, _ = base
    params = jax.tree.map(np.copy, params)
    for name, block in params.items():
        if name.startswith("blocks_"):
            block["att"]["output"]["kernel"] *= 10.0
    save_params(tmp_path / "base", model_config, params)
    corpus = tmp_path / "chat.jsonl"
    _fixed_style_chat(corpus, 400, seed=0)
    lr, threshold = LEARNING[method]
    config, result = _cli_run(
        tmp_path / "run", tmp_path / "base", method, f"data.corpus={corpus}",
        "data.records=chat", "data.max_tokens=none", "steps=60", "checkpoint.export=false",
        f"optimizer.lr={lr}",
    )  # fmt: skip
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[0] > 6.0 and np.mean(losses[-5:]) < threshold, losses
    for got, want in zip(jax.tree.leaves(result.state["params"]), jax.tree.leaves(params),
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), want)
    tuned_params, tuned_state = result.inference()
    prompts = [list(chat_prompt(q).encode()) for q in ("hgfedc", "abab", "cafe")]
    decoder = Decoder(model_config, tuned_params, DecodeConfig(prefill_chunk=32))
    state = None
    if tuned_state is not None:
        state = jax.tree.map(lambda x: jnp.repeat(x, len(prompts), axis=0), tuned_state)
    answers = _greedy(decoder, prompts, state, 4)
    assert [bytes(a.tolist()) for a in answers] == [b" OK!"] * len(prompts)
    base_decoder = Decoder(model_config, params, DecodeConfig(prefill_chunk=32))
    assert all(bytes(a.tolist()) != b" OK!" for a in _greedy(base_decoder, prompts, None, 4))


def _greedy(decoder, prompts, state, n):
    """n greedy tokens [B, n] after each prompt, read after `state` (None: fresh)."""
    logits, state = decoder.prefill(prompts, state)
    out = []
    for _ in range(n):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(np.asarray(token))
        logits, state = decoder.step(token, state)
    return np.stack(out, axis=1)


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_kill_9_then_resume_is_exact(base, tmp_path, method):
    corpus = tmp_path / "chat.jsonl"
    _fixed_style_chat(corpus, 200, seed=1)
    extra = [f"init_checkpoint={base[2]}", *METHOD_OPTIONS[method], f"data.corpus={corpus}",
             "data.records=chat", "data.max_tokens=none"]  # fmt: skip
    check_kill_9_and_ctrl_c_resume(tmp_path, extra)
