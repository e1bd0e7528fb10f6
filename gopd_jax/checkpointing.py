"""Train-state checkpoints with orbax: one directory per step holding the state pytree and a JSON `extra`.

- Atomic: orbax writes `<step>.orbax-checkpoint-tmp-<ts>/` and renames it to `<step>/` when complete, so a
  run killed mid-save leaves only a tmp directory, which is never restored (and is deleted on the next start).
- Synchronous: `save` returns only once the checkpoint is final, so a kill right after it loses nothing.
- Device-count independent: the state is saved as host (numpy) arrays, unreplicated; `restore` returns host
  arrays, to be replicated onto however many devices the resumed run has (`train.replicate`).
- `extra` is any JSON-able dict: curriculum position, experiment config, data cursor, ...
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Keep the last `max_to_keep` checkpoints of a train state under `directory`."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: Optional[int] = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=("state", "extra"))

    def save(self, step: int, state, extra: Optional[dict[str, Any]] = None) -> None:
        """Save an unreplicated state (host or single-device arrays) plus `extra` as checkpoint `step`."""
        host_state = jax.tree.map(np.asarray, jax.device_get(state))
        self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                              extra=ocp.args.JsonSave(dict(extra or {}))))
        self._manager.wait_until_finished()

    def restore(self, template_state=None, step: Optional[int] = None):
        """(state, extra) of checkpoint `step` (default: the latest), as host arrays.

        With `template_state` (e.g. a freshly initialised TrainState) the result has its exact pytree
        structure and dtypes; without it, namedtuples come back as plain dicts/lists."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self._manager.directory}")
        template = None if template_state is None else jax.tree.map(np.asarray, jax.device_get(template_state))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                                                      extra=ocp.args.JsonRestore()))
        return restored.state, restored.extra

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
