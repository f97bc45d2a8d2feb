"""Training metrics: FLOPs per token, MFU, accelerator peak table, expert-load balance, throughput, memory.

Everything here is pure bookkeeping: no distributed calls, no model instantiation. The formulas are written
out in docs/metrics.md; keep the two in step.
"""


from __future__ import annotations

import re
import resource
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TFLOPS = 1e12

# Dense (no 2:4 sparsity) peak FLOP/s per device, from the vendors' datasheets / architecture whitepapers.
# Datasheets quote tensor-core numbers "with sparsity"; those are halved here. "fp32" is the plain FP32 matmul
# peak (CUDA cores on NVIDIA, matrix cores on AMD CDNA), "tf32" the TF32 tensor-core peak. GeForce/RTX
# numbers are the FP32-accumulate ones, which is what PyTorch's BF16/FP16 GEMMs use.
# A dtype missing from an entry means the device has no such tensor-core path (e.g. FP8 before Ada/Hopper).


def _tflops(bf16: float | None, fp8: float | None, tf32: float | None, fp32: float,
            fp16: float | None = None) -> dict[str, float]:
    """One table row from dense TFLOPS; FP16 runs at the BF16 rate unless given (true of every part here)."""
    row = {"bf16": bf16, "fp16": fp16 if fp16 is not None else bf16, "fp8": fp8, "tf32": tf32, "fp32": fp32}
    return {k: v * TFLOPS for k, v in row.items() if v is not None}


PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA Hopper          bf16    fp8     tf32   fp32
    "h100_sxm": _tflops(989.5, 1979, 494.5, 67),
    "h100_pcie": _tflops(756.5, 1513, 378, 51),
    "h100_nvl": _tflops(835.5, 1670.5, 417.5, 60),
    "h800": _tflops(989.5, 1979, 494.5, 67),  # H100 SXM compute; cut NVLink and FP64
    "h800_pcie": _tflops(756.5, 1513, 378, 51),
    "h200": _tflops(989.5, 1979, 494.5, 67),  # H100 SXM compute; more HBM
    "h200_nvl": _tflops(835.5, 1670.5, 417.5, 60),
    "gh200": _tflops(989.5, 1979, 494.5, 67),
    "h20": _tflops(148, 296, 74, 44),
    # NVIDIA Ampere (no FP8)
    "a100": _tflops(312, None, 156, 19.5),  # SXM and PCIe, 40 and 80 GB alike
    "a800": _tflops(312, None, 156, 19.5),
    "a10": _tflops(125, None, 62.5, 31.2),
    "rtx3090": _tflops(71, None, 35.6, 35.6),
    # NVIDIA Ada
    "l40s": _tflops(362.05, 733, 183, 91.6),
    "l40": _tflops(181.05, 362, 90.5, 90.5),
    "l4": _tflops(121, 242.5, 60, 30.3),
    "rtx4090": _tflops(165.2, 330.3, 82.6, 82.6),
    "rtx6000_ada": _tflops(364.2, 728.5, 182.1, 91.1),
    # NVIDIA Blackwell, per GPU (HGX B200 and GB200 NVL72 system figures divided by their GPU count)
    "b200": _tflops(2250, 4500, 1125, 75),
    "gb200": _tflops(2500, 5000, 1250, 80),
    # NVIDIA Volta (no BF16 tensor cores)
    "v100": _tflops(None, None, None, 15.7, fp16=125),
    # AMD CDNA ("AMD Instinct MI300X" under ROCm); fp32 is the matrix-core rate
    "mi300x": _tflops(1307.4, 2614.9, 653.7, 163.4),
    "mi325x": _tflops(1307.4, 2614.9, 653.7, 163.4),
    "mi250x": _tflops(383, None, None, 95.7),
    "mi250": _tflops(362.1, None, None, 90.5),
}

# Device-name patterns, most specific first: "H100 ... NVL" before "H100", "GB200" before "B200". Matched
# against the upper-cased name with '-' and '_' as spaces ("A100-SXM4-80GB" -> "A100 SXM4 80GB").
_NAME_RULES: list[tuple[str, str]] = [
    (r"\bGB200\b", "gb200"),
    (r"\bGH200\b", "gh200"),
    (r"\bB200\b", "b200"),
    (r"\bH100\b.*\bNVL\b", "h100_nvl"),
    (r"\bH100\b.*\bPCIE\b", "h100_pcie"),
    (r"\bH100\b", "h100_sxm"),
    (r"\bH200\b.*\bNVL\b", "h200_nvl"),
    (r"\bH200\b", "h200"),
    (r"\bH800\b.*\bPCIE\b", "h800_pcie"),
    (r"\bH800\b", "h800"),
    (r"\bH20\b", "h20"),
    (r"\bA100\b", "a100"),
    (r"\bA800\b", "a800"),
    (r"\bA10\b", "a10"),  # not A10G (a different, cloud-only part)
    (r"\bL40S\b", "l40s"),
    (r"\bL40\b", "l40"),
    (r"\bL4\b", "l4"),
    (r"\bRTX 4090\b(?! D\b)", "rtx4090"),  # the 4090 D is a cut-down part
    (r"\bRTX 3090\b(?! TI\b)", "rtx3090"),
    (r"\bRTX 6000 ADA\b", "rtx6000_ada"),
    (r"\bV100\b", "v100"),
    (r"\bMI325X\b", "mi325x"),
    (r"\bMI300X\b", "mi300x"),
    (r"\bMI250X\b", "mi250x"),
    (r"\bMI250\b", "mi250"),
]

_DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "fp8": "fp8", "float8": "fp8", "e4m3": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8",
    "tf32": "tf32",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}


def gpu_key(device_name: str | None) -> str | None:
    """The PEAK_FLOPS key for a `torch.cuda.get_device_name()` string or a table key; None if unknown."""
    if not device_name:
        return None
    if device_name.lower() in PEAK_FLOPS:
        return device_name.lower()
    name = re.sub(r"[-_]", " ", device_name.upper())
    for pattern, key in _NAME_RULES:
        if re.search(pattern, name):
            return key
    return None


def peak_flops(device_name: str | None, dtype: str, override: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device for `dtype` ("bf16", "fp16", "fp8", "tf32", "fp32" or a torch name).

    `override` (FLOP/s, e.g. from the config) wins; otherwise None for an unknown device (CPU included) or a
    dtype the device has no tensor-core path for, so MFU is left out rather than made up.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override)
    canon = _DTYPE_ALIASES.get(str(dtype).lower())
    if canon is None:
        raise ValueError(f"unknown dtype {dtype!r} for the peak table; use bf16, fp16, fp8, tf32 or fp32")
    key = gpu_key(device_name)
    if key is None:
        return None
    return PEAK_FLOPS[key].get(canon)


def mfu(
    tokens_per_s: float, flops_per_token: float, peak: float | None, num_devices: int = 1
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over peak. None when the peak is unknown.

    `tokens_per_s` is the throughput of the `num_devices` devices together (default: one device's own).
    """
    if peak is None or peak <= 0 or num_devices <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


# ---- expert load --------------------------------------------------------------------------------------


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, list | tuple) and x and not np.isscalar(x[0]):
        return np.stack([_as_numpy(e) for e in x])  # e.g. a per-step history of count tensors
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def max_violation(counts: Any) -> float:
    """MaxVio of one layer: max_i load_i / mean_i load_i - 1 over its experts (0 = perfectly balanced)."""
    c = _as_numpy(counts).ravel()
    if c.size == 0:
        return 0.0
    mean = c.mean()
    return 0.0 if mean <= 0 else float(c.max() / mean - 1.0)


def expert_load_stats(counts_per_layer: Mapping[int, Any]) -> dict[str, float]:
    """{"maxvio/layer_{i}": MaxVio of layer i, ..., "maxvio/mean": mean of those}; {} without MoE layers."""
    stats = {f"maxvio/layer_{i}": max_violation(c) for i, c in sorted(counts_per_layer.items())}
    if stats:
        stats["maxvio/mean"] = float(np.mean(list(stats.values())))
    return stats


# ---- throughput and memory ----------------------------------------------------------------------------


class Throughput:
    """Tokens per second over the last `window` updates (a sliding window, so warm-up steps age out)."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.total_tokens = 0
        self.total_seconds = 0.0

    def update(self, tokens: int, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._samples.append((int(tokens), float(seconds)))
        self.total_tokens += int(tokens)
        self.total_seconds += float(seconds)

    @property
    def tokens_per_s(self) -> float:
        """0.0 until some time has been recorded."""
        seconds = sum(s for _, s in self._samples)
        return sum(t for t, _ in self._samples) / seconds if seconds > 0 else 0.0

    @property
    def seconds_per_update(self) -> float:
        """Mean duration of the updates in the window (step time when updated once per step)."""
        return sum(s for _, s in self._samples) / len(self._samples) if self._samples else 0.0

    def reset(self) -> None:
        self._samples.clear()


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA max allocated on GPU, else the max resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


def stack_counts(
    counts_per_layer: Mapping[int, Any] | Sequence[Any] | np.ndarray,
) -> tuple[list[int], np.ndarray]:
    """(layer ids, [layers, experts] float array) from a {layer: counts} dict or a stacked array/list.

    A value with a leading time axis ([steps, experts], e.g. a per-step history) is summed over time.
    A 3-D array is read as [steps, layers, experts] and summed over steps.
    """
    if isinstance(counts_per_layer, Mapping):
        layers = sorted(counts_per_layer)
        rows = []
        for i in layers:
            c = _as_numpy(counts_per_layer[i])
            rows.append(c.reshape(-1, c.shape[-1]).sum(axis=0) if c.ndim > 1 else c)
        if not rows:
            return [], np.zeros((0, 0))
        return layers, np.stack(rows)
    arr = _as_numpy(counts_per_layer)
    if arr.ndim == 3:
        arr = arr.sum(axis=0)
    if arr.ndim != 2:
        raise ValueError(
            f"expert counts must be [layers, experts] or [steps, layers, experts], got shape {arr.shape}"
        )
    return list(range(arr.shape[0])), arr
