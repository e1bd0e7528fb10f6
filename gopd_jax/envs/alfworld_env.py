"""ALFWorld (text-only, TextWorld PDDL engine) adapter.

Games are loaded straight from `game.tw-pddl` files (self-contained: domain, grammar, problem and a
`walkthrough`), so the train split works without ALFRED's `traj_data.json` and no planner runs.
"""
from __future__ import annotations

import copy
import functools
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from gopd_jax.envs.base import StepResult, TaskSpec

ENV_NAME = "alfworld"
SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
TASK_TYPES = ("pick_and_place_simple", "pick_two_obj_and_place", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "look_at_obj_in_light")
_ARCHIVE = Path("shared/data/alfworld/json_2.1.1.tar.xz")
_GOAL_RE = re.compile(r"Your task is to:\s*(.*)", re.DOTALL)
EXPERTS = ("walkthrough", "handcoded")
_BANNER_RE = re.compile(r"^-= Welcome to TextWorld, ALFRED! =-\s*")


def _cache_dir() -> Path:
    return Path(os.environ.get("GOPD_CACHE", Path.home() / ".cache" / "gopd_jax")) / "alfworld"


def _find_archive() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / _ARCHIVE).is_file():
            return parent / _ARCHIVE
    return None


def _unpack_once(archive: Path, dest: Path) -> None:
    """Unpacks into a temp dir beside `dest`, then renames: a killed or concurrent unpack never
    leaves a half-written `dest` behind (the loser of a race just discards its copy)."""
    if (dest / "json_2.1.1").is_dir():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".alfworld-unpack-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:xz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
            raise RuntimeError(f"{archive}: cannot unpack the ALFWorld archive ({type(e).__name__}: {e}); it is damaged "
                               "or incomplete: copy it again, or run `alfworld-download` and set ALFWORLD_DATA to the "
                               "folder that contains json_2.1.1/") from e
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first
            if not (dest / "json_2.1.1").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding `json_2.1.1/`: explicit arg, else $ALFWORLD_DATA, else the cache where an
    earlier run unpacked the project's archive, else that archive unpacked once into the cache."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not (root / "json_2.1.1").is_dir():
            raise FileNotFoundError(f"{root} has no json_2.1.1/ folder; run `alfworld-download` or fix the path")
        return root
    # `import alfworld` sets ALFWORLD_DATA to ~/.cache/alfworld even when nothing was downloaded
    # there, so an env var without data falls through to the archive instead of failing.
    env_root = Path(os.environ.get("ALFWORLD_DATA", "")).expanduser()
    if os.environ.get("ALFWORLD_DATA") and (env_root / "json_2.1.1").is_dir():
        return env_root
    if (_cache_dir() / "json_2.1.1").is_dir():  # unpacked by an earlier run
        return _cache_dir()
    archive = _find_archive()
    if archive is None:
        raise FileNotFoundError("ALFWorld data not found: run `alfworld-download` and set ALFWORLD_DATA "
                                "to the folder that contains json_2.1.1/")
    _unpack_once(archive, _cache_dir())
    return _cache_dir()


def task_type_of(game_file: str | os.PathLike) -> str:
    task_folder = Path(game_file).parent.parent.name  # <split>/<task>/<trial>/game.tw-pddl
    for task_type in TASK_TYPES:
        if task_folder.startswith(task_type):
            return task_type
    raise ValueError(f"cannot infer the ALFWorld task type of {game_file}")


def list_alfworld_tasks(split: str, data_dir: str | None = None) -> list[TaskSpec]:
    split_dir = resolve_data_dir(data_dir) / "json_2.1.1" / split
    games = sorted(str(p) for p in split_dir.glob("*/*/game.tw-pddl"))
    if not games:
        raise FileNotFoundError(f"no ALFWorld games (<task>/<trial>/game.tw-pddl) in {split_dir}: the data is missing "
                                "or incomplete; run `alfworld-download`, or point ALFWORLD_DATA / --data-dir at a "
                                "complete folder that contains json_2.1.1/")
    return [TaskSpec(ENV_NAME, split, g, task_type_of(g)) for g in games]


