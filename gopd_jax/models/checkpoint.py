"""Hugging Face checkpoint directories <-> params pytrees, without torch.

Safetensors files are read through `numpy.memmap` (bf16 via ml_dtypes), so a tensor is paged in only
when it is converted to a device array. Writing produces the hub layout (per-expert tensors for MoE,
`model.safetensors` or shards plus `model.safetensors.index.json`) that transformers loads directly.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gopd_jax.models.config import Qwen3Config

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ---- safetensors format ------------------------------------------------------------------------

_LFS_POINTER = b"version https://git-lfs"
_REFETCH = "re-download the checkpoint (e.g. `huggingface-cli download`)"


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the file is damaged or incomplete: {_REFETCH}")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file (8-byte header length, JSON header, raw data).
    The header and every tensor's byte range are checked against the file's size before any array is made."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head + f.read(len(_LFS_POINTER) - 8) == _LFS_POINTER:
            raise ValueError(f"{path} is a git-lfs pointer file, not the weights: run `git lfs pull` in the checkpoint's "
                             f"repository, or {_REFETCH}")
        if len(head) < 8:
            raise _damaged(path, f"only {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _damaged(path, f"the header claims {n} bytes but the file holds {size}")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _damaged(path, f"unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_bytes else np.zeros(0, np.uint8)
    out = {}
    for name, meta in header.items():
        try:
            dtype, shape, (start, end) = meta["dtype"], [int(d) for d in meta["shape"]], meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(path, f"tensor {name!r} has a malformed header entry {meta!r}") from e
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= start <= end or end - start != nbytes:
            raise _damaged(path, f"tensor {name!r} ({dtype} {shape}) spans bytes [{start}, {end}), not {nbytes} bytes")
        if end > data_bytes:
            raise _damaged(path, f"tensor {name!r} ends at byte {end} of the data but the file holds {data_bytes} "
                                 "(truncated)")
        out[name] = raw[start:end].view(_DTYPES[dtype]).reshape(shape)
    return out


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {what} is damaged: {_REFETCH}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object; {what} is damaged: {_REFETCH}")
    return value


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, a in arrays.items():
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
    os.replace(tmp, path)


# ---- name mapping -----------------------------------------------------------------------------

def _tensor_specs(config: Qwen3Config) -> Iterator[tuple[str, tuple, str, tuple[int, ...]]]:
    """(HF name, params path, kind, HF shape). kind: 'copy' (same layout), 'linear' (HF [out, in])
    or ('expert', e) for one expert's slice of a stacked [E, in, out] array."""
    c = config
    d, hd = c.hidden_size, c.head_dim
    yield "model.embed_tokens.weight", ("embed",), "copy", (c.vocab_size, d)
    yield "model.norm.weight", ("final_norm",), "copy", (d,)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head",), "linear", (c.vocab_size, d)
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        yield pre + "input_layernorm.weight", ("layers", i, "input_norm"), "copy", (d,)
        yield pre + "post_attention_layernorm.weight", ("layers", i, "post_norm"), "copy", (d,)
        heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads, "v": c.num_key_value_heads}
        for n, h in heads.items():
            yield pre + f"self_attn.{n}_proj.weight", ("layers", i, "attn", n), "linear", (h * hd, d)
        yield pre + "self_attn.o_proj.weight", ("layers", i, "attn", "o"), "linear", (d, c.num_attention_heads * hd)
        yield pre + "self_attn.q_norm.weight", ("layers", i, "attn", "q_norm"), "copy", (hd,)
        yield pre + "self_attn.k_norm.weight", ("layers", i, "attn", "k_norm"), "copy", (hd,)
        if c.is_sparse_layer(i):
            f = c.moe_intermediate_size
            yield pre + "mlp.gate.weight", ("layers", i, "moe", "router"), "linear", (c.num_experts, d)
            for e in range(c.num_experts):
                for n, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
                    yield pre + f"mlp.experts.{e}.{n}_proj.weight", ("layers", i, "moe", n), ("expert", e), shape
        else:
            f = c.intermediate_size
            for n, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
                yield pre + f"mlp.{n}_proj.weight", ("layers", i, "mlp", n), "linear", shape


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _skeleton(config: Qwen3Config) -> dict:
    layers = []
    for i in range(config.num_hidden_layers):
        layers.append({"attn": {}, ("moe" if config.is_sparse_layer(i) else "mlp"): {}})
    return {"layers": layers}


# ---- load / save --------------------------------------------------------------------------------

