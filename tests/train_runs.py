"""`train.py` run as a subprocess, as the resume and multi-process tests drive it: a run, its
losses, a kill -9 after its first checkpoint, a free port for jax.distributed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from rwkvx_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cli(workdir, cache_dir, steps, every, *args: str, devices: int = 1):
    """`train.py` for `steps` steps with a checkpoint every `every`, on `devices` CPU devices,
    compiling through the persistent cache `cache_dir`; `args` are more flags and overrides."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device unless asked
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    command = [
        sys.executable, os.path.join(REPO, "train.py"), "--workdir", str(workdir),
        "--steps", str(steps), "--no-progress", *args, "data.prefetch=1",
        f"checkpoint.every={every}", "checkpoint.keep=2",
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_losses(workdir):
    """[(step, loss)] of a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in training.read_metrics(str(workdir / "metrics.jsonl"))]


def saved_steps(checkpoints) -> list[int]:
    return [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if checkpoints.exists() else []


def kill_after_first_checkpoint(run, checkpoints, timeout: float = 600) -> int:
    """SIGKILLs `run` as soon as a checkpoint folder appears; returns the last saved step."""
    deadline = time.time() + timeout
    while time.time() < deadline and run.poll() is None and not saved_steps(checkpoints):
        time.sleep(0.02)
    assert run.poll() is None, "the run finished before it could be killed"
    run.send_signal(signal.SIGKILL)
    run.wait()
    return max(saved_steps(checkpoints))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes_and_one(tmp_path, steps: int, *args: str):
    """The same run by 2 processes x 2 CPU devices through jax.distributed (gloo), and by 1
    process with 1 device; returns the two runs' `run_losses`. `args`: flags and overrides."""
    common = [
        sys.executable, os.path.join(REPO, "train.py"), "--no-progress", "--steps", str(steps),
        *args, "checkpoint.every=0",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    coordinator = f"localhost:{free_port()}"
    multi = ["--workdir", str(tmp_path / "multi"), "--distributed", "--coordinator", coordinator]
    workers = [
        subprocess.Popen(
            [*common, *multi, "--num-processes", "2", "--process-id", str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    # One device: the same run without the mesh flags.
    alone = [a for a in common if not a.startswith("mesh=")]
    single = subprocess.run(
        [*alone, "--workdir", str(tmp_path / "single")], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr
    return run_losses(tmp_path / "multi"), run_losses(tmp_path / "single")
