"""`model/__init__.py` exports the library's public surface, and importing the package stays light.

Each check runs in a fresh interpreter: this process has long since imported torch, deepspeed and the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import model

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "safetensors", "transformers", "deepspeed", "parallel", "trainer", "numpy")


def fresh(code: str) -> dict:
    """Run `code` in a new interpreter at the repository root; it prints one JSON object last."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loaded(prefixes: tuple[str, ...]) -> str:
    """Python that prints, as JSON, the sorted names in sys.modules that are or start with one of `prefixes`."""
    return ("import json, sys\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {set(prefixes)!r}\n"
            f"                        or m.startswith({tuple(p for p in prefixes if '.' in p)!r}))))")


def test_import_model_loads_nothing_heavy():
    # trainer/config.py (Hydra composition, the planner CLI) imports model.config, which runs model/__init__.py
    assert fresh(f"import model, model.config\n{loaded((*HEAVY, 'torch.distributed'))}") == []


def test_public_names_import_without_distributed_code():
    names = ", ".join(model.__all__)
    got = {m.split(".")[0] for m in fresh(f"from model import {names}\n{loaded(HEAVY)}")}
    # torch's own import loads the torch.distributed package; what must not come along is DeepSpeed,
    # transformers or the project's upper layers (tests/test_layering.py bans model/'s own distributed imports)
    assert {"torch", "safetensors"} <= got
    assert not {"deepspeed", "transformers", "parallel", "trainer"} & got, got


def test_the_exports_are_the_documented_objects():
    from model.config import ConfigError, ModelConfig
    from model.generate import GenerationResult, generate, generate_speculative_mtp, sample_next
    from model.hf import HFCheckpointError, config_from_hf, export_hf, hf_config_dict, import_hf, load_hf_weights
    from model.info import parameter_report
    from model.transformer import DeepseekV3, MicroBatch, ModelOutput

    expected = {
        "ConfigError": ConfigError, "ModelConfig": ModelConfig, "DeepseekV3": DeepseekV3, "MicroBatch": MicroBatch,
        "ModelOutput": ModelOutput, "parameter_report": parameter_report, "export_hf": export_hf,
        "import_hf": import_hf, "load_hf_weights": load_hf_weights, "config_from_hf": config_from_hf,
        "hf_config_dict": hf_config_dict, "HFCheckpointError": HFCheckpointError, "generate": generate,
        "generate_speculative_mtp": generate_speculative_mtp, "sample_next": sample_next,
        "GenerationResult": GenerationResult,
    }  # fmt: skip
    assert sorted(model.__all__) == sorted(expected) == sorted(model._EXPORTS)
    for name, obj in expected.items():
        assert getattr(model, name) is obj, name
    assert set(model.__all__) <= set(dir(model))


def test_generate_is_the_function_whichever_import_comes_first():
    # model/generate.py is also a submodule: the import system binds each loaded submodule over the package's
    # name, so `from model import generate` after `from model.generate import ...` would give the module
    check = ("import json, sys, model\nm = sys.modules['model.generate']\n"
             "print(json.dumps([g is m.generate, model.generate is m.generate, callable(g)]))")
    assert fresh(f"import model.generate\nfrom model import generate as g\n{check}") == [True, True, True]
    assert fresh(f"from model import generate as g\nimport model.generate\n{check}") == [True, True, True]


def test_unknown_name_raises_attribute_error():
    try:
        model.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("model.no_such_thing resolved")


def test_the_public_surface_works_end_to_end(tmp_path):
    import torch

    from model import DeepseekV3, ModelConfig, export_hf, generate, import_hf

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                      num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16, max_position_embeddings=32)
    torch.manual_seed(0)
    net = DeepseekV3(cfg).eval()
    back = import_hf(export_hf(net, tmp_path / "hf")).eval()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(net, prompt, 4).tokens, generate(back, prompt, 4).tokens)
