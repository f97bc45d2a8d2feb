"""End-to-end data-parallel training on CPU (gloo), 2 ranks: DeepSpeed's launcher for the main run and the killed
save, trainer.launch for the rest.

One 2-rank reference run (8 steps, checkpoints at 4 and 8) is shared by the tests of this module:
loss falls and everything is logged; DP=1 with the same global batch follows the same trajectory; a run
killed inside its step-8 save resumes from step 4 and reproduces the reference bit for bit; the
checkpoint exports to Hugging Face format that transformers loads, and MTP speculative sampling equals
greedy sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import assert_first_step_matches, base_overrides, launch, losses, rows

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = ["parallel=dp", "train.steps=8", "train.eval_interval=4", "checkpoint.interval=4"]


@pytest.fixture(scope="module")
def dp2_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    launch(base_overrides(tiny_data, run_dir, *STEPS, "name=dp2-e2e-marker", "logging.wandb.mode=offline",
                          "checkpoint.export_hf=true"), nproc=2, launcher="deepspeed")  # DeepSpeed's launcher works too
    return run_dir


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_ranks_loss_falls_and_everything_is_logged(dp2_run: Path):
    loss = losses(dp2_run)
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.5, loss
    train = rows(dp2_run)
    for r in train:
        for key in ("train/loss", "train/lm_loss", "train/mtp_loss", "train/balance_loss", "train/lr",
                    "train/grad_norm", "train/tokens_per_s", "train/tflops", "train/peak_mem_gib",
                    "train/step_time_s", "train/tokens", "train/maxvio/mean", "train/maxvio/layer_1",
                    "train/maxvio/layer_2"):
            assert key in r and r[key] is not None, (key, r)
    assert train[0]["train/lr"] < train[1]["train/lr"]  # warmup
    evals = rows(dp2_run, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert 0.0 <= evals[-1]["eval/mtp_acceptance"] <= 1.0 and evals[-1]["eval/ppl"] > 1.0
    entropy = rows(dp2_run, "data")[0]["data/unigram_entropy"]
    summary = json.loads((dp2_run / "summary.json").read_text())
    assert summary["unigram_entropy"] == pytest.approx(entropy) and summary["step"] == 8
    assert _is_png(dp2_run / "loss_curve.png") and _is_png(dp2_run / "expert_load.png")
    # wandb offline run with the resolved config (its run name is in it), no network needed
    runs = list((dp2_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"dp2-e2e-marker" in runs[0].read_bytes()
    assert (dp2_run / "config.yaml").is_file() and (dp2_run / "ds_config.json").is_file()
    ds = json.loads((dp2_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 1.0
    # checkpoints: keep_last=2, every rank's RNG, both ranks' pieces of the layout-free state (each its ZeRO-1
    # partition), nothing else; latest -> step 8
    ckpts = dp2_run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000008"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000004", "step00000008"]
    for tag in ("step00000004", "step00000008"):
        files = {p.relative_to(ckpts / tag).as_posix() for p in (ckpts / tag).rglob("*") if p.is_file()}
        assert files == {"meta.json", "manifest.json", "model_config.json", "config.yaml", "state/index.json",
                         "state/rank_00000.safetensors", "state/rank_00001.safetensors", "rng/rank0.pt",
                         "rng/rank1.pt"}


def test_dp1_matches_dp2_with_the_same_global_batch(dp2_run: Path, tiny_data: Path, tmp_path: Path):
    """The same samples per step on 1 rank and on 2: the first step's loss and grad norm, and the schedule
    (see assert_first_step_matches for why later steps are not compared)."""
    run_dir = tmp_path / "dp1"
    launch(base_overrides(tiny_data, run_dir, *STEPS, "checkpoint.save_final=false", "checkpoint.interval=0"),
           nproc=1)
    assert_first_step_matches(run_dir, dp2_run)
    assert [r["step"] for r in rows(run_dir, "eval")] == [r["step"] for r in rows(dp2_run, "eval")] == [4, 8]


def test_killed_during_save_then_resume_auto_is_exact(dp2_run: Path, tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "crash"
    args = base_overrides(tiny_data, run_dir, *STEPS, "name=dp2-e2e-marker")
    # through DeepSpeed's launcher: a rank's failure ends the job with a non-zero code there too
    crashed = launch(args, nproc=2, env={"DSV3_FAULT_INJECT": "checkpoint_save:8"}, check=False, launcher="deepspeed")
    assert crashed.returncode != 0
    ckpts = run_dir / "checkpoints"
    # the torn save is there, but `latest` still names the previous complete checkpoint
    assert (ckpts / ".tmp-step00000008").is_dir() and not (ckpts / "step00000008").exists()
    assert (ckpts / "latest").read_text() == "step00000004"

    resumed = launch([*args, "train.resume=auto"], nproc=2)
    assert "resumed from" in resumed.stdout and "step00000004" in resumed.stdout
    assert not (ckpts / ".tmp-step00000008").exists() and (ckpts / "latest").read_text() == "step00000008"
    # fp32 on CPU: the resumed trajectory is identical to the uninterrupted one, step by step
    assert losses(run_dir) == losses(dp2_run)
    assert [r["eval/lm_loss"] for r in rows(run_dir, "eval")] == [r["eval/lm_loss"] for r in rows(dp2_run, "eval")]


def test_export_loads_in_transformers_and_speculative_sampling_equals_greedy(dp2_run: Path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import sample
    from trainer.export_hf import load_model

    hf_dir = dp2_run / "hf"
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    ours = load_model(dp2_run)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("def main(argv):\n    return sorted(argv)\n")["input_ids"]])
    with torch.no_grad():
        ref = theirs(ids).logits
        got = ours.logits(ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    outputs = {}
    for mode in ([], ["--speculative", "mtp"]):
        sample.main([str(hf_dir), "--prompt", "def main(", "--max-new-tokens", "24", "--ignore-eos", *mode])
        text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
        outputs[bool(mode)] = text
        assert "tokens_per_s=" in stats and "acceptance_rate=" in stats
    assert outputs[True] == outputs[False]
    assert "acceptance_rate=n/a" not in stats  # the speculative run reports its rate


def test_max_seconds_stops_early_with_a_checkpoint(tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "timed"
    launch(base_overrides(tiny_data, run_dir, *STEPS, "train.max_seconds=0.001", "train.eval_batches=2"), nproc=1)
    assert sorted(losses(run_dir)) == [1]  # stopped after the first step, as every rank agreed
    assert [r["step"] for r in rows(run_dir, "eval")] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000001"
