"""Converter: layout table, bit-exact round trips, safe reading, and clear errors on bad input."""

import os
import pickle
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import convert_torch
import rwkvx_jax
from rwkvx_jax.checkpoints.directory import CheckpointError
from rwkvx_jax.checkpoints.official_layout import (
    ConversionError,
    params_from_state_dict,
    state_dict_from_params,
)
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import (
    CheckpointFormatError,
    read_pth,
    read_safetensors,
    write_pth,
    write_safetensors,
)
from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.model import RWKVX

SMALL = RWKVXConfig(
    vocab_size=97, n_embd=128, n_rwkv_layer=4, n_attn_layer=2,
    dim_w=16, dim_a=16, dim_v=8, dim_g=32,
)  # fmt: skip
SMALL_RWKV7 = SMALL.replace(n_attn_layer=0, block0_v_params=True)


def _assert_bit_exact(actual, expected):
    assert list(actual) == list(expected), "key order differs"
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert actual[key].shape == expected[key].shape, key
        assert np.array_equal(
            actual[key].view(np.uint8), np.ascontiguousarray(expected[key]).view(np.uint8)
        ), key


def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def _flat_shapes(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


@pytest.mark.parametrize("config", [SMALL, SMALL_RWKV7], ids=["rwkvx", "rwkv7"])
def test_layout_matches_flax_init_tree(config):
    """Every official key maps to exactly one model parameter of the same size, and back."""
    shapes = jax.eval_shape(
        lambda: RWKVX(config).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))
    )["params"]
    converted = params_from_state_dict(random_state_dict(config), config)
    assert _flat_shapes(shapes) == _flat_shapes(converted)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pth_round_trip_is_bit_exact(dtype, tmp_path):
    original = random_state_dict(SMALL, seed=1, dtype=dtype)
    write_pth(tmp_path / "in.pth", original)
    rwkvx_jax.convert_pth(tmp_path / "in.pth", tmp_path / "ckpt")
    rwkvx_jax.export_pth(tmp_path / "ckpt", tmp_path / "out.pth")
    _assert_bit_exact(read_pth(tmp_path / "out.pth"), original)
    # And torch itself reads our export as the same tensors.
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(loaded) == list(original)
    assert loaded["rwkv.head.weight"].dtype == getattr(torch, dtype)


def test_params_round_trip_in_memory():
    original = random_state_dict(SMALL_RWKV7, seed=2)
    params = params_from_state_dict(original, SMALL_RWKV7)
    _assert_bit_exact(state_dict_from_params(params, SMALL_RWKV7), original)


def test_safetensors_export_uses_official_names(tmp_path):
    original = random_state_dict(SMALL, seed=3, dtype="bfloat16")
    write_pth(tmp_path / "in.pth", original)
    rwkvx_jax.convert_pth(tmp_path / "in.pth", tmp_path / "ckpt", dtype="bfloat16")
    rwkvx_jax.export_safetensors(tmp_path / "ckpt", tmp_path / "out.safetensors")
    _assert_bit_exact(read_safetensors(tmp_path / "out.safetensors"), original)
    # The reference safetensors implementation reads it too.
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "out.safetensors")
    head = theirs["rwkv.head.weight"]
    assert head.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        head.view(torch.uint16).numpy(), original["rwkv.head.weight"].view(np.uint16)
    )


