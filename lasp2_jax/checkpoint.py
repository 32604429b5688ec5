"""Checkpoints: an orbax CheckpointManager over (train state, data-iterator state) pairs."""

from __future__ import annotations

import os
from collections.abc import Callable

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves (asynchronously) and restores a train-state pytree with the data position.

    The state is saved as an orbax standard pytree (sharded arrays written by each process
    for its shards), the data-iterator position as JSON; ``keep`` newest steps are kept.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data"))

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True)

    def restore_latest(self, abstract_state, log: Callable[[str], None]):
        """(step, state, data_state) of the newest readable checkpoint, or None.

        A checkpoint that fails to load (a partial write, a corrupted file) is reported and
        the one before it is tried.
        """
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure means: try an older one
                log(f"checkpoint at step {step} is unreadable ({type(e).__name__}: "
                    f"{str(e)[:200]}); trying the one before")
                unreadable.append(step)
                continue
            break
        else:
            step = None
        # The run will pass these steps again and save them anew.
        for bad in unreadable:
            self.manager.delete(bad)
        if step is None:
            return None
        return step, out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
