"""Shared fixtures: deterministic CPU settings and small model configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_config(**overrides):
    """A very small model with every feature on: MoE with groups, shared expert, MTP, q_lora."""
    from model.config import ModelConfig

    base = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=2,
        n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=128, name="test-tiny",
    )
    base.update(overrides)
    return ModelConfig(**base)


class ModelState:
    """A TrainingState (trainer/training_state.py) of one process's plain model and optimizer, no DeepSpeed: the
    real layout-free files (state/rank_<r>.safetensors, state/index.json) through `Checkpointer.save`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters())

    def write(self, tmp: Path, rank: int) -> tuple[list[Path], dict]:
        from trainer.elastic_state import STATE_DIR, write_rank_state

        entries = write_rank_state(tmp, rank, self.model, self.optimizer, dp_rank=0, write_buffers=True)
        return [tmp / STATE_DIR / f"rank_{rank:05d}.safetensors"], entries

    def publish(self, tmp: Path, everyone: list) -> list[Path]:
        from trainer.elastic_state import write_index

        return [write_index(tmp, everyone, {})]


def layout_free_checkpoint(model: torch.nn.Module, ckpt_dir: Path, step: int = 1) -> Path:
    """A complete checkpoint of `model` (a DeepseekV3: its config goes to model_config.json) as the trainer
    writes it, with its manifest: what `trainer.export_hf` and `trainer.sample` read."""
    import json

    from trainer.checkpoint import Checkpointer

    saver = Checkpointer(ckpt_dir, rank=0, dp_rank=0, keep_last=100)
    return saver.save(ModelState(model), step, {"data": {}},
                      {"model_config.json": json.dumps(model.cfg.to_dict()), "config.yaml": "x: 1\n"})
