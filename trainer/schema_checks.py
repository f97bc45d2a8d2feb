"""What the schema itself must refuse, before any cross-field rule: keys it does not declare, numbers that are
not finite.

Hydra's `+group.key=value` adds a key even to a structured config, and `OmegaConf.to_object` then drops it
without a word: a typo (`+optim.lrr=0.1`) would train with the default. Every key under the trainer's own groups
must be a schema field; only the `deepspeed:` pass-through is open. A float field must be finite:
`optim.lr=inf` would run until the first NaN, and a NaN timeout compares false with everything (the watchdog
would never fire).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from omegaconf import DictConfig

from trainer.errors import UserError

OPEN_KEYS = ("deepspeed",)  # passed through to DeepSpeed's config as given


def check_known_keys(cfg: DictConfig, schema: Any) -> None:
    """Raise UserError for the first key of `cfg` that the schema dataclass (recursively) does not declare."""
    _known(cfg, schema, "")


def _known(node: DictConfig, schema: Any, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in fields:
            if not prefix and key == "hydra":
                continue
            near = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"did you mean {' or '.join(f'{prefix}{k}' for k in near)}? " if near else ""
            raise UserError(path, "is not a key of the config schema (a typo, or a `+` that added a new key)",
                            f"{hint}drop it (docs/trainer.md lists every key)")
        if path in OPEN_KEYS:
            continue
        child = node._get_node(key)
        nested = _dataclass_of(fields[key], schema)
        if nested is not None and isinstance(child, DictConfig):
            _known(child, nested, path + ".")


def _dataclass_of(field: dataclasses.Field, owner: Any) -> Any:
    """The dataclass type of a field whose default is a dataclass instance (the nested groups)."""
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        return type(value) if dataclasses.is_dataclass(value) else None
    return type(field.default) if dataclasses.is_dataclass(field.default) else None


def check_finite(obj: Any, prefix: str = "") -> None:
    """Raise UserError for the first float field (recursively) that is inf or NaN."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, path + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(path, f"must be a finite number, got {value}", f"set {path} to a finite value")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                if isinstance(v, float) and not math.isfinite(v):
                    raise UserError(f"{path}[{i}]", f"must be a finite number, got {v}",
                                    f"set {path} to finite values")
