"""The one helper that builds a throwaway git + DVC project, for tests and benchmarks alike.

`make_project` copies this repo's dvc.yaml, stages/ and retrain/ into a temporary repo and writes
the tests' own params (tests/default_params.py), never the workspace's params.yaml; `run` runs a
command there with this venv's tools on PATH; `serve_folder` serves archives on loopback;
`wait_for_queue` waits for `dvc queue` to drain. Tests pass every param they depend on through
`set_params`.
"""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from default_params import apply_changes, write_params
from imagegen import make_tgz
from retrain.download import file_sha256

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASSES = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class serve_folder:
    """`with serve_folder(path) as url:` serves path over HTTP on loopback until the block ends."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def run(cwd: Path, *command: str, check: bool = True, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def every_stage(root: Path) -> list[str]:
    """The project's stages in dvc.yaml's order (DVC's order too: each stage follows its inputs)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]


def set_params(root: Path, **changes) -> None:
    """Change dotted keys (`train.search.trials`) in the project's params.yaml."""
    params = apply_changes(yaml.safe_load((root / "params.yaml").read_text()), changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def wait_for_queue(root: Path, timeout: float = 600) -> str:
    """`dvc queue status` once nothing is queued or running; AssertionError if still busy after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(root, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"queue still busy after {timeout} s:\n{status}")
        time.sleep(3)


def publish(images: Path, served: Path) -> str:
    """Pack the image folder as flowers.tgz where the server serves it; return its sha256."""
    return file_sha256(make_tgz(images, served / "flowers.tgz", arcname="flowers"))


def make_project(root: Path, url: str, sha: str, backbone: Path, **overrides) -> Path:
    """A git + DVC repo holding this project's pipeline, pointed at the served archive; `overrides`
    (dotted params) are committed with it."""
    for name in ("dvc.yaml", ".gitignore", "exclusions.csv"):  # what a clone has beside the code
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "retrain"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(
        root,
        **{
            "data.url": url,
            "data.sha256": sha,
            "data.testing_percentage": 25,
            "data.validation_percentage": 20,
            "backbone.name": str(backbone),
            "train.learning_rate": 0.05,
            "train.epochs": 40,
            "train.early_stopping_patience": 10,
            "evaluate.top_k": [1, 2],
            "export.top_k": 2,
            **overrides,
        },
    )
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    for name in (".dvc/config", ".dvcignore"):  # the project's DVC settings, as a clone has them
        shutil.copy(REPO / name, root / name)
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline")
    return root


def generated_project(tmp_path_factory, name: str, backbone: Path, per_class: int = 12) -> Path:
    """A project on generated class images published as a checksummed .tgz: no TFLite, 20 epochs."""
    from imagegen import make_class_folders

    folder = tmp_path_factory.mktemp("images")
    make_class_folders(folder / "flowers", CLASSES, per_class=per_class, size=(64, 64))
    (folder / "archive").mkdir()
    sha = publish(folder / "flowers", folder / "archive")
    # Committed with the pipeline: a params.yaml rewritten just after a commit, at the same size, can
    # look unchanged to git (same mtime tick), so a clone would get the old values.
    return make_project(
        tmp_path_factory.mktemp(name), str(folder / "archive/flowers.tgz"), sha, backbone, **{"train.epochs": 20}
    )
