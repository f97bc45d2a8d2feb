"""End-of-run figures: the loss curve (from metrics.jsonl) and the per-layer expert-load heatmap.

matplotlib runs on the Agg backend (files only), so this works on headless nodes and never opens a window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from trainer.report.metrics import max_violation, stack_counts  # noqa: E402

# Metric names the loss plot looks for, first match wins (see docs/metrics.md).
TRAIN_LM_KEYS = ("train/lm_loss", "train/loss")
EVAL_KEYS = ("eval/lm_loss", "eval/loss")
MTP_PREFIX = "train/mtp_loss"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a crash mid-write) is skipped, not fatal."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*sorted(pts))
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    alpha = 2.0 / (span + 1)
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def plot_loss_curve(jsonl_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Train LM loss and MTP loss(es) against step, eval loss as points; raw faint, smoothed solid."""
    rows = read_jsonl(jsonl_path)
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    plotted = False

    def line(key: str, label: str, color: str) -> None:
        nonlocal plotted
        x, y = _series(rows, key)
        if x.size == 0:
            return
        plotted = True
        if x.size >= 20:  # smooth only when there is enough to smooth; keep the raw curve visible behind it
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, _ema(y, max(5, x.size // 50)), color=color, linewidth=1.6, label=f"{label} (EMA)")
        else:
            ax.plot(x, y, color=color, linewidth=1.6, marker="." if x.size < 50 else None, label=label)

    lm_key = next((k for k in TRAIN_LM_KEYS if k in keys), None)
    if lm_key:
        line(lm_key, "train LM loss", "tab:blue")
    mtp_keys = sorted(k for k in keys if k.startswith(MTP_PREFIX))
    for j, k in enumerate(mtp_keys):
        suffix = k[len(MTP_PREFIX):].lstrip("_/")
        color = ["tab:orange", "tab:green", "tab:purple"][j % 3]
        line(k, "train MTP loss" + (f" {suffix}" if suffix else ""), color)
    eval_key = next((k for k in EVAL_KEYS if k in keys), None)
    if eval_key:
        x, y = _series(rows, eval_key)
        if x.size:
            plotted = True
            ax.plot(x, y, color="tab:red", linestyle="--", linewidth=1.0, marker="o", markersize=5,
                    label="eval loss")

    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no loss rows in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_expert_load(counts_per_layer: Mapping[int, Any] | np.ndarray, out_png: str | Path,
                     title: str | None = None) -> Path:
    """Heatmap of load / mean load per MoE layer (rows) and expert (columns); 1 (white) is balanced.

    `counts_per_layer`: {layer index: counts [experts]} (a [steps, experts] history is summed), or an array
    [moe_layers, experts] / [steps, moe_layers, experts].
    """
    layers, counts = stack_counts(counts_per_layer)
    fig_h = min(12.0, max(3.6, 1.6 + 0.18 * len(layers)))
    # A stacked array carries no layer numbers: its rows are the MoE layers in order.
    row_name = "layer" if isinstance(counts_per_layer, Mapping) else "MoE layer #"
    fig, ax = plt.subplots(figsize=(10, fig_h), dpi=120)
    if counts.size == 0:
        ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        mean = counts.mean(axis=1, keepdims=True)
        norm_load = np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)
        # Log scale centred on 1.0 so "twice the fair share" and "half of it" are equally loud; outside
        # [1/4, 4] the colour saturates (colour-bar arrows). Blue = under-loaded, red = over-loaded.
        lo, hi = 0.25, 4.0
        im = ax.imshow(np.clip(norm_load, lo, hi), aspect="auto", cmap="RdBu_r", interpolation="nearest",
                       norm=LogNorm(vmin=lo, vmax=hi))
        cb = fig.colorbar(im, ax=ax, pad=0.02, extend="both")
        cb.set_ticks([0.25, 0.5, 1.0, 2.0, 4.0], labels=["<=1/4", "1/2", "1", "2", ">=4"])
        cb.minorticks_off()
        cb.set_label("load / layer mean")
        n_layers, n_experts = norm_load.shape
        row_step = max(1, math.ceil(n_layers / 30))
        ax.set_yticks(range(0, n_layers, row_step))
        ax.set_yticklabels([f"{row_name} {layers[r]}" for r in range(0, n_layers, row_step)], fontsize=8)
        col_step = max(1, 2 ** math.ceil(math.log2(max(1, n_experts / 16))))
        ax.set_xticks(range(0, n_experts, col_step))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("expert")
        vios = [max_violation(row) for row in counts]
        worst = int(np.argmax(vios))
        ax.set_title(
            (title + "\n" if title else "")
            + f"expert load / mean (MaxVio: mean {np.mean(vios):.3f}, "
            f"worst {vios[worst]:.3f} at {row_name} {layers[worst]})",
            fontsize=10,
        )
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
