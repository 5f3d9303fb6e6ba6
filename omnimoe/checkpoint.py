"""Checkpoints: an orbax CheckpointManager of the train state and the data loader's position.

Each step directory holds two items: `state` (the train-state pytree, restored straight onto
the target shardings, so a run may resume on another mesh) and `data` (the grain iterator
state, so a resumed run reads the exact next batch). Saves are asynchronous and keep the
newest `keep` steps. Restore tries steps newest-first: a step that cannot be read
(half-written, corrupted) is moved to `corrupt_checkpoints/` beside the checkpoint folder
with a warning, and the step before it is used.
"""
from __future__ import annotations

import os
import shutil

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class Checkpointer:
  """Saves and restores (state, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    """Starts saving `step` (in the background when async); a step already saved is skipped."""
    if step in self._mngr.all_steps():
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    self._mngr.save(step, args=args, force=True)

  def restore(self, abstract_state, data_iterator=None):
    """(step, state) of the newest readable step, or None when there is none.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with target shardings. The data
    iterator, when given, is set to the saved position in place.
    """
    for step in sorted(self._mngr.all_steps(), reverse=True):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step is skipped
        logging.warning("checkpoint step %d in %s cannot be read (%s: %s); falling back to "
                        "the previous one", step, self.directory, type(e).__name__, e)
        self._set_aside(step)
        continue
      return step, restored["state"]
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's folder, so the step can be saved again."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(step))
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._mngr.reload()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._mngr.wait_until_finished()
    self._mngr.close()
