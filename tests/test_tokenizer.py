"""Tokenizers: the tiny BPE with Qwen3 special tokens, and our chat rendering / stop ids against the real Qwen3
tokenizer (shared/data/qwen3_tokenizer, found above the repository; those tests skip where it is absent)."""

import itertools
import json
import lzma
import shutil
from pathlib import Path

import pytest

from gopd_jax.envs.prompting import build_messages
from gopd_jax.rollout import RolloutConfig, RolloutRunner
from gopd_jax.tokenizer import (IM_END, IM_START, QWEN3_CHAT_TEMPLATE, end_of_turn_id, load_tokenizer, render_chat,
                                stop_token_ids, train_bpe_tokenizer)

CORPUS = ["You are in the middle of a room. Looking quickly around you, you see a cabinet 1 and a fridge 1.",
          "Your task is to: put a clean apple in fridge.", "<action>go to fridge 1</action>",
          "The fridge 1 is closed. You open the fridge 1."] * 20
QWEN3_DIR = Path("shared/data/qwen3_tokenizer")
ENDOFTEXT_ID, IM_END_ID, THINK_ID, THINK_CLOSE_ID = 151643, 151645, 151667, 151668

SYSTEM_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Your task is to: look."}]
MULTI_TURN = SYSTEM_USER + [
    {"role": "assistant", "content": "<think>\nThe desk may hold it.\n</think>\n\n<action>go to desk 1</action>"},
    {"role": "user", "content": "On the desk 1 you see a pen 2 and a mug 1. ünïcödé  spaced   out"},
    {"role": "assistant", "content": "<think>\n\n</think>\n\n<action>take mug 1 from desk 1</action>"},
    {"role": "user", "content": "You pick up the mug 1 from the desk 1."},
]
# Ends with assistant turns after the last user message: the template keeps their reasoning.
ENDS_WITH_ASSISTANT = MULTI_TURN + [
    {"role": "assistant", "content": "<think>\nNow the sink.\n</think>\n\n<action>go to sinkbasin 1</action>"},
    {"role": "assistant", "content": "<action>clean mug 1 with sinkbasin 1</action>", "reasoning_content": "wash"},
]
AGENT_PROMPT = build_messages("put a clean mug in the coffee machine.", [("You arrive at desk 1.", "take mug 1")],
                              "You pick up the mug 1.", ["go to sinkbasin 1", "look", "inventory"], "alfworld")
CONVERSATIONS = {"system_user": SYSTEM_USER, "multi_turn": MULTI_TURN, "ends_with_assistant": ENDS_WITH_ASSISTANT,
                 "agent_prompt": AGENT_PROMPT}


def _find_upwards(rel: Path) -> Path | None:
    return next((p / rel for p in Path(__file__).resolve().parents if (p / rel).is_dir()), None)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """The real Qwen3 tokenizer files, unpacked (tokenizer.json is stored xz-compressed)."""
    src = _find_upwards(QWEN3_DIR)
    if src is None:
        pytest.skip(f"real Qwen3 tokenizer not found ({QWEN3_DIR} above the repository); these tests need "
                    "tokenizer.json.xz + tokenizer_config.json there")
    out = tmp_path_factory.mktemp("qwen3_tokenizer")
    (out / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return load_tokenizer(qwen3_dir)


def _hf_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5.x


# --------------------------------------------------------------------------------------------------------
# tiny BPE


def test_trained_tokenizer_roundtrips_and_renders_qwen3_chat(tmp_path):
    train_bpe_tokenizer(CORPUS, 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token_id == 0
    im_start, im_end = tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END)
    text = "go to fridge 1, then open it! ünïcödé"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = render_chat(tok, SYSTEM_USER)
    rendered = tok.decode(ids)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nYour task is to: look.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    no_think = tok.decode(render_chat(tok, SYSTEM_USER, enable_thinking=False))
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.convert_tokens_to_ids("<think>") in render_chat(tok, SYSTEM_USER, enable_thinking=False)


def test_tiny_tokenizer_stop_ids_and_end_of_turn(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 300, tmp_path / "tok")
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert tok.name_or_path == ""  # built in memory: no directory is searched (not even the working directory)
    assert stop_token_ids(tok) == (im_end,) == stop_token_ids(load_tokenizer(tmp_path / "tok"))
    assert end_of_turn_id(tok) == im_end
    # A generation config beside the tokenizer adds its eos ids, after <|im_end|> and without repeats.
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, im_end, 0]}))
    assert stop_token_ids(load_tokenizer(tmp_path / "tok")) == (im_end, 0)
    assert stop_token_ids(tok, model_dir=tmp_path / "tok") == (im_end, 0)
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": "0"}))
    with pytest.raises(ValueError, match="eos_token_id must be an id or a list of ids"):
        stop_token_ids(tok, model_dir=tmp_path / "tok")


def test_tokenizer_without_im_end_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                  unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"no <\|im_end\|> token.*use a Qwen3 tokenizer"):
        end_of_turn_id(tok)
    with pytest.raises(ValueError, match="nothing can end a turn; set tokenizer.eos_token"):
        stop_token_ids(tok)
    tok.eos_token = "a"
    assert stop_token_ids(tok) == (0,)


