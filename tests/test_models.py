"""Qwen3 / Qwen3-MoE parity with transformers' PyTorch implementation on tiny random checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gopd_jax.generate import SamplingConfig, generate
from gopd_jax.models import forward, load_hf_checkpoint, save_hf_checkpoint
from gopd_jax.models.qwen3 import moe
from tests.hf_reference import make_hf_model

VARIANTS = [dict(moe=False, tied=True), dict(moe=False, tied=False), dict(moe=True, tied=False),
            dict(moe=True, tied=True)]


def _ids(v):
    return f"{'moe' if v['moe'] else 'dense'}-{'tied' if v['tied'] else 'untied'}"


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=VARIANTS, ids=_ids)
def checkpoint(request, tmp_path_factory):
    model, path = make_hf_model(tmp_path_factory.mktemp("hf"), **request.param)
    params, config = load_hf_checkpoint(path, dtype=jnp.float32)
    return model, path, params, config


def test_config_translated(checkpoint):
    model, _, _, config = checkpoint
    assert config.head_dim == 24 != config.hidden_size // config.num_attention_heads
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    if config.is_moe:
        assert config.num_experts == 6 and config.norm_topk_prob and config.mlp_only_layers == (1,)
        assert [config.is_sparse_layer(i) for i in range(3)] == [True, False, True]


def test_logits_match_transformers_with_padding(checkpoint):
    model, _, params, config = checkpoint
    rng = np.random.default_rng(0)
    lengths = [17, 9, 1, 12]
    tokens = np.zeros((4, 17), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(1, config.vocab_size, n)
    ours = np.asarray(jax.jit(forward, static_argnums=1)(params, config, jnp.asarray(tokens)))
    for b, n in enumerate(lengths):
        ref = _hf_logits(model, tokens[b:b + 1, :n])[0]  # each row alone: padding must not matter
        np.testing.assert_allclose(ours[b, :n], ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(checkpoint):
    model, _, params, config = checkpoint
    rng = np.random.default_rng(1)
    lengths = np.array([7, 3, 11])
    prompts = np.zeros((3, 11), np.int32)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(1, config.vocab_size, n)
    new = 40
    out = generate(params, config, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0),
                   SamplingConfig(max_new_tokens=new, temperature=0.0))
    assert np.all(np.asarray(out.lengths) == new)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            ref = model.generate(torch.tensor(prompts[b:b + 1, :n], dtype=torch.long), max_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref[0, n:].numpy())


def test_save_roundtrip_loads_in_transformers(checkpoint, tmp_path):
    import transformers

    model, _, params, config = checkpoint
    out = save_hf_checkpoint(params, config, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 13))
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-5, rtol=0)
    params2, config2 = load_hf_checkpoint(out, dtype=jnp.float32)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    on_host, _ = load_hf_checkpoint(out, dtype=jnp.float32, on_host=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_host))
    jax.tree.map(np.testing.assert_array_equal, on_host, params)


def test_sharded_save_and_bf16(checkpoint, tmp_path):
    _, _, params, config = checkpoint
    out = save_hf_checkpoint(params, config, tmp_path / "sharded", dtype=jnp.bfloat16, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    params2, _ = load_hf_checkpoint(out, dtype=jnp.float32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), params2, params)


def test_grouped_moe_equals_dense_moe(checkpoint):
    _, _, params, config = checkpoint
    if not config.is_moe:
        pytest.skip("dense model")
    layer = params["layers"][0]["moe"]
    x = jax.random.normal(jax.random.key(3), (37, config.hidden_size))
    np.testing.assert_allclose(moe(layer, config, x, grouped=True), moe(layer, config, x, grouped=False), atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------

def test_missing_files_and_bad_tensors_are_named(checkpoint, tmp_path):
    import json
    import shutil

    from gopd_jax.models.checkpoint import read_safetensors, write_safetensors

    _, path, params, config = checkpoint
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    hf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_hf_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps(hf))
    tensors = dict(read_safetensors(bad / "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(5, np.float32)
    write_safetensors(bad / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \(5,\), expected \(64,\)"):
        load_hf_checkpoint(bad)
    del tensors["model.norm.weight"]
    write_safetensors(bad / "model.safetensors", tensors)
    with pytest.raises(KeyError, match="model.norm.weight"):
        load_hf_checkpoint(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(bad)


def test_blocked_causal_attention_equals_full_attention_with_gradients():
    from gopd_jax.models.qwen3 import attention_block, causal_attention

    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (2, 37, 4, 8))
    k, v = (jax.random.normal(kk, (2, 37, 2, 8)) for kk in keys[1:])

    def full(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    np.testing.assert_allclose(causal_attention(q, k, v, block=8), full(q, k, v), atol=1e-5)
    g_blocked = jax.grad(lambda *a: jnp.sum(causal_attention(*a, block=8) ** 2), argnums=(0, 1, 2))(q, k, v)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_blocked, g_full)
    # The default blocks: 128 query rows (a last partial block here), wider past 16 blocks.
    q, k, v = (jnp.tile(x, (1, 8, 1, 1)) for x in (q, k, v))  # 296 tokens: blocks of 128, 128 and 40
    np.testing.assert_allclose(causal_attention(q, k, v), full(q, k, v), atol=1e-5)
    assert (attention_block(296), attention_block(2048), attention_block(10_240)) == (128, 128, 640)
