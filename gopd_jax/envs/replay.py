"""`alfworld_replay_bench`: recorded real ALFWorld episodes played back, for benchmarks only.

A benchmark of the training loop needs the environment's real observations (their token lengths set the
prompt lengths) and its real step latency, without the TextWorld engine on the machine (GPU hosts have none).
`experiments/record_alfworld.py` records games on the real engine: every state along the walkthrough, plus the
engine's answers there to a few state-preserving commands, each with its wall time. This environment replays
them: the walkthrough action advances, a recorded command gets its recorded answer, anything else gets
ALFWorld's "Nothing happens." and leaves the state as is. That last rule is where it differs from the real
game (an admissible action off the walkthrough would change the state there), which is why it is a benchmark
tool, never a training or evaluation environment. With `realtime` each answer waits as long as the engine took.
"""
from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

from gopd_jax.envs.base import StepResult, TaskSpec

ENV_NAME = "alfworld_replay_bench"
SPLITS = ("valid_unseen",)
_RECORDING = Path("experiments/data/alfworld_replay.json")


def find_recording(data_dir: str | None) -> Path:
    if data_dir is not None:
        path = Path(data_dir)
        path = path / _RECORDING.name if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{data_dir}: no recording; make one with `python -m experiments.record_alfworld`")
        return path
    for parent in Path(__file__).resolve().parents:
        if (parent / _RECORDING).is_file():
            return parent / _RECORDING
    raise FileNotFoundError(f"no {_RECORDING} found above {Path(__file__).parent}; pass data_dir=<recording.json>")


@functools.lru_cache(maxsize=4)
def load_recording(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())["games"]


def list_replay_tasks(split: str, data_dir: str | None = None) -> list[TaskSpec]:
    """One task per recorded game; the task id carries the recording's path (workers need no data_dir)."""
    path = find_recording(data_dir).resolve()
    return [TaskSpec(ENV_NAME, g["split"], f"{path}#{i}", g["task_type"])
            for i, g in enumerate(load_recording(str(path))) if g["split"] == split]


class AlfWorldReplayEnv:
    """Replays one recorded game at a time (see the module docstring)."""

    def __init__(self, realtime: bool = True):
        self.realtime = realtime
        self._states: list[dict] = []
        self._i = 0
        self._miss_s = 0.0

    def _answer(self, rec: dict, admissible: list[str]) -> StepResult:
        if self.realtime:
            time.sleep(rec["seconds"])
        won = bool(rec.get("won", False))
        return StepResult(rec["observation"], float(won), 100.0 * won, bool(rec.get("done", False)), won,
                          tuple(rec.get("admissible", admissible)))

    def reset(self, task: TaskSpec) -> tuple[str, StepResult]:
        path, _, index = task.task_id.rpartition("#")
        game = load_recording(path)[int(index)]
        self._states, self._i = game["states"], 0
        self._miss_s = statistics.median(o["seconds"] for s in self._states for o in s["other"])
        return game["goal"], self._answer(self._states[0], [])

    def step(self, action: str) -> StepResult:
        here = self._states[self._i]
        if self._i + 1 < len(self._states) and action == self._states[self._i + 1]["action"]:
            self._i += 1
            return self._answer(self._states[self._i], [])
        rec = next((o for o in here["other"] if o["action"] == action), None)
        return self._answer(rec or {"observation": "Nothing happens.", "seconds": self._miss_s}, here["admissible"])

    def expert_actions(self) -> list[str]:
        return [s["action"] for s in self._states[1:]]

    def close(self) -> None:
        pass
