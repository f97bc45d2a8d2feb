"""`python -m data_prep key=value ...`: the Hydra CLI around `prepare(cfg)`.

Config: conf/data_prep/config.yaml (schema: data_prep.config.PrepConfig). User errors (data problems, unknown
keys, wrong types, bad override syntax) print one line, `error: <message>`, on stderr and exit with code 2.
"""

from __future__ import annotations

import os
import sys

# This process only prepares data: keep `datasets` from importing torch for its IterableDataset base
# class (1.5 s of startup). Set before `datasets` is imported; an explicit USE_TORCH wins.
os.environ.setdefault("USE_TORCH", "0")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from data_prep.config import register_schema  # noqa: E402
from data_prep.errors import DataError  # noqa: E402

EXIT_USER_ERROR = 2


@hydra.main(config_path="../conf/data_prep", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from data_prep.pipeline import prepare

    # Reported here, inside the task: past this point Hydra would first print "Error executing job".
    try:
        prepare(cfg)
    except DataError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume (complete shards are kept)", code=130)


def _fail(line: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def _one_line(exc: BaseException) -> str | None:
    """The message for a user error (None: an internal bug, which keeps its traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, DataError):
        return str(exc)
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException | HydraException):
        text = " ".join(str(cause).split("\n")[0].split())
        key = getattr(cause, "full_key", None)
        where = f"{key}: " if key else ""
        return f"{where}{text} (options and types: data_prep/config.py, conf/data_prep/config.yaml)"
    return None


def main() -> None:
    register_schema()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises to us instead of printing a multi-line report
    try:
        _hydra_main()
    except Exception as exc:
        line = _one_line(exc)
        if line is None:
            raise
        _fail(line)


if __name__ == "__main__":
    main()
