"""Qwen3 / Qwen3-MoE: params pytree, pure forward functions, Hugging Face checkpoint I/O."""

from gopd_jax.models.checkpoint import load_hf_checkpoint, load_hf_config, save_hf_checkpoint
from gopd_jax.models.config import QWEN3_0_6B, QWEN3_1_7B, QWEN3_4B, QWEN3_30B_A3B, Qwen3Config
from gopd_jax.models.qwen3 import (decode_step, forward, forward_hidden, init_cache, init_params, output_head,
                                   prefill, unembed)

__all__ = ["Qwen3Config", "QWEN3_0_6B", "QWEN3_1_7B", "QWEN3_4B", "QWEN3_30B_A3B", "init_params", "forward",
           "forward_hidden", "unembed", "output_head", "init_cache", "prefill", "decode_step",
           "load_hf_checkpoint", "load_hf_config", "save_hf_checkpoint"]
