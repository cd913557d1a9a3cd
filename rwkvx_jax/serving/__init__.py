"""Serving: an OpenAI-compatible HTTP server with continuous batching and reusable states.

Rooms:
  batched_step  `SlotBatch`: the slots' state on the device, the compiled sample-then-step
                with per-row settings, and `admit` (a prefilled row into a slot).
  engine        `Engine`: the queue, prefill in pieces between decode steps, stops, cancels.
  state_cache   `StateCache`: states after prompt prefixes (LRU under a byte budget).

The command line is `rwkvx_jax.serve`.
"""
