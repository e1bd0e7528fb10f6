"""Offline expert corpus: every train game's expert episode, replayed once through the real environment,
stored as raw text on disk and rendered on demand into token ids for SFT with no environment in the loop.

Three layers, each cached on disk:

1. `build_corpus` replays the expert (ALFWorld walkthroughs, ScienceWorld gold paths) of every task of a
   split through an `EnvPool` and stores, per game, the goal, task type, final result and per turn the
   observation, admissible actions and expert action - the raw pieces, independent of any tokenizer or
   prompt format. Games are appended in shards written atomically (`shard-NNNNN.jsonl`); the shards are the
   index of completed games, so a killed build resumes where it stopped. Tasks run in a seeded shuffled
   order, so a partial corpus is a uniform sample of the split.
2. `render_corpus` turns it into token ids with a tokenizer and a `RolloutConfig`, through exactly the path
   the rollout uses (`fit_prompt` + `render_chat` for the prompt, `RolloutRunner.expert_reply` for the
   reply), and caches the arrays shard by shard (compressed `.npz`, keyed by the tokenizer, the prompt
   settings and the shard's bytes), so a corpus still growing renders only its new shards.
3. `sft_batches` cuts the rendered rows into static-shape `[B, T]` batches (a few width buckets), the
   input of `train.sft_loss_fn`.

    python -m gopd_jax.expert_corpus --env alfworld --split train --out runs/corpus/alfworld_train
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gopd_jax.batch import bucket
from gopd_jax.envs import EnvPool, TaskSpec, list_tasks
from gopd_jax.envs.prompting import INVALID_HISTORY_ACTION, fit_prompt

FORMAT_VERSION = 1  # of the raw store (meta.json)
RENDER_VERSION = 2  # of the rendered .npz cache
_SHARD_GLOB = "shard-*.jsonl"


# ---- the raw corpus --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExpertTurn:
    """One expert turn with everything a prompt needs: `history` holds the episode's earlier
    (observation, action) pairs, oldest first, as the rollout keeps them."""

    game: str
    task_type: str
    turn: int
    goal: str
    history: tuple[tuple[str, str], ...]
    observation: str
    admissible_actions: tuple[str, ...]
    action: str
    won: bool  # the expert episode's final result


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _shards(corpus_dir: Path) -> list[Path]:
    return sorted(corpus_dir.glob(_SHARD_GLOB))


def load_corpus(corpus_dir: str | os.PathLike) -> list[dict]:
    """Every stored game record, sorted by game id (so two builds of the same games compare equal)."""
    records = [json.loads(line) for shard in _shards(Path(corpus_dir)) for line in shard.read_text().splitlines()]
    return sorted(records, key=lambda r: r["game"])


def corpus_meta(corpus_dir: str | os.PathLike) -> dict:
    path = Path(corpus_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{corpus_dir} holds no expert corpus (no meta.json); build it with build_corpus")
    return json.loads(path.read_text())


def pack_snapshot(corpus_dir: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """The raw store (meta.json + shards; no render caches) as one .tar.xz (ALFWorld train: ~0.5 MB)."""
    import tarfile

    corpus_dir = Path(corpus_dir)
    corpus_meta(corpus_dir)  # refuse a directory that holds no corpus
    with tarfile.open(archive, "w:xz") as tar:
        for path in [corpus_dir / "meta.json", *sorted(corpus_dir.glob("shard-*.jsonl"))]:
            tar.add(path, arcname=path.name)
    return Path(archive)


def unpack_snapshot(archive: str | os.PathLike, out: Path) -> None:
    """Extract a `pack_snapshot` archive into `out`: its meta.json and shard-*.jsonl members only."""
    import tarfile

    try:
        with tarfile.open(archive, "r:xz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/" not in m.name
                       and (m.name == "meta.json" or (m.name.startswith("shard-") and m.name.endswith(".jsonl")))]
            for m in sorted(members, key=lambda m: m.name == "meta.json"):  # meta last: it marks the store
                _write_atomic(out / m.name, tar.extractfile(m).read().decode())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"corpus snapshot {archive} is damaged ({e}); delete it (the build replays the games "
                         "instead) or restore it from the repository") from e


def iter_turns(records: Sequence[dict]) -> Iterator[ExpertTurn]:
    """Every turn with a training target: the turn's `label` where the record has labels (DAgger: the expert's
    action for the state the policy reached; turns the expert had no answer for are skipped), else the
    action played. The history always holds the actions played, as the rollout showed them."""
    for r in records:
        history: list[tuple[str, str]] = []
        for t, turn in enumerate(r["turns"]):
            target = turn.get("label", turn["action"])
            if target is not None:
                yield ExpertTurn(r["game"], r["task_type"], t, r["goal"], tuple(history), turn["observation"],
                                 tuple(turn["admissible_actions"]), target, r["won"])
            history.append((turn["observation"], turn["action"]))


def episode_record(ep, labelled: bool = False) -> dict:
    """A played episode as a raw-store record. `labelled`: each turn also stores the state-dependent expert's
    action for the state it was played from (`info["expert_action"]`) as its `label`, the SFT target."""
    turns = []
    for state, turn in zip(ep.states(), ep.turns):
        t = {"observation": state.observation, "admissible_actions": list(state.admissible_actions),
             "action": turn.action if turn.action is not None else INVALID_HISTORY_ACTION}
        if labelled:
            t["label"] = state.info.get("expert_action")
        turns.append(t)
    last = ep.turns[-1].result if ep.turns else ep.start
    record = {"game": ep.task.game_id, "task_type": ep.task.task_type, "goal": ep.goal, "won": last.won,
              "score": last.score, "final_observation": last.observation, "turns": turns}
    return {**record, "labelled": True} if labelled else record


def play_episodes(runner, tasks: Sequence[TaskSpec], policies: dict, owner_fn, key, labelled: bool = False,
                  chunk: int = 32) -> Iterator[dict]:
    """Play `tasks` through `runner` (`RolloutRunner.run` arguments), `chunk` games at a time; yields one
    `episode_record` per finished game. Games whose environment failed are skipped (logged)."""
    import jax

    for i in range(0, len(tasks), chunk):
        episodes, _ = runner.run(tasks[i:i + chunk], policies, owner_fn, jax.random.fold_in(key, i), progress=False)
        for ep in episodes:
            if ep.result.env_failed:
                reason = (ep.turns[-1].result if ep.turns else ep.start).info.get("reason")
                print(f"[expert_corpus] skipped {ep.task.game_id}: {reason}", flush=True)
                continue
            yield episode_record(ep, labelled)


def replay_expert_episodes(pool: EnvPool, tasks: Sequence[TaskSpec], max_turns: int | None = None,
                           chunk: int = 32) -> Iterator[dict]:
    """Play each task's expert to the end (or `max_turns`) through the rollout engine."""
    import jax

    from gopd_jax.evaluate import EXPERT_TURN_LIMIT
    from gopd_jax.methods import owners_from_beta
    from gopd_jax.records import EXPERT, STUDENT, TEACHER
    from gopd_jax.rollout import RolloutConfig, RolloutRunner

    if not tasks:
        return
    runner = RolloutRunner(pool, None, RolloutConfig(env=tasks[0].env, max_turns=max_turns or EXPERT_TURN_LIMIT))
    yield from play_episodes(runner, tasks, {STUDENT: EXPERT, TEACHER: EXPERT}, owners_from_beta(1.0),
                             jax.random.PRNGKey(0), chunk=chunk)


