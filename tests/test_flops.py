"""The analytic FLOP count against the paper's table, and the peak-rate lookup behind MFU."""

import pytest

from dit_jax.flops import forward_macs, peak_flops_per_device, train_flops_per_image
from dit_jax.models.dit import DIT_CONFIGS, DiTConfig


@pytest.mark.parametrize("name,image_size,paper_gflops", [
    ("DiT-XL/2", 256, 118.64), ("DiT-XL/2", 512, 524.60), ("DiT-B/4", 256, 5.56),
    ("DiT-S/2", 256, 6.06)])
def test_forward_macs_match_the_paper(name, image_size, paper_gflops):
    cfg = DiTConfig(input_size=image_size // 8, **DIT_CONFIGS[name])
    assert forward_macs(cfg) / 1e9 == pytest.approx(paper_gflops, rel=0.01)
    assert train_flops_per_image(cfg) == 6 * forward_macs(cfg)


def test_peak_lookup():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "gpu") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe", "gpu") == 756e12
    assert peak_flops_per_device("NVIDIA H200", "gpu") == 989e12
    assert peak_flops_per_device("TPU v5 lite", "tpu") == 197e12
    assert peak_flops_per_device("cpu", "cpu") is None  # MFU is null on CPU
    assert peak_flops_per_device("Some future chip", "gpu") is None
    # float32 matmuls: TF32 on NVIDIA (half rate), one bf16 pass on TPU (full rate)
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "gpu", dtype="float32") == 494.5e12
    assert peak_flops_per_device("TPU v5 lite", "tpu", dtype="float32") == 197e12
    assert peak_flops_per_device("Tesla V100-SXM2-16GB", "gpu", dtype="float32") == 15.7e12
    assert peak_flops_per_device("cpu", "cpu", override_tflops=1.5) == 1.5e12
