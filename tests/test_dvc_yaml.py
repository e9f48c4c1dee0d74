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
from pydantic import BaseModel

from retrain import paths
from retrain.params import Params

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
    return {
        node.attr
        for node in ast.walk(ast.parse(script.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths"
    }


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
    missing = sorted(
        str(path)
        for path in named
        if isinstance(path, Path)
        and not _covered(path, declared)
        and not any(path in Path(d).parents for d in declared)
    )
    assert not missing, f"stage {name} names paths dvc.yaml lists neither as deps nor outs: {missing}"


def test_every_stage_records_its_provenance():
    for name, stage in STAGES.items():
        assert f"data/runs/{name}.json" in _declared(stage, "outs"), name


def test_only_the_log_stage_reaches_mlflow():
    """Tracking is one step: every other stage writes its record and never imports MLflow (1.5-9 s)."""
    for name in STAGES:
        reaching = sorted(
            str(f.relative_to(REPO)) for f in code_of(REPO / "stages" / f"{name}.py") if "mlflow" in _top_modules(f)
        )
        assert bool(reaching) == (name == "log"), f"stage {name} reaches MLflow through {reaching}"


def _top_modules(file: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_checker_sees_indirect_imports():
    # export imports retrain.tf.export, which imports retrain.tf.graph_images: the closure must contain both.
    files = {str(f.relative_to(REPO)) for f in code_of(REPO / "stages" / "export.py")}
    assert {"retrain/tf/export.py", "retrain/tf/graph_images.py", "retrain/records.py", "retrain/__init__.py"} <= files


# --- params: each stage declares every params.<section>.<key> it reads ---------------------------
#
# A read is an attribute chain on the params object (`params.export.top_k`, `params.seed`), found
# in every module of the stage's closure that calls load_params(). A whole section handed to a
# retrain function (`Limits.of(params.data)`) counts as the keys that function reads from it;
# handed anywhere else, or copied (`params.train.model_copy(...)`), as the whole section.
# tracking's calls are exempt: it logs every param and reads tracking.experiment (where the run
# goes) and data.url (the dataset input it records), none of them an input of the stage's outputs.

EXEMPT_MODULES = {"tracking"}


def _nested_model(model, field: str):
    annotation = model.model_fields[field].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _chain(node) -> tuple[str, list[str]] | None:
    """(root name, attributes) of `a.b.c`, or None when the chain does not start at a plain name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.insert(0, node.attr)
        node = node.value
    return (node.id, attrs) if isinstance(node, ast.Name) else None


class _Module:
    """One retrain module or stage script: its functions, classes' methods and imported names."""

    def __init__(self, file: Path):
        self.file, self.tree = file, ast.parse(file.read_text())
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for cls in (n for n in self.tree.body if isinstance(n, ast.ClassDef)):
            self.functions.update({f"{cls.name}.{n.name}": n for n in cls.body if isinstance(n, ast.FunctionDef)})
        self.imports = {}  # local name -> (module file, name in it or None for the module itself)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrain"):
                for alias in node.names:
                    submodule = _module_file(f"{node.module}.{alias.name}")
                    self.imports[alias.asname or alias.name] = (
                        (submodule, None) if submodule else (_module_file(node.module), alias.name)
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("retrain.") and alias.asname:
                        self.imports[alias.asname] = (_module_file(alias.name), None)


class _ParamReads:
    """The dotted params keys a stage reads (see the comment above)."""

    def __init__(self):
        self.modules, self.reads = {}, set()

    def module(self, file: Path) -> _Module:
        if file not in self.modules:
            self.modules[file] = _Module(file)
        return self.modules[file]

    def scan_closure(self, script: Path) -> set[str]:
        for file in sorted(code_of(script)):
            if file.stem not in EXEMPT_MODULES:
                self.scan(self.module(file), self.module(file).tree, {}, depth=0)
        return self.reads

    def scan(self, module: _Module, body, roots: dict, depth: int) -> None:
        """Record the reads in `body`; roots: name -> (key path, model) of names holding params."""
        roots = dict(roots)
        for _ in range(3):  # aliases: params = load_params(); data = params.data
            for node in ast.walk(body):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    value = node.value
                    if isinstance(value, ast.Call) and _chain(value.func) in (
                        ("load_params", []),
                        ("params", ["load_params"]),
                    ):
                        roots[node.targets[0].id] = ("", Params)
                    elif (resolved := self.resolve(value, roots)) and resolved[1] is not None and not resolved[2]:
                        roots[node.targets[0].id] = resolved[:2]
        parents = {child: node for node in ast.walk(body) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(body):
            if isinstance(parents.get(node), ast.Attribute) or not (resolved := self.resolve(node, roots)):
                continue  # only whole chains: `params.export.top_k`, not its `params.export`
            path, model, extra = resolved
            if model is None:
                self.reads.add(path)
            elif not extra:  # a section (or all params) handed on
                self.handed_on(module, node, parents.get(node), path, model, depth)
            else:  # a method of the section: model_copy, model_dump
                self.reads.add(path or "(all params)")

    def resolve(self, node, roots):
        """(key path, model or None for a leaf, attributes left over) of a chain on a root, or None."""
        if not isinstance(node, (ast.Attribute, ast.Name)) or not isinstance(node.ctx, ast.Load):
            return None
        chain = _chain(node)
        if not chain or chain[0] not in roots:
            return None
        (path, model), attrs = roots[chain[0]], chain[1]
        while attrs and model is not None and attrs[0] in model.model_fields:
            path, model, attrs = f"{path}.{attrs[0]}".lstrip("."), _nested_model(model, attrs[0]), attrs[1:]
        return path, model, attrs

    def handed_on(self, module: _Module, node, call, path: str, model, depth: int) -> None:
        """A section (or all params) passed on: into a retrain function, read there; else read whole."""
        if isinstance(call, ast.Call) and node is not call.func:
            chain = _chain(call.func)
            source = module.imports.get(chain[0], (None,))[0] if chain else None
            if chain and (chain[0] in EXEMPT_MODULES or (source and source.stem in EXEMPT_MODULES)):
                return
            target = self.callee(module, call.func) if depth < 6 else None
            name = _parameter(target[1], call, node) if target else None
            if name:
                return self.scan(target[0], target[1], {name: (path, model)}, depth + 1)
        self.reads.add(path or "(all params)")

    def callee(self, module: _Module, func):
        """(module, function definition) that `f(...)`, `mod.f(...)` or `Class.method(...)` calls, if in retrain."""
        chain = _chain(func)
        if not chain or len(chain[1]) > 1:
            return None
        name, attrs = chain
        if not attrs:
            if name in module.functions:
                return module, module.functions[name]
            source, attr = module.imports.get(name, (None, None))
            return (
                (self.module(source), self.module(source).functions[attr])
                if source and attr in self.module(source).functions
                else None
            )
        source, attr = module.imports.get(name, (None, None))
        if source is None:
            key, found = f"{name}.{attrs[0]}", module
        else:
            found = self.module(source)
            key = f"{attr}.{attrs[0]}" if attr else attrs[0]
        return (found, found.functions[key]) if key in found.functions else None


def _parameter(function, call: ast.Call, argument) -> str | None:
    """The name `function` gives `argument` of `call` (positional or keyword), or None."""
    names = [a.arg for a in function.args.posonlyargs + function.args.args]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    for index, given in enumerate(call.args):
        if given is argument:
            return names[index] if index < len(names) else None
    return next((k.arg for k in call.keywords if k.value is argument), None)


def _declared_params(stage: dict) -> list[str]:
    return [key for entry in stage.get("params") or [] for key in ([entry] if isinstance(entry, str) else entry)]


def param_reads(name: str) -> set[str]:
    return _ParamReads().scan_closure(REPO / "stages" / f"{name}.py")


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_declares_every_param_it_reads(name):
    declared = _declared_params(STAGES[name])
    missing = sorted(key for key in param_reads(name) if not any(key == d or key.startswith(f"{d}.") for d in declared))
    assert not missing, f"stage {name} reads params dvc.yaml does not declare: {missing}"


def test_the_checker_sees_params_read_through_functions_and_sections():
    # export_variants(..., params.export, params.seed, ...): the keys it reads, and the int8 sample's seed
    assert {"seed", "export.top_k", "export.representative_images", "evaluate.min_accuracy"} <= param_reads("export")
    # Limits.of(params.data) reads four keys of the section, not the whole of it
    assert {"data.max_download_bytes", "data.max_compression_ratio", "data.url"} <= param_reads("download")
    assert "data" not in param_reads("download") and "tracking.experiment" not in param_reads("download")


def test_compiled_bytecode_does_not_change_a_code_dependency(tmp_path):
    """Stages depend on the `retrain` folder: the __pycache__ Python writes there on import (as it
    does on a user's machine) must not make every stage out of date."""
    import os
    import subprocess
    import sys

    from project import run

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mod.py").write_text("VALUE = 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: echo done > out.txt\n    deps:\n    - lib\n    outs:\n    - out.txt\n"
    )
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    (tmp_path / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    run(tmp_path, "dvc", "repro", "-q")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import mod"], cwd=tmp_path / "lib", env=env, check=True)
    assert list((tmp_path / "lib" / "__pycache__").glob("mod.*.pyc"))
    status = run(tmp_path, "dvc", "status", "--json")
    assert status.stdout.strip() == "{}", status.stdout
