"""Damaged Hugging Face checkpoint directories (issue 9, item 7): every error names the file (and the tensor
or field) and the fix, instead of a reshape error, a MemoryError, a struct.error or a bare JSON/Key error."""

import json
import struct

import jax
import numpy as np
import pytest

from gopd_jax.models import Qwen3Config, init_params, load_hf_checkpoint, save_hf_checkpoint
from gopd_jax.models.checkpoint import INDEX_FILE, SINGLE_FILE

CFG = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)


@pytest.fixture
def ckpt(tmp_path):
    return save_hf_checkpoint(init_params(CFG, jax.random.PRNGKey(0)), CFG, tmp_path / "ckpt")


def _load_error(path, match):
    with pytest.raises(ValueError, match=match) as info:
        load_hf_checkpoint(path, dtype=np.float32)
    return str(info.value)


def test_truncated_safetensors_names_file_tensor_and_fix(ckpt):
    data = (ckpt / SINGLE_FILE).read_bytes()
    (ckpt / SINGLE_FILE).write_bytes(data[:-100])
    msg = _load_error(ckpt, "truncated")
    assert str(ckpt / SINGLE_FILE) in msg and "re-download" in msg
    assert "model." in msg  # the tensor that runs past the end


def test_git_lfs_pointer_is_recognised(ckpt):
    (ckpt / SINGLE_FILE).write_text("version https://git-lfs.github.com/spec/v1\n"
                                    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                                    "size 1503300328\n")
    msg = _load_error(ckpt, "git-lfs pointer")
    assert str(ckpt / SINGLE_FILE) in msg and "git lfs pull" in msg


@pytest.mark.parametrize("content", [b"", b"\x05\x00"], ids=["empty", "shorter-than-header"])
def test_empty_or_tiny_file(ckpt, content):
    (ckpt / SINGLE_FILE).write_bytes(content)
    msg = _load_error(ckpt, "too short")
    assert str(ckpt / SINGLE_FILE) in msg and "re-download" in msg


def test_header_length_beyond_the_file(ckpt):
    data = (ckpt / SINGLE_FILE).read_bytes()
    (ckpt / SINGLE_FILE).write_bytes(struct.pack("<Q", 10 ** 12) + data[8:])
    assert str(ckpt / SINGLE_FILE) in _load_error(ckpt, "header claims 1000000000000 bytes")


def test_unreadable_header(ckpt):
    data = (ckpt / SINGLE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (ckpt / SINGLE_FILE).write_bytes(data[:8] + b"{" * n + data[8 + n:])
    assert str(ckpt / SINGLE_FILE) in _load_error(ckpt, "unreadable header")


def test_header_offsets_that_disagree_with_the_shape(ckpt):
    data = (ckpt / SINGLE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["shape"] = [64]  # 32 floats stored, 64 claimed
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob))  # same length: only the shape changed (2 -> 2 digits)
    (ckpt / SINGLE_FILE).write_bytes(data[:8] + blob + data[8 + n:])
    msg = _load_error(ckpt, "'model.norm.weight'.*spans bytes")
    assert str(ckpt / SINGLE_FILE) in msg


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen3", ')
    msg = _load_error(ckpt, "not valid JSON")
    assert str(ckpt / "config.json") in msg


def test_config_without_a_required_field(ckpt):
    hf = json.loads((ckpt / "config.json").read_text())
    del hf["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(hf))
    msg = _load_error(ckpt, "'hidden_size' is missing")
    assert str(ckpt / "config.json") in msg


def test_bad_index_json(ckpt):
    (ckpt / INDEX_FILE).write_text("{not json")
    assert str(ckpt / INDEX_FILE) in _load_error(ckpt, "not valid JSON")
    (ckpt / INDEX_FILE).write_text('{"metadata": {}}')
    assert str(ckpt / INDEX_FILE) in _load_error(ckpt, "no 'weight_map'")


def test_non_finite_weights_are_refused(ckpt, tmp_path):
    """Issue 9, item 3 at the loader: a NaN student would otherwise have every update skipped."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    params["layers"][0]["mlp"]["up"] = params["layers"][0]["mlp"]["up"].at[0, 0].set(np.nan)
    save_hf_checkpoint(params, CFG, tmp_path / "nan")
    msg = _load_error(tmp_path / "nan", "NaN or Inf")
    assert "model.layers.0.mlp.up_proj.weight" in msg and str(tmp_path / "nan") in msg


def test_intact_checkpoint_still_loads(ckpt):
    params, config = load_hf_checkpoint(ckpt, dtype=np.float32)
    ref = init_params(CFG, jax.random.PRNGKey(0))
    assert config == CFG
    np.testing.assert_array_equal(params["embed"], ref["embed"])