def split_intro(text: str) -> tuple[str, str]:
    """First observation -> (goal, observation without the welcome banner)."""
    observation = _BANNER_RE.sub("", text).strip()
    match = _GOAL_RE.search(observation)
    goal = match.group(1).strip() if match else ""
    return goal, observation


class _TranslationCache:
    """Stands in for the `fast_downward` module inside textworld's PDDL logic (set in the worker process).

    textworld translates a game's PDDL to SAS four times per episode (measured: ~70% of a reset): a plain
    and an "optimized" translation while loading (only to list the game's entities), and both again in
    `reset`. The translation is a pure function of (domain, problem), so the reset reuses the load's. The
    optimized one only serves the engine's re-planner (policy commands), which this adapter never asks
    for, so the plain translation - a complete encoding of the same task - is loaded in its place."""

    def __init__(self, module):
        self._module = module
        self._last: tuple[tuple[str, str], tuple] | None = None

    def __getattr__(self, name):
        return getattr(self._module, name)

    def pddl2sas(self, domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        del optimize  # see the class docstring
        if self._last is None or self._last[0] != (domain, problem):
            self._last = ((domain, problem), self._module.pddl2sas(domain, problem, verbose=verbose))
        return self._last[1]


def _memoized_parse(parse, maxsize: int = 8192):
    """A memo for textworld's text-grammar parser (TatSu, pure Python, ~40% of a reset once translations
    are cached): every game's grammar repeats the same few hundred rules and command templates. Callers
    mutate the parsed symbols (they attach contexts), so each call gets its own deep copy."""
    cached = functools.lru_cache(maxsize=maxsize)(lambda text, kwargs: parse(text, **dict(kwargs)))

    def parse_copy(text, **kwargs):
        return copy.deepcopy(cached(text, tuple(sorted(kwargs.items()))))
    parse_copy.memoized = True
    return parse_copy


class _QueryCache:
    """Stands in for `Rule` inside textworld's text generator, whose only use of it is parsing the conditions
    of its grammar rules (TatSu, pure Python; ~19 parses of the same few strings per step, a third of a step).
    The parsed query is only read (matched against the state), so every caller shares one."""

    def __init__(self, rule_cls, maxsize: int = 4096):
        self._rule_cls = rule_cls
        self.parse_conjunctive_query = functools.lru_cache(maxsize=maxsize)(rule_cls.parse_conjunctive_query)

    def __getattr__(self, name):
        return getattr(self._rule_cls, name)


def _copy_context(context: dict) -> dict:
    """textworld's text generator copies a derivation context for every symbol it expands, deep-copying the
    variable and placeholder maps (half of a step's time). Their values (entity infos, logic variables) are
    never mutated, only the maps are extended, so copies of the maps suffice."""
    return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}


def _install_engine_caches() -> None:
    """Idempotent, per process; results are identical to the uncached engine (tests/test_alfworld_engine_caches)."""
    import fast_downward
    import textworld.envs.pddl.logic as pddl_logic
    import textworld.envs.pddl.textgen as textgen

    if not isinstance(pddl_logic.fast_downward, _TranslationCache):
        pddl_logic.fast_downward = _TranslationCache(fast_downward)
    if not getattr(textgen._parse_and_convert, "memoized", False):
        textgen._parse_and_convert = _memoized_parse(textgen._parse_and_convert)
    if not isinstance(textgen.Rule, _QueryCache):
        textgen.Rule = _QueryCache(textgen.Rule)
    textgen.copy_context = _copy_context


def task_params(game_file: str) -> dict:
    """The handcoded expert's task parameters (ALFRED's `pddl_params` + task type), from the game's
    `traj_data.json` where it exists (valid splits), else from its folder name
    `<task type>-<object>-<movable receptacle or None>-<receptacle or light>-<scene>` (the train split ships
    without traj_data; the two agree on every valid game: tests/test_alfworld_expert.py)."""
    traj = Path(game_file).parent / "traj_data.json"
    if traj.is_file():
        data = json.loads(traj.read_text())
        return {**data["pddl_params"], "task_type": data["task_type"]}
    task_type, obj, mrecep, target, _ = Path(game_file).parent.parent.name.split("-")
    light = task_type == "look_at_obj_in_light"
    return {"object_target": obj, "mrecep_target": "" if mrecep == "None" else mrecep,
            "parent_target": "" if light else target, "toggle_target": target if light else "",
            "object_sliced": False, "task_type": task_type}


