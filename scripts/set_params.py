"""Set params.yaml values as `dvc exp run -S key=value` does, without running anything.

`make run DATA=...` uses it before a plain `dvc repro`: `dvc exp run` first checks out every output
that dvc.lock records, and on a fresh clone, with no dvc.lock, it warns once per output that it has
nothing to check out. Values are YAML (`null`, `0.3`, `[a, b]`); a round trip keeps every comment,
and every other line as it was.

    python scripts/set_params.py data.url=/path/to/flower_photos.tgz data.sha256=null
"""

import sys
from pathlib import Path

import yaml
from ruamel.yaml import YAML


def _round_trip() -> YAML:
    loader = YAML()
    loader.width = 4096  # never wrap a long line
    loader.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return loader


def set_params(assignments: list[str], path: str = "params.yaml") -> None:
    loader = _round_trip()
    params = loader.load(Path(path))
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            sys.exit(f"set_params: {assignment!r} is not key=value")
        *parents, leaf = key.split(".")
        section = params
        for name in parents:
            if not isinstance(section.get(name), dict):
                sys.exit(f"set_params: {path} has no section {name!r} (in {key})")
            section = section[name]
        if leaf not in section:
            sys.exit(f"set_params: {path} has no key {key!r}")
        section[leaf] = yaml.safe_load(value)
    loader.dump(params, Path(path))


if __name__ == "__main__":
    set_params(sys.argv[1:])
