"""dit_jax.plan: target names, the collective counter, and ahead-of-time compiles of the real
train step for a TPU slice (needs libtpu: the `tpu` extra) and a GPU node (needs the CUDA plugin:
the `cuda` extra), each skipped where its compiler is not installed."""

import importlib.util

import pytest

from configs import dit as dit_configs
from dit_jax import plan

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
                   and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (the `tpu` extra)")


def test_target_names_map_to_topologies_and_chip_counts():
    cases = {
        "v4-8": ("tpu", 4, 1, "v4:2x2x1"), "v4-512": ("tpu", 256, 1, "v4:4x8x8"),
        "v5p-8": ("tpu", 4, 1, "v5:2x2x1"), "v5p-128": ("tpu", 64, 1, "v5:4x4x4"),
        "v5p-512": ("tpu", 256, 1, "v5:4x8x8"), "v5e-8": ("tpu", 8, 1, "v5e:2x4"),
        "v5e-256": ("tpu", 256, 1, "v5e:16x16"), "v6e-256": ("tpu", 256, 1, "v6e:16x16"),
        "2xv5e-256": ("tpu", 512, 2, "v5e:16x16"), "h100-8": ("cuda", 8, 1, "1x1x8"),
        "4xh100-8": ("cuda", 32, 4, "1x4x8"), "a100-8": ("cuda", 8, 1, "1x1x8"),
    }
    for name, (platform, chips, groups, topology) in cases.items():
        t = plan.parse_target(name)
        assert (t.platform, t.chips, t.groups, t.topology) == (platform, chips, groups, topology), name
    for bad, message in [("v4-6", "TensorCores"), ("v5e-12", "chips"), ("h100-4", "nodes of 8"),
                         ("tpu-8", "unknown device"), ("v5e256", "expected a name")]:
        with pytest.raises(ValueError, match=message):
            plan.parse_target(bad)


HLO = """HloModule step

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]) parameter(0)
  %x = f32[64] get-tuple-element(%p), index=1
  %ag = bf16[4,64]{1,0} all-gather(bf16[1,64]{1,0} %y), replica_groups=[2,4]<=[8], dimensions={0}
  %ar = f32[64]{0} all-reduce(f32[64]{0} %x), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[64]) tuple(%i, %ar)
}

ENTRY %main (a: f32[64]) -> f32[16] {
  %a = f32[64]{0} parameter(0)
  %w = (s32[], f32[64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"28"}}
  %rs = f32[16]{0} reduce-scatter(f32[64]{0} %a), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, to_apply=%add
  %cp-start = (f32[16], f32[16]) collective-permute-start(f32[16] %rs), source_target_pairs={{0,1},{1,0}}
  %cp-done = f32[16] collective-permute-done(%cp-start)
  ROOT %r = f32[16] copy(%cp-done)
}
"""


def test_collectives_are_counted_per_run_with_bytes_and_traffic():
    slice_of = lambda i: i // 4  # noqa: E731  devices 0-3 in one slice, 4-7 in the other
    found = plan.collectives_of(HLO, 8, slice_of)
    kinds = found["by_kind"]
    assert not found["unknown_trip_counts"]
    # Inside the 28-trip loop: 28 all-gathers of 4×64 bf16 within groups of 4 (one slice each).
    assert kinds["all-gather"] == {"count": 28, "bytes": 28 * 512, "traffic_bytes": 28 * 384,
                                   "cross_group_traffic_bytes": 0}
    ar = kinds["all-reduce"]  # 28 all-reduces of 256 bytes over all 8 devices (both slices)
    assert (ar["count"], ar["bytes"], ar["traffic_bytes"]) == (28, 28 * 256, 28 * 448)
    assert ar["cross_group_traffic_bytes"] == ar["traffic_bytes"]
    rs = kinds["reduce-scatter"]  # once; groups {0,2,4,6}: 64 bytes each from 256
    assert (rs["count"], rs["bytes"], rs["traffic_bytes"]) == (1, 64, 192)
    assert rs["cross_group_traffic_bytes"] == 192
    assert kinds["collective-permute"]["count"] == 1 and kinds["collective-permute"]["bytes"] == 64
    assert kinds["all-to-all"]["count"] == 0