@contextlib.contextmanager
def _exclusive(out: Path):
    """One builder per corpus directory: a second one (e.g. a pipeline started while a standalone build
    runs) waits here, then finds the games already stored."""
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[expert_corpus] another build holds {out}; waiting for it to finish", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_corpus(env_name: str, split: str, out_dir: str | os.PathLike, *, num_workers: int = 1,
                 limit: int | None = None, seed: int = 0, shard_games: int = 50, shard_seconds: float = 300.0,
                 max_turns: int | None = None, env_kwargs: dict | None = None, data_dir: str | None = None,
                 progress: bool = True, snapshot: str | os.PathLike | None = None,
                 play: Callable[[EnvPool, list[TaskSpec]], Iterator[dict]] | None = None,
                 player: str = "expert") -> Path:
    """Replay the expert on the tasks of `split` (a seeded shuffle; the first `limit` of it) into `out_dir`.
    `env_kwargs` default: what the environment needs for its expert (ScienceWorld: gold paths).

    Resumable: games already in a shard are skipped. A shard is written (atomically) every `shard_games`
    games or `shard_seconds` seconds, whichever comes first, so a kill loses at most that much work.
    `snapshot`: a packed corpus (.tar.xz of meta.json + shards, see `pack_snapshot`) that seeds an empty
    `out_dir`; the build then replays only the games it lacks (none, when it was built with the same settings).
    `play(pool, tasks)`: who plays instead of the expert (e.g. a model with the expert's labels, DAgger), named
    by `player` in meta.json, yielding `episode_record`s."""
    from gopd_jax.rollout import env_kwargs as expert_env_kwargs

    env_kwargs = expert_env_kwargs(env_name, expert=True) if env_kwargs is None else env_kwargs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if snapshot is not None and Path(snapshot).is_file() and not (out / "meta.json").is_file():
            unpack_snapshot(snapshot, out)
        return _build(env_name, split, out, num_workers=num_workers, limit=limit, seed=seed, shard_games=shard_games,
                      shard_seconds=shard_seconds, max_turns=max_turns, env_kwargs=env_kwargs, data_dir=data_dir,
                      progress=progress, play=play, player=player)


