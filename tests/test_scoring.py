"""Teacher scoring: chunked log-probs, sharded (tensor / expert parallel) == unsharded, vocab checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopd_jax import scoring
from gopd_jax.models import Qwen3Config, forward, init_params

DENSE = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False)
MOE = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)


def tokens_targets(vocab, b=2, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
    return tokens, np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)


def test_teacher_logprobs_match_full_softmax():
    params = init_params(DENSE, jax.random.PRNGKey(0))
    tokens, targets = tokens_targets(DENSE.vocab_size)
    mask = np.ones(tokens.shape, np.float32)
    mask[:, :3] = 0
    logp = scoring.teacher_logprobs(params, DENSE, tokens, targets, mask, chunk=5)  # T not a multiple of chunk
    ref = jnp.take_along_axis(jax.nn.log_softmax(forward(params, DENSE, tokens)), targets[..., None], -1)[..., 0]
    assert logp.shape == tokens.shape and logp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), np.where(mask > 0, ref, 0.0), atol=1e-5)
    hidden = scoring.teacher_hidden(params, DENSE, tokens)
    assert hidden.shape == (*tokens.shape, DENSE.hidden_size)


def _sharded_dims(x):
    """Dimensions whose per-device shard is smaller than the global array."""
    shard = x.addressable_shards[0].data.shape
    return [i for i, (a, b) in enumerate(zip(x.shape, shard)) if a != b]


@pytest.mark.multidevice
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config,strategy", [(DENSE, "tensor"), (MOE, "expert"), (MOE, "tensor")])
def test_sharded_scoring_matches_unsharded(config, strategy):
    mesh = scoring.make_mesh(4)
    params = init_params(config, jax.random.PRNGKey(1))
    tokens, targets = tokens_targets(config.vocab_size, seed=1)
    ref = jax.block_until_ready(scoring.teacher_logprobs(params, config, tokens, targets))

    sharded = jax.block_until_ready(scoring.shard_params(params, config, mesh, strategy))
    layer = sharded["layers"][0]
    if strategy == "tensor":
        assert _sharded_dims(sharded["embed"]) == [0] and _sharded_dims(sharded["lm_head"]) == [1]
        assert _sharded_dims(layer["attn"]["q"]) == [1] and _sharded_dims(layer["attn"]["o"]) == [0]
        ffn = layer.get("mlp") or layer["moe"]
        assert _sharded_dims(ffn["up"]) == [ffn["up"].ndim - 1] and _sharded_dims(ffn["down"]) == [ffn["down"].ndim - 2]
    else:
        for name in ("gate", "up", "down"):
            assert _sharded_dims(layer["moe"][name]) == [0]
            assert layer["moe"][name].addressable_shards[0].data.shape[0] == config.num_experts // 4
        assert _sharded_dims(layer["attn"]["q"]) == [] and _sharded_dims(sharded["embed"]) == []
    assert _sharded_dims(layer["input_norm"]) == []

    out = jax.block_until_ready(scoring.teacher_logprobs(sharded, config, tokens, targets))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.multidevice
def test_expert_strategy_needs_divisible_moe():
    mesh = scoring.make_mesh(4)
    with pytest.raises(ValueError, match="num_experts"):
        scoring.shard_params(init_params(DENSE, jax.random.PRNGKey(0)), DENSE, mesh, "expert")
    with pytest.raises(ValueError, match="strategy must be"):
        scoring.shard_params(init_params(DENSE, jax.random.PRNGKey(0)), DENSE, mesh, "pipeline")


class FakeTokenizer:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return dict(self._vocab)


def test_check_compatible():
    scoring.check_compatible(DENSE, MOE)  # same vocab size
    other = dataclasses.replace(DENSE, vocab_size=256)
    with pytest.raises(ValueError, match=r"student vocab_size 256 != teacher vocab_size 128.*share a tokenizer"):
        scoring.check_compatible(other, DENSE)
    tok_a, tok_b = FakeTokenizer({"a": 0, "b": 1}), FakeTokenizer({"a": 0, "c": 1})
    scoring.check_compatible(DENSE, MOE, tok_a, FakeTokenizer({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="vocabularies differ.*share a tokenizer"):
        scoring.check_compatible(DENSE, MOE, tok_a, tok_b)