def tiny_config(batch=8, **model):
    config = dit_configs.get_config("S/2")
    config.model.name = ""
    config.model.hidden_size, config.model.depth, config.model.num_heads = 64, 2, 2
    config.model.patch_size = 2
    config.model.attention_impl = "splash"
    config.data.image_size = 64  # 8×8 latents: 16 tokens
    config.global_batch_size = batch
    config.mesh.data, config.mesh.fsdp = 2, 2
    for key, value in model.items():
        config.model[key] = value
    return config


PLAN_KEYS = ("target", "devices", "peak_bytes_per_device", "memory_bytes_per_device", "fits",
             "compile_seconds", "max_global_batch", "model_flops_per_step")


@needs_libtpu
def test_tpu_compile_of_the_sharded_step_with_splash_reports_memory():
    from dit_jax.sharding import make_mesh

    target = plan.parse_target("v5e-4")  # a 2x2 v5e slice
    devices = plan.target_devices(target)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    mesh = make_mesh(2, 2, 1, devices=devices)
    compiled, model_cfg, seconds = plan.compile_train_step(tiny_config(), mesh, 8)
    assert model_cfg.attention_impl == "splash" and seconds > 0
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the splash kernel, compiled for the TPU
    memory = plan.memory_of(compiled)
    assert memory["argument_bytes_per_device"] > 0 and memory["temp_bytes_per_device"] > 0
    assert memory["peak_bytes_per_device"] >= memory["argument_bytes_per_device"]
    # Donated state: the new state reuses the old one's buffers.
    assert memory["alias_bytes_per_device"] > 0.9 * memory["argument_bytes_per_device"]


@needs_libtpu
def test_plan_json_keys_an_impossible_batch_and_the_boundary():
    """Memory allowed between the peaks of 3 and 4 units of batch (linear in the batch): a plan
    for 4 units does not fit, and the search finds 3 units, confirmed by compiles either side."""
    from dit_jax.sharding import make_mesh

    target = plan.parse_target("v5e-4")
    mesh = make_mesh(2, 2, 1, devices=plan.target_devices(target))
    config = tiny_config()
    unit = plan.batch_unit(config, mesh)
    peaks = {b: plan.memory_of(plan.compile_train_step(config, mesh, b)[0])["peak_bytes_per_device"]
             for b in (unit, 2 * unit)}
    slope = (peaks[2 * unit] - peaks[unit]) / unit
    assert slope > 0
    limit = peaks[unit] + 2.5 * unit * slope
    config.global_batch_size = 4 * unit
    config.sample.num_images, config.sample.steps = 4, 5
    result = plan.make_plan(config, "v5e-4", search=("batch",), sample=True,
                            memory_fraction=limit / (16 * plan.GiB), log=lambda s: None)
    for key in PLAN_KEYS:
        assert key in result, key
    assert result["target"] == "v5e-4" and result["devices"] == 4
    assert result["fits"] is False
    best = result["max_global_batch"]
    assert result["max_global_batch_confirmed"]
    assert result["batch_points"][str(best)]["fits"]
    assert not result["batch_points"][str(best + unit)]["fits"]
    assert best == 3 * unit
    assert result["sample"]["peak_bytes_per_device"] > 0 and result["sample"]["steps"] == 5
    assert result["model_flops_per_step"] > 0 and result["compute_bound_images_per_second"] > 0
    assert result["collectives"]["all-reduce"]["count"] + result["collectives"]["reduce-scatter"][
        "count"] > 0  # gradients are summed over the batch devices


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the JAX CUDA plugin is not installed "
                    "(the `cuda` extra)")
