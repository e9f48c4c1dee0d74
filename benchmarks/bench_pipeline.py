"""Part B of benchmarks/run.py: the real pipeline in a temporary git + DVC project, timed per stage.

Builds the project with tests/project.py's `make_project` (the one project builder; run.py puts
tests/ on sys.path) with efficientnet_lite0 and the image folder as `data.url`, then puts back the
tests' default params (tests/params.default.yaml, the shipped defaults) that the builder tunes for
tiny test data. Stage processes are polled with psutil for their own lifetime and peak RSS, so
`dvc`'s own start-up is not charged to a stage.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import psutil

from default_params import write_params
from project import BIN, make_project, ran_stages, run, set_params

GENERATED_CLASSES = {
    "daisy": (240, 240, 230),
    "dandelion": (240, 200, 30),
    "roses": (200, 30, 60),
    "sunflowers": (250, 170, 20),
    "tulips": (230, 80, 150),
}


def image_folder(data: Path, sha256: str, dest: Path, limit: int | None) -> tuple[Path, str]:
    """(folder of class folders, description): the real archive extracted, or generated JPEGs."""
    if data.is_file():
        digest = _sha256(data)
        if data.name == "flower_photos.tgz" and digest != sha256:
            raise SystemExit(f"{data}: sha256 {digest}, expected {sha256}; the file is damaged")
        with tarfile.open(data) as archive:
            archive.extractall(dest, filter="data")
        root = next(p for p in dest.iterdir() if p.is_dir())
        source = f"real JPEGs from {data.name} (sha256 {digest[:12]}…)"
    elif data.is_dir():
        root = dest / data.name
        shutil.copytree(data, root)
        source = f"images from {data}"
    else:
        from imagegen import make_class_folders

        print(f"{data} is absent (a user's clone has no ../shared): using generated JPEGs instead")
        per_class = -(-(limit or 2400) // len(GENERATED_CLASSES))
        make_class_folders(dest / "generated", GENERATED_CLASSES, per_class=per_class, size=(320, 240))
        root, source = dest / "generated", "generated JPEGs 320x240 (real data absent)"
    if limit:
        _keep_first(root, limit)
    count = sum(1 for _ in image_paths(root))
    return root, f"{source}: {count} images"


def image_paths(root: Path) -> list[Path]:
    """Every image under root/<class>/, round-robin over classes so any prefix stays balanced."""
    per_class = [
        sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        for folder in sorted(root.iterdir())
        if folder.is_dir()
    ]
    ordered = []
    for i in range(max(map(len, per_class), default=0)):
        ordered += [files[i] for files in per_class if i < len(files)]
    return ordered


def _keep_first(root: Path, limit: int) -> None:
    for path in image_paths(root)[limit:]:
        path.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bench_cache(root: Path) -> Path:
    """Point RETRAIN_CACHE_DIR at a fresh folder (cold features) that reuses the converted backbone
    and its XNNPACK conversion (both made once, ever, in the user's cache)."""
    from retrain.backbones import load_backbone, xnnpack
    from retrain.backbones.efficientnet_lite import convert

    converted = Path(convert())
    tflite = xnnpack.tflite_path(load_backbone("efficientnet_lite0", runtime="xnnpack").weights_id)
    (root / "backbones").mkdir(parents=True)
    for made in (converted, tflite):
        (root / "backbones" / made.name).symlink_to(made)
    os.environ["RETRAIN_CACHE_DIR"] = str(root)
    # The backbone's checked id, memoised under this root as a stage would find it: otherwise the
    # first stage that loads it pays for TensorFlow's check of the module (seconds) in its timing.
    load_backbone("efficientnet_lite0", runtime="xnnpack")
    return root


def distinct_copy(source: Path, target: Path, k: int) -> None:
    """The same JPEG with k bytes after its end marker: decoders ignore them, sha256 differs."""
    target.write_bytes(source.read_bytes() + b"\0" * k)


def polled(cwd: Path, command: list[str], marker: str) -> dict:
    """Run command; for the child process whose command line holds marker: lifetime and peak RSS."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = open(cwd / ".bench.log", "w")
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    stage = {"peak_rss": 0, "first": None, "last": None}
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            for child in parent.children(recursive=True):
                try:
                    if marker in " ".join(child.cmdline()):
                        stage["peak_rss"] = max(stage["peak_rss"], child.memory_info().rss)
                        stage["first"] = stage["first"] or child.create_time()
                        stage["last"] = time.time()
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    log.close()
    output = (cwd / ".bench.log").read_text()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return {
        "wall_s": round(wall, 2),
        "stage_s": round(stage["last"] - stage["first"], 2) if stage["first"] else None,
        "peak_rss_mb": round(stage["peak_rss"] / 2**20, 1),
        "ran": ran_stages(_Result(output)),
        "log": output[-2000:],
    }


class _Result:  # ran_stages reads .stdout
    def __init__(self, stdout):
        self.stdout = stdout


def timed(root: Path, *command: str) -> tuple[float, list[str]]:
    start = time.perf_counter()
    result = run(root, *command)
    return round(time.perf_counter() - start, 2), ran_stages(result)


def output_bytes(root: Path) -> int:
    """Size of the arrays the bottlenecks stage writes (they are in memory once, while written)."""
    return sum(p.stat().st_size for p in (root / "data/features").glob("*.npz"))


def stats(root: Path) -> dict:
    return json.loads((root / "data/bottlenecks.json").read_text())


def pipeline_figures(images: Path, work: Path, cache: Path, ceiling_now) -> dict:
    """Cold and incremental bottlenecks, train, no-op repro and 4x memory on the whole folder.

    ceiling_now() measures part A's ceiling once more: the cold stage is bracketed by it, so its
    ratio compares figures taken within the same minute or so on a machine whose speed drifts.
    """
    (work / "project").mkdir()
    root = make_project(work / "project", str(images), None, "efficientnet_lite0")
    # The shipped defaults, not make_project's tuning for 48 tiny images; issue #7 measures the
    # photos' own features (augmented views would add 5x work per run).
    write_params(
        root,
        **{"data.url": str(images), "data.sha256": None, "backbone.name": "efficientnet_lite0", "augment.copies": 0},
    )
    out = {"_project": root, "images": sum(1 for _ in image_paths(images))}

    out["split_s"], _ = timed(root, "dvc", "repro", "split")
    print("B: cold bottlenecks stage ...", flush=True)
    out["ceiling_before_cold"] = ceiling_now()
    out["cold"] = polled(root, ["dvc", "repro", "bottlenecks"], "stages/bottlenecks.py")
    out["ceiling_after_cold"] = ceiling_now()
    out["cold"]["stats"] = stats(root)
    out["cold"]["output_bytes"] = output_bytes(root)
    print("B: train ...", flush=True)
    out["train"] = polled(root, ["dvc", "repro", "train"], "stages/train.py")
    out["train"]["epochs"] = sum(1 for _ in open(root / "data/train/history.csv")) - 1
    out["train"]["fit_s"] = float(
        re.search(r"head trained for \d+ epochs in ([0-9.]+) s", out["train"]["log"]).group(1)
    )
    print("B: evaluate + export ...", flush=True)
    out["evaluate_export_s"], _ = timed(root, "dvc", "repro")
    out["test_accuracy"] = json.loads((root / "data/evaluate/metrics.json").read_text()).get("accuracy")
    noop = [timed(root, "dvc", "repro") for _ in range(2)]
    out["noop"] = {"wall_s": [s for s, _ in noop], "ran": [r for _, r in noop]}

    print("B: 10 new images ...", flush=True)
    for i, path in enumerate(image_paths(images)[:10]):
        distinct_copy(path, path.with_name(f"bench_new_{i}.jpg"), 1)
    run(root, "dvc", "repro", "--force", "download")
    run(root, "dvc", "repro", "split")
    out["incremental"] = polled(root, ["dvc", "repro", "bottlenecks"], "stages/bottlenecks.py")
    out["incremental"]["stats"] = stats(root)

    print("B: the set 4x for memory ...", flush=True)
    x4 = work / "x4" / images.name
    for path in [p for p in image_paths(images) if not p.name.startswith("bench_new_")]:
        (x4 / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, x4 / path.parent.name / path.name)
        for k in (1, 2, 3):
            distinct_copy(path, x4 / path.parent.name / f"{path.stem}_x{k}{path.suffix}", k)
    set_params(root, **{"data.url": str(x4)})
    run(root, "dvc", "repro", "split")
    out["x4"] = polled(root, ["dvc", "repro", "bottlenecks"], "stages/bottlenecks.py")
    out["x4"]["stats"] = stats(root)
    out["x4"]["output_bytes"] = output_bytes(root)
    out["x4"]["images"] = out["images"] * 4
    return out