def test_read_pth_matches_torch_load_on_views_and_offsets(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {
        "transposed": base.t(),
        "sliced": base[2:5, 3:],
        "strided": base[:, ::3],
        "bf16": torch.randn(3, 4).bfloat16(),
        "half": torch.randn(5).half()[1:],
        "scalar": torch.tensor(3.5),
    }
    torch.save(tensors, tmp_path / "views.pth")
    ours = read_pth(tmp_path / "views.pth")
    for key, tensor in tensors.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        np.testing.assert_array_equal(np.asarray(ours[key], np.float32), expected)
    assert ours["bf16"].dtype == ml_dtypes.bfloat16


def test_config_inferred_from_shapes():
    inferred = RWKVXConfig.from_torch_state_dict(random_state_dict(SMALL))
    assert inferred == SMALL
    rwkv7 = RWKVXConfig.from_torch_state_dict(random_state_dict(SMALL_RWKV7))
    assert rwkv7 == SMALL_RWKV7


def test_config_json_round_trip_and_presets():
    for name, config in rwkvx_jax.PRESETS.items():
        assert RWKVXConfig.from_json(config.to_json()) == config, name
    released = rwkvx_jax.preset("rwkvx-0.22b")
    assert [kind for kind, _ in released.block_order()] == (["rwkv"] * 3 + ["attn"]) * 4
    with pytest.raises(ValueError, match="unknown config field"):
        RWKVXConfig.from_dict({**SMALL.to_dict(), "n_layers": 3})


# ---------------------------------------------------------------- bad inputs, nothing written


def _convert_fails(tmp_path, state_dict, match, **kwargs):
    write_pth(tmp_path / "bad.pth", state_dict)
    with pytest.raises((ConversionError, CheckpointFormatError, ValueError), match=match):
        rwkvx_jax.convert_pth(tmp_path / "bad.pth", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_missing_key_is_named(tmp_path):
    state_dict = random_state_dict(SMALL)
    del state_dict["rwkv.blocks.2.att.k_a"]
    _convert_fails(tmp_path, state_dict, r"missing keys: \['rwkv.blocks.2.att.k_a'\]")


def test_wrong_shape_is_named(tmp_path):
    state_dict = random_state_dict(SMALL)
    state_dict["moba.1.ffn.key.weight"] = np.zeros((100, 128), np.float32)
    _convert_fails(tmp_path, state_dict, r"moba.1.ffn.key.weight has shape \(100, 128\)")


def test_stray_key_is_an_error(tmp_path):
    state_dict = random_state_dict(SMALL)
    state_dict["rwkv.blocks.1.att.time_faaaa"] = np.zeros((2, 64), np.float32)
    _convert_fails(tmp_path, state_dict, r"unexpected keys.*time_faaaa")


def test_rwkv_count_not_divisible_by_sparse_count(tmp_path):
    config = SMALL.replace(n_rwkv_layer=5, allow_dropped_rwkv_blocks=True)
    state_dict = random_state_dict(config)
    _convert_fails(tmp_path, state_dict, r"n_rwkv_layer=5 is not divisible by n_attn_layer=2")
    # Asked for explicitly, the official quirk is reproduced: block 4 never runs.
    rwkvx_jax.convert_pth(tmp_path / "bad.pth", tmp_path / "quirk", allow_dropped_rwkv_blocks=True)
    loaded, _ = rwkvx_jax.load(tmp_path / "quirk")
    assert ("rwkv", 4) not in loaded.block_order()


def test_head_size_not_64(tmp_path):
    state_dict = random_state_dict(SMALL)
    state_dict["rwkv.blocks.0.att.r_k"] = np.zeros((4, 32), np.float32)
    _convert_fails(tmp_path, state_dict, r"head size 32.*use head size 64")


def test_truncated_file(tmp_path):
    write_pth(tmp_path / "full.pth", random_state_dict(SMALL))
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "bad.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        rwkvx_jax.convert_pth(tmp_path / "bad.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this would call os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"emb.weight": _RunsCode(marker)}, protocol=2)
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/version", "3\n")
    with pytest.raises(CheckpointFormatError, match=r"references (posix|os)\.system"):
        rwkvx_jax.convert_pth(tmp_path / "evil.pth", tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointFormatError, match="expected a state dict"):
        read_pth(tmp_path / "list.pth")


