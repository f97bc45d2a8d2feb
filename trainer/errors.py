"""User errors: one line `error: <key>: <problem>; <fix>` on stderr and exit code 2, never a traceback.

Config mistakes come from four places: the trainer's own cross-field checks (`UserError`), the model's
`ConfigError`, data_prep's `DataError`, and Hydra/OmegaConf while composing (unknown key, wrong type, bad
override syntax, missing group option). A Hugging Face directory that does not fit or is damaged (model/hf.py's
`HFCheckpointError`, which names the file or tensor) is one too. `user_error_line` turns each of them into the
one line; anything else is an internal bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

EXIT_USER_ERROR = 2
T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix: names the config key (or path), the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}: {problem}; {fix}")
        self.key, self.problem, self.fix = key, problem, fix


def _first_line(text: str) -> str:
    return " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""


def _omegaconf_line(exc: BaseException) -> str:
    """'<full_key>: <message>; <fix>' from an OmegaConf error (unknown key, wrong type, missing value)."""
    import dataclasses

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    key = getattr(exc, "full_key", None) or "config"
    msg = _first_line(getattr(exc, "msg", None) or str(exc))
    if isinstance(exc, ConfigKeyError | ConfigAttributeError):
        schema = getattr(exc, "object_type", None)
        if dataclasses.is_dataclass(schema):
            valid = ", ".join(f.name for f in dataclasses.fields(schema))
            return f"{key}: unknown key; valid keys here are: {valid}"
        return f"{key}: unknown key; check the spelling against docs/trainer.md"
    if isinstance(exc, ValidationError):
        return f"{key}: {msg}; give a value of the type declared in trainer/config.py"
    if isinstance(exc, MissingMandatoryValue):
        return f"{key}: no value given; set {key}=..."
    return f"{key}: {msg}; fix the config"


def user_error_line(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None if `exc` is not one."""
    from data_prep.errors import DataError
    from model.config import ConfigError

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, ConfigError):  # already "model.<key>: <problem and fix>"
        return _first_line(str(exc))
    if isinstance(exc, DataError):
        return "data: " + _first_line(str(exc))
    hf = sys.modules.get("model.hf")  # only raised once model.hf is imported; importing it here costs seconds
    if hf is not None and isinstance(exc, hf.HFCheckpointError):  # already "<path>: <problem>; <fix>"
        return _first_line(str(exc))
    try:
        from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if isinstance(exc, OmegaConfBaseException):
        return _omegaconf_line(exc)
    if isinstance(exc, MissingConfigException):
        options = getattr(exc, "options", None)
        hint = f"choose one of {sorted(options)}" if options else "check the group and option names under conf/"
        return f"config: {_first_line(str(exc))}; {hint}"
    if isinstance(exc, OverrideParseException):
        return f"override: {_first_line(str(exc))}; write overrides as key=value (see docs/trainer.md)"
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            return _omegaconf_line(cause)
        line = _first_line(str(exc))
        if "+" in str(exc) and "append" in str(exc):
            return f"config: {line}; the key does not exist in the schema (trainer/config.py)"
        return f"config: {line}; fix the override or the config file"
    return None


def fail(line: str, same_on_every_rank: bool = False) -> NoReturn:
    """Print the one line (once per job where the ranks can tell, see `_first_to_report`) and exit 2."""
    if _first_to_report(line, same_on_every_rank):
        sys.stderr.write(f"error: {line}\n")  # one write of the whole line: print writes the newline apart
        sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


@contextmanager
def same_on_every_rank() -> Iterator[None]:
    """Mark the errors raised inside as the config's alone (every rank finds the same): rank 0 reports them."""
    try:
        yield
    except Exception as exc:
        exc.same_on_every_rank = True  # type: ignore[attr-defined]
        raise


def _is_shared(exc: BaseException) -> bool:
    from model.config import ConfigError

    if getattr(exc, "same_on_every_rank", False) or isinstance(exc, ConfigError):
        return True
    return type(exc).__module__.split(".")[0] in ("hydra", "omegaconf")  # composing the config


def _first_to_report(line: str, same_on_every_rank: bool) -> bool:
    """Whether this rank prints `line`. Before the process group starts: rank 0 alone for a config error (every
    rank checks the same config), every rank that hits anything else (its own data shards, its node's
    filesystem). After: the first rank to count the line in the rendezvous store prints it, the others stay
    quiet (one line per distinct error, not one per rank)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group (importing torch here costs seconds)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return os.environ.get("RANK", "0") == "0" or not same_on_every_rank
    try:
        from datetime import timedelta

        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))  # an unreachable rank 0: print rather than wait (we exit next)
        return store.add("dsv3/error/" + hashlib.sha256(line.encode()).hexdigest()[:16], 1) == 1
    except Exception:  # the store's host (rank 0) is gone: better twice than never
        return True


def run_reporting_user_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn; a user error becomes one line on stderr and exit code 2 (others propagate)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        fail(line, _is_shared(exc))
