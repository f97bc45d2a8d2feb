"""Elastic resume through the trainer (docs/checkpoints.md): a checkpoint written by DualPipe pp=2 on 2 ranks
continues as plain data parallelism with expert parallelism (dp=2, ep=2) on 2 ranks, and as one process; the
run goes on where it was (losses, grad norm, data position); a state that does not fit is one line, exit 2,
with nothing overwritten; the same weights written by two layouts export to the same bytes.

Runs (the tiny model): A, 4 steps of DualPipe (checkpoints at 2 and 4); B, A's step-2 checkpoint resumed as
dp=2 x ep=2 for steps 3-4 (A's step-2 checkpoint is what the first half of B would write: the same config and
seed give the same bits); C, A's step-4 checkpoint resumed on 1 process for one step that changes nothing;
two refused resumes on 1 process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.trainer.conftest import base_overrides, launch, rows
from trainer.checkpoint import META_FILE, tag_for
from trainer.checkpoint_manifest import MANIFEST_FILE, read_manifest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# the default job's layout: DualPipe, pp=2 over the 2 ranks (conf/parallel/dualpipe.yaml)
RUN = ["checkpoint.interval=2", "checkpoint.keep_last=3", "train.eval_interval=0", "train.eval_batches=0",
       "parallel.timeline_step=0", "optim.grad_clip=0"]  # no clipping: the grad norm does not feed back
AS_DP_EP = ["parallel=dp", "parallel.ep=2"]  # schedule none, pp=1: dp=2 over the 2 ranks, experts split in 2
ONE_PROCESS = ["parallel=dp"]

# Step 3 of B against step 3 of A: the same weights, fp32 masters and Adam moments (read back bit for bit), the
# same 8 samples; only the order of fp32 summations differs (DualPipe's interleaved microbatches and its two
# stage copies summed vs ZeRO-1's all-reduce over dp, the experts' rows gathered by an all-to-all). Two sums
# carry that: the loss, a mean of 256 token losses (reassociating n terms moves a sum by at most (n-1) * 2^-24
# of the sum of magnitudes: 1.5e-5, all terms positive), and the grad norm, the root of a sum of 2e5 squared
# gradients, each a sum over the 256 tokens (independent rounding: ~sqrt(2e5) * 2^-24 = 3e-5). REL covers both
# with margin; measured: 4e-8 (one ulp) for the losses, 0 for the grad norm. Step 4 starts from weights one
# AdamW step apart by lr x that relative error (~1e-9 each): its loss moves by far less than REL.
REL = 5e-5


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("elastic")
    a, b = base / "a", base / "b"
    launch(base_overrides(tiny_data, a, *RUN, "train.steps=4"), nproc=2)
    b_out = launch(base_overrides(tiny_data, b, *RUN, "train.steps=4", *AS_DP_EP,
                                  f"train.resume={a / 'checkpoints' / tag_for(2)}"), nproc=2)
    (b / "stdout.txt").write_text(b_out.stdout)
    return {"a": a, "b": b, "base": base}


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in rows(run_dir)}


def test_dualpipe_checkpoint_continues_as_dp_with_experts_split(runs: dict[str, Path]):
    a, b = _rows(runs["a"]), _rows(runs["b"])
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    ckpt = runs["a"] / "checkpoints" / tag_for(2)
    assert f"resumed from {ckpt} at step 2 on a new layout (schedule dualpipe -> none, pp 2 -> 1, dp 1 -> 2, " \
           "ep 1 -> 2)\n" in (runs["b"] / "stdout.txt").read_text()  # the world size is the same: RNG kept
    for key in ("train/loss", "train/lm_loss", "train/mtp_loss", "train/grad_norm"):
        assert b[3][key] == pytest.approx(a[3][key], rel=REL), (key, a[3][key], b[3][key])
    assert b[4]["train/lm_loss"] == pytest.approx(a[4]["train/lm_loss"], rel=REL)  # the same samples at step 4
    assert b[4]["train/lr"] == a[4]["train/lr"]  # the LR schedule's position came along
    # the data position continues: the same tokens seen, the same global sample index
    assert b[4]["train/tokens"] == a[4]["train/tokens"]
    meta_a, meta_b = (json.loads((r / "checkpoints" / tag_for(4) / META_FILE).read_text())
                      for r in (runs["a"], runs["b"]))
    assert meta_b["tokens_seen"] == meta_a["tokens_seen"]
    assert meta_b["data"]["consumed_samples"] == meta_a["data"]["consumed_samples"] == 32
    assert (meta_b["schedule"], meta_b["pp"], meta_b["dp"], meta_b["ep"]) == ("none", 1, 2, 2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_layouts_write_the_same_weights_and_export_them_alike(runs: dict[str, Path], tiny_data: Path):
    """A's step-4 checkpoint (2 ranks, DualPipe) resumed on 1 process for a step that changes no weight (lr
    1e-30 is absorbed by every fp32 weight, the router-bias speed is 0): its step-5 checkpoint holds the same
    weights, written by another layout, and both export to the same bytes."""
    from trainer.elastic_state import read_full
    from trainer.export_hf import main as export_main

    a, c = runs["a"], runs["base"] / "c"
    proc = launch(base_overrides(tiny_data, c, *RUN, *ONE_PROCESS, "train.steps=5", "optim.lr=1e-30",
                                 "optim.min_lr=0", "model.bias_update_speed=0",
                                 f"train.resume={a / 'checkpoints' / tag_for(4)}"), nproc=1)
    assert "on a new layout (schedule dualpipe -> none, pp 2 -> 1); RNG states start fresh (the world size " \
           "changed)" in proc.stdout
    two, one = a / "checkpoints" / tag_for(4), c / "checkpoints" / tag_for(5)
    assert len(list((two / "state").glob("rank_*"))) == 2 and len(list((one / "state").glob("rank_*"))) == 1
    w2, w1 = read_full(two), read_full(one)
    assert w2["param"].keys() == w1["param"].keys()
    assert all(t.equal(w1["param"][n]) for n, t in w2["param"].items())
    biases = [n for n in w2["buffer"] if n.endswith("e_score_correction_bias")]
    assert biases and all(w2["buffer"][n].equal(w1["buffer"][n]) for n in biases)
    for ckpt, out in ((two, runs["base"] / "hf2"), (one, runs["base"] / "hf1")):
        assert export_main([str(ckpt), str(out)]) == 0
    files = sorted(p.name for p in (runs["base"] / "hf2").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (runs["base"] / "hf1").glob("*.safetensors"))
    for name in files:
        assert _sha256(runs["base"] / "hf2" / name) == _sha256(runs["base"] / "hf1" / name), name


# ---- a state that does not fit: one line, exit 2, nothing overwritten ------------------------------------


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    return dst


def test_damaged_or_missing_rank_files_are_one_line(runs: dict[str, Path], tiny_data: Path, tmp_path: Path):
    """Step 4's rank-0 file cut short, step 2's rank-1 file gone: the manifest names both, no checkpoint is
    intact, and the run (on another layout) refuses to start without touching the run directory."""
    run_dir = _copy_run(runs["a"], tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    cut = ckpts / tag_for(4) / "state" / "rank_00000.safetensors"
    cut.write_bytes(cut.read_bytes()[:1000])
    (ckpts / tag_for(2) / "state" / "rank_00001.safetensors").unlink()
    config = (run_dir / "config.yaml").read_text()
    proc = launch(base_overrides(tiny_data, run_dir, *RUN, *ONE_PROCESS, "train.steps=6"), nproc=1, check=False)
    line = _one_error_line(proc)
    assert line.startswith(f"error: train.resume: no intact checkpoint in {ckpts}: ")
    assert f"{tag_for(4)} is damaged (state/rank_00000.safetensors: truncated (1000 of " in line
    assert f"{tag_for(2)} is damaged (state/rank_00001.safetensors: missing)" in line
    assert (run_dir / "config.yaml").read_text() == config


def test_an_index_naming_a_tensor_its_file_lacks_is_one_line(runs: dict[str, Path], tiny_data: Path,
                                                             tmp_path: Path, capsys):
    """The index and the rank files disagree while every hash matches (the manifest entry of the edited index
    rewritten): the check of the index against the rank files' headers catches it, at resume before anything
    is written (as a damaged checkpoint: `resume=auto` would take the one before) and at export, naming the
    rank file."""
    from trainer.export_hf import main as export_main

    run_dir = _copy_run(runs["a"], tmp_path / "run")
    ckpt = run_dir / "checkpoints" / tag_for(4)
    index_file = ckpt / "state" / "index.json"
    index = json.loads(index_file.read_text())
    name = "embed.embed_tokens.weight"  # read by every layout
    piece = index["tensors"][name]["pieces"]["param"][0]
    piece[3] = f"param/{name}.bogus/0"  # the key of the piece in its rank file
    index_file.write_text(json.dumps(index))
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"]["state/index.json"] = {"size": index_file.stat().st_size, "sha256": _sha256(index_file)}
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(ckpt)["state/index.json"]["sha256"] == _sha256(index_file)
    config = (run_dir / "config.yaml").read_text()

    proc = launch(base_overrides(tiny_data, run_dir, *RUN, *ONE_PROCESS, "train.steps=6", f"train.resume={ckpt}"),
                  nproc=1, check=False)
    line = _one_error_line(proc)
    assert line.startswith(f"error: train.resume: {ckpt} is damaged (state/{piece[2]}: no tensor "
                           f"'param/{name}.bogus/0' (the index names one the file lacks))"), line
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(4)

    with pytest.raises(SystemExit) as exit_info:
        export_main([str(ckpt), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ckpt / 'state' / piece[2]}: ") and f"param/{name}.bogus/0" in err
    assert "\n" not in err and not (tmp_path / "hf").exists()
