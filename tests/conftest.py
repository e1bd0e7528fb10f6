"""Test-session set-up that must happen before jax is first imported."""

import os

# 4 simulated CPU devices for the pmap / sharding tests (must precede the first jax import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gopd_jax/jax_compile"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "multidevice: needs 4 devices (simulated on CPU); skipped on a single accelerator")


def pytest_runtest_setup(item):
    import jax
    import pytest

    # On CPU the 4 simulated devices always exist, so these tests never skip in CI.
    if item.get_closest_marker("multidevice") and jax.default_backend() != "cpu" and jax.local_device_count() < 4:
        pytest.skip(f"needs 4 devices, {jax.default_backend()} has {jax.local_device_count()}")