def load_hf_config(path: str | os.PathLike) -> Qwen3Config:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: a Hugging Face checkpoint directory needs config.json "
                                "(download the model with `huggingface-cli download` or point at the right folder)")
    hf = _read_json(cfg_file, "the model config")
    try:
        return Qwen3Config.from_hf_dict(hf, source=str(cfg_file))
    except KeyError as e:
        raise ValueError(f"{cfg_file}: required field {e.args[0]!r} is missing; it is not a complete Qwen3 "
                         f"config.json: {_REFETCH}") from e


def _open_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a checkpoint (memory-mapped) and the file each came from."""
    if (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX_FILE}: no 'weight_map' object; the shard index is damaged: {_REFETCH}")
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; gopd_jax reads safetensors checkpoints "
                                "(convert .bin files with transformers' save_pretrained(safe_serialization=True))")
    tensors, source = {}, {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is listed in {INDEX_FILE} but missing: re-download the checkpoint")
        for k, v in _split_fused_experts(read_safetensors(path / name)).items():
            tensors[k], source[k] = v, name
    return tensors, source


def _split_fused_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept transformers 5's in-memory fused expert layout (`experts.gate_up_proj` [E, 2F, D],
    `experts.down_proj` [E, D, F]) by renaming it to the hub's per-expert tensors."""
    out = {}
    for name, a in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, f = name[: -len("gate_up_proj")], a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = a[e, :f], a[e, f:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(a.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = a[e]
        else:
            out[name] = a
    return out


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.bfloat16, on_host: bool = False) -> tuple[dict, Qwen3Config]:
    """Read a Qwen3 / Qwen3-MoE checkpoint directory into (params, config); weights cast to `dtype`.

    on_host: keep the weights as numpy arrays, so a model bigger than one device can go straight to its
    shards (`device_plan.place_teacher`) instead of passing whole through the default device."""
    xp = np if on_host else jnp
    path = Path(path)
    config = load_hf_config(path)
    tensors, source = _open_tensors(path)
    params = _skeleton(config)
    experts: dict[tuple, list] = {}
    finite = {}  # name -> bool (on device: fetched once at the end, no host sync per tensor)
    for name, tree_path, kind, shape in _tensor_specs(config):
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name!r} (shape {shape}) is missing from the checkpoint; "
                           f"config.json describes a {config.model_type} model with {config.num_hidden_layers} layers")
        a = tensors[name]
        if tuple(a.shape) != shape:
            raise ValueError(f"{path / source[name]}: tensor {name!r} has shape {tuple(a.shape)}, expected {shape} "
                             "from config.json")
        x = xp.asarray(a, dtype)
        finite[name] = xp.isfinite(x).all()
        if kind == "copy":
            _set(params, tree_path, x)
        elif kind == "linear":
            _set(params, tree_path, x.T)
        else:
            experts.setdefault(tree_path, []).append(x.T)
    for tree_path, per_expert in experts.items():
        _set(params, tree_path, xp.stack(per_expert))
    # A NaN/Inf weight would make every training step non-finite (and be skipped) or every sample garbage.
    bad = [name for name, ok in jax.device_get(finite).items() if not ok]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN or Inf values as {jnp.dtype(dtype).name} "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the checkpoint is damaged or "
                         "comes from a diverged run; use an earlier checkpoint or re-download it")
    return params, config


def save_hf_checkpoint(params: dict, config: Qwen3Config, out_dir: str | os.PathLike,
                       dtype=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `params` as a Hugging Face checkpoint directory (config.json + safetensors).

    `dtype` defaults to the params' own dtype. Checkpoints above `max_shard_bytes` are sharded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = jax.device_get(params)
    tensors = {}
    for name, tree_path, kind, shape in _tensor_specs(config):
        a = np.asarray(_get(host, tree_path))
        if kind == "linear":
            a = a.T
        elif kind != "copy":
            a = a[kind[1]].T
        if tuple(a.shape) != shape:
            raise ValueError(f"params{list(tree_path)} gives {name!r} shape {a.shape}, expected {shape}")
        tensors[name] = a.astype(dtype) if dtype is not None else a
    hf = config.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(
        next(iter(tensors.values())).dtype, "float32")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    shards, current, size = [], {}, 0
    for name, a in tensors.items():
        if current and size + a.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = a, size + a.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(out / SINGLE_FILE, shards[0])
        (out / INDEX_FILE).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, shard)
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for a in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        (out / SINGLE_FILE).unlink(missing_ok=True)
    return out
