"""Damaged checkpoints and HF files: every checkpoint carries a manifest (size + sha256 of each file), resume takes
the newest checkpoint that verifies and says in one line which file of which checkpoint it skipped; a damaged
file anywhere else (export, sampling, import) is one line naming it and exit code 2; a resume with another
model shape is refused before config.yaml is touched; a final export a kill cut short is redone on rerun."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ModelState, layout_free_checkpoint
from tests.trainer.conftest import base_overrides, launch, losses
from trainer.checkpoint import (
    META_FILE,
    Checkpointer,
    find_intact,
    find_latest,
    load_file,
    load_module_state,
    model_shape_changes,
    tag_for,
)
from trainer.checkpoint_manifest import MANIFEST_FILE, read_manifest, verify
from trainer.errors import UserError

STATE_FILE = "state/rank_00000.safetensors"  # rank 0's pieces of the layout-free state (trainer/elastic_state.py)
INDEX_FILE = "state/index.json"  # where every piece lies
RNG_FILE = "rng/rank0.pt"


# ---- helpers ---------------------------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path) -> None:
    """The same size, one byte changed in the middle: torch.load reads such a file without complaint."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def _linear_state() -> ModelState:
    """What Checkpointer.save needs of a TrainingState, on a tiny plain model: the real state files."""
    return ModelState(torch.nn.Linear(2, 2))