def test_existing_output_directory_is_not_clobbered(tmp_path):
    write_pth(tmp_path / "in.pth", random_state_dict(SMALL))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        rwkvx_jax.convert_pth(tmp_path / "in.pth", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    rwkvx_jax.convert_pth(tmp_path / "in.pth", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert _leftovers(tmp_path) == []


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    write_pth(tmp_path / "in.pth", random_state_dict(SMALL, dtype="bfloat16"))
    assert convert_torch.main([str(tmp_path / "in.pth"), str(tmp_path / "ckpt")]) == 0
    assert convert_torch.main([str(tmp_path / "ckpt"), str(tmp_path / "back.pth")]) == 0
    assert read_pth(tmp_path / "back.pth")["rwkv.emb.weight"].dtype == ml_dtypes.bfloat16
    assert convert_torch.main([str(tmp_path / "missing.pth"), str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bf16": np.ones(3, ml_dtypes.bfloat16),
        "f16": np.full((1, 1, 5), 0.5, np.float16),
    }
    write_safetensors(tmp_path / "t.safetensors", arrays, {"note": "x"})
    _assert_bit_exact(read_safetensors(tmp_path / "t.safetensors"), arrays)


def test_demo_main_job_end_to_end(tmp_path, capsys):
    """`python convert_torch.py --demo`: convert, run, export bit-exactly, match the official."""
    assert convert_torch.main(["--demo", str(tmp_path)]) == 0
    lines = {}
    for line in capsys.readouterr().out.splitlines():
        key, sep, value = line.strip().rpartition("  ")
        if sep:
            lines[key.strip()] = value.strip()
    assert lines["export bit-exact"] == "True"
    assert lines["logits finite"] == "True"
    assert float(lines["vs official rwkv-x (rel. max err)"]) <= 1e-4


def test_cli_refuses_an_output_folder_that_does_not_exist(tmp_path, capsys):
    """A mistyped output path fails with one line; no folder is created on the way."""
    write_pth(tmp_path / "in.pth", random_state_dict(SMALL))
    before = sorted(os.listdir(tmp_path))
    assert convert_torch.main([str(tmp_path / "in.pth"), str(tmp_path / "no" / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and str(tmp_path / "no") in err
    assert convert_torch.main([str(tmp_path / "in.pth"), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    for target in ("no/back.pth", "no/back.safetensors"):
        assert convert_torch.main([str(tmp_path / "ckpt"), str(tmp_path / target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not exist" in err, err
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "ckpt"])


def test_demo_without_torch_says_what_to_install_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """`convert_torch.py --demo` on a machine without torch: one line naming the install, at
    once, and no temporary folder (nor a given WORK_DIR) left behind."""
    import sys
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert convert_torch.main(["--demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[torch]'" in err, err
    assert convert_torch.main(["--demo", str(tmp_path / "work")]) == 2
    capsys.readouterr()
    assert sorted(os.listdir(scratch)) == [] and not (tmp_path / "work").exists()


def test_cli_dtype_chunk_and_top_k_reach_the_checkpoint(tmp_path):
    """--dtype, --chunk-size and --top-k on import, --dtype on export, as the files record them."""
    from rwkvx_jax.checkpoints.directory import load_metadata, load_params

    write_pth(tmp_path / "in.pth", random_state_dict(SMALL, dtype="float32"))
    argv = ["--dtype", "bfloat16", "--chunk-size", "512", "--top-k", "4"]
    assert convert_torch.main([str(tmp_path / "in.pth"), str(tmp_path / "ckpt"), *argv]) == 0
    config, params = load_params(tmp_path / "ckpt")
    assert (config.chunk_size, config.top_k, config.param_dtype) == (512, 4, "bfloat16")
    assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    assert load_metadata(tmp_path / "ckpt")["source_dtype"] == "float32"
    # Export: the source's dtype by default, --dtype when given.
    assert convert_torch.main([str(tmp_path / "ckpt"), str(tmp_path / "same.pth")]) == 0
    assert {v.dtype for v in read_pth(tmp_path / "same.pth").values()} == {np.dtype(np.float32)}
    back = tmp_path / "half.pth"
    assert convert_torch.main([str(tmp_path / "ckpt"), str(back), "--dtype", "float16"]) == 0
    original = read_pth(tmp_path / "in.pth")
    halves = read_pth(back)
    assert list(halves) == list(original)
    for key, value in original.items():  # float32 -> bfloat16 (stored) -> float16 (exported)
        expected = value.astype(ml_dtypes.bfloat16).astype(np.float32).astype(np.float16)
        np.testing.assert_array_equal(halves[key], expected, err_msg=key)


@pytest.mark.parametrize(
    ("flag", "value"), [("--chunk-size", "0"), ("--top-k", "-1"), ("--dtype", "int8")]
)
def test_cli_refuses_bad_settings(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        convert_torch.main([str(tmp_path / "in.pth"), str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
