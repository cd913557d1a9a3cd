"""Training: configs, sharding, expansion, sharded steps, stage 1, NaN guard, kill -9 resume."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from train_runs import kill_after_first_checkpoint, run_losses, train_cli, two_processes_and_one

from rwkvx_jax import sharding as shd
from rwkvx_jax import training
from rwkvx_jax.config import preset
from rwkvx_jax.data import write_binidx
from rwkvx_jax.model import RWKVX
from rwkvx_jax.training.config import (
    RECIPES,
    TrainConfig,
    TrainConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    recipe,
)
from rwkvx_jax.training.expand import COPIED, expand_params, fresh_sparse_block, source_block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest RWKV-X: one RWKV block then one sparse block; C=128 (2 heads) so tensor=2 and
# fsdp=4 divide every matrix. ctx 32 > chunk 16, so the top-k selection is exercised.
SMALL_MODEL = "model.n_rwkv_layer=1 model.n_attn_layer=1"
SMALL_RUN = (
    f"{SMALL_MODEL} data.ctx=32 data.batch_size=8 data.max_tokens=40000 "
    "optimizer.lr=1e-2 optimizer.schedule=constant optimizer.lr_final=none "
    "optimizer.total_steps=none optimizer.warmup_steps=2 log_every=1 sample.tokens=0 "
    "checkpoint.export=false"
).split()


# Tests of the training logic (not of the kernels) use the pure-JAX reference kernels: they
# compile in about half the time of the chunked forms on CPU.
REFERENCE_KERNELS = ["model.wkv_backend=reference", "model.attention_backend=reference"]
REFERENCE_BACKENDS = {"wkv_backend": "reference", "attention_backend": "reference"}


def small_config(tmp_path, *overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [*SMALL_RUN, f"workdir={tmp_path}", *overrides])


def single_device_mesh():
    return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# ----------------------------------------------------------------------------- configs


def test_overrides_are_typed():
    config = apply_overrides(
        TrainConfig(),
        [
            "optimizer.lr=3e-4", "data.ctx=256", "mesh=2,2,2", "checkpoint.async_save=false",
            "init_checkpoint=none", "optimizer.grad_clip=null", "model=rwkvx-0.22b",
            "model.dtype=bfloat16", "steps=1_000",
        ],
    )  # fmt: skip
    assert config.optimizer.lr == 3e-4 and isinstance(config.optimizer.lr, float)
    assert config.data.ctx == 256 and config.mesh == (2, 2, 2) and config.steps == 1000
    assert config.checkpoint.async_save is False and config.optimizer.grad_clip is None
    assert config.model.n_embd == 768 and config.model.dtype == "bfloat16"
    assert config.init_checkpoint is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lrr=1", "did you mean 'lr'"),
        ("dta.ctx=1", "did you mean 'data'"),
        ("data.ctx=abc", "data.ctx expects int"),
        ("data.ctx=1.5", "data.ctx expects int"),
        ("checkpoint.async_save=maybe", "use true/false"),
        ("mesh=2,2", r"give \(data, fsdp, tensor\) or \(data, fsdp, tensor, context\)"),
        ("data=stdlib", "data is a section"),
        ("model=gpt2", "unknown model preset"),
        ("model.n_embd=100", "not a multiple of head_size"),
        ("stage=stage3", "stage must be one of"),
        ("optimizer.lr_final=none", "needs lr_final"),
        ("steps", "must look like key=value"),
        ("loss.chunk_tokens=-1", r"loss.chunk_tokens must be >= 0 \(0: whole logits\), got -1"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(TrainConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_config_files_round_trip_and_bases(tmp_path):
    config = apply_overrides(recipe("0.22b-stage1"), ["steps=7", "data.ctx=512"])
    path = tmp_path / "run.json"
    path.write_text(config.to_json())
    assert load_config(str(path)) == config
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"base": "3.6b-stage2", "optimizer": {"lr": 2e-5}}))
    loaded = load_config(str(partial))
    assert loaded.optimizer.lr == 2e-5 and loaded.data.ctx == 64_000 and loaded.stage == "stage2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"context": 5}}))
    with pytest.raises(TrainConfigError, match=r"bad.json: unknown config key 'data.context'"):
        load_config(str(bad))
    with pytest.raises(TrainConfigError, match="neither a recipe"):
        load_config("no-such-recipe")
    with pytest.raises(TrainConfigError, match="model.vocab_size"):
        config_from_dict({"model": {"preset": "tiny", "vocab_size": "big"}})


def test_recipes_follow_spec():
    for name in RECIPES:
        recipe(name)
    stage1, stage2 = recipe("3.6b-stage1"), recipe("3.6b-stage2")
    assert stage1.stage == "stage1" and stage1.model.n_attn_layer == 8
    assert 512 <= stage1.data.ctx <= 1024
    assert stage2.data.ctx == 64_000 and stage2.data.batch_size == 64 and stage2.steps == 5000
    assert stage2.remat == "ordered"  # what makes the 3.6b step fit a v5p chip (BENCHMARKS.md)
    for config in (stage1, stage2):
        opt = config.optimizer
        assert (opt.lr, opt.warmup_steps, opt.warmup_init_fraction) == (1e-5, 10, 0.01)
        assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.grad_clip) == (
            0.9, 0.99, 1e-18, 1e-3, 1.0,
        )  # fmt: skip
        assert config.model.dtype == "bfloat16" and config.loss.l2wrap
    assert TrainConfig() == recipe("tiny")


def test_cli_lists_every_recipe_as_its_config(capsys):
    """`train.py --list`: each recipe under its name, as the JSON its config writes."""
    import train

    assert train.main(["--list"]) == 0
    out = capsys.readouterr().out
    sections = re.split(r"^--- (\S+)\n", out, flags=re.MULTILINE)[1:]
    listed = dict(zip(sections[::2], sections[1::2], strict=True))
    assert list(listed) == list(RECIPES)
    for name, text in listed.items():
        assert config_from_dict(json.loads(text)) == recipe(name), name


def test_training_reads_a_jsonl_corpus(tmp_path):
    """data.corpus=FILE.jsonl: each record's text field, tokenized (bytes here), documents
    joined by the end-of-document id; a run trains on it."""
    records = [{"text": "def f():\n    return 1\n"}, {"text": "héllo", "id": 2}]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = small_config(
        tmp_path / "run", *REFERENCE_KERNELS, f"data.corpus={corpus}", "data.max_tokens=none",
        "data.tokenizer=bytes", "data.ctx=8", "data.batch_size=2", "steps=2",
        "checkpoint.every=0",
    )  # fmt: skip
    tokens = np.asarray(training.load_corpus(config.data, config.model.vocab_size))
    expected = []
    for record in records:
        expected += list(record["text"].encode("utf-8")) + [0]
    assert tokens.tolist() == expected
    result = training.train(config, mesh=single_device_mesh(), progress=False, log=lambda _: None)
    assert sorted(result.losses) == [1, 2] and all(np.isfinite(list(result.losses.values())))


def test_cli_reports_config_errors(capsys):
    import train

    assert train.main(["--config", "nope"]) == 2
    assert "neither a recipe" in capsys.readouterr().err
    assert train.main(["optimizer.lr=fast"]) == 2
    assert "optimizer.lr expects float" in capsys.readouterr().err
    assert train.main(["--print-config", "--steps", "5", "--workdir", "/tmp/x"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 5 and printed["workdir"] == "/tmp/x"


def _damaged_checkpoint(tmp_path, damage: str) -> str:
    """An init_checkpoint .pth of the small model, damaged one way."""
    from rwkvx_jax.checkpoints.random_weights import random_state_dict
    from rwkvx_jax.checkpoints.tensor_files import write_pth

    path = tmp_path / f"{damage}.pth"
    model = apply_overrides(TrainConfig(), SMALL_MODEL.split()).model.replace(n_attn_layer=0)
    write_pth(path, random_state_dict(model))
    if damage == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "wrong-keys":
        write_pth(path, {"blocks.0.nonsense.weight": np.zeros((4, 4), np.float32)})
    return str(path)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "wrong-keys", "no-such-corpus"])
def test_cli_bad_start_is_one_line_and_leaves_no_run(tmp_path, capsys, damage):
    """A corrupt, truncated or wrong-keys init_checkpoint (or a missing corpus): one line on
    stderr, exit 2, and no runs/<workdir> skeleton (nor the runs/ folder it would have made)."""
    import train

    workdir = tmp_path / "runs" / "exp"
    if damage == "no-such-corpus":
        start = [f"data.corpus={tmp_path / 'nothing.jsonl'}"]
    else:
        start = [f"init_checkpoint={_damaged_checkpoint(tmp_path, damage)}"]
    argv = ["--no-progress", *SMALL_RUN, *REFERENCE_KERNELS, f"workdir={workdir}", *start]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: "), err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- sharding


def test_partition_specs_follow_rules_and_divisibility():
    mesh = shd.make_mesh((2, 2, 2))
    spec = lambda path, shape: shd.logical_to_partition_spec(
        shd.param_logical_axes(path, shape), shape, mesh
    )
    assert spec("blocks_0/ffn/key/kernel", (128, 512)) == PartitionSpec("fsdp", "tensor")
    assert spec("moba_0/att/output/kernel", (128, 128)) == PartitionSpec("tensor", "fsdp")
    assert spec("emb/embedding", (256, 128)) == PartitionSpec("tensor", "fsdp")
    assert spec("blocks_1/att/w1", (128, 16)) == PartitionSpec("fsdp", None)
    assert spec("blocks_0/att/x_r", (128,)) == PartitionSpec(None)
    assert spec("emb/embedding", (255, 3)) == PartitionSpec(None, None)  # never uneven
    # Optimizer state leaves end with their param's path.
    assert spec("opt_state/1/0/mu/head/kernel", (128, 256)) == PartitionSpec("fsdp", "tensor")
    assert spec("other/matrix", (16, 64)) == PartitionSpec("tensor", "fsdp")
    assert shd.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="needs 12 devices"):
        shd.make_mesh((3, 2, 2))
    # The three-number form: no context parallelism.
    want = {"data": 2, "fsdp": 4, "tensor": 1, "context": 1}
    assert dict(shd.make_mesh((2, -1, 1)).shape) == want


# ----------------------------------------------------------------------------- expansion


def _logits(config, params, tokens):
    return np.asarray(jax.jit(RWKVX(config).apply)({"params": params}, tokens))


def _random_rwkv7(config):
    """RWKV-7 params at trained-like scales (fresh inits zero the output projections)."""
    from rwkvx_jax.checkpoints.official_layout import params_from_state_dict
    from rwkvx_jax.checkpoints.random_weights import random_state_dict

    return params_from_state_dict(random_state_dict(config, seed=0), config)


def test_zero_expansion_keeps_rwkv7_logits_exactly():
    rwkv7 = preset(
        "tiny", n_rwkv_layer=2, n_attn_layer=0, wkv_backend="reference",
        attention_backend="reference",
    )  # fmt: skip
    params = _random_rwkv7(rwkv7)
    target = rwkv7.replace(n_attn_layer=2)  # b0 moba0 b1 moba1
    expanded = expand_params(params, target, init="zero")
    assert sorted(k for k in expanded if k.startswith("moba_")) == ["moba_0", "moba_1"]
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)
    reference = _logits(rwkv7, params, tokens)
    np.testing.assert_array_equal(_logits(target, expanded, tokens), reference)
    copied = expand_params(params, target, init="copy")
    assert not np.allclose(_logits(target, copied, tokens), reference, atol=1e-3)


def test_expand_init_zero_from_the_training_config(tmp_path):
    """`expand_init=zero` as train.py receives it: the run's starting params compute exactly
    the RWKV-7 checkpoint's logits; "copy" (the default) does not."""
    from rwkvx_jax.checkpoints.random_weights import random_state_dict
    from rwkvx_jax.checkpoints.tensor_files import write_pth
    from rwkvx_jax.training.initial_params import initial_params

    rwkv7 = preset("tiny", n_rwkv_layer=2, n_attn_layer=0, **REFERENCE_BACKENDS)
    pth = tmp_path / "rwkv7.pth"
    write_pth(pth, random_state_dict(rwkv7, seed=0))
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)
    reference = _logits(rwkv7, _random_rwkv7(rwkv7), tokens)
    starts = {}
    for init in ("zero", "copy"):
        config = apply_overrides(
            TrainConfig(),
            ["model.n_rwkv_layer=2", "model.n_attn_layer=2", *REFERENCE_KERNELS,
             "stage=stage1", f"init_checkpoint={pth}", f"expand_init={init}"],
        )  # fmt: skip
        model_config, params = initial_params(config, lambda _: None)
        assert model_config.n_attn_layer == 2
        starts[init] = _logits(model_config, params, tokens)
    np.testing.assert_array_equal(starts["zero"], reference)
    assert not np.allclose(starts["copy"], reference, atol=1e-3)


