"""Qwen3 / Qwen3-MoE configuration and its translation to and from Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from jax.sharding import Mesh

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture hyperparameters. Frozen and hashable so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40_960
    # Mixture of experts (num_experts == 0 means a dense Qwen3).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Placement, not architecture (never in config.json): a 1-D mesh whose axis splits the MoE experts, as
    # `scoring.shard_params(..., "expert")` lays them out. MoE layers then run expert parallel (qwen3.moe).
    expert_mesh: Optional["Mesh"] = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}")
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        mesh = self.expert_mesh
        if mesh is not None and (len(mesh.axis_names) != 1 or not self.is_moe or self.num_experts % mesh.size):
            raise ValueError(f"expert_mesh needs a 1-D mesh (got axes {mesh.axis_names}) and a MoE config whose "
                             f"num_experts ({self.num_experts}) is a multiple of its {mesh.size} devices; shard a "
                             f"dense or indivisible model with scoring.shard_params(..., 'tensor') instead")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        return "qwen3_moe" if self.is_moe else "qwen3"

    def is_sparse_layer(self, layer: int) -> bool:
        """Same rule as transformers' Qwen3MoeDecoderLayer."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def num_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * hd + 2 * d
        total = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        for layer in range(self.num_hidden_layers):
            if self.is_sparse_layer(layer):
                mlp = d * self.num_experts + 3 * self.num_experts * d * self.moe_intermediate_size
            else:
                mlp = 3 * d * self.intermediate_size
            total += attn + mlp
        return total

    # ---- Hugging Face translation -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: unsupported model_type {model_type!r}; gopd_jax supports "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen3 dense and Qwen3-MoE checkpoints)")
        # transformers 5 moved rope_theta into rope_parameters; older configs keep it at the top level.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"{source}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
        heads = hf["num_attention_heads"]
        kwargs = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0), num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 40_960),
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("attention_bias", False):
            raise NotImplementedError(f"{source}: attention_bias=true is not supported by Qwen3 checkpoints")
        if model_type == "qwen3_moe":
            kwargs.update(
                num_experts=hf.get("num_experts", hf.get("num_local_experts")),
                num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=hf.get("norm_topk_prob", False),  # transformers' default
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            )
            if kwargs["num_experts"] is None:
                raise ValueError(f"{source}: qwen3_moe config has neither num_experts nor num_local_experts")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        hf = dict(
            architectures=["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"],
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, hidden_act="silu",
            rope_theta=self.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=self.max_position_embeddings,
            attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
            bos_token_id=None, eos_token_id=None,
        )
        if self.is_moe:
            hf.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                      output_router_logits=False, router_aux_loss_coef=0.001)
        return hf


# Published shapes, for benchmarks and random-weight experiments (real weights come from checkpoints).
QWEN3_0_6B = Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_1_7B = dataclasses.replace(QWEN3_0_6B, hidden_size=2048, intermediate_size=6144, num_attention_heads=16)
QWEN3_4B = dataclasses.replace(QWEN3_0_6B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32)
QWEN3_30B_A3B = Qwen3Config(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)
