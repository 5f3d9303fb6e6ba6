"""Checkpoints: an orbax CheckpointManager of the train state and the data loader's position.

Each step directory holds four items: `state` (the train-state pytree, restored straight
onto the target shardings, so a run may resume on another mesh), `layout` (a JSON of every
state leaf's path, shape and dtype), `config` (the run's config as JSON) and `data` (the
grain iterator state of each process, so a resumed run reads the exact next batch). Saves
are asynchronous and keep the newest `keep` steps.

Restore tries steps newest-first:
  - a step that cannot be read (half-written, corrupted: its state, layout, config or a
    process's data position) is moved to `corrupt_checkpoints/` beside the checkpoint
    folder (never deleted) with a warning, and the step before it is used. When every step
    is unreadable, restore raises instead of letting the run start from scratch unnoticed.
    An error of the machine rather than of the files (out of memory, no permission) is
    raised as it is, and nothing is moved;
  - a readable step whose layout differs from the state the config builds (another model
    or optimizer) is a ConfigError naming the first difference: the checkpoints stay where
    they are, and nothing starts from scratch over them (a step saved without a layout, by
    an earlier version, is restored unchecked);
  - a step saved by a config that differs in a field the caller names as fixed (the
    trainer's `RESUME_FIXED`: what the model computes and which batch comes next) is a
    ConfigError naming the field and both values; other differences are allowed and
    listed in a warning (a step saved without a config is restored unchecked);
  - a step whose data positions were saved by another number of processes, or that do not
    fit this run's loader (e.g. another `data.workers`), is a ConfigError too.
A read-only checkpointer (`omnimoe.sample` beside a live run) never moves, deletes or
cleans anything: it skips unreadable steps with a warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from omnimoe.config import ConfigError


def layout(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a pytree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
          for path, leaf in leaves}


def first_difference(saved: dict, wanted: dict) -> str | None:
  """The first leaf (in sorted path order) that is missing on one side or differs."""
  for path in sorted(set(saved) | set(wanted)):
    if path not in saved:
      return f"{path} is not in the checkpoint"
    if path not in wanted:
      return f"the checkpoint has {path}, which this config does not build"
    if saved[path] != wanted[path]:
      (s_shape, s_dtype), (w_shape, w_dtype) = saved[path], wanted[path]
      return (f"{path} is {tuple(s_shape)} {s_dtype} in the checkpoint, {tuple(w_shape)} "
              f"{w_dtype} in this config")
  return None


ABSENT = "<absent>"  # a config field that one side does not have


def config_leaves(tree: dict, prefix: str = "") -> dict[str, object]:
  """{dotted path: value} of a nested config dict's leaves."""
  leaves = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      leaves.update(config_leaves(value, path + "."))
    else:
      leaves[path] = value
  return leaves


def config_differences(saved: dict, current: dict) -> dict[str, tuple]:
  """{dotted path: (saved value, current value)} of the leaves that differ, in sorted path
  order; a leaf missing on one side is `ABSENT` there."""
  saved, current = config_leaves(saved), config_leaves(current)
  return {path: (saved.get(path, ABSENT), current.get(path, ABSENT))
          for path in sorted(set(saved) | set(current))
          if saved.get(path, ABSENT) != current.get(path, ABSENT)}


def is_under(path: str, prefixes) -> bool:
  """Whether dotted `path` is one of `prefixes` or lies under one (whole names)."""
  return any(path == p or path.startswith(p + ".") for p in prefixes)


def machine_error(error: BaseException) -> bool:
  """An error of the machine, not of the checkpoint's files (out of memory, no permission),
  anywhere in the exception's chain: such a step is not set aside."""
  while error is not None:
    if isinstance(error, (MemoryError, PermissionError)) or "RESOURCE_EXHAUSTED" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class NoReadableCheckpoint(RuntimeError):
  """Every step in the checkpoint folder was unreadable (all set aside, none deleted)."""


