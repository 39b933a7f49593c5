"""Device choice, matmul precision and seeding; the CUDA tests run where a GPU is present.

`benchmarks/gpu.sh` runs this file first on a GPU machine: the CUDA-only tests below are the
device-sensitive ones (on CPU machines they are skipped, and the CPU paths are pinned instead).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from atari_vae import runtime
from atari_vae.envs import FRAME_SHAPE
from atari_vae.errors import ConfigError
from atari_vae.model import vae_for
from atari_vae.runtime import autocast, resolve_device, resolve_precision, seed_everything
from tests.conftest import tiny_fit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_accelerator = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(),
    reason="this machine has an accelerator")


@no_accelerator
def test_auto_device_falls_back_to_cpu_without_an_accelerator() -> None:
    assert resolve_device("auto") == torch.device("cpu")


@no_accelerator
def test_absent_mps_is_a_config_error_naming_the_alternatives() -> None:
    with pytest.raises(ConfigError, match="MPS is not available here.*auto, cpu"):
        resolve_device("mps")


def test_explicit_precisions_map_to_their_dtypes() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is torch.float32
    assert resolve_precision("bf16", cpu) is torch.bfloat16


def test_fp32_autocast_leaves_matmuls_in_fp32_and_bf16_lowers_them() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    cpu = torch.device("cpu")
    with autocast(cpu, torch.float32):
        assert (a @ b).dtype is torch.float32
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype is torch.bfloat16


@pytest.mark.parametrize(("flags", "cap", "expected"), [
    ({"avx2", "avx512_bf16"}, None, torch.bfloat16),
    ({"avx2", "amx_bf16"}, None, torch.bfloat16),
    ({"avx2", "fma"}, None, torch.float32),  # most laptops
    ({"avx2", "avx512_bf16"}, "AVX2", torch.float32),
    ({"avx2", "avx512_bf16"}, "avx512_core", torch.float32),
    ({"avx2", "avx512_bf16"}, "AVX512_CORE_BF16", torch.bfloat16),
])
def test_auto_precision_follows_the_cpu_flags_and_a_onednn_isa_cap(
        flags: set[str], cap: str | None, expected: torch.dtype,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 makes an AVX512-BF16 CPU train as an AVX2 one: fp32, because
    oneDNN's capped bf16 matmuls crawl."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    runtime.cpu_has_fast_bf16.cache_clear()
    try:
        assert resolve_precision("auto", torch.device("cpu")) is expected
    finally:
        runtime.cpu_has_fast_bf16.cache_clear()


def test_cpu_flags_are_this_machine_s_feature_words() -> None:
    flags = runtime.cpu_flags()
    if Path("/proc/cpuinfo").exists():
        assert "fpu" in flags and all(" " not in f for f in flags)
    else:
        assert flags == set()


def test_seed_everything_repeats_torch_and_numpy_draws() -> None:
    seed_everything(7)
    first = torch.rand(3), np.random.rand(3)
    seed_everything(7)
    second = torch.rand(3), np.random.rand(3)
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_gives_finite_losses_and_weights_that_load_on_cpu(
        tmp_path: Path, precision: str) -> None:
    result = tiny_fit(tmp_path / "out", device="cuda", precision=precision)
    assert all(math.isfinite(epoch["val_loss"]) for epoch in result.history)
    assert next(result.model.parameters()).device.type == "cuda"
    state = torch.load(tmp_path / "out" / "best_model.pt", map_location="cpu",
                       weights_only=True)
    cpu_model = vae_for(state, FRAME_SHAPE)
    cpu_model.load_state_dict(state)
    x = torch.rand(2, *FRAME_SHAPE)
    with torch.no_grad():
        mu_gpu = result.model.encode(x.cuda())[0].cpu()
        mu_cpu = cpu_model.encode(x)[0]
    assert torch.allclose(mu_gpu, mu_cpu, rtol=1e-2, atol=1e-2)  # TF32 convs on GPU


@needs_cuda
def test_auto_precision_on_cuda_is_bf16_where_supported() -> None:
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_precision("auto", torch.device("cuda")) is expected
