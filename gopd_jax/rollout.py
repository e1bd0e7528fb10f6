"""The host loop: environments in worker processes <-> batched device-side generation.

Every turn of every live episode has an owner (teacher or student) drawn before the episode starts;
rows are grouped by owner and generated in one batched call per owner, and the first group's actions
go to the environment workers before the second group is generated, so stepping overlaps generation.
Finished episodes free their slot for the next task at once.

Token in, token out: a turn's training sample is the exact prompt ids fed to the model plus the exact
sampled ids (stop token included); decoded text is used only to read the action.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gopd_jax.batch import bucket, width_bucket
from gopd_jax.envs import EnvPool, StepResult, TaskSpec, failed_step_result
from gopd_jax.envs.prompting import (INVALID_HISTORY_ACTION, MAX_TURNS, fit_prompt, invalid_step_result, is_admissible,
                                     parse_action)
from gopd_jax.generate import SamplingConfig, generate
from gopd_jax.records import STUDENT, TEACHER, Episode, EpisodeResult, ExpertPolicy, Policy, Turn
from gopd_jax.tokenizer import end_of_turn_id, render_chat, stop_token_ids

if TYPE_CHECKING:
    from gopd_jax.methods import OwnerFn


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    env: str
    max_turns: int | None = None  # None: the paper's per-environment limit (MAX_TURNS)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    k_history: int = 2
    keep_first_observation: bool = False  # see prompting.build_messages
    earlier_actions: bool = False  # see prompting.build_messages
    think: bool = True
    max_prompt_tokens: int = 10_240
    length_bucket: int = 256  # prompt widths are width_bucket(length, this): few shapes get compiled

    @property
    def turn_limit(self) -> int:
        return self.max_turns or MAX_TURNS[self.env]

    @classmethod
    def from_experiment(cls, cfg, evaluation: bool = False) -> "RolloutConfig":
        """The rollout settings of an ExperimentConfig (evaluation: the eval temperature, no truncation)."""
        return cls(env=cfg.env, max_turns=cfg.max_turns or None, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.eval_temperature if evaluation else cfg.temperature,
                   top_p=1.0 if evaluation else cfg.top_p, top_k=0 if evaluation else cfg.top_k, k_history=cfg.k_history, think=cfg.think,
                   keep_first_observation=cfg.keep_first_observation, earlier_actions=cfg.earlier_actions,
                   max_prompt_tokens=cfg.max_prompt_tokens)


def env_kwargs(env_name: str, expert: bool, which: str = "walkthrough") -> dict:
    """Worker construction arguments. ScienceWorld computes gold paths at every reset (up to ~30 s on some
    tasks): only when the expert plays. `which`: ALFWorld's expert ("walkthrough" or "handcoded", see
    AlfWorldEnv); the state-dependent handcoded one is built only when the expert plays."""
    if env_name == "scienceworld":
        return {"gold_path": expert}
    return {"expert": which} if env_name == "alfworld" and expert and which != "walkthrough" else {}


@dataclasses.dataclass
class _Live:
    index: int  # position of the task in the run's task list
    task: TaskSpec
    goal: str
    last: StepResult
    owners: np.ndarray  # bool, True = teacher; its length caps the episode's turns
    key: jax.Array  # the episode's PRNG key: owners and every turn's sampling derive from it
    turns: list[Turn] = dataclasses.field(default_factory=list)
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    invalid: int = 0
    inadmissible: int = 0
    expert_actions: list[str] = dataclasses.field(default_factory=list)
    start: StepResult | None = None  # the reset's result


def _pad_batch(prompts: list[np.ndarray], width_multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a bucketed width and row count (dummy rows of one token)."""
    rows = bucket(len(prompts), 1)
    width = width_bucket(max(len(p) for p in prompts), width_multiple)
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], lengths[i] = p, len(p)
    return tokens, lengths


