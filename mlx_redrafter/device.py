"""The device computations run on, what to call it, and the dtype models default to.

On a Mac, MLX runs on the GPU (Metal) by default and models load in float16; on Linux it
runs on the CPU, where float32 with OpenBLAS is the fast path. The CPU-only replacements of
this library (:mod:`mlx_redrafter.fast_math`'s ``exp``, :mod:`mlx_redrafter.train.fast_ops`,
the native attention kernel, the trainer's custom softmax / SwiGLU) are used only while
:func:`on_cpu` is true: on a GPU MLX's own fused kernels are faster and smaller.
"""

from __future__ import annotations

import os
import platform
import re

import mlx.core as mx


def is_macos() -> bool:
    """True on macOS (``platform.system() == "Darwin"``)."""
    return platform.system() == "Darwin"


def on_cpu() -> bool:
    """True when MLX's default device, where this library's graphs run, is the CPU."""
    return mx.default_device().type == mx.cpu


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` else)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def description() -> str:
    """One line naming the device computations run on, e.g. ``"gpu: Apple M2 Max, 32 GB"``
    or ``"cpu: AMD EPYC 9R14 (2 cores)"``."""
    if not on_cpu():
        try:
            info = mx.device_info()
        except (AttributeError, RuntimeError):
            info = {}
        name = info.get("device_name", "GPU")
        memory = info.get("memory_size")
        size = f", {memory / 2**30:.0f} GB" if memory else ""
        return f"gpu: {name}{size}"
    return f"cpu: {cpu_model()} ({os.cpu_count()} cores)"


def key() -> str:
    """:func:`description` as a file-name-safe key (profiles are saved per device)."""
    text = f"{platform.system()}-{platform.machine()}-{description()}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def default_dtype() -> str:
    """``"float16"`` on macOS with Metal, else ``"float32"`` (fp16 matmuls are slow on CPUs)."""
    return "float16" if is_macos() and mx.metal.is_available() else "float32"


# Architectures whose activations exceed float16's range (65,504): Gemma scales the
# embeddings by sqrt(hidden size) and its residual stream grows past float16 in later
# layers; mlx-lm and llama.cpp run them in bfloat16 or float32.
FLOAT16_OVERFLOWS = ("gemma2", "gemma3", "gemma3_text")


def safe_dtype(dtype: str, architecture: str | None) -> str:
    """``dtype``, or ``"bfloat16"`` when it is float16 and ``architecture`` (an mlx-lm
    ``model_type``) overflows float16."""
    if dtype == "float16" and architecture in FLOAT16_OVERFLOWS:
        return "bfloat16"
    return dtype
