"""Keep secrets out of everything a run writes: config.yaml, ds_config.json, meta.json, summary.json, wandb's config
and the DeepSpeed checkpoint files (which embed the engine's config).

A value is a secret when its key names one (`api_key`, `token`, `password`, ...) or when the config draws it from
the environment (`${oc.env:HF_TOKEN}`): the process still gets the real value, the written copies read
`<redacted>`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from omegaconf import DictConfig, ListConfig

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"^(.*[_-])?(api[_-]?key|token|secret|password|passwd|credentials?|access[_-]?key)$",
                         re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.match(str(key)))


def env_paths(cfg: DictConfig | ListConfig, prefix: tuple = ()) -> list[tuple]:
    """Paths of the values the config interpolates from the environment (`${oc.env:...}`)."""
    out: list[tuple] = []
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        node = cfg._get_node(key)
        path = (*prefix, key)
        if isinstance(node, DictConfig | ListConfig):
            out += env_paths(node, path)
        elif isinstance(node._value(), str) and "oc.env:" in node._value():
            out.append(path)
    return out


def redact(tree: Any, paths: list[tuple] = ()) -> Any:
    """A copy of a plain dict/list tree with `paths` and every value under a secret-looking key redacted."""
    out = copy.deepcopy(tree)
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            if isinstance(node, dict) and path[-1] in node:
                node[path[-1]] = REDACTED
    return _redact_keys(out)


def _redact_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: REDACTED if is_secret_key(k) and node[k] is not None and not isinstance(node[k], dict | list)
                else _redact_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact_keys(v) for v in node]
    return node


def redact_override(override: str) -> str:
    """`+deepspeed.comet.api_key=abc` -> `+deepspeed.comet.api_key=<redacted>` (command-line overrides)."""
    key, sep, _ = override.partition("=")
    return f"{key}{sep}{REDACTED}" if sep and is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]) else override
