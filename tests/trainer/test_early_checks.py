"""What can be checked before training is checked before training: token ids against the vocabulary, a
validation split big enough to evaluate, a writable checkpoint directory. Each is one line and exit code 2
before step 1, instead of a crash at the final evaluation (which runs before the final checkpoint) or at the
first save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.trainer.conftest import MODEL, ROOT, TRAIN, base_overrides, launch
from trainer.config import register_configs
from trainer.errors import UserError, user_error_line

VOCAB = 512  # the fixture's tokenizer and model


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank variables `prepare` would otherwise set in this test process's environment."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", "DS_ACCELERATOR": "cpu"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)


def prepare_job(data: Path, run_dir: Path, *overrides: str):
    """trainer.job.prepare on a composed one-process config (no process group, nothing built)."""
    from trainer.job import prepare

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*MODEL, *TRAIN, f"data.dirs=[{data}]", f"run_dir={run_dir}",
                                           "logging.wandb.mode=disabled", "parallel=dp", *overrides])  # fmt: skip
    return prepare(cfg)


def refused(data: Path, run_dir: Path, *overrides: str) -> str:
    with pytest.raises(Exception) as info:
        prepare_job(data, run_dir, *overrides)
    line = user_error_line(info.value)
    assert line is not None and "\n" not in line, repr(info.value)
    return line


def copy_data(tiny_data: Path, dest: Path) -> Path:
    return shutil.copytree(tiny_data, dest)


def edit_manifest(directory: Path, edit) -> None:
    raw = json.loads((directory / "manifest.json").read_text())
    edit(raw)
    (directory / "manifest.json").write_text(json.dumps(raw))


def test_token_id_outside_the_vocabulary_in_val_fails_before_step_1(tiny_data: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_data, tmp_path / "data")
    tokens = np.fromfile(data / "val-00000.bin", dtype="<u2")
    tokens[10] = VOCAB + 88  # same size, and the manifest still records the true maximum
    tokens.tofile(data / "val-00000.bin")
    run_dir = tmp_path / "run"
    proc = launch(base_overrides(data, run_dir, "parallel=dp", "train.steps=2", "train.eval_interval=0",
                                 "checkpoint.interval=0"), nproc=1, check=False)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"val-00000.bin holds token id {VOCAB + 88}" in errors[0] and f"{VOCAB}" in errors[0], errors[0]
    assert "data_prep" in errors[0] and "eval_batches=0" in errors[0]  # the fixes
    assert not run_dir.exists()  # refused before anything was built or written


def test_recorded_id_outside_the_vocabulary_is_a_config_error(tiny_data: Path, tmp_path: Path,
                                                               single_process: None) -> None:  # fmt: skip
    data = copy_data(tiny_data, tmp_path / "data")
    edit_manifest(data, lambda raw: raw["splits"]["train"]["shards"][0].update(max_id=VOCAB + 3))
    line = refused(data, tmp_path / "run")
    assert line.startswith("data.dirs:") and f"train-00000.bin holds token id {VOCAB + 3}" in line, line
    assert f"the tokenizer's {VOCAB} ids, model.vocab_size={VOCAB}" in line and "data_prep" in line, line


def test_old_manifest_train_shard_with_a_bad_id_is_refused_at_start(tiny_data: Path, tmp_path: Path,
                                                                     single_process: None) -> None:  # fmt: skip
    data = copy_data(tiny_data, tmp_path / "data")
    edit_manifest(data, lambda raw: [s.pop("max_id") for split in raw["splits"].values() for s in split["shards"]])
    tokens = np.fromfile(data / "train-00000.bin", dtype="<u2")
    tokens[-1] = VOCAB  # one past the last id
    tokens.tofile(data / "train-00000.bin")
    line = refused(data, tmp_path / "run")
    assert line.startswith("data: ") and f"train-00000.bin holds token id {VOCAB}, outside the vocabulary" in line


def test_empty_validation_split_is_refused_when_the_run_evaluates(tiny_data: Path, tmp_path: Path,
                                                                   single_process: None) -> None:  # fmt: skip
    data = copy_data(tiny_data, tmp_path / "data")
    edit_manifest(data, lambda raw: raw["splits"].update(
        val={"shards": [], "num_tokens": 0, "num_docs": 0, "max_doc_tokens": 0}))  # fmt: skip
    line = refused(data, tmp_path / "run")
    assert line.startswith("train.eval_batches:") and "empty validation split" in line, line
    assert "train.eval_batches=0" in line
    prepare_job(data, tmp_path / "run", "train.eval_batches=0")  # no evaluation: nothing to refuse


def test_validation_split_smaller_than_one_eval_batch_is_refused(tiny_data: Path, tmp_path: Path,
                                                                  single_process: None) -> None:  # fmt: skip
    job = prepare_job(tiny_data, tmp_path / "ok")[0]
    mtp = job.model.num_nextn_predict_layers
    val = json.loads((tiny_data / "manifest.json").read_text())["splits"]["val"]
    samples = sum((s["num_tokens"] - 1 - mtp) // 32 for s in val["shards"])  # pack mode, train.seq_len=32
    mb = samples + 1
    line = refused(tiny_data, tmp_path / "run", f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}")
    assert line.startswith("data.dirs: validation data:") and f"fewer val samples than one microbatch per rank ({mb})" \
        in line, line  # fmt: skip
    assert "train.eval_batches=0" in line


def test_unwritable_checkpoint_dir_is_refused_at_start(tiny_data: Path, tmp_path: Path,
                                                       single_process: None) -> None:  # fmt: skip
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError) as info:
        prepare_job(tiny_data, tmp_path / "run", f"checkpoint.dir={blocker}/ckpt")
    line = user_error_line(info.value)
    assert line.startswith(f"checkpoint.dir: cannot write to {blocker}/ckpt") and "writable" in line, line
    ok = tmp_path / "fresh" / "ckpt"
    prepare_job(tiny_data, tmp_path / "run", f"checkpoint.dir={ok}")
    assert ok.is_dir() and list(ok.iterdir()) == []  # created, the probe file removed