def test_copy_expansion_copies_the_preceding_block():
    target = preset("tiny")  # L4 A2: order b0 b1 moba0 b2 b3 moba1
    assert [source_block(target, j) for j in range(2)] == [1, 3]
    assert source_block(preset("tiny", n_attn_layer=1), 0) == 3
    params = _random_rwkv7(target.replace(n_attn_layer=0))
    expanded = expand_params(params, target, init="copy")
    for j, src in ((0, 1), (1, 3)):
        block, source = expanded[f"moba_{j}"], params[f"blocks_{src}"]
        for path in COPIED:
            a, b = block, source
            for key in path:
                a, b = a[key], b[key]
            np.testing.assert_array_equal(a, b)
            assert a is not b
        for ln in ("ln1", "ln2"):
            np.testing.assert_array_equal(block[ln]["scale"], 1.0)
            np.testing.assert_array_equal(block[ln]["bias"], 0.0)
        # x_k from the RWKV-7 init rule of layer `src`, not copied from the trained block.
        fresh = fresh_sparse_block(target, j)
        np.testing.assert_array_equal(block["ffn"]["x_k"], fresh["ffn"]["x_k"])
        assert not np.array_equal(block["ffn"]["x_k"], source["ffn"]["x_k"])
    for key in params:
        assert expanded[key] is params[key]
    with pytest.raises(ValueError, match="already have sparse blocks"):
        expand_params(expanded, target)


