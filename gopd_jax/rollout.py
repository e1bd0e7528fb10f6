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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gopd_jax.curriculum import draw_owners
from gopd_jax.envs import EnvPool, StepResult, TaskSpec
from gopd_jax.envs.prompting import MAX_TURNS, fit_prompt, invalid_step_result, parse_action
from gopd_jax.evaluate import EpisodeResult
from gopd_jax.generate import SamplingConfig, generate
from gopd_jax.models import Qwen3Config
from gopd_jax.tokenizer import render_chat, stop_token_ids

STUDENT, TEACHER = "student", "teacher"


@dataclasses.dataclass(frozen=True)
class Policy:
    """The completer seam: one model's params and config. Swap params to swap the policy."""

    params: Any
    config: Qwen3Config


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    env: str
    max_turns: int | None = None  # None: the paper's per-environment limit (MAX_TURNS)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    k_history: int = 2
    think: bool = True
    max_prompt_tokens: int = 10_240
    length_bucket: int = 256  # prompt lengths round up to a multiple of this, so few shapes are compiled

    @property
    def turn_limit(self) -> int:
        return self.max_turns or MAX_TURNS[self.env]


@dataclasses.dataclass
class Turn:
    owner: str
    prompt_ids: np.ndarray  # int32, exactly what the model was fed
    response_ids: np.ndarray  # int32, exactly what it sampled (stop token included)
    logprobs: np.ndarray  # float32 log-probs of response_ids under the owner's sampling distribution
    action: str | None  # None: no parsable <action> tag (an invalid action)
    result: StepResult


@dataclasses.dataclass
class Episode:
    task: TaskSpec
    goal: str
    turns: list[Turn]
    result: EpisodeResult


@dataclasses.dataclass
class _Live:
    task: TaskSpec
    goal: str
    last: StepResult
    owners: np.ndarray  # [turn_limit] bool, True = teacher
    key: jax.Array  # the episode's PRNG key: owners and every turn's sampling derive from it
    turns: list[Turn] = dataclasses.field(default_factory=list)
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    invalid: int = 0
    inadmissible: int = 0
    expert_actions: list[str] = dataclasses.field(default_factory=list)


class ExpertPolicy:
    """The environment's own expert (ALFWorld walkthroughs, ScienceWorld gold paths) as a policy: turn t
    replies with the t-th expert action in the agent's reply format. Used for SFT data and as a reference
    policy in evaluation; its log-probs are zero (it is not a model)."""


EXPERT = ExpertPolicy()

OwnerFn = Callable[[jax.Array, int], np.ndarray]


def owners_from_beta(beta: float) -> OwnerFn:
    """Guided-OPD: every turn independently teacher-owned with probability beta."""
    return lambda key, n: np.asarray(draw_owners(key, beta, (n,)))


def owners_student_first(k: int) -> OwnerFn:
    """TCOD's trajectory-depth curriculum: the student plays the first k turns, the teacher the rest."""
    return lambda key, n: np.arange(n) >= k


