"""The checkpoints of a training run: train state and data iterator in one orbax manager."""

from __future__ import annotations

import os

TrainState = dict  # {"step": int32 [], "params": tree, "opt_state": tree}


class CheckpointStore:
    """One orbax CheckpointManager: item "state" (train state) + item "data" (grain iterator)."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: TrainState, iterator) -> None:
        import grain

        ocp = self._ocp
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state, iterator) -> TrainState:
        import grain

        ocp = self._ocp
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator),
        )
        return self.manager.restore(step, args=args)["state"]

    def restore_state(self, step: int, abstract_state) -> TrainState:
        """The train state alone (no iterator), e.g. to inspect a checkpoint."""
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
