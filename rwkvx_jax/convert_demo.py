"""End-to-end converter demo on a random checkpoint: convert, run, export, verify, report."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from tqdm import tqdm

from rwkvx_jax.api import forward, load
from rwkvx_jax.checkpoints.conversion import convert_pth, export_pth
from rwkvx_jax.checkpoints.random_weights import random_state_dict
from rwkvx_jax.checkpoints.tensor_files import import_torch, read_pth, write_pth
from rwkvx_jax.config import RWKVXConfig

DEMO_CONFIG = RWKVXConfig(
    vocab_size=4096, n_embd=256, n_rwkv_layer=4, n_attn_layer=2,
    dim_w=32, dim_a=32, dim_v=16, dim_g=64,
)  # fmt: skip


def _official_logits(path: str, tokens: np.ndarray) -> np.ndarray | None:
    """Logits from the authors' runtime (`rwkv-x`), or None when it is not installed."""
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        import torch
        from rwkv_x import model_old
    except ImportError:
        return None
    with torch.no_grad():
        logits, _ = model_old.RWKV_X(path, "cpu fp32").forward(
            tokens.tolist(), None, full_output=True
        )
    return logits.numpy()


def run_demo(work_dir: str | None = None, seq_len: int = 64) -> dict[str, object]:
    """Runs the demo in work_dir (a fresh temporary directory when None); prints a report.

    Raises:
      ImportError: torch is not installed (nothing is created then).
      FileNotFoundError: work_dir's parent folder does not exist.
    """
    # The demo starts by writing an official .pth: say what it needs before any folder is made.
    import_torch(
        "the demo (it writes an official .pth)",
        "pip install -e '.[test]' also brings the official runtime it compares with",
    )
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="rwkvx-demo-")
    else:
        parent = os.path.dirname(os.path.abspath(work_dir))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{work_dir}: the folder {parent} does not exist")
        os.makedirs(work_dir, exist_ok=True)
    pth = os.path.join(work_dir, "random-rwkvx.pth")
    converted = os.path.join(work_dir, "converted")
    exported = os.path.join(work_dir, "exported.pth")
    tokens = np.random.default_rng(0).integers(0, DEMO_CONFIG.vocab_size, size=(1, seq_len))
    report: dict[str, object] = {}
    steps = tqdm(total=5, desc="demo", unit="step")

    original = random_state_dict(DEMO_CONFIG, seed=0, dtype="bfloat16")
    write_pth(pth, original)
    steps.set_postfix_str("wrote random official-layout .pth")
    steps.update()

    config = convert_pth(pth, converted, overwrite=True)
    steps.set_postfix_str("converted")
    steps.update()

    config, params = load(converted)
    start = time.perf_counter()
    logits = np.asarray(forward(config, params, tokens))
    report["forward (incl. compile) s"] = round(time.perf_counter() - start, 2)
    report["logits shape"] = logits.shape
    report["logits finite"] = bool(np.isfinite(logits).all())
    steps.set_postfix_str("ran forward")
    steps.update()

    export_pth(converted, exported)
    roundtrip = read_pth(exported)
    report["export bit-exact"] = list(roundtrip) == list(original) and all(
        roundtrip[k].dtype == original[k].dtype and np.array_equal(roundtrip[k], original[k])
        for k in original
    )
    steps.set_postfix_str("exported .pth")
    steps.update()

    reference = _official_logits(pth, tokens[0])
    if reference is None:
        report["vs official rwkv-x"] = "skipped (pip install -e '.[test]' to compare)"
    else:
        error = np.max(np.abs(logits[0] - reference)) / np.max(np.abs(reference))
        report["vs official rwkv-x (rel. max err)"] = f"{error:.2e}"
    steps.set_postfix_str("compared with the official runtime")
    steps.update()
    steps.close()

    print(f"\nRWKV-X demo in {work_dir}")
    print(f"  model: L={config.n_rwkv_layer} A={config.n_attn_layer} C={config.n_embd} "
          f"V={config.vocab_size}, {seq_len} tokens")  # fmt: skip
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"  {key:<{width}}  {value}")
    return report
