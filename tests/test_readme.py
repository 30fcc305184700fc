"""The README must stay true: its commands are the ones CI runs, and its config reference is complete."""

import dataclasses
import os
import re
import typing

import yaml

from conftest import ROOT
from pretrain.config import Config
from pretrain.config_loading import _coerce


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


owner = {}  # dotted field name -> the dataclass that declares it


def fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from fields(type(default), prefix + f.name + ".")
        else:
            owner[prefix + f.name] = cls
            yield prefix + f.name, default


def test_every_config_field_is_in_the_reference_with_its_default():
    text = readme()
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", text, flags=re.M))
    for name, default in fields(Config):
        assert name in rows, f"{name} is missing from the README's config reference"
        shown = rows[name]
        if default is None:
            assert shown == "null", name
        elif isinstance(default, bool):
            assert shown == str(default).lower(), name
        elif isinstance(default, float):
            assert float(shown) == default, name
        elif isinstance(default, (list, dict)):  # shown as YAML that loads to the default
            hint = typing.get_type_hints(owner[name])[name.split(".")[-1]]
            assert _coerce(hint, yaml.safe_load(shown), name) == default, name
        else:
            assert shown == str(default), name
    documented = set(rows)
    assert documented == {name for name, _ in fields(Config)}, "README documents fields that do not exist"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    command = next(line for line in readme().splitlines() if "pytest" in line and line.startswith("pip install"))
    assert command in ci
