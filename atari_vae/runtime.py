"""Where and how tensors run: device choice, matmul precision and seeding, in one place."""

from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from atari_vae.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is absent is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (allowed: auto, cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here (allowed: auto, cpu)")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a device (allowed: auto, cpu, cuda, mps)") \
            from exc
    if kind == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below its bf16 kernels: under one, bf16 matmuls fall back
# to a reference path ~1000x slower than fp32 (0.4 against 153 GFLOP/s measured here).
ISA_CAPS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


def onednn_isa_cap() -> str | None:
    """The instruction-set cap set for oneDNN in the environment, upper-case, or None."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap else None


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX) and oneDNN
    is not capped below them (``ONEDNN_MAX_CPU_ISA=AVX2`` makes this CPU train as an AVX2 one)."""
    if onednn_isa_cap() in ISA_CAPS_WITHOUT_BF16:
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (/proc/cpuinfo); empty where it reports none."""
    try:
        with open("/proc/cpuinfo") as fh:
            return {flag for line in fh if line.startswith("flags")
                    for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` (auto, fp32, bf16) on ``device``."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``dtype``; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    # PyTorch asks for autocast's weight cache off while a CUDA graph is captured.
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=not capturing)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
