"""The schema refuses what it does not declare and numbers that are not finite; secrets never reach a written file."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.trainer.conftest import ROOT, base_overrides, launch
from tests.trainer.test_config_validation import composed
from trainer.config import JobConfig
from trainer.errors import UserError
from trainer.redaction import REDACTED, env_paths, redact, redact_override
from trainer.schema_checks import check_finite, check_known_keys


@pytest.mark.parametrize("override, key, words", [
    ("+train.foo=1", "train.foo", "not a key of the config schema"),
    ("+optim.lrr=0.1", "optim.lrr", "did you mean optim.lr"),
    ("+model.hidden=64", "model.hidden", "not a key"),
    ("+precision.fp8.recipie=current", "precision.fp8.recipie", "did you mean precision.fp8.recipe"),
    ("+nonsense=1", "nonsense", "not a key"),
])
def test_unknown_keys_are_refused(override, key, words):
    with pytest.raises(UserError) as info:
        check_known_keys(composed(override), JobConfig)
    assert info.value.key == key and words in str(info.value), str(info.value)


def test_the_deepspeed_pass_through_stays_open():
    check_known_keys(composed("+deepspeed.comet.enabled=false", "+deepspeed.wall_clock_breakdown=true"), JobConfig)
    check_known_keys(composed(), JobConfig)  # the default job itself


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("train.fault_timeout=nan", "train.fault_timeout"),
    ("train.fault_timeout=-inf", "train.fault_timeout"), ("optim.betas=[0.9,nan]", "optim.betas[1]"),
    ("model.rms_norm_eps=inf", "model.rms_norm_eps"),
])
def test_non_finite_numbers_are_refused(override, key):
    cfg = composed(override)
    with pytest.raises(UserError) as info:
        check_finite(OmegaConf.to_object(cfg))
    assert info.value.key == key and "finite" in str(info.value)


def test_redaction_by_key_name_and_by_environment(monkeypatch):
    monkeypatch.setenv("DSV3_TEST_SECRET", "s3cr3t-value")
    cfg = composed("+deepspeed.comet.api_key=${oc.env:DSV3_TEST_SECRET}",
                   "+deepspeed.comet.project=${oc.env:DSV3_TEST_SECRET}", "+deepspeed.comet.enabled=false")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["deepspeed"]["comet"]["project"] == "s3cr3t-value"  # the process gets the real value
    out = redact(resolved, env_paths(cfg))
    assert out["deepspeed"]["comet"] == {"api_key": REDACTED, "project": REDACTED, "enabled": False}
    assert out["model"] == resolved["model"] and out["model"]["bos_token_id"] == resolved["model"]["bos_token_id"]
    assert redact({"hf_token": "x", "token_budget": 3, "tokens": 5}) == {"hf_token": REDACTED, "token_budget": 3,
                                                                         "tokens": 5}
    assert redact_override("+deepspeed.comet.api_key=abc") == f"+deepspeed.comet.api_key={REDACTED}"
    assert redact_override("optim.lr=0.1") == "optim.lr=0.1"


@pytest.mark.slow
def test_a_run_writes_no_secret_anywhere(tiny_data, tmp_path):
    """A secret interpolated into the DeepSpeed pass-through reaches DeepSpeed but no file of the run: config,
    ds_config.json, meta.json, summary.json, the checkpoint's files (DeepSpeed embeds its config), metrics."""
    secret = "s3cr3t-7c1d0e"
    run = tmp_path / "run"
    proc = launch(base_overrides(tiny_data, run, "parallel=dp", "train.steps=2", "checkpoint.interval=1",
                                 "+deepspeed.comet.api_key=${oc.env:DSV3_TEST_SECRET}",
                                 "+deepspeed.comet.enabled=false"),
                  nproc=1, env={"DSV3_TEST_SECRET": secret})
    assert secret not in proc.stdout + proc.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".pt") for p in files) and (run / "ds_config.json").is_file()
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert json.loads((run / "ds_config.json").read_text())["comet"]["api_key"] == REDACTED


@pytest.mark.slow
def test_the_trainer_refuses_an_unknown_key_before_starting(tiny_data, tmp_path):
    """One line, exit 2, and no directory made: neither run_dir nor Hydra's runs/<name> in the working dir."""
    name = f"refused-{tmp_path.name}"
    proc = launch(base_overrides(tiny_data, tmp_path / "run", "parallel=dp", "+optim.lrr=0.1", f"name={name}"),
                  nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: optim.lrr:"), proc.stderr
    assert not (tmp_path / "run").exists() and not (ROOT / "runs" / name).exists()
