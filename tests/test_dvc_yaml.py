"""dvc.yaml tells the truth: each stage declares every retrain module it runs and every file it reads.

A stage's code is its script plus every `retrain` module it imports, directly or through others
(imports inside functions count: they run too). If dvc.yaml misses one, a change there would not
rerun the stage, and `dvc repro` would leave stale outputs. The same for the `paths.*` a stage
script names: each must be a dep or an out. `paths.RUNS_DIR` is exempt: the other stages'
provenance files are what the MLflow run records about reuse, not inputs of the stage's outputs.
"""

import ast
from pathlib import Path

import pytest
import yaml

from retrain import paths

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
EXEMPT_PATHS = {"RUNS_DIR"}


def _module_file(dotted: str) -> Path | None:
    base = REPO / Path(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(file: Path) -> set[Path]:
    """retrain module files that `file` imports anywhere in its body, and their packages' __init__."""
    package = ".".join(file.relative_to(REPO).with_suffix("").parts)
    if file.name == "__init__.py":
        package = package.removesuffix(".__init__")
    else:
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "retrain" or name.startswith("retrain."):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # importing retrain.a.b runs retrain/__init__ and retrain/a/__init__
                    module_file = _module_file(".".join(parts[:i]))
                    if module_file:
                        found.add(module_file)
    return found


def code_of(script: Path) -> set[Path]:
    """The script and the transitive closure of the retrain modules it imports."""
    seen, todo = set(), [script]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(_imports(file) - seen)
    return seen


def _covered(path: Path, declared: list[str]) -> bool:
    relative = path.relative_to(REPO) if path.is_absolute() else path
    return any(relative == Path(d) or Path(d) in relative.parents for d in declared)


def _declared(stage: dict, *kinds: str) -> list[str]:
    entries = []
    for kind in kinds:
        for entry in stage.get(kind) or []:
            entries.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return entries


def _paths_named(script: Path) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths"}


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_declares_every_module_it_runs(name):
    stage = STAGES[name]
    script = REPO / "stages" / f"{name}.py"
    assert stage["cmd"] == f"python stages/{name}.py"
    missing = sorted(str(f.relative_to(REPO)) for f in code_of(script) if not _covered(f, _declared(stage, "deps")))
    assert not missing, f"stage {name} runs code dvc.yaml does not list as deps: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_declares_every_path_it_names(name):
    stage = STAGES[name]
    declared = _declared(stage, "deps", "outs", "metrics", "plots")
    named = [getattr(paths, attr) for attr in _paths_named(REPO / "stages" / f"{name}.py") - EXEMPT_PATHS]
    # A folder that holds declared outputs (mkdir before writing them) counts as declared.
    missing = sorted(str(path) for path in named if isinstance(path, Path) and not _covered(path, declared)
                     and not any(path in Path(d).parents for d in declared))
    assert not missing, f"stage {name} names paths dvc.yaml lists neither as deps nor outs: {missing}"


def test_every_stage_records_its_provenance():
    for name, stage in STAGES.items():
        assert f"data/runs/{name}.json" in _declared(stage, "outs"), name


def test_the_checker_sees_indirect_imports():
    # export imports retrain.export, which imports retrain.images: the closure must contain both.
    files = {str(f.relative_to(REPO)) for f in code_of(REPO / "stages" / "export.py")}
    assert {"retrain/export.py", "retrain/images.py", "retrain/tracking.py", "retrain/__init__.py"} <= files
