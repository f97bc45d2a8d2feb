"""`python -m trainer.export_hf CHECKPOINT OUT [--dtype fp32|bf16] [--fp8]`: a training checkpoint as a Hugging Face
`deepseek_v3` directory (model/hf.py writes the weights and config.json), with the tokenizer beside it, so
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it.

--fp8 writes DeepSeek-V3's release format: the FP8 layers' weights as float8_e4m3fn with a `weight_scale_inv`
per 128 x 128 block, everything else in bf16 (the router in fp32), `quantization_config` in config.json
(docs/fp8.md, "Export in the release format"); --dtype is then bf16.

CHECKPOINT is a checkpoint directory (checkpoints/step00000300), a checkpoints directory (its latest) or
a run directory (runs/default). No DeepSpeed and no process group are needed.

The export is atomic: it is written into a temporary directory beside OUT, which then replaces OUT (files of
OUT that the export does not write are kept); `dsv3_export.json` in it names the checkpoint it came from, so a
killed export leaves OUT as it was and a rerun of the job sees that the export is missing and redoes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.transformer import DeepseekV3
from trainer.checkpoint import fsync_dir, fsync_file, load_module_state, read_meta, resolve_checkpoint
from trainer.errors import UserError, run_reporting_user_errors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MARKER = "dsv3_export.json"  # written last: which checkpoint this export is (see `export_is_complete`)
_OURS = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", MARKER)


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
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(str(cfg_file), f"unreadable, the file is cut or corrupt ({' '.join(str(e).split())[:160]})",
                        "restore it, or export an earlier checkpoint") from None
    dirs = ((cfg.get("data") if isinstance(cfg, dict) else None) or {}).get("dirs") or []
    for d in dirs:
        try:
            manifest = read_manifest(d)
        except Exception:  # data moved or a Megatron prefix: export the weights anyway
            continue
        return Path(manifest.tokenizer_path), {"bos_id": manifest.bos_id, "eos_id": manifest.eos_id,
                                               "pad_id": manifest.pad_id}
    return None, {}


def write_tokenizer(tok_path: Path, ids: dict, out: Path) -> None:
    shutil.copyfile(tok_path, out / "tokenizer.json")
    tok = read_tokenizer(tok_path)
    special = {name: tok.id_to_token(ids[f"{name}_id"]) for name in ("bos", "eos", "pad") if f"{name}_id" in ids}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
              **{f"{k}_token": v for k, v in special.items() if v is not None}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({f"{k}_token": v for k, v in special.items() if v is not None}, indent=2) + "\n")


def read_tokenizer(path: Path) -> Any:
    """tokenizers.Tokenizer from a tokenizer.json; a cut or corrupt file is a UserError naming it."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception ("expected value at line 1 column 1")
        why = " ".join(str(e).split())[:160]
        raise UserError(str(path), f"unreadable tokenizer, the file is cut or corrupt ({why})",
                        "restore it (data_prep writes it beside the shards)") from None


def export_is_complete(out: str | Path, checkpoint: Path) -> bool:
    """Whether `out` holds a finished export of `checkpoint` (its marker names that checkpoint and step)."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
        return marker["checkpoint"] == checkpoint.name and marker["step"] == read_meta(checkpoint)["step"]
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return False


def _is_ours(name: str) -> bool:
    """A file an export writes (a previous export's, possibly cut short)."""
    return name in _OURS or (name.startswith("model-") and name.endswith(".safetensors"))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` in place of `out` (two renames); files of `out` the export does not write stay."""
    if out.is_dir():
        for p in out.iterdir():
            if not _is_ours(p.name) and not (tmp / p.name).exists():
                os.replace(p, tmp / p.name)
        old = out.parent / f".{out.name}.export-old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", fp8: bool = False) -> Path:
    from model.hf import export_hf

    try:
        ckpt = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise UserError("CHECKPOINT", str(e), "pass runs/<name> or a checkpoint directory") from None
    if fp8 and dtype != "bf16":
        raise UserError("--dtype", f"the FP8 release format keeps its unquantized tensors in bf16, not {dtype}",
                        "drop --dtype or pass --dtype bf16 with --fp8")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("OUT", f"{out} is a file", "pass a directory (it is created)")
    if out.is_dir() and any(out.iterdir()) and not any(_is_ours(p.name) for p in out.iterdir()):
        raise UserError("OUT", f"{out} is not empty and holds no Hugging Face export (no config.json, no "
                        "*.safetensors) to replace", "pass a new or empty directory")
    model = load_model(ckpt)
    meta = read_meta(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.export-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    export_hf(model, tmp, dtype=DTYPES[dtype], fp8=fp8)
    tok, ids = tokenizer_file(ckpt)
    if tok is not None:
        write_tokenizer(tok, ids, tmp)
    marker = {"checkpoint": ckpt.name, "step": meta["step"], "source": str(ckpt), "dtype": dtype, "fp8": fp8}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    for f in tmp.iterdir():  # on disk before the rename makes them the export
        fsync_file(f)
    fsync_dir(tmp)
    _replace_dir(tmp, out)
    fsync_dir(out.parent)
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
