"""The training input pipeline: ordered windows, per-host batches, prefetch, resumable state."""

from __future__ import annotations

import functools

import grain
import jax
import numpy as np

from rwkvx_jax.data.windows import Order, TokenWindows, window_order


def _read_host_rows(
    global_indices, *, windows: TokenWindows, start: int, stop: int
) -> dict[str, np.ndarray]:
    return windows.read(global_indices[start:stop])


def make_train_dataset(
    tokens,
    *,
    ctx: int,
    batch_size: int,
    seed: int = 0,
    order: Order = "shuffle",
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    prefetch: int = 2,
) -> grain.IterDataset:
    """This host's training batches as a grain IterDataset (see `make_train_iterator`)."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    windows = TokenWindows(tokens, ctx)
    global_batch = batch_size * shard_count
    epoch = window_order(windows, order, seed)
    samples = epoch.repeat(num_epochs)
    if len(samples) < global_batch:
        raise ValueError(
            f"{num_epochs} epoch(s) of {len(epoch)} windows cannot fill one global batch of "
            f"{global_batch} (batch_size {batch_size} x {shard_count} shards)"
        )
    # Batch the window indices of each global step, then read only this host's rows of it.
    steps = samples.batch(global_batch, drop_remainder=True)
    rows = functools.partial(
        _read_host_rows,
        windows=windows,
        start=shard_index * batch_size,
        stop=(shard_index + 1) * batch_size,
    )
    read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    return steps.map(rows).to_iter_dataset(read_options)


def make_train_iterator(
    tokens,
    *,
    ctx: int,
    batch_size: int,
    seed: int = 0,
    order: Order = "shuffle",
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """An iterator over this host's training batches {"tokens": int32 [batch_size, ctx + 1]}.

    The global sample stream is `window_order(...)` repeated `num_epochs` times (forever if None;
    batches may straddle epochs). Global step g takes samples [g*G, (g+1)*G) with
    G = batch_size * shard_count, and host h gets rows [h*batch_size, (h+1)*batch_size) of it:
    concatenating the hosts' batches in host order gives the global batch, the same for any
    shard_count, and each host reads only its own windows. A final partial global batch is
    dropped. With order="magic_prime", global sample k reads RWKV-LM's window for sample k.

    Batches are read ahead by `prefetch` grain threads (no processes, so it runs anywhere). The
    iterator's `get_state()` is a small JSON-able dict; `set_state()` on a fresh iterator built
    with the same arguments resumes with exactly the batches that would have come next. For orbax,
    save it with `grain.checkpoint.CheckpointSave(iterator)` and restore with
    `grain.checkpoint.CheckpointRestore(iterator)` (handler `grain.checkpoint.CheckpointHandler`,
    one JSON file per process).

    Args:
      tokens: the flat token stream (`BinIdxTokens`, numpy array or memmap, or a sequence).
      ctx: context length T; each row holds T + 1 tokens.
      batch_size: rows per host per step.
      seed: shuffle seed in [0, 2**32) (order="shuffle" only).
      order: "shuffle", "magic_prime" or "sequential"; see `window_order`.
      shard_index: this host's index; defaults to `jax.process_index()`.
      shard_count: number of hosts; defaults to `jax.process_count()`.
      num_epochs: passes over the window order; None repeats forever.
      prefetch: batches read ahead in background threads; 0 reads synchronously.

    Raises:
      ValueError: bad arguments, or fewer windows than one global batch needs.
    """
    return iter(
        make_train_dataset(
            tokens,
            ctx=ctx,
            batch_size=batch_size,
            seed=seed,
            order=order,
            shard_index=shard_index,
            shard_count=shard_count,
            num_epochs=num_epochs,
            prefetch=prefetch,
        )
    )