class Checkpointer:
  """Saves and restores (state, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int = 1, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, data_iterator, config: dict | None = None) -> None:
    """Starts saving `step` (in the background when async); a step already saved is skipped.
    `config` (a JSON-able dict, the run's config) is saved beside the state when given."""
    if step in self._mngr.all_steps():
      return
    items = dict(state=ocp.args.StandardSave(state), layout=ocp.args.JsonSave(layout(state)),
                 data=grain.checkpoint.CheckpointSave(data_iterator))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, data_iterator=None, config: dict | None = None,
              fixed: Callable[[str], bool] = lambda path: True):
    """(step, state) of the newest readable step, or None when there is none.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with target shardings. The data
    iterator, when given, is set to the saved position in place. With `config` (this
    run's, as a dict), a step saved by a config that differs in a field for which `fixed`
    (of the dotted path) is true is a ConfigError; other differences are logged. Raises
    ConfigError when a readable step holds a state of another layout or positions of
    another process count, and NoReadableCheckpoint when there were steps and none could
    be read (not in read-only mode, which returns None).
    """
    wanted = layout(abstract_state)
    steps = sorted(self._mngr.all_steps(), reverse=True)
    for step in steps:
      try:
        saved = self._saved_json(step, "layout")
        if saved is not None and (difference := first_difference(saved, wanted)):
          raise ConfigError(
              f"checkpoint step {step} in {self.directory} holds another model or optimizer "
              f"state than this config builds: {difference}. Resume with the run's own "
              f"config (config.json beside the checkpoints) or use a new workdir.")
        if config is not None:
          self._check_config(step, config, fixed)
        if data_iterator is not None:
          self._check_data_item(step)
        state = self._read(step, state=ocp.args.StandardRestore(abstract_state))["state"]
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step is skipped
        if machine_error(e):
          raise
        self._unreadable(step, e)
        continue
      if data_iterator is not None:
        self._restore_data(step, data_iterator)
      return step, state
    if steps and not self.read_only:
      raise NoReadableCheckpoint(
          f"none of the {len(steps)} checkpoint step(s) in {self.directory} could be read "
          f"(warnings above); they were moved to {self._aside_folder()}, none deleted. "
          f"Relaunch to start from scratch, or move a repaired step back.")
    return None

  def _saved_json(self, step: int, item: str) -> dict | None:
    """The step's saved JSON item ('layout', 'config'); None for a checkpoint written before
    the item was saved (the check it serves is then skipped)."""
    if not os.path.exists(os.path.join(self.directory, str(step), item)):
      return None
    return self._read(step, **{item: ocp.args.JsonRestore()})[item]

  def _check_config(self, step: int, config: dict, fixed) -> None:
    """ConfigError on a change of a fixed field since the step was saved; logs the rest."""
    saved = self._saved_json(step, "config")
    if saved is None:
      return
    changes = config_differences(saved, config)
    for path, (before, now) in changes.items():
      if fixed(path):
        raise ConfigError(
            f"{path}={now!r}, but checkpoint step {step} in {self.directory} was saved with "
            f"{path}={before!r}: a resumed run keeps what the model computes and which batch "
            f"comes next. Resume with the run's own config (config.json beside the "
            f"checkpoints) or use a new workdir.")
    if changes:
      logging.warning("resuming step %d with config changes: %s", step, "; ".join(
          f"{path} {before!r} -> {now!r}" for path, (before, now) in changes.items()))

  def _restore_data(self, step: int, data_iterator) -> None:
    """Sets the iterator to the step's saved position. The state and the position's JSON
    read, so a position that does not fit this loader is a config change (e.g.
    `data.workers`), not corruption."""
    try:
      self._read(step, data=grain.checkpoint.CheckpointRestore(data_iterator))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          f"checkpoint step {step} in {self.directory}: its data position does not fit this "
          f"run's loader ({type(e).__name__}: {e}); the data section of the config (e.g. "
          f"data.workers) must match the run that saved it (config.json beside the "
          f"checkpoints)") from e

  def _read(self, step: int, **items):
    return self._mngr.restore(step, args=ocp.args.Composite(**items))

  def _check_data_item(self, step: int) -> None:
    """grain saves one position per process (`process_<i>-of-<n>.json`): one saved by
    another process count is a ConfigError, not a corrupt step; every process's position
    must parse as JSON, else the step is unreadable (every process reads them all, so all
    agree on which step to set aside)."""
    folder = os.path.join(self.directory, str(step), "data")
    files = {f: int(m.group(1)) for f in (os.listdir(folder) if os.path.isdir(folder) else ())
             if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f))}
    counts = set(files.values())
    if counts and jax.process_count() not in counts:
      raise ConfigError(
          f"checkpoint step {step} in {self.directory} holds the data positions of "
          f"{sorted(counts)[0]} process(es); this run has {jax.process_count()}. Resume with "
          f"that many processes (any devices per process and any mesh), or use a new workdir.")
    if not files:
      raise FileNotFoundError(f"no data positions in {folder}")
    for name in files:
      with open(os.path.join(folder, name)) as f:
        json.load(f)

  def _unreadable(self, step: int, error: Exception) -> None:
    what = "skipping it" if self.read_only else "setting it aside, falling back to the previous one"
    logging.warning("checkpoint step %d in %s cannot be read (%s: %s); %s", step,
                    self.directory, type(error).__name__, error, what)
    if not self.read_only:
      self._set_aside(step)

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's folder (under a name not yet taken),
    so the step can be saved again."""
    if jax.process_index() == 0:
      aside = self._aside_folder()
      os.makedirs(aside, exist_ok=True)
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(aside, f"{step}.{n}"), n + 1
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._mngr.reload()

  def _aside_folder(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._mngr.wait_until_finished()
    self._mngr.close()