def test_gpu_plan_compiles_for_an_h100_node():
    config = tiny_config()
    # "auto" would pick cuDNN, whose lowering needs the cuDNN library (not in the `cuda` extra).
    config.model.attention_impl = "xla"
    config.mesh.data, config.mesh.fsdp = -1, 2
    result = plan.make_plan(config, "h100-8", search=(), log=lambda s: None)
    assert result["devices"] == 8 and "H100" in result["device_kind"]
    assert result["fits"] and result["peak_bytes_per_device"] > 0
    assert result["memory_bytes_per_device"] > 70 * plan.GiB


def test_missing_compiler_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("libtpu", "jax_plugins.xla_cuda12",
                                                          "jax_plugins.xla_cuda13")
                        else real(name, *a))
    with pytest.raises(RuntimeError, match=r"dit_jax\[tpu\]"):
        plan.target_devices(plan.parse_target("v5e-4"))
    with pytest.raises(RuntimeError, match=r"dit_jax\[cuda\]"):
        plan.target_devices(plan.parse_target("h100-8"))


def test_fsdp_split_moves_to_the_dimension_that_tiles_better():
    """DiT-XL's width 1152 over fsdp 128 leaves 9-row shards (padded to 16 on a TPU); the MLP
    width 4608 leaves 36 (padded to 40): the rule splits that one. Aligned splits stay put."""
    import jax
    from jax.sharding import PartitionSpec as P

    from dit_jax.sharding import logical_to_mesh_spec, param_spec

    mesh = jax.sharding.AbstractMesh((2, 128, 1), ("data", "fsdp", "tensor"))
    assert logical_to_mesh_spec(("embed", "mlp"), (1152, 4608), mesh) == P("fsdp", None)
    assert param_spec(("embed", "mlp"), (1152, 4608), mesh) == P(None, "fsdp")
    assert param_spec(("mlp", "embed"), (4608, 1152), mesh) == P("fsdp", None)
    assert param_spec(("layers", "embed", "qkv"), (28, 1152, 3456), mesh) == P(None, None, "fsdp")
    aligned = jax.sharding.AbstractMesh((16, 16, 1), ("data", "fsdp", "tensor"))
    assert param_spec(("embed", "mlp"), (1152, 4608), aligned) == P("fsdp", None)
    assert param_spec(("embed",), (1152,), mesh) == P("fsdp")
    # Activations keep the logical rules: the batch stays split over the batch axes.
    assert logical_to_mesh_spec(("batch", None), (4, 16), jax.sharding.AbstractMesh(
        (1, 4, 1), ("data", "fsdp", "tensor"))) == P("fsdp", None)


@needs_libtpu
def test_fsdp_shards_of_dit_xl_waste_little_tpu_memory():
    import math

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from dit_jax.sharding import make_mesh, param_spec

    mesh = make_mesh(2, 128, 1, devices=plan.target_devices(plan.parse_target("v5e-256")))
    for logical, shape in [(("embed", "mlp"), (1152, 4608)), (("mlp", "embed"), (4608, 1152)),
                           (("layers", "embed", "modulation"), (28, 1152, 6912))]:
        sharding = NamedSharding(mesh, param_spec(logical, shape, mesh))
        compiled = jax.jit(lambda a: a * 2, in_shardings=sharding, out_shardings=sharding,
                           donate_argnums=0).trace(
            jax.ShapeDtypeStruct(shape, jnp.float32)).lower().compile()
        stored = compiled.memory_analysis().argument_size_in_bytes
        assert stored <= 1.12 * 4 * math.prod(sharding.shard_shape(shape)), (logical, stored)


def test_guided_sampler_compiles_on_a_cpu_mesh():
    from dit_jax.sharding import make_mesh

    config = tiny_config()
    config.model.attention_impl = "xla"
    config.sample.sampler, config.sample.steps = "ddim", 3
    compiled, seconds = plan.compile_sampler(config, make_mesh(4, 2, 1), 8)
    memory = plan.memory_of(compiled)
    assert seconds > 0 and memory["argument_bytes_per_device"] > 0
    assert "while" in compiled.as_text()  # the sampling loop
