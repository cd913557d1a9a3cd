"""Serving: an OpenAI-compatible HTTP server with continuous batching and reusable states.

Rooms:
  batched_step  `SlotBatch`: the slots' state on the device, the compiled sample-then-step
                with per-row settings, and `admit` (a prefilled row into a slot).
  engine        `Engine`: the queue, prefill in pieces between decode steps, stops, cancels.
  state_cache   `StateCache`: states after prompt prefixes (LRU under a byte budget).
  named_states  `NamedStates`: states saved under a name (`POST /v1/states`, request `state`).
  chat_format   `chat_prompt`: messages as one RWKV World prompt.
  text_stream   `TextStream`: tokens to text deltas, cut at stop strings.
  protocol      the OpenAI request bodies checked, errors as OpenAI writes them.
  metrics       `Metrics`: counters and histograms as Prometheus text.
  service       `Service`: the engine's thread, text in, deltas out.
  app           `create_app`: the FastAPI routes (needs the `serve` extra).

The command line is `rwkvx_jax.serve`.
"""
