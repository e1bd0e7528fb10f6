"""Tokenizers and the Qwen3 chat format, as token ids.

Real checkpoints bring their own tokenizer and chat template (loaded from the local directory). For
CPU-scale experiments `train_bpe_tokenizer` builds a small byte-level BPE with Qwen3's special tokens and
a Qwen3-style chat template, saved as an ordinary Hugging Face tokenizer directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ACTION_OPEN, ACTION_CLOSE = "<action>", "</action>"

# Qwen3's own chat template restricted to conversations without tools (equal to it there, as the tests check
# against the real one): roles wrapped in <|im_start|>/<|im_end|>; an assistant turn after the last user message
# keeps its <think> block, earlier ones lose their reasoning; with enable_thinking=False the generation prompt
# carries an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role != 'system' %}{{- raise_exception('this chat template renders system, user and '"
    "'assistant messages only, not ' + message.role + '; use a checkpoint tokenizer for tool calls') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a local directory (no hub access)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json; point at the checkpoint "
                                "directory that holds the tokenizer files")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_fits(tokenizer, vocab_size: int, source: str) -> None:
    """A tokenizer with ids beyond the model's embedding table would index garbage rows: refuse it."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {source!r} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
                         "use the tokenizer the model was trained with")


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                enable_thinking: bool = True) -> list[int]:
    """Chat messages -> prompt token ids via the tokenizer's own chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def _token_id(tokenizer, token: str) -> int | None:
    """The id of a single token, or None when the vocabulary lacks it (HF maps unknowns to unk or None)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def end_of_turn_id(tokenizer) -> int:
    """The id that ends an assistant turn in the Qwen3 chat format, ``<|im_end|>``: the last token of every
    SFT / expert target. Never the eos token: a base-model tokenizer's eos is ``<|endoftext|>``, which would
    teach the student to end turns with a token the chat template never writes there."""
    tid = _token_id(tokenizer, IM_END)
    if tid is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no {IM_END} token, so it cannot end a turn "
                         "in the Qwen3 chat format; use a Qwen3 tokenizer (or add the token)")
    return tid


def _generation_config_eos(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not all(isinstance(t, int) and t >= 0 for t in eos):
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return eos


def stop_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> tuple[int, ...]:
    """Ids that end a generated turn: ``<|im_end|>`` first (so ``[0]`` is the end of turn), then the
    ``eos_token_id`` of ``generation_config.json`` (an id or a list; Qwen3 lists <|im_end|> and <|endoftext|>),
    read from ``model_dir`` and from the directory the tokenizer was loaded from, then the tokenizer's eos.
    No duplicates; the order is fixed by the files, not by id values."""
    ids = [_token_id(tokenizer, IM_END)]
    dirs = [Path(d) for d in (model_dir, tokenizer.name_or_path) if d]  # name_or_path is "" when built in memory
    for d in dict.fromkeys(dirs):
        ids += _generation_config_eos(d)
    ids.append(tokenizer.eos_token_id)
    ids = [int(t) for t in dict.fromkeys(ids) if t is not None]
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no {IM_END} token, no eos token and no "
                         "generation_config.json with eos_token_id beside it: nothing can end a turn; set "
                         "tokenizer.eos_token or pass model_dir= a checkpoint with a generation_config.json")
    return tuple(ids)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on `texts` with Qwen3's special tokens and chat template; save to `out_dir`
    (loadable with `load_tokenizer` / `AutoTokenizer`). The pad token gets id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The agent's format tags are atomic tokens too, so tiny models learn the reply format quickly.
    specials = [PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=IM_END,
                                   additional_special_tokens=specials[1:2] + specials[3:])
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast
