"""Test-session set-up that must happen before jax is first imported."""

import os

# 4 simulated CPU devices for the pmap / sharding tests (must precede the first jax import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gopd_jax/jax_compile"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
