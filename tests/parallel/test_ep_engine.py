"""Expert parallelism through the DeepSpeed engine (`parallel.schedule=none`, ZeRO-1, AdamW, clipping) equals
single-process training; its checkpoints hold the experts sharded and reshard between ep sizes."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.transformer import DeepseekV3
from parallel.expert_shard import is_expert_key
from parallel.spawn import run_ranks
from tests.parallel.engine_workers import assert_matches
from tests.parallel.ep_engine_workers import run_ep_engine
from trainer.checkpoint import load_module_state
from trainer.expert_files import checkpoint_ep_size, expert_file
from trainer.reshard import main, reshard

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
def test_checkpoint_reshards_between_ep_sizes(ep2, tmp_path):
    reports, ckpt = ep2
    src = ckpt / "step00000002"
    assert checkpoint_ep_size(src) == 2 and expert_file(src, 1).is_file()
    full, cfg_dict = load_module_state(src)
    cfg = ModelConfig.from_dict(cfg_dict)
    # the full model read from the ep=2 checkpoint gives the ep=2 model's logits on every rank's tokens
    for rep in reports:
        want = torch.tensor(rep["logits"])
        got = _logits(full, cfg, torch.tensor(rep["probe"]))
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())

    assert main([str(src), str(tmp_path / "ep1"), "--ep", "1"]) == 0
    one, _ = load_module_state(tmp_path / "ep1")
    assert checkpoint_ep_size(tmp_path / "ep1") == 1
    ep1_file = torch.load(tmp_path / "ep1" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(ep1_file[n], t) for n, t in full.items())  # an ep=1 checkpoint: the full model
    back = reshard(tmp_path / "ep1", tmp_path / "ep2", 2)
    for k in range(2):  # ep=2 -> 1 -> 2 gives back the same shards, bit for bit
        a = torch.load(expert_file(src, k), weights_only=True)["module"]
        b = torch.load(expert_file(back, k), weights_only=True)["module"]
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    two, _ = load_module_state(back)
    assert all(torch.equal(two[n], t) for n, t in full.items())
    four = reshard(src, tmp_path / "ep4", 4)
    assert checkpoint_ep_size(four) == 4
    shard = torch.load(expert_file(four, 3), weights_only=True)["module"]
    assert all(t.shape[0] == cfg.n_routed_experts // 4 for n, t in shard.items() if is_expert_key(n))
    assert all(torch.equal(t, full[n]) for n, t in load_module_state(four)[0].items())
    assert main([str(src), str(tmp_path / "ep3"), "--ep", "3"]) == 2  # 8 experts do not split over 3
