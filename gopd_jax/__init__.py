"""gopd_jax: Guided On-Policy Distillation of multi-turn LLM agents in JAX."""