def _build(env_name, split, out: Path, *, num_workers, limit, seed, shard_games, shard_seconds, max_turns, env_kwargs,
           data_dir, progress, play, player) -> Path:
    meta = {"format_version": FORMAT_VERSION, "env": env_name, "split": split, "seed": seed, "limit": limit,
            "max_turns": max_turns, "env_kwargs": env_kwargs or {}}
    if player != "expert":  # the expert's stores keep their original meta (and the shipped snapshot stays valid)
        meta["player"] = player
    if (out / "meta.json").is_file():
        old = corpus_meta(out)
        if old != meta:
            raise ValueError(f"{out} holds a corpus built with {old}, not {meta}: "
                             "build into another directory or delete this one")
    else:
        _write_atomic(out / "meta.json", json.dumps(meta, indent=2))
    tasks = list_tasks(env_name, split, data_dir=data_dir)
    tasks = [tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks))][:limit]
    done = {r["game"] for r in load_corpus(out)}
    todo = [t for t in tasks if t.game_id not in done]
    next_shard = 1 + max((int(p.stem.split("-")[1]) for p in _shards(out)), default=-1)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"expert corpus {env_name}/{split}",
               disable=not progress, mininterval=10.0)
    pending: list[dict] = []
    t_flush = t_start = time.monotonic()
    n_new = 0

    def flush():
        nonlocal pending, next_shard, t_flush
        if pending:
            _write_atomic(out / f"shard-{next_shard:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in pending))
            next_shard, pending, t_flush = next_shard + 1, [], time.monotonic()
            rate = n_new / max(time.monotonic() - t_start, 1e-9)
            print(f"[expert_corpus] {len(tasks) - len(todo) + n_new}/{len(tasks)} games stored, "
                  f"{60 * rate:.1f} games/min this run", flush=True)

    if todo:
        with EnvPool(env_name, env_kwargs, num_workers=num_workers) as pool:
            records = (play(pool, todo) if play is not None else
                       replay_expert_episodes(pool, todo, max_turns, chunk=shard_games))
            for record in records:
                pending.append(record)
                n_new += 1
                bar.update(1)
                if len(pending) >= shard_games or time.monotonic() - t_flush >= shard_seconds:
                    flush()
    flush()
    bar.close()
    return out


# ---- rendering into token ids ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RenderedCorpus:
    """Token ids of every expert turn: row i is tokens[offsets[i]:offsets[i+1]], its first
    prompt_lengths[i] ids the prompt, the rest the reply (stop token included)."""

    tokens: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [N + 1]
    prompt_lengths: np.ndarray  # int32 [N]
    game_index: np.ndarray  # int32 [N], into `games`
    turn: np.ndarray  # int32 [N]
    games: tuple[str, ...]
    task_types: tuple[str, ...]  # per game

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, reply ids) of row i."""
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]]
        return ids[:self.prompt_lengths[i]], ids[self.prompt_lengths[i]:]


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids of any text could change: vocabulary, merges, specials, chat template."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


def render_turn(tokenizer, rollout_config, turn: ExpertTurn, runner=None) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of one expert turn, exactly as the rollout would feed and stitch them."""
    from gopd_jax.rollout import RolloutRunner
    from gopd_jax.tokenizer import render_chat

    c = rollout_config
    runner = runner or RolloutRunner(None, tokenizer, c)
    prompt = fit_prompt(lambda msgs: render_chat(tokenizer, msgs, enable_thinking=c.think), turn.goal,
                        list(turn.history), turn.observation, turn.admissible_actions, c.env, c.max_prompt_tokens,
                        k_history=c.k_history, think=c.think, keep_first=c.keep_first_observation,
                        earlier_actions=c.earlier_actions)
    return prompt, runner.expert_reply(turn.action).tolist()


