"""The params every test starts from: tests/params.default.yaml, never the workspace's params.yaml.

A user's `dvc exp run -S train.search.trials=10` rewrites the workspace's params.yaml; tests that
read it would test the user's experiment instead of the code. Tests build what they depend on here:
`default_params(**{"train.epochs": 3})` validated, `default_raw(...)` as a mapping, and
`write_params(root, ...)` as a project's params.yaml. Keys are dotted paths, any depth
(`train.search.trials`).
"""

import copy
from pathlib import Path

import yaml

from retrain.params import Params, parse_params

DEFAULTS_FILE = Path(__file__).resolve().with_name("params.default.yaml")
_DEFAULTS = yaml.safe_load(DEFAULTS_FILE.read_text())


def apply_changes(raw: dict, changes: dict) -> dict:
    """raw with each dotted key set to its value, in place; a key path that does not exist is a KeyError."""
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        section = raw
        for name in sections:
            section = section[name]
        if key not in section:
            raise KeyError(f"{dotted}: not a key of params.yaml")
        section[key] = value
    return raw


def default_raw(**changes) -> dict:
    """A fresh copy of the tests' params mapping with dotted changes applied."""
    return apply_changes(copy.deepcopy(_DEFAULTS), changes)


def default_params(**changes) -> Params:
    """The tests' params with dotted changes applied, validated like params.yaml."""
    return parse_params(default_raw(**changes), DEFAULTS_FILE)


def write_params(root: Path, **changes) -> Path:
    """Write the tests' params (with changes) as root/params.yaml; returns its path."""
    path = Path(root) / "params.yaml"
    path.write_text(yaml.safe_dump(default_raw(**changes), sort_keys=False))
    return path
