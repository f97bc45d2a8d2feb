"""The preparation config: a structured schema shared by the Hydra CLI and `prepare(cfg)` from Python."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from data_prep.errors import DataError

SCHEMA_NAME = "data_prep_schema"


@dataclass
class TokenizerConfig:
    # A `tokenizers` JSON file or a transformers tokenizer directory; None trains a byte-level BPE on the
    # corpus (nothing needs a network) and saves it next to the shards.
    path: str | None = None
    vocab_size: int = 4096  # size of the trained BPE (special tokens included)
    min_frequency: int = 2
    # BPE training reads at most this many characters of the train split, taken as a deterministic
    # hash-selected subset; the whole Python stdlib (~32M chars) trains in ~4 s on 2 cores, so the default
    # keeps all of it.
    train_max_chars: int = 64_000_000
    # Special tokens. For a trained tokenizer these are added; for a loaded one they are looked up (None:
    # read the transformers tokenizer_config.json or try common names; BOS and PAD fall back to EOS).
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None


@dataclass
class PrepConfig:
    # "python_stdlib" (the running interpreter's standard library), a local file or directory of text /
    # .jsonl / .json / .parquet files, or a `datasets` name when the machine is online.
    corpus: str = "python_stdlib"
    out_dir: str = "data/python_stdlib"
    include: str = "*"  # file-name pattern for directory inputs, e.g. "*.py"
    text_field: str = "text"  # column holding the text in JSONL / Parquet / hub inputs
    hub_config: str | None = None  # `datasets` config name for hub inputs
    val_fraction: float = 0.02  # share of documents (by hash of path or content) in the val split
    shard_tokens: int = 4_194_304  # tokens per shard (the last shard of a split holds the rest)
    add_bos: bool = False  # documents are always followed by EOS; optionally preceded by BOS
    max_documents: int | None = None  # only the first N documents of the corpus (quick experiments)
    num_workers: int | None = None  # tokenizer processes; None: one per CPU; 0: tokenize in this process
    model_vocab_size: int | None = None  # if set, refuse a tokenizer whose vocabulary is larger
    overwrite: bool = False  # replace an out_dir prepared with different parameters
    progress: bool = True  # tqdm progress bar
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def register_schema() -> None:
    """Register PrepConfig with Hydra's ConfigStore so conf/data_prep/config.yaml is type-checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PrepConfig)


def to_prep_config(cfg: Any) -> PrepConfig:
    """Accept a PrepConfig, an OmegaConf DictConfig or a mapping (dotted keys like "tokenizer.path" allowed).

    Values are type-checked and converted as on the command line ("1024" -> 1024); unknown keys are errors.
    """
    if isinstance(cfg, PrepConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise DataError(f"prepare(cfg): expected a PrepConfig, DictConfig or dict, got {type(cfg).__name__}")
    nested: dict[str, Any] = {}
    for key, value in cfg.items():
        if key == "hydra":
            continue
        *parents, leaf = str(key).split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = dict(value) if isinstance(value, Mapping) else value
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepConfig), nested)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = getattr(e, "full_key", None)
        raise DataError(f"bad data_prep option{f' {key}' if key else ''}: {first}: see data_prep/config.py") from None


def validate(cfg: PrepConfig) -> None:
    """Fail fast on settings that cannot work, before anything is read or written."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"val_fraction={cfg.val_fraction} must be in [0, 1): set e.g. val_fraction=0.02")
    if cfg.shard_tokens < 1024:
        raise DataError(f"shard_tokens={cfg.shard_tokens} is too small: use at least 1024 (default 4194304)")
    if cfg.tokenizer.path is None and cfg.tokenizer.vocab_size < 256 + 3:
        raise DataError(
            f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} cannot hold the 256 bytes and 3 special "
            "tokens of a byte-level BPE: use at least 259"
        )
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise DataError(f"num_workers={cfg.num_workers} must be >= 0 (0 tokenizes in the main process)")
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise DataError(f"max_documents={cfg.max_documents} must be >= 1 or null")
