"""Device plan: per-device sizes of the real Qwen3 shapes against hand computation, layout choice, errors;
the sizes of sharded placements equal what `shard_params` / `fsdp_shard` put on a device."""

import dataclasses

import jax
import numpy as np
import pytest

from gopd_jax import device_plan as dp
from gopd_jax import train
from gopd_jax.models import QWEN3_0_6B, QWEN3_4B, QWEN3_30B_A3B, Qwen3Config, init_params

GB = 10 ** 9
# Paper-like run shapes: ALFWorld prompts ~1-2k tokens, 512-token turns, 8 env workers generating at once.
SHAPES = dict(rollout_rows=8, max_prompt_tokens=2048, max_new_tokens=512, micro_batch_rows=1)

# Hand counts (HF shapes): Qwen3-30B-A3B = untied embed + head, 48 layers of attention (32 q heads, 4 kv heads,
# head_dim 128) + 128 experts of 3 x [2048, 768] + router [2048, 128].
V, D = 151_936, 2048
ATTN_30B = D * 128 * (32 + 4 + 4) + 32 * 128 * D
NORMS_30B = 2 * D + 2 * 128
EXPERTS_30B = 128 * 3 * D * 768
ROUTER_30B = D * 128
TOTAL_30B = 2 * V * D + D + 48 * (ATTN_30B + NORMS_30B + EXPERTS_30B + ROUTER_30B)


def test_param_counts_match_hand_computation():
    assert TOTAL_30B == 30_532_122_624 == QWEN3_30B_A3B.num_params()
    # Qwen3-0.6B: tied embedding, 28 layers, d 1024, 16 q / 8 kv heads of 128, MLP 3072.
    layer = 1024 * 128 * (16 + 8 + 8) + 16 * 128 * 1024 + 2 * 1024 + 2 * 128 + 3 * 1024 * 3072
    assert QWEN3_0_6B.num_params() == V * 1024 + 1024 + 28 * layer == 596_049_920


def test_teacher_bytes_per_layout():
    n = 4
    assert dp.teacher_elements_per_device(QWEN3_30B_A3B, "replicated", n) == TOTAL_30B
    # expert parallel: each device holds a quarter of the experts, everything else whole
    assert dp.teacher_elements_per_device(QWEN3_30B_A3B, "expert", n) == TOTAL_30B - 48 * EXPERTS_30B * 3 // 4
    # tensor parallel: all but router and norms split in four
    whole = 48 * (ROUTER_30B + NORMS_30B) + D
    assert dp.teacher_elements_per_device(QWEN3_30B_A3B, "tensor", n) == (TOTAL_30B - whole) // 4 + whole


def test_student_state_and_kv_sizes():
    p4 = QWEN3_4B.num_params()
    assert dp.student_elements_per_device(QWEN3_4B, "pmap", 4) == p4
    assert dp.student_elements_per_device(QWEN3_4B, "fsdp", 4) == p4 // 4  # every 4B dimension divides by 4
    assert dp.kv_bytes_per_token(QWEN3_30B_A3B, "bfloat16") == 2 * 48 * 4 * 128 * 2
    plan = dp.make_plan(QWEN3_30B_A3B, QWEN3_4B, n_devices=4, device_bytes=80 * GB, teacher_layout="tensor",
                        student_update="fsdp", **SHAPES)
    c = plan.components
    assert c["student params (f32)"] == 4 * p4 // 4 and c["student AdamW moments (f32)"] == 8 * p4 // 4
    assert c["student generation copy"] == 2 * p4
    assert c["teacher KV cache (rollout)"] == 8 * 2560 * 98_304 // 4  # kv heads split over the 4 devices
    assert c["student KV cache (rollout)"] == 8 * 2560 * 2 * 36 * 8 * 128 * 2
    assert plan.phases["peak"] == plan.phases["resident"] + max(plan.phases[k] for k in ("rollout", "scoring",
                                                                                          "update"))


def test_auto_layouts_for_the_paper_students():
    kw = dict(n_devices=4, device_bytes=80 * GB, **SHAPES)
    small = dp.make_plan(QWEN3_30B_A3B, QWEN3_0_6B, **kw)
    assert (small.teacher_layout, small.student_update) == ("expert", "pmap") and small.fits
    # 4B: 16 bytes/param of replicated f32 state + grads is ~64 GB: only the sharded update fits
    big = dp.make_plan(QWEN3_30B_A3B, QWEN3_4B, **kw)
    assert (big.teacher_layout, big.student_update) == ("expert", "fsdp") and big.fits
    text = big.describe()
    assert "teacher: expert; student update: fsdp" in text and "teacher weights" in text
    # a tiny pair on a big device stays replicated / pmap
    tiny = dataclasses.replace(QWEN3_0_6B, num_hidden_layers=2)
    assert (dp.make_plan(tiny, tiny, **kw).teacher_layout, dp.make_plan(tiny, tiny, **kw).student_update) == \
        ("replicated", "pmap")


