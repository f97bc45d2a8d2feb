"""FP8 test fixtures: the trainer tests' tiny prepared dataset (python_stdlib modules, 512-token BPE)."""

from tests.trainer.conftest import tiny_data  # noqa: F401  (a session fixture, shared with the trainer tests)
