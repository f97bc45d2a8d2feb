"""A damaged Hugging Face directory (cut config.json, truncated or corrupt safetensors, a cut index) is an
HFCheckpointError whose first line names the file, never a JSONDecodeError or SafetensorError traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.hf import HFCheckpointError, export_hf, import_hf
from model.transformer import DeepseekV3
from tests.conftest import tiny_config


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    return export_hf(DeepseekV3(tiny_config()), tmp_path / "hf")


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_cut_config_json_names_the_file(hf_dir: Path):
    cut(hf_dir / "config.json")
    with pytest.raises(HFCheckpointError, match=f"^{hf_dir / 'config.json'}: unreadable JSON .*cut or corrupt"):
        import_hf(hf_dir)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_safetensors_names_the_file(hf_dir: Path, keep: float):
    cut(hf_dir / "model.safetensors", keep)
    with pytest.raises(HFCheckpointError, match=f"^{hf_dir / 'model.safetensors'}: not a readable safetensors"):
        import_hf(hf_dir)


def test_sharded_export_with_a_cut_index_or_shard(tmp_path: Path):
    out = export_hf(DeepseekV3(tiny_config()), tmp_path / "hf", max_shard_bytes=200_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    cut(shards[-1])
    with pytest.raises(HFCheckpointError, match=f"^{shards[-1]}: not a readable safetensors"):
        import_hf(out)
    cut(out / "model.safetensors.index.json")
    with pytest.raises(HFCheckpointError, match=f"^{out / 'model.safetensors.index.json'}: unreadable JSON"):
        import_hf(out)
