"""Tiny BPE tokenizer with Qwen3 special tokens and chat format."""

from gopd_jax.tokenizer import IM_END, IM_START, load_tokenizer, render_chat, stop_token_ids, train_bpe_tokenizer

CORPUS = ["You are in the middle of a room. Looking quickly around you, you see a cabinet 1 and a fridge 1.",
          "Your task is to: put a clean apple in fridge.", "<action>go to fridge 1</action>",
          "The fridge 1 is closed. You open the fridge 1."] * 20


def test_trained_tokenizer_roundtrips_and_renders_qwen3_chat(tmp_path):
    train_bpe_tokenizer(CORPUS, 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token_id == 0
    im_start, im_end = tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END)
    assert stop_token_ids(tok) == (im_end,)
    text = "go to fridge 1, then open it! ünïcödé"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Your task is to: look."}]
    ids = render_chat(tok, msgs)
    rendered = tok.decode(ids)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nYour task is to: look.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    no_think = tok.decode(render_chat(tok, msgs, enable_thinking=False))
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.convert_tokens_to_ids("<think>") in render_chat(tok, msgs, enable_thinking=False)
