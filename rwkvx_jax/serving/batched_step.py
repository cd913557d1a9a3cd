"""The device side of continuous batching: a fixed number of slots, one compiled step.

`SlotBatch` holds the decode state, next-token logits and sampler state of `slots` rows on the
device. Two compiled functions touch them, each compiled once (`warm_up`) whatever requests
come: `advance` samples one token per row by that row's own settings and reads it (inactive
rows absorb nothing), and `admit` writes a freshly prefilled batch-1 state into one slot. The
slot index, the active mask and the per-row settings are arrays, never static arguments, so no
mix of requests compiles anything new.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkvx_jax.decoding.decoder import Decoder
from rwkvx_jax.decoding.row_sampling import (
    RowSamplerState,
    RowSettings,
    init_row_sampler,
    row_key,
    row_settings,
    sample_rows,
)
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.model import DecodeState


def _write_row(batched, row, slot):
    """Every leaf of `batched` [S, ...] with row `slot` replaced by `row`'s only row [1, ...]."""
    return jax.tree.map(
        lambda big, one: jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, 0),
        batched,
        row,
    )


class SlotBatch:
    """`slots` rows decoded together; a row is a request's sequence between admit and release.

    Example:
      batch = SlotBatch(decoder, slots=4)
      batch.admit(0, state, logits, SamplingConfig(temperature=0.0))  # a batch-1 prefill
      tokens = batch.advance(np.array([True, False, False, False]))   # int32 [4] on the host
    """

    def __init__(self, decoder: Decoder, slots: int):
        """Args:
        decoder: the model's decoder; its cache size is every slot's context capacity.
        slots: S, rows decoded together (the compiled batch size).
        """
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.decoder = decoder
        self.slots = slots
        vocab = decoder.config.vocab_size
        self.reset()
        step = decoder.step_function

        def advance(weights, state, sampler, logits, active, settings):
            tokens, sampler = sample_rows(logits, sampler, settings, active)
            logits, state = step(weights, state, tokens, active)
            return tokens, logits, state, sampler

        def admit(state, logits, sampler, row_state, row_logits, slot, key):
            state = _write_row(state, row_state, slot)
            logits = jax.lax.dynamic_update_slice_in_dim(logits, row_logits, slot, 0)
            fresh = RowSamplerState(
                occurrence=jnp.zeros((1, vocab), jnp.float32),
                seen=jnp.zeros((1, vocab), jnp.bool_),
                rng=key[None],
            )
            return state, logits, _write_row(sampler, fresh, slot)

        self._advance = jax.jit(advance, donate_argnums=(1, 2, 3))
        self._admit = jax.jit(admit, donate_argnums=(0, 1, 2))

    def reset(self) -> None:
        """Fresh buffers for every slot (all free): after a failed step, whose donated buffers
        may be gone."""
        vocab = self.decoder.config.vocab_size
        self.state: DecodeState = self.decoder.init_state(self.slots)
        self.logits = jnp.zeros((self.slots, vocab), jnp.float32)
        self.sampler: RowSamplerState = init_row_sampler(self.slots, vocab)
        self.settings: RowSettings = row_settings([SamplingConfig(temperature=0.0)] * self.slots)

    def admit(
        self, slot: int, row_state: DecodeState, row_logits, sampling: SamplingConfig
    ) -> None:
        """Puts a prefilled sequence into `slot`.

        Args:
          slot: the row, in [0, S).
          row_state: its batch-1 decode state (consumed).
          row_logits: float32 [1, V], its next-token logits.
          sampling: its sampling settings and seed (bans and stop tokens are not applied here).
        """
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot must lie in [0, {self.slots}), got {slot}")
        for name, column in zip(RowSettings._fields, row_settings([sampling]), strict=True):
            getattr(self.settings, name)[slot] = column[0]
        self.state, self.logits, self.sampler = self._admit(
            self.state,
            self.logits,
            self.sampler,
            row_state,
            jnp.asarray(row_logits, jnp.float32).reshape(1, -1),
            jnp.int32(slot),
            jnp.asarray(row_key(sampling.seed)),
        )

    def advance(self, active: np.ndarray) -> np.ndarray:
        """One token for every active row, read into its state; int32 [S] on the host (the
        entries of inactive rows mean nothing)."""
        tokens, self.logits, self.state, self.sampler = self._advance(
            self.decoder.weights,
            self.state,
            self.sampler,
            self.logits,
            np.asarray(active, bool),
            self.settings,
        )
        return np.asarray(tokens)

    def warm_up(self) -> None:
        """Compiles `advance` and `admit` (and the decoder's batch-1 prefill piece) now, so that
        serving compiles nothing; leaves every slot empty of meaning (they are all free)."""
        logits, row = self.decoder.prefill([[0]])
        self.admit(0, row, logits, SamplingConfig(temperature=0.0))
        self.advance(np.zeros((self.slots,), bool))