def _pad_batch(prompts: list[np.ndarray], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a bucketed length, and the row count to a power of two (dummy rows of one token)."""
    rows = 1 << (len(prompts) - 1).bit_length()
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], lengths[i] = p, len(p)
    return tokens, lengths


class RolloutRunner:
    """Runs batches of episodes for one environment pool, tokenizer and rollout config."""

    def __init__(self, pool: EnvPool, tokenizer, config: RolloutConfig):
        self.pool, self.tokenizer, self.config = pool, tokenizer, config
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p, stop_token_ids=stop_token_ids(tokenizer),
                                       pad_id=tokenizer.pad_token_id or 0)
        self._stops = set(self.sampling.stop_token_ids)

    def _prompt(self, ep: _Live) -> np.ndarray:
        c = self.config
        ids = fit_prompt(lambda msgs: render_chat(self.tokenizer, msgs, enable_thinking=c.think), ep.goal,
                         ep.history, ep.last.observation, ep.last.admissible_actions, c.env, c.max_prompt_tokens,
                         k_history=c.k_history, think=c.think)
        return np.asarray(ids, np.int32)

    def expert_reply(self, action: str) -> np.ndarray:
        """Token ids of the reply an ideal agent gives for `action` (the stop token included)."""
        text = f"<think>\n\n</think>\n\n<action>{action}</action>" if self.config.think else f"<action>{action}</action>"
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False) + [self.sampling.stop_token_ids[0]],
                          np.int32)

    def _generate(self, policy, prompts: list[np.ndarray], keys: list[jax.Array], episodes: list[_Live]):
        if isinstance(policy, ExpertPolicy):
            replies = [self.expert_reply(ep.expert_actions[len(ep.turns)]) if len(ep.turns) < len(ep.expert_actions)
                       else np.asarray(self.sampling.stop_token_ids[:1], np.int32) for ep in episodes]
            return [(r, np.zeros(len(r), np.float32)) for r in replies]
        tokens, lengths = _pad_batch(prompts, self.config.length_bucket)
        keys = jnp.stack(keys + keys[:1] * (len(tokens) - len(keys)))  # dummy rows reuse a key
        out = jax.device_get(generate(policy.params, policy.config, jnp.asarray(tokens), jnp.asarray(lengths), keys,
                                      self.sampling))
        return [(out.tokens[i, :out.lengths[i]], out.logprobs[i, :out.lengths[i]]) for i in range(len(prompts))]

    def _reply_action(self, response: np.ndarray) -> str | None:
        ids = [int(t) for t in response if int(t) not in self._stops]
        return parse_action(self.tokenizer.decode(ids, skip_special_tokens=False))

    def run(self, tasks: Sequence[TaskSpec], policies: dict[str, Policy], owner_fn: OwnerFn, key: jax.Array,
            progress: bool = True, desc: str = "rollout") -> tuple[list[Episode], dict[str, float]]:
        """Play every task to the end; returns episodes (in completion order) and timing stats."""
        c, pool = self.config, self.pool
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
            episodes.append(Episode(ep.task, ep.goal, ep.turns, EpisodeResult(
                task=ep.task, won=r.won, score=r.score, rounds=len(ep.turns),
                env_failed=bool(r.info.get("env_failed")), invalid_actions=ep.invalid,
                inadmissible_actions=ep.inadmissible,
                turns=[t.owner for t in ep.turns])))
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
                for s, prompt, (resp, logp) in zip(slots, prompts, outs):
                    action = self._reply_action(resp)
                    pending[s] = (action, Turn(owner, prompt, resp, logp, action, live[s].last))
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
                    ep = _Live(tasks[idx], goal, first, owner_fn(jax.random.fold_in(ep_key, 1_000_003), c.turn_limit),
                               key=ep_key)
                    live[slot] = ep
                    if first.done:  # the environment died during reset
                        finish(slot, ep)
                    elif any(isinstance(p, ExpertPolicy) for p in policies.values()):
                        ep.expert_actions = pool.expert_actions(slot)
            for slot, (action, turn) in pending.items():
                ep = live[slot]
                if action is None:
                    ep.invalid += 1
                    turn.result = invalid_step_result(ep.last, c.env)
                else:
                    ep.inadmissible += bool(ep.last.admissible_actions) and action not in ep.last.admissible_actions
                    turn.result = results[slot]
                ep.turns.append(turn)
                ep.history.append((ep.last.observation, action if action is not None else "(invalid)"))
                ep.last = turn.result
                stats["turns"] += 1
                if turn.result.done or len(ep.turns) >= c.turn_limit:
                    finish(slot, ep)
            start_free_slots()
        bar.close()
        stats["generate_calls"] = calls
        stats["wall_s"] = time.perf_counter() - t_start
        return episodes, stats


# ---- training samples -------------------------------------------------------------------------

def training_batch(turns: Sequence[Turn], *, pad_id: int = 0, row_multiple: int = 1, min_width: int = 128,
                   max_len: int | None = None) -> dict[str, np.ndarray]:
    """One row per turn: prompt ids + response ids, right padded to a power of two (>= min_width, so a run
    compiles its update for a handful of widths only). Masks mark the response tokens of student-owned and
    teacher-owned turns (aligned with `targets`, the next-token ids); prompt and padding positions carry no
    mask. Rows are padded to a multiple of `row_multiple` with empty rows."""
    if not turns:
        raise ValueError("training_batch needs at least one turn")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in turns]
    width = max(min_width, 1 << (max(lengths) - 1).bit_length())
    if max_len is not None and width > max_len:
        raise ValueError(f"a turn has {max(lengths)} tokens, more than max_len={max_len}; raise max_len or lower "
                         "max_prompt_tokens / max_new_tokens")
    rows = -(-len(turns) // row_multiple) * row_multiple
    tokens = np.full((rows, width), pad_id, np.int32)
    student, teacher, old = (np.zeros((rows, width), np.float32) for _ in range(3))
    for i, turn in enumerate(turns):
        p, r = len(turn.prompt_ids), len(turn.response_ids)
        tokens[i, :p + r] = np.concatenate([turn.prompt_ids, turn.response_ids])
        # targets[:, t] = tokens[:, t + 1]: the response occupies targets p-1 .. p+r-2.
        mask = student if turn.owner == STUDENT else teacher
        mask[i, p - 1:p + r - 1] = 1.0
        old[i, p - 1:p + r - 1] = turn.logprobs
    targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), pad_id, np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "student_mask": student, "teacher_mask": teacher,
            "old_logprobs": old * student}