def handcoded_expert(game_file: str):
    """ALFWorld's HandCodedTWAgent for one game, set up as its own `reset` does, but from `task_params` so
    train games (no traj_data.json) work too. Its tie-breaks use Python's global `random`: seeded per game
    here so its labels replay."""
    import random

    import alfworld.gen.constants as constants
    from alfworld.agents.expert import HandCodedTWAgent

    agent = HandCodedTWAgent(max_steps=200)
    params = {k: v.lower() if v in constants.OBJECTS else v for k, v in task_params(game_file).items()}
    agent.task_params = params
    agent.policy = agent.get_task_policy(params)(params, max_steps=agent.max_steps)
    random.seed(zlib.crc32(str(Path(game_file).parent.relative_to(Path(game_file).parents[2])).encode()))
    return agent


class AlfWorldEnv:
    """One ALFWorld game at a time; `reset` loads the game file named by the task id.

    `expert`: "walkthrough" (default) - the game file's stored solution, a fixed plan for the start state
    (`expert_actions`); "handcoded" - ALFWorld's own rule-based expert (the one its authors trained DAgger
    agents with), which searches receptacles like an agent that cannot see inside them and re-plans from
    whatever state the episode is in: every StepResult then carries `info["expert_action"]`, its next action
    from that state (None where its rules fail). Costs the engine's facts at every step."""

    def __init__(self, expert: str = "walkthrough"):
        import textworld  # heavy imports stay inside the worker process
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv

        if expert not in EXPERTS:
            raise ValueError(f"unknown ALFWorld expert {expert!r}; choose one of {', '.join(EXPERTS)}")
        _install_engine_caches()

        # One engine for the worker's lifetime: every new PddlEnv dlopens a fresh copy of
        # fast-downward's 34 MB library that is never unloaded (~2.6 MB RSS per episode otherwise).
        # The demangler turns PDDL ids into names like "desk 1".
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=expert == "handcoded")
        self._env = AlfredDemangler(PddlEnv(infos), shuffle=False)
        self._expert = expert
        self._handcoded = None
        self._walkthrough: list[str] = []

    def reset(self, task: TaskSpec) -> tuple[str, StepResult]:
        self._env.load(task.task_id)
        with open(task.task_id) as f:
            self._walkthrough = list(json.load(f)["walkthrough"])
        state = self._env.reset()
        goal, observation = split_intro(state.feedback)
        info = {}
        if self._expert == "handcoded":
            self._handcoded = handcoded_expert(task.task_id)
            self._handcoded.observe(state.feedback)
            info["expert_action"] = "look"  # its first subgoal, as ALFWorld's own expert wrapper plays it
        return goal, StepResult(observation, 0.0, 0.0, False, False, self._admissible(), info)

    def step(self, action: str) -> StepResult:
        state, _, done = self._env.step(action)
        won = bool(state["won"])
        info = {"expert_action": self._handcoded_action(state, action)} if self._expert == "handcoded" else {}
        # Unknown or inapplicable commands come back as the engine's own "Nothing happens.".
        return StepResult(state.feedback.strip(), float(won), 100.0 * won, bool(done), won, self._admissible(), info)

    def _handcoded_action(self, state, taken: str) -> str | None:
        try:
            action = self._handcoded.act(state, 0, bool(state["won"]), taken)
        except Exception:  # noqa: BLE001 - its rules raise on states they do not cover (timeouts, odd layouts)
            return None
        # ALFWorld's own wrapper answers "look" when the rules name a command the state does not admit.
        return action if action in state["admissible_commands"] else "look"

    def _admissible(self) -> tuple[str, ...]:
        return tuple(self._env.state["admissible_commands"])

    def expert_actions(self) -> list[str]:
        return list(self._walkthrough)

    def close(self) -> None:
        self._env.close()