def render_corpus(corpus_dir: str | os.PathLike, tokenizer, rollout_config, *, shards: Sequence[str] | None = None,
                  cache_dir: str | os.PathLike | None = None, won_only: bool = True,
                  progress: bool = True) -> RenderedCorpus:
    """Every turn of the corpus (of won games only, by default) as token ids, shard by shard in shard order.

    Shards are immutable once written, so each is rendered once and cached in `cache_dir` (default
    `<corpus_dir>/rendered`) under a key of tokenizer + prompt settings + the shard's bytes; a growing corpus
    renders only its new shards. `shards`: the shard file names to use (default: all present now)."""
    c = rollout_config
    corpus_dir = Path(corpus_dir)
    meta = corpus_meta(corpus_dir)
    if meta["env"] != c.env:
        raise ValueError(f"corpus {corpus_dir} is {meta['env']}, the rollout config is {c.env}")
    names = list(shards) if shards is not None else [p.name for p in _shards(corpus_dir)]
    settings = {"env": c.env, "k_history": c.k_history, "keep_first_observation": c.keep_first_observation,
                "earlier_actions": c.earlier_actions,
                "think": c.think, "max_prompt_tokens": c.max_prompt_tokens,
                "won_only": won_only, "render_version": RENDER_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer)}
    cache = Path(cache_dir or corpus_dir / "rendered")
    parts = [_render_shard(corpus_dir / name, tokenizer, c, settings, cache, progress) for name in names]
    rendered = concat_corpora(parts)
    if not len(rendered):
        raise ValueError(f"corpus {corpus_dir} holds no {'won ' if won_only else ''}games yet")
    return rendered


def _render_shard(shard: Path, tokenizer, rollout_config, settings: dict, cache_dir: Path,
                  progress: bool) -> RenderedCorpus:
    from gopd_jax.rollout import RolloutRunner

    data = shard.read_bytes()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + data).hexdigest()[:20]
    cache = cache_dir / f"{shard.stem}-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return RenderedCorpus(z["tokens"].astype(np.int32), z["offsets"], z["prompt_lengths"], z["game_index"], z["turn"],
                                  tuple(z["games"].tolist()), tuple(z["task_types"].tolist()))
    # A labelled (DAgger) record trains on its labels whatever the episode's outcome.
    records = [r for r in map(json.loads, data.decode().splitlines())
               if r["won"] or r.get("labelled") or not settings["won_only"]]
    runner = RolloutRunner(None, tokenizer, rollout_config)
    rows, prompt_lengths, game_index, turns = [], [], [], []
    index = {r["game"]: i for i, r in enumerate(records)}
    for turn in tqdm(iter_turns(records), total=sum(len(r["turns"]) for r in records), desc=f"render {shard.name}",
                     disable=not progress, leave=False):
        prompt, reply = render_turn(tokenizer, rollout_config, turn, runner)
        rows.append(prompt + reply)
        prompt_lengths.append(len(prompt))
        game_index.append(index[turn.game])
        turns.append(turn.turn)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(x) for x in rows], out=offsets[1:])
    rendered = RenderedCorpus(np.asarray([t for x in rows for t in x], np.int32), offsets,
                              np.asarray(prompt_lengths, np.int32), np.asarray(game_index, np.int32),
                              np.asarray(turns, np.int32), tuple(r["game"] for r in records),
                              tuple(r["task_type"] for r in records))
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache.stem}-", suffix=".npz", dir=cache_dir)
    with os.fdopen(fd, "wb") as f:
        # Compressed, and 16-bit ids where the vocabulary allows: the whole ALFWorld corpus is a few MB.
        small = rendered.tokens.size == 0 or rendered.tokens.max() < 2 ** 16
        np.savez_compressed(f, tokens=rendered.tokens.astype(np.uint16 if small else np.int32),
                            offsets=rendered.offsets, prompt_lengths=rendered.prompt_lengths,
                            game_index=rendered.game_index, turn=rendered.turn,
                            games=np.asarray(rendered.games, dtype=str),
                            task_types=np.asarray(rendered.task_types, dtype=str), settings=json.dumps(settings))
    os.replace(tmp, cache)
    return rendered


