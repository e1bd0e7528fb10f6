"""Tokenizers and the Qwen3 chat format, as token ids.

Real checkpoints bring their own tokenizer and chat template (loaded from the local directory). For
CPU-scale experiments `train_bpe_tokenizer` builds a small byte-level BPE with Qwen3's special tokens and
a Qwen3-style chat template, saved as an ordinary Hugging Face tokenizer directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ACTION_OPEN, ACTION_CLOSE = "<action>", "</action>"

# Qwen3's rendering for a conversation without tool calls: roles wrapped in <|im_start|>/<|im_end|>;
# with enable_thinking=False the generation prompt carries an empty think block, as Qwen3's own template.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a local directory (no hub access)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json; point at the checkpoint "
                                "directory that holds the tokenizer files")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                enable_thinking: bool = True) -> list[int]:
    """Chat messages -> prompt token ids via the tokenizer's own chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn: Qwen's <|im_end|> (and the eos token, when different)."""
    ids = {tokenizer.convert_tokens_to_ids(IM_END)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids.discard(tokenizer.unk_token_id)
    if not ids:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token: cannot tell where a turn ends")
    return tuple(sorted(ids))


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