# ----------------------------------------------------------------------------- train steps


def _batches(n, batch, ctx, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, ctx + 1)).astype(np.int32) for _ in range(n)]


def _run_steps(config, mesh, params, batches):
    program = training.TrainProgram.create(config, config.model, mesh)
    state = program.init_state(params)
    losses = []
    for tokens in batches:
        state, metrics = program.step(state, program.global_batch(tokens))
        losses.append(float(metrics["loss"]))
    return program, state, losses


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Three steps on one device from given params (the same init the program's random init
    computes), on fixed batches."""
    config = small_config(tmp_path_factory.mktemp("ref"))
    model = RWKVX(config.model)
    init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(np.asarray, jax.jit(init)(jax.random.key(config.seed)))
    batches = _batches(3, config.data.batch_size, config.data.ctx)
    _, _, losses = _run_steps(config, single_device_mesh(), params, batches)
    return config, params, batches, losses


@pytest.mark.parametrize(
    "mesh_shape",
    # Data parallel only, FSDP with data, and every axis at once.
    [(8, 1, 1), (2, 4, 1), (2, 2, 2)],
)
def test_sharded_steps_match_one_device(reference_run, mesh_shape):
    config, params, batches, losses = reference_run
    mesh = shd.make_mesh(mesh_shape)
    program = training.TrainProgram.create(config, config.model, mesh)
    state = program.init_state()  # random init straight into the shardings
    kernel = state["params"]["blocks_0"]["ffn"]["key"]["kernel"]  # [C, 4C] = [128, 512]
    expected_spec = shd.logical_to_partition_spec(("embed", "mlp"), kernel.shape, mesh)
    assert kernel.sharding.spec == expected_spec
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    assert kernel.addressable_shards[0].data.shape == (128 // fsdp, 512 // tensor)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # same values as one device
    sharded_losses = []
    for tokens in batches:
        state, metrics = program.step(state, program.global_batch(tokens))
        sharded_losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
    assert state["params"]["blocks_0"]["ffn"]["key"]["kernel"].sharding.spec == expected_spec


def _assert_trees_close(got_tree, want_tree, bound=1e-5):
    """Every leaf within `bound` of that leaf's largest entry: sums taken in another order move
    entries that nearly cancel by ~1e-6 of the largest."""
    for got, want in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree), strict=True):
        error, scale = float(jnp.max(jnp.abs(got - want))), float(jnp.max(jnp.abs(want)))
        assert error <= bound * scale, (error, scale)


def test_remat_wraps_every_block_and_keeps_paths(reference_run):
    config, params, batches, _ = reference_run
    tokens = jnp.asarray(batches[0])
    blocks = len(config.model.block_order())
    gradients = {}
    for policy in ("none", "full", "dots", "ordered"):
        program = training.TrainProgram.create(
            config.replace(remat=policy), config.model, single_device_mesh()
        )

        def grad_fn(p, prog=program, policy=policy):
            with training.block_transforms(policy):
                return jax.grad(prog.loss_fn)(p, tokens)

        jaxpr = str(jax.make_jaxpr(grad_fn)(params))
        checkpointed = 0 if policy in ("none", "ordered") else blocks
        # Plus the loss's own: ctx 32 is one piece of `losses.chunked_token_cross_entropy`.
        assert jaxpr.count("remat") == checkpointed + 1, policy
        # "ordered": one barrier before each block's recomputation and one on its gradients.
        assert jaxpr.count("optimization_barrier") == (2 * blocks if policy == "ordered" else 0)
        shapes = jax.eval_shape(grad_fn, params)
        assert jax.tree.structure(shapes) == jax.tree.structure(params)
        if policy in ("none", "ordered"):  # "ordered" is our own backward pass: check values
            gradients[policy] = jax.jit(grad_fn)(params)
    _assert_trees_close(gradients["ordered"], gradients["none"])


@pytest.mark.parametrize("chunk_tokens", [5, 0], ids=["pieces-of-5", "whole"])
def test_loss_equals_the_whole_logits_loss(reference_run, chunk_tokens):
    """ctx 32 in pieces of 5 positions (six pieces and a tail of 2), or whole (0): the loss and
    every gradient equal cross-entropy + L2Wrap of the model's whole [B, T, V] logits. Only the
    pieces are remade in the backward pass (jax.checkpoint around the scan's piece and the
    tail's; none around whole logits)."""
    from rwkvx_jax.training.losses import l2wrap, mean_cross_entropy

    config, params, batches, _ = reference_run
    tokens = jnp.asarray(batches[0])
    config = apply_overrides(config, [f"loss.chunk_tokens={chunk_tokens}"])
    program = training.TrainProgram.create(config, config.model, single_device_mesh())
    jaxpr = str(jax.make_jaxpr(jax.grad(program.loss_fn))(params, tokens))
    assert jaxpr.count("remat") == (2 if chunk_tokens else 0)

    def whole_logits_loss(params):
        logits = program.model.apply({"params": params}, tokens[:, :-1])
        return l2wrap(mean_cross_entropy(logits, tokens[:, 1:]), logits)

    value, grads = jax.jit(jax.value_and_grad(program.loss_fn))(params, tokens)
    expected_value, expected_grads = jax.jit(jax.value_and_grad(whole_logits_loss))(params)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    _assert_trees_close(grads, expected_grads)  # the head's gradient sums the pieces in turn


def test_stage1_expands_a_pth_and_trains_only_sparse_blocks(tmp_path):
    from rwkvx_jax.checkpoints.directory import load_params
    from rwkvx_jax.checkpoints.official_layout import state_dict_from_params
    from rwkvx_jax.checkpoints.random_weights import random_state_dict
    from rwkvx_jax.checkpoints.tensor_files import read_pth, write_pth

    rwkv7 = preset("tiny", n_rwkv_layer=1, n_attn_layer=0)
    pth = str(tmp_path / "rwkv7.pth")
    write_pth(pth, random_state_dict(rwkv7, seed=0))
    config = small_config(
        tmp_path / "run", *REFERENCE_KERNELS, "stage=stage1", "steps=3", "checkpoint.every=0",
        "checkpoint.export=true", "data.batch_size=4", f"init_checkpoint={pth}",
    )  # fmt: skip
    initial = expand_params(_random_rwkv7(rwkv7), config.model, init="copy")
    result = training.train(config, mesh=single_device_mesh(), progress=False, log=lambda _: None)
    final = jax.tree.map(np.asarray, result.state["params"])
    for key in initial:
        changed = [not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(final[key]), jax.tree.leaves(initial[key]), strict=True)]  # fmt: skip
        if key.startswith("moba_"):
            assert any(changed), key
        else:
            assert not any(changed), key  # bit-identical
    # Optimizer state: Adam moments for moba_* only, nothing for the frozen params.
    opt_paths = [
        shd.path_string(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(result.state["opt_state"])[0]
        if np.ndim(leaf) > 0
    ]
    n_moba = len(jax.tree.leaves({k: v for k, v in initial.items() if k.startswith("moba_")}))
    assert all("moba_" in p for p in opt_paths) and len(opt_paths) == 2 * n_moba  # mu, nu
    # Export: the inference format holds the final params; the .pth is written with torch.
    exported_config, exported = load_params(os.path.join(result.export_dir, "params"))
    assert exported_config == result.model_config and exported_config.n_attn_layer == 1
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... and the official .pth holds them too, key by key, in the source's float32.
    official = read_pth(os.path.join(result.export_dir, "model.pth"))
    expected = state_dict_from_params(final, exported_config, "float32")
    assert list(official) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(official[key], value, err_msg=key)
    records = training.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert os.path.isfile(tmp_path / "run" / "loss.png")


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A binidx corpus whose 4th batch (sequential order) holds an id outside the vocabulary:
    # its embedding gathers NaN, as corrupted data would.
    ctx, batch = 32, 4
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, 40 * (ctx + 1)).astype(np.uint16)
    tokens[3 * batch * ctx + 5] = 300
    prefix = str(tmp_path / "poisoned")
    write_binidx(prefix, [tokens.tolist()])
    config = small_config(
        tmp_path / "run", *REFERENCE_KERNELS, f"data.corpus={prefix}", "data.order=sequential",
        "data.max_tokens=none", f"data.batch_size={batch}", "steps=6", "checkpoint.every=1",
        "checkpoint.keep=2",
    )  # fmt: skip
    with pytest.raises(
        training.NonFiniteError, match=r"step 4: loss nan.*Last good checkpoint: step 3"
    ):
        training.train(config, mesh=single_device_mesh(), progress=False, log=lambda _: None)
    store = training.CheckpointStore(str(tmp_path / "run" / "checkpoints"), 1, 2, False)
    assert store.manager.all_steps() == [2, 3]
    program = training.TrainProgram.create(config, config.model, single_device_mesh())
    state = store.restore_state(3, program.abstract_state_with_shardings())
    assert int(state["step"]) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    records = training.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]


# ----------------------------------------------------------------------------- resume


def _train_cli(workdir, cache_dir, steps, every, extra=()):
    return train_cli(workdir, cache_dir, steps, every, *SMALL_RUN, *REFERENCE_KERNELS,
                     "data.batch_size=4", *extra)  # fmt: skip


def test_kill_9_and_ctrl_c_then_resume_match_an_uninterrupted_run(tmp_path):
    check_kill_9_and_ctrl_c_resume(tmp_path)


def check_kill_9_and_ctrl_c_resume(tmp_path, extra=()):
    """A run killed with kill -9, then stopped with Ctrl-C, then resumed logs the losses of an
    uninterrupted run bit for bit (`extra`: more train.py overrides, e.g. a fine-tuning)."""
    steps, every = 24, 4
    cache = tmp_path / "jax-cache"
    reference = _train_cli(tmp_path / "reference", cache, steps, every, extra)
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output
    expected = run_losses(tmp_path / "reference")
    assert [s for s, _ in expected] == list(range(1, steps + 1))

    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    killed_at = kill_after_first_checkpoint(
        _train_cli(workdir, cache, steps, every, extra), checkpoints
    )
    assert killed_at < steps

    # Ctrl-C after the next checkpoint: the run saves the step it is on, says so in one line
    # with the resume hint, and exits 130.
    interrupted = _train_cli(workdir, cache, steps, every, extra)
    deadline = time.time() + 600
    while time.time() < deadline and interrupted.poll() is None:
        if max(int(d) for d in os.listdir(checkpoints) if d.isdigit()) > killed_at:
            break
        time.sleep(0.02)
    assert interrupted.poll() is None, "the run finished before it could be interrupted"
    interrupted.send_signal(signal.SIGINT)
    output, _ = interrupted.communicate(timeout=600)
    assert interrupted.returncode == 130, output
    # The step it was on is finished and saved: nothing is lost.
    last = output.splitlines()[-1]
    stopped_at = int(
        re.match(r"train.py: interrupted \(saved a checkpoint at step (\d+) ", last)[1]
    )
    assert last.endswith("; run the same command again to resume from the last checkpoint")
    assert max(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == stopped_at
    assert "Traceback" not in output

    resumed = _train_cli(workdir, cache, steps, every, extra)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert run_losses(workdir) == expected  # bit-exact, every step, after kill -9 and Ctrl-C


def test_two_processes_match_one_process(tmp_path):
    """2 processes x 2 CPU devices through jax.distributed (gloo) == 1 process, 1 device."""
    args = [*SMALL_RUN, *REFERENCE_KERNELS, "data.batch_size=4"]
    multi, one = two_processes_and_one(tmp_path, 3, *args)
    assert [s for s, _ in multi] == [s for s, _ in one] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in multi], [l for _, l in one], rtol=1e-5)


@pytest.mark.aot
@pytest.mark.parametrize("backend", ["auto", "xla_chunked"])
def test_aot_compile_for_a_tpu_slice(tmp_path, backend):
    """The train step compiles for a TPU topology on a machine without TPUs, with the kernels
    "auto" means on a TPU (the Pallas TPU ones, run per device: XLA cannot partition Mosaic
    kernels, rwkvx_jax.ops.kernel_mesh), not on this CPU host, or with the chunked XLA ones;
    with remat=ordered, the stage-2 recipes' setting.

    Needs the TPU compiler: `pip install -e '.[aot]'`, then `pytest -m aot`.
    """
    devices = training.tpu_topology_devices("v5p:2x2x1")
    backends = [f"model.wkv_backend={backend}", f"model.attention_backend={backend}"]
    config = small_config(
        tmp_path,
        "mesh=1,2,2",
        "data.batch_size=4",
        "model.dtype=bfloat16",
        "remat=ordered",
        *backends,
    )
    program, compiled = training.aot_compile(config, devices)
    assert dict(program.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "context": 1}
    assert ("tpu_custom_call" in compiled.as_text()) == (backend == "auto")
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert "memory analysis" in training.describe_memory(compiled)
