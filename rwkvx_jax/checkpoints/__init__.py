"""Checkpoint I/O, all of it: every file format a model's weights or a run's state lives in.

Rooms:
  tensor_files     official `.pth` read without running pickled code, `.pth` and safetensors
                   written atomically.
  official_layout  the official state-dict layout (SPEC §2) <-> Flax params, one table.
  directory        converted checkpoints: a folder with config.json, metadata.json and orbax
                   params (`save_params` / `load_params`).
  conversion       file to file: `.pth` -> folder -> `.pth` / safetensors; any source's params.
  train_state      a training run's orbax manager: train state and data iterator together.
  random_weights   seeded random checkpoints in the official layout, and the `--demo` model.
"""
