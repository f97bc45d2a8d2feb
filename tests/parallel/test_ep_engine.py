"""Expert parallelism through the DeepSpeed engine (`parallel.schedule=none`, ZeRO-1, AdamW, clipping) equals
single-process training; its layout-free checkpoint holds each rank's experts and gives back the full model, and a
format-1 checkpoint (DeepSpeed's files plus expert shards) still resumes on its own layout and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.transformer import DeepseekV3
from parallel.spawn import run_ranks
from tests.parallel.engine_workers import assert_matches
from tests.parallel.ep_engine_workers import run_ep_engine
from trainer.checkpoint import load_module_state
from trainer.elastic_state import STATE_DIR, StateReader
from trainer.expert_files import checkpoint_ep_size, expert_file

# Compared as in test_pipeline_engine.py (tests/parallel/engine_workers.py): expert gradients reach their rank
# through the all-to-all and are summed in another order than in one process (fp32 reassociation). The first
# step's gradients are checked directly (a wrongly scaled expert gradient fails them), the grad norm (counting
# experts twice fails it), then the parameters after two Lipschitz AdamW steps and the losses to first order.
STEPS, MICROBATCHES, CLIP = 2, 2, 1.0


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ep2") / "checkpoints"
    return run_ranks(2, run_ep_engine, 2, MICROBATCHES, STEPS, CLIP, str(ckpt)), ckpt


@pytest.mark.multiprocess
def test_ep2_engine_steps_equal_single_process(ep2):
    reports, _ = ep2
    for rep in reports:
        assert rep["n_marked"] == 2 * 3  # gate_up + down of the 3 MoE layers (MTP included)
        assert rep["layout_groups"] == (3, True, True)
        assert rep["n"] == rep["n_ref"]
        assert_matches(rep)  # the norm counts each expert once
        assert rep["ref_norm"] > CLIP  # the clip is active, so the parameters also check the clip coefficient
        assert rep["bias_diff"] == 0.0, rep["bias_diff"]  # integer counts summed: the same update
        assert all(set(empty) >= {1, 2, 6} for empty in rep["empty_last_step"].values()), rep["empty_last_step"]
    assert reports[0]["biases"] == reports[1]["biases"]  # the identical update on every rank


@pytest.mark.multiprocess
def test_ep2_resume_restores_every_rank(ep2):
    """A fresh engine at ep=2 loading the checkpoint gets back every parameter, rank 1's experts included."""
    for rep in ep2[0]:
        assert rep["resume_diff"] == 0.0


def _logits(state: dict, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    model = DeepseekV3(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(tokens, return_logits=True).logits


@pytest.mark.multiprocess
def test_checkpoint_holds_each_ranks_experts_and_gives_the_full_model(ep2):
    reports, ckpt = ep2
    src = ckpt / "step00000002"
    assert sorted(p.name for p in (src / STATE_DIR).iterdir()) == [
        "index.json", "rank_00000.safetensors", "rank_00001.safetensors"]
    # each ep rank wrote its own experts: the stacked weight's pieces lie in both ranks' files
    index = StateReader(src).index["tensors"]
    experts = index["layers.1.block.mlp.experts.gate_up_proj.weight"]
    assert experts["shape"][0] == 8 and {p[2] for p in experts["pieces"]["param"]} == {
        "rank_00000.safetensors", "rank_00001.safetensors"}
    full, cfg_dict = load_module_state(src)
    cfg = ModelConfig.from_dict(cfg_dict)
    # the full model read from the ep=2 checkpoint gives the ep=2 model's logits on every rank's tokens
    for rep in reports:
        want = torch.tensor(rep["logits"])
        got = _logits(full, cfg, torch.tensor(rep["probe"]))
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.multiprocess
def test_format1_checkpoint_resumes_on_its_layout_and_exports(ep2):
    """The legacy branch of Checkpointer.load: DeepSpeed's files, then each rank's own experts from `experts/`."""
    reports, ckpt = ep2
    for rep in reports:
        assert rep["legacy_diff"] == 0.0 and rep["legacy_masters_equal"]
    legacy = Path(reports[0]["legacy"])
    assert checkpoint_ep_size(legacy) == 2 and expert_file(legacy, 1).is_file()
    old, _ = load_module_state(legacy)  # mp_rank_00 with ep rank 0's experts, the others gathered
    new, _ = load_module_state(ckpt / "step00000002")
    assert old.keys() == new.keys() and all(torch.equal(old[n], t) for n, t in new.items())
