"""Tiny random Hugging Face (PyTorch) Qwen3 checkpoints: the independent reference for parity tests."""

import torch
import transformers


def make_hf_model(tmp_path, *, moe=False, tied=True, seed=0, **overrides):
    """Build a tiny random transformers Qwen3 / Qwen3-MoE, perturb every weight (norms included) so
    no parameter sits at its default, save it with `save_pretrained`, and return (model, directory)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                  max_position_embeddings=256, rope_theta=10000.0)
    common.update(overrides)
    if moe:
        cfg = transformers.Qwen3MoeConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                                          norm_topk_prob=True, mlp_only_layers=[1], **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.eval()
    out = tmp_path / ("moe" if moe else "dense") / ("tied" if tied else "untied")
    model.save_pretrained(out)
    return model, out
