"""bench/fp8_te.py runs on a machine with torch alone: its --smoke mode (tiny model and GEMMs, CPU, seconds)
completes and writes the result JSON in a process where DeepSpeed, Hydra, OmegaConf, wandb and Transformer
Engine cannot be imported; the synthetic data is the Markov chain it claims to be."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("deepspeed", "hydra", "omegaconf", "wandb", "transformer_engine")
# importing any of these raises ImportError (a None entry in sys.modules), as on a bare torch machine
PRELUDE = "import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"


def run_without_extras(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE.format(blocked=BLOCKED) + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_runs_without_deepspeed_hydra_or_te(tmp_path: Path):
    out = tmp_path / "fp8_te.json"
    code = (
        "import runpy\n"
        f"sys.argv = ['bench/fp8_te.py', '--smoke', '--out', {str(out)!r}]\n"
        "runpy.run_path('bench/fp8_te.py', run_name='__main__')\n"
    )
    proc = run_without_extras(code)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["name"] == "fp8_te" and res["smoke"] and res["unit"] == "s/step"
    assert {"bf16", "emulated-blockwise"} <= set(res["modes"])
    assert "not installed" in res["skipped"]["te-blockwise"] or "CUDA" in res["skipped"]["te-blockwise"]
    for name, mode in res["modes"].items():
        assert mode["steps_run"] == res["steps"] and mode["final_loss"] > 0, name
        assert mode["rel_loss_gap"] is not None and mode["rel_loss_gap"] < 0.01, name
    assert res["gemm"] and "bf16" in res["gemm"][0]["ms"]


def test_import_path_is_torch_only():
    """The modules the GPU check imports load with the extras blocked."""
    proc = run_without_extras(
        "import bench.fp8_te, bench.common, model.fp8, model.fp8.scaled_mm, model.fp8.te, "
        "model.transformer\nprint('ok')"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_markov_batches_follow_the_chain():
    from bench.fp8_te import synthetic_batches

    b = synthetic_batches(3, 2, 50, 97, "cpu")
    assert b.shape == (3, 2, 52) and b.dtype == torch.long and int(b.max()) < 97
    g = torch.Generator(device="cpu").manual_seed(0)
    successors = torch.randint(0, 97, (97, 8), generator=g)
    flat = b.reshape(-1, 52)
    for row in flat:
        for i in range(1, 52):
            assert int(row[i]) in successors[int(row[i - 1])].tolist()
    assert torch.equal(b, synthetic_batches(3, 2, 50, 97, "cpu"))  # deterministic