def fake_run(tmp_path: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    ckpts = tmp_path / "checkpoints"
    saver = Checkpointer(ckpts, rank=0, dp_rank=0, keep_last=len(steps))
    for step in steps:
        saver.save(_linear_state(), step, {"data": {}}, {"model_config.json": json.dumps({"hidden_size": 64}),
                                                       "config.yaml": "x: 1\n"})
    return ckpts


# ---- the manifest ----------------------------------------------------------------------------------------


def test_save_writes_a_manifest_of_every_file_before_meta(tmp_path: Path):
    ckpts = fake_run(tmp_path, (2,))
    ckpt = ckpts / tag_for(2)
    manifest = read_manifest(ckpt)
    # not itself, not meta; no DeepSpeed files (format 2: the layout-free state)
    assert set(manifest) == {STATE_FILE, INDEX_FILE, RNG_FILE, "model_config.json", "config.yaml"}
    assert json.loads((ckpt / META_FILE).read_text())["format"] == 2
    for rel, entry in manifest.items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((ckpt / MANIFEST_FILE).read_text())["format"] == 1
    assert verify(ckpt, exclude=(META_FILE,)) is None


@pytest.mark.parametrize("name", [STATE_FILE, INDEX_FILE])
@pytest.mark.parametrize("damage, problem", [
    (truncate, "truncated"),
    (flip_byte, "sha256 mismatch"),
    (Path.unlink, "missing"),
])  # fmt: skip
def test_verify_names_the_damaged_file(tmp_path: Path, damage, problem, name: str):
    ckpt = fake_run(tmp_path, (2,)) / tag_for(2)
    damage(ckpt / name)
    problem = f"{name}: {problem}"
    assert verify(ckpt, exclude=(META_FILE,)).startswith(problem)


def test_fallback_to_the_previous_intact_checkpoint(tmp_path: Path):
    ckpts = fake_run(tmp_path)
    flip_byte(ckpts / tag_for(4) / STATE_FILE)
    said: list[str] = []
    assert find_intact(ckpts, said.append) == ckpts / tag_for(2)
    assert said == [f"warning: {ckpts / tag_for(4)} is damaged ({STATE_FILE}: sha256 mismatch); resuming from "
                    f"{tag_for(2)}"]


def _rewrite_index(ckpt: Path, edit) -> None:
    """Edit state/index.json and its manifest entry alike: only the check of the index against the rank files'
    headers can find what is wrong."""
    index = json.loads((ckpt / INDEX_FILE).read_text())
    edit(index)
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    data = (ckpt / INDEX_FILE).read_bytes()
    manifest["files"][INDEX_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert verify(ckpt, exclude=(META_FILE,)) is None


def _bogus_key(index: dict) -> None:
    index["tensors"]["weight"]["pieces"]["param"][0][3] = "param/weight.bogus/0"


def _longer_piece(index: dict) -> None:
    index["tensors"]["bias"]["shape"] = [3]
    index["tensors"]["bias"]["pieces"]["param"][0][1] = 3


def _no_pieces(index: dict) -> None:
    del index["tensors"]["weight"]["pieces"]


@pytest.mark.parametrize("edit, problem", [
    (_bogus_key, f"{STATE_FILE}: no tensor 'param/weight.bogus/0' (the index names one the file lacks)"),
    (_longer_piece, f"{STATE_FILE}: param/bias/0 has 2 elements, the index reads [2, 3)"),
    (_no_pieces, f"{INDEX_FILE}: malformed (KeyError: 'pieces')"),
])  # fmt: skip
def test_an_index_that_does_not_fit_its_rank_files_is_damage(tmp_path: Path, edit, problem: str):
    ckpts = fake_run(tmp_path)
    _rewrite_index(ckpts / tag_for(4), edit)
    said: list[str] = []
    assert find_intact(ckpts, said.append) == ckpts / tag_for(2)
    assert said == [f"warning: {ckpts / tag_for(4)} is damaged ({problem}); resuming from {tag_for(2)}"]


def test_corrupt_meta_makes_a_checkpoint_incomplete(tmp_path: Path):
    ckpts = fake_run(tmp_path)
    (ckpts / tag_for(4) / META_FILE).write_text('{"step": 4, "da')  # cut mid-write
    said: list[str] = []
    assert find_intact(ckpts, said.append) == ckpts / tag_for(2)
    assert len(said) == 1 and f"{tag_for(4)} is incomplete (meta.json: unreadable" in said[0]
    assert find_latest(ckpts) == ckpts / tag_for(2)  # the cheap lookup (export, messages) skips it too


def test_no_intact_checkpoint_is_a_user_error(tmp_path: Path):
    ckpts = fake_run(tmp_path)
    truncate(ckpts / tag_for(4) / RNG_FILE)
    (ckpts / tag_for(2) / META_FILE).write_text("")
    with pytest.raises(UserError) as err:
        find_intact(ckpts, lambda line: None)
    assert err.value.key == "train.resume"
    assert f"{tag_for(4)} is damaged ({RNG_FILE}: truncated" in str(err.value)
    assert f"{tag_for(2)} is incomplete (meta.json" in str(err.value)
    assert "train.resume=never" in err.value.fix


def test_checkpoint_without_manifest_is_accepted_unless_a_torch_file_is_cut(tmp_path: Path):
    ckpts = fake_run(tmp_path)
    for step in (2, 4):
        (ckpts / tag_for(step) / MANIFEST_FILE).unlink()  # as if written before manifests existed
    assert find_intact(ckpts, lambda line: None) == ckpts / tag_for(4)
    truncate(ckpts / tag_for(4) / RNG_FILE)
    said: list[str] = []
    assert find_intact(ckpts, said.append) == ckpts / tag_for(2)
    assert f"is damaged ({RNG_FILE}: not a readable torch file" in said[0]


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_it_until_it_passes_the_damaged_one(tmp_path: Path):
    """keep_last counts the checkpoints up to the one just saved: the newer damaged one must not push out the
    intact one the run resumed from."""
    ckpts = fake_run(tmp_path, (2, 6))
    Checkpointer(ckpts, 0, 0, keep_last=2).save(_linear_state(), 4, {"data": {}}, {})
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step")) == [tag_for(2), tag_for(4),
                                                                                     tag_for(6)]


def test_truncated_torch_file_is_one_line_naming_it(tmp_path: Path):
    ckpt = fake_run(tmp_path) / tag_for(4)
    truncate(ckpt / RNG_FILE)
    with pytest.raises(UserError) as err:
        load_file(ckpt / RNG_FILE, weights_only=True)
    assert err.value.key == str(ckpt / RNG_FILE) and "truncated or corrupt" in err.value.problem
    assert tag_for(2) in err.value.fix  # the checkpoint before it


@pytest.mark.parametrize("name", [STATE_FILE, INDEX_FILE])
@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_export_reads_only_verified_weights(tmp_path: Path, damage, name: str):
    ckpts = fake_run(tmp_path)
    damage(ckpts / tag_for(4) / name)
    with pytest.raises(UserError) as err:
        load_module_state(ckpts / tag_for(4))
    assert err.value.key == str(ckpts / tag_for(4) / name)
    assert tag_for(2) in err.value.fix


@pytest.mark.parametrize("name, problem", [(STATE_FILE, "unreadable"), (INDEX_FILE, "not valid JSON")])
def test_export_without_manifest_names_the_damaged_state_file(tmp_path: Path, name: str, problem: str):
    """A state file the manifest cannot vouch for (no manifest): the reader's own checks name the file."""
    ckpts = fake_run(tmp_path)
    (ckpts / tag_for(4) / MANIFEST_FILE).unlink()
    truncate(ckpts / tag_for(4) / name)
    with pytest.raises(UserError) as err:
        load_module_state(ckpts / tag_for(4))
    assert err.value.key == str(ckpts / tag_for(4) / name) and err.value.problem.startswith(problem)
    assert tag_for(2) in err.value.fix


def test_model_shape_changes_name_key_and_values(tmp_path: Path):
    ckpt = fake_run(tmp_path, (2,)) / tag_for(2)
    assert model_shape_changes(ckpt, {"hidden_size": 64}) == []
    assert model_shape_changes(ckpt, {"hidden_size": 96}) == [("hidden_size", 64, 96)]


# ---- HF files through the CLIs (one line naming the file, exit 2) --------------------------------------


def _tiny_model():
    from model.transformer import DeepseekV3
    from tests.conftest import tiny_config

    return DeepseekV3(tiny_config()).eval()


def _fake_checkpoint(ckpts: Path) -> Path:
    """A training checkpoint of the tiny model in `ckpts` (step 1), as the trainer writes it."""
    return layout_free_checkpoint(_tiny_model(), ckpts, step=1)


def _cli_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_sample_on_a_damaged_hf_dir_is_one_line(tmp_path: Path, capsys, name: str):
    from model.hf import export_hf
    from trainer.sample import main

    hf = export_hf(_tiny_model(), tmp_path / "hf")
    truncate(hf / name)
    line = _cli_error(main, [str(hf), "--prompt", "x"], capsys)
    assert line.startswith(f"error: {hf / name}: ") and "cut or corrupt" in line


@pytest.mark.parametrize("name", [STATE_FILE, INDEX_FILE, "model_config.json"])
def test_export_of_a_damaged_checkpoint_is_one_line(tmp_path: Path, capsys, name: str):
    from trainer.export_hf import main

    ckpt = _fake_checkpoint(tmp_path / "checkpoints")
    truncate(ckpt / name)
    line = _cli_error(main, [str(ckpt), str(tmp_path / "hf")], capsys)
    assert line.startswith(f"error: {ckpt / name}: truncated") and "restore the file" in line
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", [STATE_FILE, INDEX_FILE])
def test_sample_on_a_damaged_checkpoint_is_one_line(tmp_path: Path, capsys, name: str):
    from trainer.sample import main

    ckpt = _fake_checkpoint(tmp_path / "checkpoints")
    flip_byte(ckpt / name)
    line = _cli_error(main, [str(ckpt), "--prompt", "x"], capsys)
    assert line.startswith(f"error: {ckpt / name}: sha256 mismatch")


def test_export_replaces_its_output_atomically(tmp_path: Path):
    from trainer.export_hf import MARKER, export, export_is_complete

    ckpt = _fake_checkpoint(tmp_path / "checkpoints")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{")  # an export a kill cut short (before exports were atomic)
    (out / "README.md").write_text("mine")
    assert not export_is_complete(out, ckpt)
    export(ckpt, out)
    assert export_is_complete(out, ckpt) and (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    assert (out / "README.md").read_text() == "mine"  # files the export does not write are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "hf"]  # no temporary directory left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no Hugging Face export"):
        export(ckpt, tmp_path / "other")


# ---- the trainer, end to end (one process) -------------------------------------------------------------

RUN = ["parallel=dp", "train.eval_interval=0", "train.eval_batches=2", "checkpoint.interval=2",
       "checkpoint.keep_last=3", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    launch(base_overrides(tiny_data, run_dir, *RUN, "train.steps=4"), nproc=1)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damaged", [STATE_FILE, INDEX_FILE, RNG_FILE])
def test_damaged_newest_checkpoint_real_files_fall_back(trained: Path, tmp_path: Path, damaged: str):
    """Every file a run writes is in the manifest: each one's damage is found and named."""
    ckpts = _copy(trained, tmp_path) / "checkpoints"
    # the layout-free state and nothing of DeepSpeed's own format
    assert set(read_manifest(ckpts / tag_for(4))) == {STATE_FILE, INDEX_FILE, RNG_FILE, "model_config.json",
                                                      "config.yaml"}
    truncate(ckpts / tag_for(4) / damaged)
    said: list[str] = []
    assert find_intact(ckpts, said.append) == ckpts / tag_for(2)
    assert said == [f"warning: {ckpts / tag_for(4)} is damaged ({damaged}: truncated "
                    f"({(ckpts / tag_for(4) / damaged).stat().st_size} of "
                    f"{read_manifest(ckpts / tag_for(4))[damaged]['size']} bytes)); resuming from {tag_for(2)}"]


@pytest.mark.slow
def test_resume_falls_back_past_a_damaged_checkpoint(trained: Path, tiny_data: Path, tmp_path: Path):
    run_dir = _copy(trained, tmp_path)
    flip_byte(run_dir / "checkpoints" / tag_for(4) / STATE_FILE)
    proc = launch(base_overrides(tiny_data, run_dir, *RUN, "train.steps=6"), nproc=1)
    out = proc.stdout + proc.stderr
    warnings = [line for line in out.splitlines() if "is damaged" in line]
    assert warnings == [f"warning: {run_dir / 'checkpoints' / tag_for(4)} is damaged ({STATE_FILE}: sha256 "
                        f"mismatch); resuming from {tag_for(2)}"], out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(2)} at step 2" in out
    assert max(losses(run_dir)) == 6
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(6)
    assert verify(run_dir / "checkpoints" / tag_for(4), exclude=(META_FILE,)) is None  # saved again, intact


@pytest.mark.slow
def test_no_intact_checkpoint_exits_2_and_writes_nothing(trained: Path, tiny_data: Path, tmp_path: Path):
    run_dir = _copy(trained, tmp_path)
    flip_byte(run_dir / "checkpoints" / tag_for(4) / INDEX_FILE)  # a corrupt index
    (run_dir / "checkpoints" / tag_for(2) / META_FILE).write_text("{")
    config = (run_dir / "config.yaml").read_text()
    proc = launch(base_overrides(tiny_data, run_dir, *RUN, "train.steps=6", "name=changed"), nproc=1,
                  check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("error: train.resume: no intact checkpoint in")
    assert f"{tag_for(4)} is damaged ({INDEX_FILE}: sha256 mismatch)" in line
    assert line.endswith("start over with train.resume=never (it overwrites the run)")
    assert (run_dir / "config.yaml").read_text() == config


@pytest.mark.slow
def test_resume_with_another_hidden_size_is_one_line(trained: Path, tiny_data: Path, tmp_path: Path):
    run_dir = _copy(trained, tmp_path)
    config = (run_dir / "config.yaml").read_text()
    proc = launch(base_overrides(tiny_data, run_dir, *RUN, "train.steps=6", "model.hidden_size=96"), nproc=1,
                  check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("error: model.hidden_size: ") and "model.hidden_size=64" in line and \
        "model.hidden_size=96" in line and "train.resume=never" in line
    assert len(proc.stderr.splitlines()) < 5, proc.stderr
    assert (run_dir / "config.yaml").read_text() == config


# imported by the trainer's interpreter at start-up (PYTHONPATH): SIGKILL right after the HF weights are written
_KILL_IN_EXPORT = """
import os, signal
import model.hf as _hf
_write = _hf.export_hf
def _export_then_die(*args, **kwargs):
    _write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
_hf.export_hf = _export_then_die
"""


@pytest.mark.slow
def test_killed_export_is_redone_on_rerun_and_summary_keeps_losses(tiny_data: Path, tmp_path: Path):
    from tests.trainer.conftest import ROOT

    run_dir = tmp_path / "run"
    args = base_overrides(tiny_data, run_dir, *RUN, "train.steps=2", "checkpoint.export_hf=true")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_IN_EXPORT)
    killed = launch(args, nproc=1, env={"PYTHONPATH": f"{hook}:{ROOT}"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(2)
    assert not (run_dir / "hf").exists() and not (run_dir / "summary.json").exists()
    assert list(run_dir.glob(".hf.export-tmp-*/model.safetensors"))  # it died in the middle of the export
    (run_dir / "summary.json").write_text("")  # and a summary a kill emptied (before summaries were atomic)

    proc = launch(args, nproc=1)
    assert "done already" in proc.stdout and "exporting it again" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {r["kind"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert summary["train_lm_loss"] == rows["train"]["train/lm_loss"] and summary["train_lm_loss"] > 0
    assert summary["val_lm_loss"] == rows["eval"]["eval/lm_loss"]
    assert summary["step"] == 2 and summary["hf_dir"] == str(run_dir / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run_dir / "hf").iterdir()}
    assert not list(run_dir.glob(".hf.export-*"))  # the killed export's temporary directory is gone

    again = launch(args, nproc=1)  # complete now: nothing redone, the summary unchanged
    assert "exporting it again" not in again.stdout
    assert json.loads((run_dir / "summary.json").read_text()) == summary


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_hash_their_own_files_and_agree_on_the_fallback(tiny_data: Path, tmp_path: Path):
    """2 ranks: each hashes the files it wrote at save, and at resume half of the files; both pick the same
    checkpoint, rank 0 says which file was damaged."""
    run_dir = tmp_path / "run"
    args = base_overrides(tiny_data, run_dir, *RUN, "train.steps=4")
    launch(args, nproc=2)
    ckpts = run_dir / "checkpoints"
    manifest = read_manifest(ckpts / tag_for(4))
    assert {"rng/rank1.pt", "state/rank_00001.safetensors", STATE_FILE, INDEX_FILE} <= set(manifest)
    flip_byte(ckpts / tag_for(4) / "state/rank_00001.safetensors")
    proc = launch([*args, "train.steps=6"], nproc=2)
    out = proc.stdout + proc.stderr
    warnings = [line for line in out.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"is damaged (state/rank_00001.safetensors: sha256 mismatch); resuming from {tag_for(2)}"), out
    assert max(losses(run_dir)) == 6
