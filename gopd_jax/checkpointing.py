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
        structure and dtypes, and a checkpoint of another structure or shape (another model) is refused;
        without it, namedtuples come back as plain dicts/lists."""
        step = self._step(step)
        template = None if template_state is None else jax.tree.map(np.asarray, jax.device_get(template_state))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template), extra=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            if template is None:
                raise
            raise ValueError(f"checkpoint {self._manager.directory}/{step} does not hold a state of this model's "
                             f"structure ({type(e).__name__}: {e}); it was made by another model or optimizer: "
                             "use a new output directory") from e
        if template is not None:
            check_shapes(restored.state, template, f"checkpoint {self._manager.directory}/{step}")
        return restored.state, restored.extra

    def extra(self, step: Optional[int] = None) -> dict:
        """Only the JSON `extra` of checkpoint `step` (default: the latest): cheap, no arrays are read."""
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra

    def _step(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self._manager.directory}")
        return step

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


def check_shapes(restored, template, source: str) -> None:
    """Raise ValueError naming every leaf whose shape or dtype differs between `restored` and `template`
    (orbax restores the saved shapes whatever the template says)."""
    got = jax.tree_util.tree_flatten_with_path(restored)[0]
    want = jax.tree_util.tree_flatten_with_path(template)[0]
    if [p for p, _ in got] != [p for p, _ in want]:
        raise ValueError(f"{source} holds a state of another structure than this model's: use a new output directory")
    bad = [f"{jax.tree_util.keystr(p)}: saved {np.shape(a)} {np.asarray(a).dtype}, expected {np.shape(b)} "
           f"{np.asarray(b).dtype}" for (p, a), (_, b) in zip(got, want)
           if np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype]
    if bad:
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{source} was saved for another model (different shapes):\n  " + "\n  ".join(bad[:5]) + more
                         + "\nuse a new output directory for this model")
