"""A default is declared once: a conf/ preset holds only what it changes relative to the schema.

Every option of every group of the job schema (conf/<group>/<option>.yaml), the top level of conf/config.yaml
and conf/data_prep/config.yaml (schema: data_prep/config.py) are read as plain YAML; a key that repeats the
schema's default fails, as does a key the schema lacks (Hydra would reject it at compose time anyway). The
composed job for each option must equal the schema with that preset's keys applied, so the presets change
nothing beyond what they say.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import JobConfig, register_configs
from trainer.config_docs import presets

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = [f.name for f in dataclasses.fields(JobConfig) if (CONF / f.name).is_dir()]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
DEFAULTS = OmegaConf.to_container(OmegaConf.structured(JobConfig))


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


SCHEMA = flatten(DEFAULTS)


def test_every_group_has_options():
    assert {"model", "parallel", "precision", "data", "optim", "train", "logging", "checkpoint"} <= set(GROUPS)
    assert ("parallel", "dualpipe") in OPTIONS and ("model", "dsv3_671b") in OPTIONS


@pytest.mark.parametrize("group, option", OPTIONS)
def test_preset_holds_only_what_it_changes(group, option):
    keys = flatten(yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}, f"{group}.")
    unknown = sorted(set(keys) - set(SCHEMA))
    assert not unknown, f"conf/{group}/{option}.yaml: {unknown} are not schema keys"
    repeated = sorted(k for k, v in keys.items() if v == SCHEMA[k])  # 180 == 180.0: a repeat too
    assert not repeated, f"conf/{group}/{option}.yaml repeats the schema defaults of {repeated}: delete those lines"


def test_config_yaml_sets_no_job_key_to_its_default():
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    own = flatten({k: v for k, v in top.items() if k not in ("defaults", "hydra")})
    assert not [k for k, v in own.items() if k in SCHEMA and v == SCHEMA[k]]


def test_data_prep_config_sets_no_key_to_its_default():
    from data_prep.config import PrepConfig

    schema = flatten(OmegaConf.to_container(OmegaConf.structured(PrepConfig)))
    top = yaml.safe_load((CONF / "data_prep" / "config.yaml").read_text())
    own = flatten({k: v for k, v in top.items() if k not in ("defaults", "hydra")})
    assert not sorted(set(own) - set(schema)), "not PrepConfig keys"
    assert not [k for k, v in own.items() if v == schema[k]], "repeats of data_prep/config.py defaults"


def test_the_repeat_check_can_fail():
    # the previous, repeating form of a preset is caught by the same comparison
    old = flatten({"schedule": "1f1b", "pp": 2, "dp": None, "ep": 1, "zero_stage": 1}, "parallel.")
    assert sorted(k for k, v in old.items() if v == SCHEMA[k]) == ["parallel.dp", "parallel.ep", "parallel.zero_stage"]


@pytest.mark.parametrize("group, option", OPTIONS)
def test_composed_option_is_the_schema_plus_the_preset(group, option):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = flatten(OmegaConf.to_container(compose("config", overrides=[f"{group}={option}"])))
    expected, top = dict(SCHEMA), {}
    for label, values in presets():  # this option, and the default option of every other group
        name = label.split(" ")[0]
        if name == "conf/config.yaml":
            top = values  # `_self_` comes last in the defaults list
        elif name == f"{group}={option}" or (label.endswith("(default)") and not name.startswith(f"{group}=")):
            expected.update({f"{name.split('=')[0]}.{k}": v for k, v in values.items()})
    assert composed == {**expected, **top}
