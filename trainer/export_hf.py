"""`python -m trainer.export_hf CHECKPOINT OUT [--dtype fp32|bf16] [--fp8]`: a training checkpoint as a Hugging Face
`deepseek_v3` directory (model/hf.py writes the weights and config.json), with the tokenizer beside it, so
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it.

--fp8 writes DeepSeek-V3's release format: the FP8 layers' weights as float8_e4m3fn with a `weight_scale_inv`
per 128 x 128 block, everything else in bf16 (the router in fp32), `quantization_config` in config.json
(docs/fp8.md, "Export in the release format"); --dtype is then bf16.

CHECKPOINT is a checkpoint directory (checkpoints/step00000300), a checkpoints directory (its latest) or
a run directory (runs/default). No DeepSpeed and no process group are needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import DeepseekV3
from trainer.checkpoint import load_module_state, resolve_checkpoint
from trainer.errors import UserError, run_reporting_user_errors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_model(checkpoint: str | Path) -> DeepseekV3:
    """The trained model of a checkpoint (router biases included), in fp32, in eval mode."""
    state, model_cfg = load_module_state(checkpoint)
    model = DeepseekV3(ModelConfig.from_dict(model_cfg))
    model.load_state_dict(state)  # copies into the fp32 parameters whatever dtype training used
    return model.eval()


def tokenizer_file(checkpoint: Path) -> tuple[Path | None, dict]:
    """The data's tokenizer.json and its manifest, found through the checkpoint's config (or None)."""
    import yaml

    from data_prep.manifest import read_manifest

    cfg_file = checkpoint / "config.yaml"
    if not cfg_file.is_file():
        return None, {}
    dirs = (yaml.safe_load(cfg_file.read_text()).get("data") or {}).get("dirs") or []
    for d in dirs:
        try:
            manifest = read_manifest(d)
        except Exception:  # data moved or a Megatron prefix: export the weights anyway
            continue
        return Path(manifest.tokenizer_path), {"bos_id": manifest.bos_id, "eos_id": manifest.eos_id,
                                               "pad_id": manifest.pad_id}
    return None, {}


def write_tokenizer(tok_path: Path, ids: dict, out: Path) -> None:
    from tokenizers import Tokenizer

    shutil.copyfile(tok_path, out / "tokenizer.json")
    tok = Tokenizer.from_file(str(tok_path))
    special = {name: tok.id_to_token(ids[f"{name}_id"]) for name in ("bos", "eos", "pad") if f"{name}_id" in ids}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
              **{f"{k}_token": v for k, v in special.items() if v is not None}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({f"{k}_token": v for k, v in special.items() if v is not None}, indent=2) + "\n")


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", fp8: bool = False) -> Path:
    from model.hf import export_hf

    try:
        ckpt = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise UserError("CHECKPOINT", str(e), "pass runs/<name> or a checkpoint directory") from None
    if fp8 and dtype != "bf16":
        raise UserError("--dtype", f"the FP8 release format keeps its unquantized tensors in bf16, not {dtype}",
                        "drop --dtype or pass --dtype bf16 with --fp8")
    model = load_model(ckpt)
    out = Path(out)
    export_hf(model, out, dtype=DTYPES[dtype], fp8=fp8)
    tok, ids = tokenizer_file(ckpt)
    if tok is not None:
        write_tokenizer(tok, ids, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint dir, checkpoints dir or run dir")
    parser.add_argument("out", help="output directory (Hugging Face format)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fp32 (default), bf16 (with --fp8)")
    parser.add_argument("--fp8", action="store_true",
                        help="DeepSeek-V3 release format: FP8 GEMM weights with 128x128 block scales, the rest bf16")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.fp8 else "fp32")
    out = run_reporting_user_errors(export, args.checkpoint, args.out, dtype, args.fp8)
    print(f"exported {resolve_checkpoint(args.checkpoint)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