# --------------------------------------------------------------------------------------------------------
# the real Qwen3 tokenizer


@pytest.mark.parametrize("name,thinking,generation_prompt",
                         list(itertools.product(CONVERSATIONS, [True, False], [True, False])))
def test_render_chat_equals_transformers_on_qwen3(qwen3, name, thinking, generation_prompt):
    messages = CONVERSATIONS[name]
    ours = render_chat(qwen3, messages, add_generation_prompt=generation_prompt, enable_thinking=thinking)
    assert ours == _hf_ids(qwen3, messages, add_generation_prompt=generation_prompt, enable_thinking=thinking)
    assert ours.count(IM_END_ID) == len(messages) and ENDOFTEXT_ID not in ours
    empty_think = [THINK_ID, 271, THINK_CLOSE_ID, 271]  # "<think>\n\n</think>\n\n"
    assert (ours[-4:] == empty_think) == (generation_prompt and not thinking)


def test_qwen3_template_drops_earlier_reasoning_keeps_the_last(qwen3):
    text = qwen3.decode(render_chat(qwen3, ENDS_WITH_ASSISTANT, add_generation_prompt=False))
    assert "The desk may hold it." not in text  # before the last user message: reasoning dropped
    assert "<think>\nNow the sink.\n</think>\n\n<action>go to sinkbasin 1</action>" in text
    assert "<think>\nwash\n</think>\n\n<action>clean mug 1" in text


@pytest.mark.parametrize("name,thinking,generation_prompt",
                         list(itertools.product(CONVERSATIONS, [True, False], [True, False])))
def test_tiny_chat_template_equals_qwen3_template(qwen3, name, thinking, generation_prompt):
    """The template train_bpe_tokenizer installs renders tool-free conversations exactly as Qwen3's own."""
    kw = dict(tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=thinking)
    messages = CONVERSATIONS[name]
    assert (qwen3.apply_chat_template(messages, chat_template=QWEN3_CHAT_TEMPLATE, **kw)
            == qwen3.apply_chat_template(messages, **kw))


def test_tiny_chat_template_refuses_tool_messages(qwen3):
    from jinja2 import TemplateError

    messages = SYSTEM_USER + [{"role": "tool", "content": "42"}]
    with pytest.raises(TemplateError, match="not tool; use a checkpoint tokenizer"):
        qwen3.apply_chat_template(messages, chat_template=QWEN3_CHAT_TEMPLATE, tokenize=False)


def test_qwen3_stop_ids(qwen3_dir, tmp_path):
    tok = load_tokenizer(qwen3_dir)
    assert (tok.convert_tokens_to_ids(IM_END), tok.pad_token_id) == (IM_END_ID, ENDOFTEXT_ID)
    assert stop_token_ids(tok) == (IM_END_ID,)  # no generation_config.json: <|im_end|> (also the eos)
    # Qwen3 checkpoints' generation_config.json: eos_token_id [151645, 151643].
    instruct = tmp_path / "instruct"
    shutil.copytree(qwen3_dir, instruct)
    (instruct / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_ID, ENDOFTEXT_ID]}))
    tok = load_tokenizer(instruct)
    assert stop_token_ids(tok) == (IM_END_ID, ENDOFTEXT_ID)
    assert end_of_turn_id(tok) == IM_END_ID
    # A base checkpoint: eos <|endoftext|>, generation config eos an int. Turns still end with <|im_end|>.
    base = tmp_path / "base"
    shutil.copytree(qwen3_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_token="<|endoftext|>")))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": ENDOFTEXT_ID}))
    tok = load_tokenizer(base)
    assert tok.eos_token_id == ENDOFTEXT_ID
    assert stop_token_ids(tok) == (IM_END_ID, ENDOFTEXT_ID)
    assert end_of_turn_id(tok) == IM_END_ID


@pytest.mark.parametrize("think", [True, False])
def test_expert_reply_is_the_templates_assistant_turn(qwen3_dir, tmp_path, think):
    """Prompt + expert (SFT) reply tokens = Qwen3's rendering of the conversation with that reply, up to the
    template's newline after <|im_end|>, even with a base tokenizer whose eos is <|endoftext|>."""
    base = tmp_path / "base"
    shutil.copytree(qwen3_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_token="<|endoftext|>")))
    tok = load_tokenizer(base)
    reply = RolloutRunner(None, tok, RolloutConfig(env="alfworld", think=think)).expert_reply("go to sinkbasin 1")
    assert reply[-1] == IM_END_ID
    prompt = render_chat(tok, AGENT_PROMPT, enable_thinking=think)
    answered = AGENT_PROMPT + [{"role": "assistant", "content": tok.decode(reply[:-1])}]
    full = _hf_ids(tok, answered, add_generation_prompt=False, enable_thinking=think)
    assert prompt + reply.tolist() == full[:-1] and tok.decode(full[-1:]) == "\n"
