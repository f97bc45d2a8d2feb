"""The sweep summary table from the jobs' summary.json files (the 2-job basic-launcher sweep that produces it
end to end is tests/trainer/test_multirun.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import ROOT
from trainer.cluster.sweep import SUMMARY_JSON, SUMMARY_MD, collect, summarize


def _job(sweep: Path, num: int, lr: str, loss: float | None, steps: int = 10) -> None:
    job = sweep / str(num)
    job.mkdir(parents=True)
    if loss is None:  # preempted: a checkpoint, no summary
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "latest").write_text("step00000004")
        return
    summary = {"step": steps, "train_lm_loss": loss + 0.1, "val_lm_loss": loss, "val_ppl": 2.718281828 ** loss,
               "val_mtp_acceptance": 0.25, "tokens_per_s": 1234.5, "overrides": [f"optim.lr={lr}", "name=s"]}
    (job / "summary.json").write_text(json.dumps(summary))


def test_summary_table(tmp_path: Path):
    sweep = tmp_path / "multirun" / "s" / "launch"
    _job(sweep, 0, "0.01", 5.0)
    _job(sweep, 1, "0.005", 4.5)
    _job(sweep, 2, "0.001", None)
    text = summarize(sweep, echo=False)
    lines = text.splitlines()
    assert lines[0] == ("| job | optim.lr | state | step | train LM loss | val LM loss | val ppl | MTP acceptance | "
                        "tokens/s |")  # name=s is the same everywhere: not a column
    assert lines[2] == "| 0 | 0.01 | done | 10 | 5.1000 | 5.0000 | 148.41 | 0.250 | 1234 |"
    assert lines[3].startswith("| 1 | 0.005 | done | 10 | 4.6000 | 4.5000 |")
    assert lines[4] == "| 2 |  | stopped at step00000004 | - | - | - | - | - | - |"
    assert (sweep / SUMMARY_MD).read_text().endswith(text)
    rows = json.loads((sweep / SUMMARY_JSON).read_text())
    assert [r["state"] for r in rows] == ["done", "done", "stopped at step00000004"] == [r["state"] for r in
                                                                                          collect(sweep)]


def test_cli(tmp_path: Path):
    _job(tmp_path, 0, "0.1", 3.0)
    out = subprocess.run([sys.executable, "-m", "trainer.sweep", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "| 0 | s | 0.1 | done |" in out.stdout  # one job: every override shown