def concat_corpora(parts: Sequence[RenderedCorpus]) -> RenderedCorpus:
    """One corpus holding every part's rows, in order (a game in two parts counts twice)."""
    starts = np.cumsum([0] + [len(p.games) for p in parts])
    return RenderedCorpus(
        np.concatenate([p.tokens for p in parts] or [np.zeros(0, np.int32)]).astype(np.int32),
        np.concatenate([[0]] + [p.offsets[1:] + sum(len(q.tokens) for q in parts[:i]) for i, p in enumerate(parts)]
                       ).astype(np.int64),
        np.concatenate([p.prompt_lengths for p in parts] or [np.zeros(0, np.int32)]).astype(np.int32),
        np.concatenate([p.game_index + s for p, s in zip(parts, starts)] or [np.zeros(0, np.int32)]).astype(np.int32),
        np.concatenate([p.turn for p in parts] or [np.zeros(0, np.int32)]).astype(np.int32),
        tuple(g for p in parts for g in p.games), tuple(t for p in parts for t in p.task_types))


# ---- static-shape SFT batches ----------------------------------------------------------------------------------

def bucket_widths(max_length: int, smallest: int = 128) -> tuple[int, ...]:
    """Every width the shared padding rule (`batch.bucket(n, smallest)`) gives for up to `max_length` tokens:
    smallest * 2^k."""
    return tuple(smallest << k for k in range((bucket(max_length, smallest) // smallest).bit_length()))


def sft_batch(rendered: RenderedCorpus, rows: Sequence[int], batch_rows: int, width: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of the corpus as one `[batch_rows, width]` batch: tokens, next-token targets, a loss mask over the
    reply's targets and a prompt mask over the prompt's own (padding carries neither); missing rows are empty
    (all padding)."""
    tokens = np.full((batch_rows, width), pad_id, np.int32)
    mask = np.zeros((batch_rows, width), np.float32)
    prompt_mask = np.zeros((batch_rows, width), np.float32)
    for i, r in enumerate(rows):
        prompt, reply = rendered.row(r)
        p, n = len(prompt), len(prompt) + len(reply)
        if n > width:
            raise ValueError(f"row {r} has {n} tokens, more than the batch width {width}")
        tokens[i, :p] = prompt
        tokens[i, p:n] = reply
        mask[i, p - 1:n - 1] = 1.0  # targets[t] = tokens[t + 1]: the reply is predicted from p - 1 on
        prompt_mask[i, :p - 1] = 1.0
    targets = np.concatenate([tokens[:, 1:], np.full((batch_rows, 1), pad_id, np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "prompt_mask": prompt_mask}


def epoch_plan(rendered: RenderedCorpus, tokens_per_batch: int, seed: int, epoch: int,
               widths: Sequence[int] | None = None) -> list[tuple[int, np.ndarray]]:
    """One epoch as (width, row indices) batches: every row once, each in the narrowest bucket that holds
    it, `tokens_per_batch // width` rows per batch (the last batch of a bucket may be short), batches in
    a seeded random order. A pure function of (seed, epoch), so a resumed run replays the same batches."""
    lengths = rendered.lengths
    widths = tuple(widths or bucket_widths(int(lengths.max())))
    if lengths.max() > widths[-1]:
        raise ValueError(f"the longest row has {lengths.max()} tokens, more than the widest bucket {widths[-1]}")
    rng = np.random.default_rng([seed, epoch])
    which = np.searchsorted(np.asarray(widths), lengths)  # first width >= length
    plan = []
    for b, width in enumerate(widths):
        rows = rng.permutation(np.flatnonzero(which == b))
        per = max(1, tokens_per_batch // width)
        plan += [(width, rows[i:i + per]) for i in range(0, len(rows), per)]
    return [plan[i] for i in rng.permutation(len(plan))]


def sft_batches(corpus: RenderedCorpus | Callable[[int], RenderedCorpus], tokens_per_batch: int, *, seed: int = 0,
                start_step: int = 0, widths: Sequence[int] | None = None,
                pad_id: int = 0) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Endless (step, epoch, batch) stream from `start_step` on; batch shapes are `[tokens_per_batch // w, w]`
    for the bucket widths w, so a jitted update compiles once per width. `corpus` may be a function of the
    epoch (a corpus still growing: each epoch trains on what it returns), called once per epoch."""
    step, epoch = 0, 0
    while True:
        rendered = corpus(epoch) if callable(corpus) else corpus
        plan = epoch_plan(rendered, tokens_per_batch, seed, epoch, widths)
        if step + len(plan) > start_step:
            for width, rows in plan:
                if step >= start_step:
                    yield step, epoch, sft_batch(rendered, rows, max(1, tokens_per_batch // width), width, pad_id)
                step += 1
        else:
            step += len(plan)
        epoch += 1


@functools.lru_cache(maxsize=8)
def _agreement_scorer(config):
    """One jitted scorer per model config, kept across calls: a training run measures the agreement at every
    evaluation, and a fresh closure would be traced and compiled again each time."""
    import jax
    import jax.numpy as jnp

    from gopd_jax.models import forward_hidden, output_head

    @jax.jit
    def score(p, tokens, targets, mask):
        logits = (forward_hidden(p, config, tokens) @ output_head(p, config)).astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        hit = (jnp.argmax(logits, -1) == targets) | (mask == 0)
        return jnp.all(hit, -1), jnp.sum(-logp * mask)

    return score


def expert_agreement(params, config, rendered: RenderedCorpus, tokens_per_batch: int = 8192,
                     widths: Sequence[int] | None = None, pad_id: int = 0,
                     labels: Mapping[str, Sequence[str]] | None = None) -> dict:
    """How well a model imitates the expert on the expert's own states, over every row of `rendered`:
    "agreement" is the % of turns whose whole reply greedy decoding reproduces (each reply token the argmax
    given the expert's tokens before it, which is what greedy decoding then emits), "reply_nll" the replies'
    mean token NLL. Teacher-forced, so unlike success rate it needs no environment, moves long before the
    model wins games, and has little variance on a few thousand turns.

    "by_task_type" breaks the agreement down per task type ({type: {"agreement", "turns"}}); `labels` adds one
    such breakdown per entry, "by_<name>", from one label per row (for example the expert action's verb)."""
    score = _agreement_scorer(config)
    hits = np.zeros(len(rendered), bool)
    nll, tokens = 0.0, 0.0
    for width, rows in epoch_plan(rendered, tokens_per_batch, seed=0, epoch=0, widths=widths):
        b = sft_batch(rendered, rows, max(1, tokens_per_batch // width), width, pad_id)
        row_hits, total = score(params, b["tokens"], b["targets"], b["loss_mask"])
        hits[rows] = np.asarray(row_hits)[:len(rows)]
        nll, tokens = nll + float(total), tokens + float(b["loss_mask"].sum())
    groups = {"task_type": [rendered.task_types[g] for g in rendered.game_index], **(labels or {})}
    result = {"agreement": float(100.0 * hits.mean()) if len(hits) else 0.0, "reply_nll": nll / max(tokens, 1.0),
              "turns": len(rendered)}
    for name, row_labels in groups.items():
        if len(row_labels) != len(rendered):
            raise ValueError(f"labels[{name!r}] has {len(row_labels)} entries for {len(rendered)} rows: give one "
                             "label per row of the rendered corpus")
        row_labels = np.asarray(row_labels)
        result[f"by_{name}"] = {str(k): {"agreement": float(100.0 * hits[row_labels == k].mean()),
                                         "turns": int((row_labels == k).sum())} for k in sorted(set(row_labels))}
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="alfworld")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True, help="corpus directory (resumes if it exists)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="only the first N games of the seeded shuffle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-turns", type=int, default=None)
    ap.add_argument("--expert", default=None, choices=("walkthrough", "handcoded"),
                    help="ALFWorld: the game's walkthrough (default) or ALFWorld's handcoded, searching expert")
    ap.add_argument("--shard-games", type=int, default=50, help="games per shard (at most this many lost to a kill)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = build_corpus(args.env, args.split, args.out, num_workers=args.workers, limit=args.limit, seed=args.seed,
                       max_turns=args.max_turns, shard_games=args.shard_games, progress=not args.no_progress,
                       env_kwargs={"expert": args.expert} if args.expert else None)
    records = load_corpus(out)
    print(f"[expert_corpus] {out}: {len(records)} games, {sum(len(r['turns']) for r in records)} turns, "
          f"{sum(r['won'] for r in records)} won", flush=True)


if __name__ == "__main__":
    main()
