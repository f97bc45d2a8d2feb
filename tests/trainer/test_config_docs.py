"""docs/trainer.md documents every key of the job schema with the default the schema declares.

The schema (trainer/config.py `JobConfig` and the dataclasses it nests, `ModelConfig` included) is walked
field by field, independently of the generator's own walk; the doc's generated section
(`python -m trainer.config_docs --write`) must list each leaf once, with its default, and nothing else.
"""

from __future__ import annotations

import dataclasses

import pytest

from trainer import config_docs
from trainer.config import JobConfig

DOC_TEXT = config_docs.DOC.read_text()


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default, for every leaf field of a dataclass instance (nested dataclasses walked)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


SCHEMA = leaves(JobConfig())


def test_the_walk_reaches_every_nested_group():
    # a guard on the walk itself: nested groups two levels down and the model's fields are all there
    nested = {"precision.fp8.recipe", "logging.wandb.mode", "model.kv_lora_rank", "model.name", "deepspeed"}
    assert nested <= set(SCHEMA)
    assert len([k for k in SCHEMA if k.startswith("model.")]) == len(dataclasses.fields(JobConfig().model))


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_every_schema_key_is_documented_with_its_default(key):
    rows = config_docs.doc_rows(DOC_TEXT)
    assert key in rows, f"{key} is missing from docs/trainer.md; run `python -m trainer.config_docs --write`"
    _type, default, meaning = rows[key]
    assert default == f"`{config_docs.fmt(SCHEMA[key])}`", f"{key}: the doc says {default}, the schema {SCHEMA[key]!r}"
    assert meaning, f"{key}: describe it in the meaning column of docs/trainer.md"


def test_the_doc_lists_no_key_the_schema_lacks():
    assert set(config_docs.doc_rows(DOC_TEXT)) == set(SCHEMA)


def test_the_doc_equals_the_generated_section():
    # types, order and the preset table too: the whole section is what the generator writes
    assert config_docs.problems(DOC_TEXT) == []
    assert DOC_TEXT == config_docs.expected_doc(DOC_TEXT)


def test_fmt_writes_values_as_yaml_does():
    assert [config_docs.fmt(v) for v in (None, True, 3e-3, 1e-8, 180.0, 7, "auto", [0.9, 0.95], {})] == [
        "null", "true", "0.003", "1e-08", "180.0", "7", "auto", "[0.9, 0.95]", "{}"]


def test_the_check_fails_on_a_missing_key_a_wrong_default_and_a_stale_key():
    rows = DOC_TEXT.splitlines()
    missing = "\n".join(r for r in rows if not r.startswith("| `parallel.defer_w` |"))
    assert "parallel.defer_w: not in the doc" in config_docs.problems(missing)

    wrong = DOC_TEXT.replace("| `train.steps` | int | `200` |", "| `train.steps` | int | `100` |")
    assert wrong != DOC_TEXT
    assert any(p.startswith("train.steps: the doc says default `100`") for p in config_docs.problems(wrong))

    stale_row = "| `train.old_key` | int | `1` | gone |"
    stale = DOC_TEXT.replace("| `train.steps` |", f"{stale_row}\n| `train.steps` |")
    assert "train.old_key: in the doc but not in the schema" in config_docs.problems(stale)

    no_meaning = DOC_TEXT.replace("| `data.seed` | int | `1234` | sample order |", "| `data.seed` | int | `1234` |  |")
    assert no_meaning != DOC_TEXT
    assert "data.seed: no meaning given" in config_docs.problems(no_meaning)


def test_a_new_schema_field_makes_the_check_fail(monkeypatch):
    @dataclasses.dataclass
    class Extended(JobConfig):
        brand_new: int = 3  # a key nobody documented yet

    real = config_docs.schema_keys
    monkeypatch.setattr(config_docs, "schema_keys", lambda node=None, prefix="": real(node or Extended(), prefix))
    assert "brand_new: not in the doc" in config_docs.problems(DOC_TEXT)
    # the generator adds the row, with the field's comment as its first meaning
    assert "| `brand_new` | int | `3` | a key nobody documented yet |" in config_docs.render()


def test_check_cli_exit_code(capsys, monkeypatch, tmp_path):
    assert config_docs.main(["--check"]) == 0
    drifted = tmp_path / "trainer.md"
    drifted.write_text(DOC_TEXT.replace("| `train.seed` | int | `42` |", "| `train.seed` | int | `43` |"))
    monkeypatch.setattr(config_docs, "DOC", drifted)
    assert config_docs.main(["--check"]) == 1
    assert "train.seed" in capsys.readouterr().err
    assert config_docs.main(["--write"]) == 0 and config_docs.main(["--check"]) == 0