class RolloutRunner:
    """Runs batches of episodes for one environment pool, tokenizer and rollout config.

    The tokenizer may be None when only the environment's expert plays (no prompts are rendered then)."""

    def __init__(self, pool: EnvPool, tokenizer, config: RolloutConfig):
        self.pool, self.tokenizer, self.config = pool, tokenizer, config
        if tokenizer is not None:
            self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                           top_p=config.top_p, top_k=config.top_k, stop_token_ids=stop_token_ids(tokenizer),
                                           pad_id=tokenizer.pad_token_id or 0)
            self._stops = set(self.sampling.stop_token_ids)

    def _prompt(self, ep: _Live) -> np.ndarray:
        if self.tokenizer is None:
            return np.zeros((0,), np.int32)
        c = self.config
        ids = fit_prompt(lambda msgs: render_chat(self.tokenizer, msgs, enable_thinking=c.think), ep.goal,
                         ep.history, ep.last.observation, ep.last.admissible_actions, c.env, c.max_prompt_tokens,
                         k_history=c.k_history, think=c.think, keep_first=c.keep_first_observation,
                         earlier_actions=c.earlier_actions)
        return np.asarray(ids, np.int32)

    def expert_reply(self, action: str) -> np.ndarray:
        """Token ids of the reply an ideal agent gives for `action` (the stop token included)."""
        text = f"<think>\n\n</think>\n\n<action>{action}</action>" if self.config.think else f"<action>{action}</action>"
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False) + [end_of_turn_id(self.tokenizer)],
                          np.int32)

    def _expert_turns(self, episodes: list[_Live]):
        """(response ids, log-probs, action) of the expert's next action per episode: a state-dependent
        expert's answer for the current state (`info["expert_action"]`, e.g. ALFWorld's handcoded expert),
        else turn t of its plan. No answer, or past the end of the plan: the reply carries no action (an
        invalid turn)."""
        out = []
        for ep in episodes:
            if "expert_action" in ep.last.info:
                action = ep.last.info["expert_action"]
            else:
                action = ep.expert_actions[len(ep.turns)] if len(ep.turns) < len(ep.expert_actions) else None
            ids = (np.zeros((0,), np.int32) if self.tokenizer is None else
                   self.expert_reply(action) if action is not None else
                   np.asarray(self.sampling.stop_token_ids[:1], np.int32))
            out.append((ids, np.zeros(len(ids), np.float32), action))
        return out

    def _generate(self, policy, prompts: list[np.ndarray], keys: list[jax.Array], episodes: list[_Live]):
        """(response ids, log-probs, action) per row."""
        if isinstance(policy, ExpertPolicy):
            return self._expert_turns(episodes)
        tokens, lengths = _pad_batch(prompts, self.config.length_bucket)
        keys = jnp.stack(keys + keys[:1] * (len(tokens) - len(keys)))  # dummy rows reuse a key
        out = jax.device_get(generate(policy.params, policy.config, jnp.asarray(tokens), jnp.asarray(lengths), keys,
                                      self.sampling))
        rows = [(out.tokens[i, :out.lengths[i]], out.logprobs[i, :out.lengths[i]]) for i in range(len(prompts))]
        return [(ids, logp, self._reply_action(ids)) for ids, logp in rows]

    def _reply_action(self, response: np.ndarray) -> str | None:
        ids = [int(t) for t in response if int(t) not in self._stops]
        return parse_action(self.tokenizer.decode(ids, skip_special_tokens=False))

    def run(self, tasks: Sequence[TaskSpec], policies: dict[str, Policy | ExpertPolicy], owner_fn: OwnerFn,
            key: jax.Array, progress: bool = True, desc: str = "rollout") -> tuple[list[Episode], dict[str, float]]:
        """Play every task to the end; returns episodes (in completion order) and timing stats.

        owner_fn(episode key, turn limit, task index) gives each episode's turn owners when it starts; an owner
        array shorter than the turn limit ends the episode after that many turns (``result.truncated``)."""
        c, pool = self.config, self.pool
        if self.tokenizer is None and not all(isinstance(p, ExpertPolicy) for p in policies.values()):
            raise ValueError("RolloutRunner needs a tokenizer when a model plays")
        queue = list(enumerate(tasks))[::-1]
        live: dict[int, _Live] = {}
        starting: dict[int, int] = {}  # slot -> task index, resets in flight
        episodes: list[Episode] = []
        stats = {"generate_s": 0.0, "env_wait_s": 0.0, "turns": 0, "generate_calls": 0}
        t_start, calls = time.perf_counter(), 0
        bar = tqdm(total=len(tasks), desc=desc, disable=not progress, leave=False)

        def start_free_slots():
            assign = {}
            for slot in pool.slots:
                if slot not in live and slot not in starting and queue:
                    idx, task = queue.pop()
                    starting[slot], assign[slot] = idx, task
            pool.reset_async(assign)

        def finish(slot: int, ep: _Live):
            del live[slot]
            r = ep.last
            episodes.append(Episode(ep.index, ep.task, ep.goal, ep.turns, EpisodeResult(
                task=ep.task, won=r.won, score=r.score, rounds=len(ep.turns),
                env_failed=bool(r.info.get("env_failed")), invalid_actions=ep.invalid,
                inadmissible_actions=ep.inadmissible, owners=[t.owner for t in ep.turns],
                truncated=not r.done and len(ep.turns) < c.turn_limit), start=ep.start))
            bar.update(1)

        start_free_slots()
        while live or starting:
            pending: dict[int, tuple[str, Turn]] = {}
            t = {slot: len(ep.turns) for slot, ep in live.items()}
            for owner in (STUDENT, TEACHER):
                slots = [s for s, ep in live.items() if (ep.owners[t[s]] == (owner == TEACHER))]
                if not slots:
                    continue
                prompts = [self._prompt(live[s]) for s in slots]
                t0 = time.perf_counter()
                # Keys per (task, turn): a rollout does not depend on how env timing grouped the rows.
                keys = [jax.random.fold_in(live[s].key, t[s]) for s in slots]
                outs = self._generate(policies[owner], prompts, keys, [live[s] for s in slots])
                stats["generate_s"] += time.perf_counter() - t0
                calls += 1
                actions = {}
                for s, prompt, (resp, logp, action) in zip(slots, prompts, outs):
                    pending[s] = (action, Turn(owner, prompt, resp, logp, action, live[s].last, index=t[s]))
                    if action is not None:
                        actions[s] = action
                pool.step_async(actions)  # these envs step while the next owner group generates
            t0 = time.perf_counter()
            results = pool.collect()
            stats["env_wait_s"] += time.perf_counter() - t0
            for slot, res in results.items():
                if slot in starting:
                    idx = starting.pop(slot)
                    goal, first = res if isinstance(res, tuple) else ("", res)
                    ep_key = jax.random.fold_in(key, idx)
                    owners = np.asarray(owner_fn(jax.random.fold_in(ep_key, 1_000_003), c.turn_limit, idx), bool)
                    ep = _Live(idx, tasks[idx], goal, first, owners[:c.turn_limit], key=ep_key, start=first)
                    live[slot] = ep
                    if first.done or not len(ep.owners):  # the environment died during reset, or no turn to play
                        finish(slot, ep)
                    # A planning expert's whole plan is fetched once; a state-dependent one answers every state.
                    elif any(isinstance(p, ExpertPolicy) for p in policies.values()) and \
                            "expert_action" not in first.info:
                        try:
                            ep.expert_actions = pool.expert_actions(slot)
                        except RuntimeError as e:  # the worker died or hung: the episode is lost, like a step
                            ep.last = failed_step_result(str(e))
                            finish(slot, ep)
                            continue
                        if all(isinstance(p, ExpertPolicy) for p in policies.values()):
                            ep.owners = ep.owners[:len(ep.expert_actions)]  # the expert's plan is the episode
                            if not len(ep.owners):
                                finish(slot, ep)
            for slot, (action, turn) in pending.items():
                ep = live[slot]
                if action is None:
                    ep.invalid += 1
                    turn.result = invalid_step_result(ep.last, c.env)
                else:
                    turn.valid = not ep.last.admissible_actions or is_admissible(action, ep.last.admissible_actions)
                    ep.inadmissible += not turn.valid
                    turn.result = results[slot]
                ep.turns.append(turn)
                ep.history.append((ep.last.observation, action if action is not None else INVALID_HISTORY_ACTION))
                ep.last = turn.result
                stats["turns"] += 1
                if turn.result.done or len(ep.turns) >= len(ep.owners):
                    finish(slot, ep)
            start_free_slots()
        bar.close()
        stats["generate_calls"] = calls
        stats["wall_s"] = time.perf_counter() - t_start
        return episodes, stats
