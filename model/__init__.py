"""A DeepSeek-V3-style MoE network as a plain library (no torch.distributed, no DeepSpeed).

The public surface, importable from here::

    from model import ModelConfig, DeepseekV3, export_hf, import_hf, generate

- config: `ModelConfig`, `ConfigError` (model/config.py)
- network: `DeepseekV3`, `MicroBatch`, `ModelOutput` (model/transformer.py); `parameter_report` (model/info.py)
- Hugging Face: `export_hf`, `import_hf`, `load_hf_weights`, `config_from_hf`, `hf_config_dict`,
  `HFCheckpointError` (model/hf.py)
- generation: `generate`, `generate_speculative_mtp`, `sample_next`, `GenerationResult` (model/generate.py)

Every package of the project imports `model.config`, which runs this file first, so the names are resolved on
first use (PEP 562): `import model` itself loads neither torch nor safetensors. `model.generate` is the
function, whichever was imported first (see `_Package`); the module is `sys.modules["model.generate"]`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelConfig": "model.config",
    "ConfigError": "model.config",
    "DeepseekV3": "model.transformer",
    "MicroBatch": "model.transformer",
    "ModelOutput": "model.transformer",
    "parameter_report": "model.info",
    "export_hf": "model.hf",
    "import_hf": "model.hf",
    "load_hf_weights": "model.hf",
    "config_from_hf": "model.hf",
    "hf_config_dict": "model.hf",
    "HFCheckpointError": "model.hf",
    "generate": "model.generate",
    "generate_speculative_mtp": "model.generate",
    "sample_next": "model.generate",
    "GenerationResult": "model.generate",
}

__all__ = [  # the keys of _EXPORTS (tests/model/test_public_api.py)
    "ConfigError", "DeepseekV3", "GenerationResult", "HFCheckpointError", "MicroBatch", "ModelConfig", "ModelOutput",
    "config_from_hf", "export_hf", "generate", "generate_speculative_mtp", "hf_config_dict", "import_hf",
    "load_hf_weights", "parameter_report", "sample_next",
]  # fmt: skip

if TYPE_CHECKING:
    from model.config import ConfigError, ModelConfig
    from model.generate import GenerationResult, generate, generate_speculative_mtp, sample_next
    from model.hf import HFCheckpointError, config_from_hf, export_hf, hf_config_dict, import_hf, load_hf_weights
    from model.info import parameter_report
    from model.transformer import DeepseekV3, MicroBatch, ModelOutput


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The import system binds every loaded submodule as an attribute of its package (`model.generate` = the
    module model/generate.py), which would shadow the exported function of the same name; the export wins."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
