"""bench/paper_claim.py --experiment facts --quick: every step of issue 26's experiment runs
(data, both models' two training phases through `training.train`, the evaluation grid with
RWKV-X's diagnostics, the report with its pass verdict) and resumes without redoing work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path) -> str:
    command = [sys.executable, "bench/paper_claim.py", "--experiment", "facts", "--quick"]
    command += ["--out", str(out), "--no-progress"]
    # One CPU device, as the bench runs it (conftest gives this process 8 for the mesh tests).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_quick_run_trains_evaluates_reports_and_resumes(tmp_path):
    out = tmp_path / "facts"
    first = _run(out)
    assert "python train.py model=tiny model.n_embd=64 model.n_rwkv_layer=3" in first
    assert "init_checkpoint=" in first  # the long phase starts from the short one's params
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["rwkv7"] / summary["parameters"]["rwkvx"] < 1.05
    accuracy = summary["accuracy"]
    assert set(accuracy) == {"rwkvx", "rwkv7", "rwkvx-zeroed", "rwkvx-dense", "rwkvx-oracle"}
    # 100 facts do not fit 192 tokens: only the 2-fact cell exists.
    assert list(accuracy["rwkvx"]["192"]) == ["2"]
    mean, error, selected = accuracy["rwkvx-oracle"]["192"]["2"]
    assert selected == 1.0 and 0 <= mean <= 1 and error == 0  # one seed: no spread
    assert summary["verdict"]["passed"] in (True, False)
    assert "pass criterion (RWKV-X >= 90% where RWKV-7 <= 50%" in first
    for name in ("facts_accuracy.png", "facts_heatmap_rwkvx.png", "facts_training_loss.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    second = _run(out)
    assert "python train.py" not in second and "exact (" not in second  # nothing redone


def _bench_module():
    """bench/many_facts_claim.py loaded by path (bench/ is a folder of scripts)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        path = ROOT / "bench" / "many_facts_claim.py"
        spec = importlib.util.spec_from_file_location("many_facts_claim", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["many_facts_claim"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_standard_error_verdict_and_breaking_point():
    bench = _bench_module()
    mean, error = bench.mean_and_error([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and error == pytest.approx(0.2 / 3**0.5)
    s = bench.Settings(ctx=256, pass_rwkvx=0.9, pass_rwkv7=0.5)
    table = {
        "rwkvx": {256: {8: (1.0, 0, 1), 64: (0.92, 0.01, 1), 96: (0.6, 0.1, 1)}},
        "rwkv7": {256: {8: (1.0, 0, 0), 64: (0.4, 0.05, 0), 96: (0.1, 0.05, 0)}},
    }
    assert bench.verdict(table, s) == {"passed": True, "facts_where_it_holds": [64]}
    table["rwkvx"][256][64] = (0.89, 0.01, 1)
    assert bench.verdict(table, s) == {"passed": False, "facts_where_it_holds": []}
    assert bench.breaking_point(table["rwkvx"][256]) == 64
    assert bench.breaking_point(table["rwkv7"][256]) == 64
    assert bench.breaking_point({8: (0.95, 0, 0)}) is None
