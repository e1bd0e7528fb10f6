"""Teacher scoring: chunked log-probs, sharded (tensor / expert parallel) == unsharded, expert parallel keeps
every expert on its device, vocab checks."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopd_jax import scoring
from gopd_jax.models import Qwen3Config, forward, init_params
from gopd_jax.models.qwen3 import moe

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

    sharded, sharded_config = scoring.shard_params(params, config, mesh, strategy)
    assert sharded_config == dataclasses.replace(config, expert_mesh=mesh if strategy == "expert" else None)
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

    out = jax.block_until_ready(scoring.teacher_logprobs(sharded, sharded_config, tokens, targets))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def _expert_parallel_layer(n_tokens=24):
    """One MoE layer's weights, expert-sharded over 4 devices, its config and replicated tokens [N, D]."""
    params = init_params(MOE, jax.random.PRNGKey(2))
    sharded, config = scoring.shard_params(params, MOE, scoring.make_mesh(4), "expert")
    x = jax.random.normal(jax.random.PRNGKey(3), (n_tokens, MOE.hidden_size))
    return params, sharded, config, x


@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_expert_parallel_equals_unsharded():
    """Both expert paths under shard_map (the grouped one is what accelerators run) and the whole forward equal
    the single-device model."""
    params, sharded, config, x = _expert_parallel_layer()
    layer = jax.jit(moe, static_argnums=(1, 3))
    for grouped in (True, False):
        np.testing.assert_allclose(np.asarray(layer(sharded["layers"][0]["moe"], config, x, grouped)),
                                   np.asarray(layer(params["layers"][0]["moe"], MOE, x, grouped)), atol=1e-6)
    tokens, _ = tokens_targets(MOE.vocab_size, seed=4)
    logits = jax.jit(forward, static_argnums=1)
    np.testing.assert_allclose(np.asarray(logits(sharded, config, tokens)), np.asarray(logits(params, MOE, tokens)),
                               atol=1e-5, rtol=1e-5)


def _collectives(hlo: str) -> dict:
    """{collective op: [result shapes]} of compiled HLO text (layouts dropped)."""
    ops = re.findall(r"= (\S+|\([^)]*\)) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                     r"(?:-start)?\(", hlo)
    found = {}
    for shape, op in ops:
        found.setdefault(op, []).append(re.sub(r"\{[^}]*\}", "", shape))
    return found


@pytest.mark.multidevice
@pytest.mark.timeout(300)
@pytest.mark.parametrize("grouped", [True, False])
def test_expert_parallel_moves_tokens_not_experts(grouped):
    """The compiled expert-parallel layer communicates exactly once: the psum of the combined [N, D] output.
    No expert weight, group size or per-expert token copy crosses devices (without shard_map, XLA's own
    partitioning of the grouped path all-gathers the group sizes and all-reduces the k copies of each token)."""
    _, sharded, config, x = _expert_parallel_layer()
    compiled = jax.jit(moe, static_argnums=(1, 3)).lower(sharded["layers"][0]["moe"], config, x, grouped).compile()
    assert _collectives(compiled.as_text()) == {"all-reduce": [f"f32[{x.shape[0]},{MOE.hidden_size}]"]}


@pytest.mark.multidevice
def test_expert_strategy_needs_divisible_moe():
    mesh = scoring.make_mesh(4)
    with pytest.raises(ValueError, match="num_experts"):
        scoring.shard_params(init_params(DENSE, jax.random.PRNGKey(0)), DENSE, mesh, "expert")
    with pytest.raises(ValueError, match="strategy must be"):
        scoring.shard_params(init_params(DENSE, jax.random.PRNGKey(0)), DENSE, mesh, "pipeline")
    grid = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    with pytest.raises(ValueError, match="expert_mesh needs a 1-D mesh"):
        dataclasses.replace(MOE, expert_mesh=grid)


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