def test_nothing_fits_names_the_sizes():
    with pytest.raises(ValueError, match=r"(?s)no layout fits.*replicated/pmap.*teacher weights\s+56\.87 GiB"):
        dp.make_plan(QWEN3_30B_A3B, QWEN3_0_6B, n_devices=1, device_bytes=80 * GB, **SHAPES)


def test_forced_layout_and_its_errors():
    plan = dp.make_plan(QWEN3_30B_A3B, QWEN3_4B, n_devices=4, device_bytes=80 * GB, teacher_layout="replicated",
                        student_update="pmap", **SHAPES)
    assert (plan.teacher_layout, plan.student_update, plan.forced, plan.fits) == ("replicated", "pmap", True, False)
    assert "WARNING" in plan.describe()
    with pytest.raises(ValueError, match="needs student_update='fsdp'"):
        dp.make_plan(QWEN3_30B_A3B, QWEN3_0_6B, n_devices=4, device_bytes=80 * GB, estimator="exact",
                     teacher_layout="expert", student_update="pmap", **SHAPES)
    with pytest.raises(ValueError, match="multiple of the 3 devices"):
        dp.make_plan(QWEN3_30B_A3B, QWEN3_0_6B, n_devices=3, device_bytes=80 * GB, teacher_layout="expert", **SHAPES)
    with pytest.raises(ValueError, match="teacher_layout must be one of"):
        dp.make_plan(QWEN3_30B_A3B, QWEN3_0_6B, n_devices=4, device_bytes=80 * GB, teacher_layout="pipeline",
                     **SHAPES)
    # remat shrinks the saved activations; the exact estimator adds the teacher's forward to the update
    kw = dict(n_devices=4, device_bytes=80 * GB, **SHAPES)
    none, full = (dp.make_plan(QWEN3_30B_A3B, QWEN3_4B, remat=r, **kw) for r in ("none", "full"))
    assert full.components["update activations (micro-batch)"] < none.components["update activations (micro-batch)"]
    assert "update teacher forward (exact)" in dp.make_plan(QWEN3_30B_A3B, QWEN3_0_6B, estimator="exact",
                                                            **kw).components


TINY_MOE = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                       num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)


def _device0_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.multidevice
@pytest.mark.parametrize("layout", ["expert", "tensor"])
def test_plan_sizes_equal_real_placements(layout):
    plan = dp.make_plan(TINY_MOE, TINY_MOE, n_devices=4, device_bytes=GB, teacher_layout=layout,
                        student_update="fsdp", teacher_dtype="float32", **SHAPES)
    params = init_params(TINY_MOE, jax.random.PRNGKey(0))
    placed, placed_config = dp.place_teacher(params, TINY_MOE, plan)
    assert _device0_bytes(jax.block_until_ready(placed)) == plan.components["teacher weights"]
    assert placed_config.expert_mesh == (plan.mesh("model") if layout == "expert" else None)
    opt = train.make_optimizer(1e-3)
    state = jax.block_until_ready(train.fsdp_shard(train.init_train_state(params, opt, jax.random.PRNGKey(1)),
                                                   plan.mesh("data")))
    moments = _device0_bytes(state.opt_state) - sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.opt_state)
                                                    if np.ndim(x) == 0)
    assert _device0_bytes(state.params) == plan.components["student params (f32)"]
    assert moments == plan.components["student AdamW moments (f32)"]
    # host (numpy) weights go straight to their shards; the replicated layout keeps one copy on one device
    host = jax.tree.map(np.asarray, params)
    from_host = jax.block_until_ready(dp.place_teacher(host, TINY_MOE, plan)[0])
    assert _device0_bytes(from_host) == plan.components["teacher weights"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_host), host)
    whole, whole_config = dp.place_teacher(host, TINY_MOE, dp.make_plan(TINY_MOE, TINY_MOE, n_devices=4,
                                                                       device_bytes=GB, **SHAPES))
    assert whole_config == TINY_MOE
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(whole))
    assert _device0_bytes(whole) == sum(x.nbytes for x in jax.tree.leaves(host))
