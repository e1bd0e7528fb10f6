"""Real Qwen3 param pytrees with hand-set weights, for driving the rollout deterministically in tests."""

import jax.numpy as jnp
import numpy as np

from gopd_jax.models import Qwen3Config, init_params
from gopd_jax.records import Policy


def alfworld_data_available() -> bool:
    """Whether ALFWorld's game files can be found (ALFWORLD_DATA, an earlier unpack, or the shared archive)."""
    from gopd_jax.envs.alfworld_env import resolve_data_dir

    try:
        resolve_data_dir()
        return True
    except FileNotFoundError:
        return False


def random_checkpoint(config: Qwen3Config, tokenizer, out, seed: int) -> str:
    """A Hugging Face checkpoint directory of `config` at a seeded random init, with `tokenizer` (made once)."""
    import jax

    from gopd_jax.models import save_hf_checkpoint

    if not (out / "config.json").is_file():
        save_hf_checkpoint(init_params(config, jax.random.PRNGKey(seed)), config, out)
        tokenizer.save_pretrained(out)
    return str(out)


def tiny_checkpoints(root, moe_teacher: bool) -> tuple[str, str]:
    """(student, teacher) Hugging Face checkpoint directories of tiny random Qwen3 models sharing a small BPE
    tokenizer trained on one ALFWorld prompt; the teacher is a 4-expert Qwen3-MoE when `moe_teacher`."""
    from experiments.mini_repro import _dense
    from gopd_jax.envs.prompting import build_messages
    from gopd_jax.tokenizer import train_bpe_tokenizer

    text = [m["content"] for m in build_messages("put a mug in the sink.", [], "You see a mug 1.", ["look"],
                                                 "alfworld", think=False)]
    tok = train_bpe_tokenizer(text * 5, 320, root / "tok")
    teacher_cfg = (Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
                   if moe_teacher else _dense(len(tok), 32, 1))
    teacher = random_checkpoint(teacher_cfg, tok, root / "teacher", seed=0)
    student = random_checkpoint(_dense(len(tok), 32, 1), tok, root / "student", seed=1)
    return student, teacher


def alfworld_tokenizer(out_dir):
    """A tiny byte-level BPE trained on one rendered ALFWorld prompt (enough to tokenize any prompt)."""
    from gopd_jax.envs.prompting import build_messages
    from gopd_jax.tokenizer import train_bpe_tokenizer

    text = [m["content"] for m in build_messages("put a mug in the sink.", [], "You see a mug 1 and a sink 1.",
                                                 ["look", "go to sink 1", "take mug 1 from table 1"], "alfworld")]
    return train_bpe_tokenizer(text * 10, 400, out_dir)


def scripted_policy(tokenizer, reply: str, start_token: int) -> Policy:
    """A one-layer Qwen3 whose attention and MLP outputs are zeroed and whose embeddings are one-hot, so
    the next token depends on the current token only; the head maps `start_token` -> reply tokens -> stop.
    Greedy decoding then emits exactly `reply` + <|im_end|> after any prompt ending in `start_token`."""
    chain = [start_token] + tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(
        "<|im_end|>")]
    if len(set(chain)) != len(chain):
        raise ValueError(f"reply {reply!r} repeats a token; a bigram policy cannot emit it")
    v = len(tokenizer)
    config = Qwen3Config(vocab_size=v, hidden_size=v, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    params = init_params(config, __import__("jax").random.key(0))
    params["embed"] = jnp.eye(v, dtype=jnp.float32)
    params["layers"][0]["attn"]["o"] = jnp.zeros_like(params["layers"][0]["attn"]["o"])
    params["layers"][0]["mlp"]["down"] = jnp.zeros_like(params["layers"][0]["mlp"]["down"])
    head = np.zeros((v, v), np.float32)
    for a, b in zip(chain, chain[1:]):
        head[a, b] = 10.0
    params["lm_head"] = jnp.asarray(head)
    return Policy(params, config)
