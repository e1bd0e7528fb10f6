"""Sampling engine: log-probs, greedy limit, stop tokens, determinism, top-k / top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopd_jax.generate import SamplingConfig, generate, sampling_distribution
from gopd_jax.models import Qwen3Config, forward, init_params

CFG = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(0))
    # Larger weights than the 0.02 init so the distribution is far from uniform.
    params = jax.tree.map(lambda a: a * 12.0 if a.ndim == 2 else a, params)
    lengths = np.array([5, 2, 8, 3], np.int32)
    prompts = np.zeros((4, 8), np.int32)
    rng = np.random.default_rng(0)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(1, CFG.vocab_size, n)
    return params, jnp.asarray(prompts), jnp.asarray(lengths)


def _full_sequences(prompts, lengths, out):
    rows = []
    for b in range(prompts.shape[0]):
        rows.append(np.concatenate([np.asarray(prompts[b, :lengths[b]]), np.asarray(out.tokens[b, :out.lengths[b]])]))
    return rows


def test_logprobs_are_log_softmax_of_forward(setup):
    params, prompts, lengths = setup
    out = generate(params, CFG, prompts, lengths, jax.random.key(1), SamplingConfig(max_new_tokens=12))
    for b, seq in enumerate(_full_sequences(prompts, lengths, out)):
        logp = jax.nn.log_softmax(forward(params, CFG, jnp.asarray(seq)[None])[0], axis=-1)
        n = int(lengths[b])
        ref = logp[np.arange(n - 1, len(seq) - 1), seq[n:]]
        np.testing.assert_allclose(out.logprobs[b, :out.lengths[b]], ref, atol=2e-5)
        assert np.all(np.asarray(out.logprobs[b, out.lengths[b]:]) == 0)


def test_low_temperature_is_greedy_and_greedy_is_argmax(setup):
    params, prompts, lengths = setup
    greedy = generate(params, CFG, prompts, lengths, jax.random.key(2), SamplingConfig(max_new_tokens=10,
                                                                                     temperature=0.0))
    cold = generate(params, CFG, prompts, lengths, jax.random.key(3), SamplingConfig(max_new_tokens=10,
                                                                                   temperature=1e-4))
    np.testing.assert_array_equal(greedy.tokens, cold.tokens)
    for b, seq in enumerate(_full_sequences(prompts, lengths, greedy)):
        logits = forward(params, CFG, jnp.asarray(seq)[None])[0]
        n = int(lengths[b])
        np.testing.assert_array_equal(np.argmax(logits[n - 1:len(seq) - 1], -1), seq[n:])


def test_stop_token_ends_row_and_pads(setup):
    params, prompts, lengths = setup
    free = generate(params, CFG, prompts, lengths, jax.random.key(4), SamplingConfig(max_new_tokens=16))
    stop = int(free.tokens[0, 3])  # a token row 0 is known to produce at step 3 with this key
    out = generate(params, CFG, prompts, lengths, jax.random.key(4),
                   SamplingConfig(max_new_tokens=16, stop_token_ids=(stop,), pad_id=0))
    toks = np.asarray(out.tokens)
    for b in range(4):
        n = int(out.lengths[b])
        hits = np.flatnonzero(np.asarray(free.tokens[b]) == stop)
        expected = hits[0] + 1 if len(hits) else 16
        assert n == expected
        assert np.all(toks[b, n:] == 0)
        np.testing.assert_array_equal(toks[b, :n], np.asarray(free.tokens[b, :n]))


def test_deterministic_per_key(setup):
    params, prompts, lengths = setup
    s = SamplingConfig(max_new_tokens=8)
    a = generate(params, CFG, prompts, lengths, jax.random.key(5), s)
    b = generate(params, CFG, prompts, lengths, jax.random.key(5), s)
    c = generate(params, CFG, prompts, lengths, jax.random.key(6), s)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_row_sample_independent_of_batch_company(setup):
    params, prompts, lengths = setup
    s = SamplingConfig(max_new_tokens=8)
    keys = jax.random.split(jax.random.key(9), 4)
    full = generate(params, CFG, prompts, lengths, keys, s)
    alone = generate(params, CFG, prompts[2:3], lengths[2:3], keys[2:3], s)
    np.testing.assert_array_equal(full.tokens[2], alone.tokens[0])
    with pytest.raises(ValueError, match="row keys"):
        generate(params, CFG, prompts, lengths, keys[:3], s)


def test_top_k_and_top_p_filter_the_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    topk = np.exp(np.asarray(sampling_distribution(logits, SamplingConfig(top_k=2))))
    np.testing.assert_allclose(topk, [[2 / 3, 1 / 3, 0, 0]], atol=1e-6)
    # top-p keeps the smallest prefix whose mass reaches p: 0.5 + 0.25 >= 0.7; 0.5 + 0.25 + 0.15 >= 0.8.
    topp = np.exp(np.asarray(sampling_distribution(logits, SamplingConfig(top_p=0.7))))
    np.testing.assert_allclose(topp, [[2 / 3, 1 / 3, 0, 0]], atol=1e-6)
    topp = np.exp(np.asarray(sampling_distribution(logits, SamplingConfig(top_p=0.8))))
    np.testing.assert_allclose(topp, [[0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]], atol=1e-6)
    hot = np.exp(np.asarray(sampling_distribution(logits, SamplingConfig(temperature=2.0))))
    ref = np.sqrt([0.5, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(hot[0], ref / ref.sum(), atol=1e-6)


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


# head_dim 16: the smallest the fused (Triton) decode kernel takes on a GPU.
CFG16 = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
# On CPU the fused decode kernel runs in Pallas' interpreter (exact float32); on a GPU Triton's float32 dots may
# use TF32.
FUSED_ATOL = 2e-5 if jax.default_backend() == "cpu" else 3e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_decode_attention_matches_xla(dtype):
    from gopd_jax.models.qwen3 import DECODE_SPLIT, decode_attention

    b, h, kv, s, hd = 3, 4, 2, 2 * DECODE_SPLIT, 16
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (b, h, hd), jnp.float32)
    k = jax.random.normal(keys[1], (b, kv, s, hd), jnp.float32)
    v = jax.random.normal(keys[2], (b, kv, s, hd), jnp.float32)
    lengths = jnp.array([1, DECODE_SPLIT + 3, s], jnp.int32)
    beyond = jnp.arange(s)[None, None, :, None] >= lengths[:, None, None, None]
    k, v = jnp.where(beyond, 1e4, k), jnp.where(beyond, 1e4, v)  # cache slots past a row's length are ignored
    ref = decode_attention(q, k, v, lengths)
    out = decode_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), lengths, fused=True)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=FUSED_ATOL if dtype == jnp.float32 else 5e-2)


def test_fused_generation_logprobs_are_log_softmax_of_forward():
    params = jax.tree.map(lambda a: a * 12.0 if a.ndim == 2 else a, init_params(CFG16, jax.random.key(0)))
    prompts = jnp.asarray(np.random.default_rng(1).integers(1, CFG16.vocab_size, (3, 6)), jnp.int32)
    lengths = jnp.array([6, 2, 4], jnp.int32)
    out = generate(params, CFG16, prompts, lengths, jax.random.key(1), SamplingConfig(max_new_tokens=6),
                   attention="fused")
    for b, seq in enumerate(_full_sequences(prompts, lengths, out)):
        logp = jax.nn.log_softmax(forward(params, CFG16, jnp.asarray(seq)[None])[0], axis=-1)
        n = int(lengths[b])
        np.testing.assert_allclose(out.logprobs[b, :out.lengths[b]], logp[np.arange(n - 1, len(seq) - 1), seq[n:]],
                                   atol=FUSED_ATOL * 10)


def test_unknown_attention_implementation():
    with pytest.raises(ValueError, match="attention must be one of"):
        generate(init_params(CFG16, jax.random.key(0)), CFG16, jnp.ones((1, 2), jnp.int32), jnp.array([2]),
                 jax.random.key(0), SamplingConfig(max_new_tokens=2), attention="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention (the fused prefill) needs a GPU")
def test_fused_prefill_matches_xla_in_bfloat16():
    from gopd_jax.models import init_cache, prefill

    params = init_params(CFG16, jax.random.key(3), jnp.bfloat16)
    prompts = jnp.asarray(np.random.default_rng(2).integers(1, CFG16.vocab_size, (2, 64)), jnp.int32)
    lengths = jnp.array([64, 17], jnp.int32)
    cache = init_cache(CFG16, 2, 128, jnp.bfloat16)
    ref, ref_cache = prefill(params, CFG16, prompts, lengths, cache, attention="xla")
    out, out_cache = prefill(params, CFG16, prompts, lengths, cache, attention="fused")
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(np.asarray(out_cache[0]["k"], np.float32), np.asarray(ref_cache[0]["k"], np.float32))


MOE = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=16)


@pytest.mark.multidevice
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config,strategy", [(CFG, "tensor"), (MOE, "expert"), (MOE, "tensor")])
def test_sharded_teacher_generation_matches_unsharded(setup, config, strategy):
    """Teacher-owned turns are generated by the sharded teacher (jit over a mesh, no pmap): greedy tokens and
    log-probs equal the single-device ones."""
    from gopd_jax.scoring import make_mesh, shard_params

    _, prompts, lengths = setup
    params = jax.tree.map(lambda a: a * 12.0 if a.ndim >= 2 else a, init_params(config, jax.random.key(3)))
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=(7,))
    ref = jax.block_until_ready(generate(params, config, prompts, lengths, jax.random.key(1), sampling))
    sharded, sharded_config = shard_params(params, config, make_mesh(4), strategy)
    assert len(sharded["layers"][0]["attn"]["q"].sharding.device_set) == 4
    assert (sharded_config.expert_mesh is not None) == (strategy == "expert")  # expert parallel: shard_map MoE
    out = jax.block_until_ready(generate(sharded, sharded_config, prompts, lengths, jax.random.key(1), sampling))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)
