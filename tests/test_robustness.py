"""Bad input gets a clear message and nothing is lost: a corpus of awkward files through the real
split and bottlenecks stages, stages run with their inputs missing, SIGKILLs in the middle of
bottlenecks and train, two from-scratch pipelines compared bit for bit, and a scan for unsafe loads.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from default_params import write_params
from imagegen import image_bytes, jpeg_with_orientation, make_class_folders, png_16bit_bytes, png_header_only
from project import REPO, make_project, run, set_params

CLASSES = {"red": (230, 20, 20), "blue": (30, 40, 230)}


def _stage_function(name: str):
    """The stage's function (split, bottlenecks...) from stages/<name>.py, run in this process."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _plain_project(root: Path, backbone: Path, **params) -> Path:
    """A folder with the tests' params.yaml, where stage scripts run without DVC (their cwd is the project)."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, **{"data.url": "unused", "data.sha256": None, "backbone.name": str(backbone), **params})
    return root


def _csv(path: Path) -> dict[str, str]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


# --- 1. a corpus of awkward files --------------------------------------------------------------


def _animated_gif() -> bytes:
    import io

    frames = [Image.new("RGB", (40, 30), colour) for colour in [(230, 20, 20), (20, 230, 20), (20, 20, 230)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


GOOD = {  # name in the red folder: bytes (every one must be used)
    "png_named.jpg": image_bytes("PNG", CLASSES["red"], seed=1),
    "webp_named.jpg": image_bytes("WEBP", CLASSES["red"], seed=2),
    "bmp_named.jpg": image_bytes("BMP", CLASSES["red"], seed=3),
    "animated.gif": _animated_gif(),
    "sixteen_bit.png": png_16bit_bytes(),
    "grayscale.jpg": image_bytes("JPEG", CLASSES["red"], seed=4, mode="L"),
    "cmyk.jpg": image_bytes("JPEG", CLASSES["red"], seed=5, mode="CMYK"),
    "rgba.png": image_bytes("PNG", CLASSES["red"], seed=6, mode="RGBA"),
    "rosé été.jpg": image_bytes("JPEG", CLASSES["red"], seed=7),
    "向日葵.JPG": image_bytes("JPEG", CLASSES["red"], seed=8),
    "exif_rotated.jpg": jpeg_with_orientation(6, size=(48, 32), seed=9),
}
_JPEG = image_bytes("JPEG", CLASSES["red"], (200, 150), seed=10)
BAD = {  # name in the red folder: (bytes, the reason rejected.csv must give)
    "empty.jpg": (b"", "empty file"),
    "truncated.jpg": (_JPEG[: len(_JPEG) * 2 // 3], "truncated JPEG"),
    "damaged_header.png": (b"\x89PNG\r\n\x1a\n" + bytes(40), "corrupt PNG (damaged header)"),
    "huge.png": (
        png_header_only(100_000, 100_000),  # 30 GB if decoded: rejected from the header
        "image is 100000x100000 = 10000 MP, over the 89 MP limit (data.max_image_pixels)",
    ),
    "notes.txt": (b"holiday photos, see the other folder\n", "not an image (text file)"),
    "scan.tiff": (image_bytes("TIFF"), "TIFF image: format not supported (use JPEG, PNG, GIF, BMP or WebP)"),
    ".DS_Store": (b"\0\0\0\1Bud1" + bytes(100), "hidden file, skipped"),
    ".hidden.jpg": (_JPEG, "hidden file, skipped"),
}


def _write_corpus(root: Path) -> None:
    make_class_folders(root, CLASSES, per_class=3, size=(48, 48))
    for name, data in GOOD.items():
        (root / "red" / name).write_bytes(data)
    for name, (data, _) in BAD.items():
        (root / "red" / name).write_bytes(data)
    (root / "blue" / ".thumbnails").mkdir()
    (root / "blue" / ".thumbnails" / "t.jpg").write_bytes(_JPEG)
    os.symlink("..", root / "blue" / "loop")
    os.symlink("gone.jpg", root / "blue" / "dangling.jpg")
    os.symlink(root / "red" / "rgba.png", root / "blue" / "linked.png")  # a good link is followed


def test_every_awkward_file_is_used_or_rejected_with_a_reason_and_serving_sees_the_same_pixels(
    tmp_path, tiny_backbone, monkeypatch
):
    from retrain.backbones import load_backbone
    from retrain.tf.export import build_classifier, load_model, save_classifier

    root = _plain_project(tmp_path / "project", tiny_backbone, **{"bottlenecks.batch_size": 4})
    corpus = root / "data" / "raw" / "corpus"
    _write_corpus(corpus)
    monkeypatch.chdir(root)
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    _stage_function("split")()
    _stage_function("bottlenecks")()

    used = _csv(root / "data/split.csv")
    good = {f"data/raw/corpus/red/{name}" for name in GOOD} | {"data/raw/corpus/blue/linked.png"}
    good |= {f"data/raw/corpus/{c}/{c}_{i:04d}.jpg" for c in CLASSES for i in range(3)}
    assert set(used) == good
    rejected = {path: row["reason"] for path, row in _csv(root / "data/rejected.csv").items()}
    expected = {f"data/raw/corpus/red/{name}": reason for name, (_, reason) in BAD.items()}
    expected.update(
        {
            "data/raw/corpus/blue/.thumbnails": "hidden folder, skipped",
            "data/raw/corpus/blue/loop": "symlink loop (links to a folder already scanned), skipped",
            "data/raw/corpus/blue/dangling.jpg": "broken symlink",
        }
    )
    assert rejected == expected

    featured = {}
    for split in ("train", "validation", "test"):
        with np.load(root / f"data/features/{split}.npz", allow_pickle=False) as arrays:
            featured.update(zip((str(p) for p in arrays["paths"]), arrays["features"]))
    assert set(featured) == good  # every usable image got features, and nothing else did
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    assert stats["computed"] == len({row["sha256"] for row in used.values()})

    # The served model decodes with the same function: an identity head returns the features.
    backbone = load_backbone(str(tiny_backbone))
    dim = backbone.feature_dim
    # (softmax of them: the last layer is always a softmax, and it is one-to-one up to a shift).
    from retrain.head import Head, softmax

    identity = Head([np.eye(dim, dtype=np.float32)], [np.zeros(dim, np.float32)], ["softmax"])
    save_classifier(
        build_classifier(backbone, identity, [f"f{i}" for i in range(dim)], 1), tmp_path / "m", tflite=False
    )
    serve = load_model(tmp_path / "m").signatures["serving_default"]
    rotated, upright = GOOD["exif_rotated.jpg"], jpeg_with_orientation(1, size=(48, 32), seed=9)
    served = serve(image_bytes=np.array([rotated, upright], dtype=object))["probabilities"].numpy()
    expected = softmax(featured["data/raw/corpus/red/exif_rotated.jpg"][None])[0]
    np.testing.assert_allclose(served[0], expected, rtol=1e-4, atol=1e-6)
    shift = np.log(served[0]) - np.log(served[1])  # log-softmax: the features' differences, less a constant
    assert np.ptp(shift) > 1e-3  # the EXIF tag really turned the pixels


# --- 2. a stage missing its input says so in one line ------------------------------------------


def _stage(root: Path, name: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})  # default store
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **popen,
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, says",
    [
        ("split", "data/raw should hold one dataset folder but holds nothing; run: dvc repro download"),
        ("bottlenecks", "data/split.csv: not found; run the split stage first"),
        ("train", "data/features/labels.txt: not found; run the bottlenecks stage first"),
        ("evaluate", "data/finetune/labels.txt: not found; run the bottlenecks stage first"),
        ("export", "data/evaluate/metrics.json: not found; run the evaluate stage first"),
    ],
)
def test_a_stage_run_before_its_inputs_exist_prints_one_error_line(tmp_path, tiny_backbone, stage, says):
    assert says in _error_line(_stage(_plain_project(tmp_path, tiny_backbone), stage))


@pytest.mark.slow
def test_a_typo_in_params_and_a_lone_class_stop_the_split_stage_with_one_line(tmp_path, tiny_backbone):
    root = _plain_project(tmp_path, tiny_backbone)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["min_image_per_class"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert "data.min_image_per_class" in _error_line(_stage(root, "split"))
    _plain_project(root, tiny_backbone)
    make_class_folders(root / "data/raw/photos", {"red": (255, 0, 0)}, per_class=3)
    assert "only one class folder" in _error_line(_stage(root, "split"))


# --- 3. SIGKILL in the middle, then rerun ------------------------------------------------------


def _save_slow_backbone(path: Path, size: int = 32) -> Path:
    """A real SavedModel that is deliberately slow, so a test can stop the bottlenecks stage while
    it is computing: 3,000 dependent 768x768 matmuls per image (~5 GFLOP: ~0.1-0.3 s on these
    cores, 120 images take minutes, far longer than a poll), and a string op that keeps it off
    XNNPACK (which would make it fast) so it runs on TensorFlow as written."""
    import tensorflow as tf

    class Slow(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, images):
            x = tf.reshape(tf.image.resize(images, [16, 16]), [-1, 768])
            mix = tf.eye(768) * 0.999 + 0.0001

            def body(i, y):
                return i + 1, tf.tanh(tf.matmul(y, mix))

            _, y = tf.while_loop(lambda i, y: i < 3000, body, [tf.constant(0), x])
            y = tf.strings.to_number(tf.strings.as_string(y[:, :9], precision=9))  # not a TFLite built-in
            return tf.concat([tf.reduce_mean(images, axis=[1, 2]), y], axis=1)

    tf.saved_model.save(Slow(), str(path))
    return path


def _wait_for(process: subprocess.Popen, ready, what: str, timeout_s: float = 600) -> None:
    """Return as soon as `ready()` holds (polled); fail if `process` ended first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise AssertionError(
                f"the stage ended before {what}: {(process.stderr.read() if process.stderr else '')[-2000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


def _kill_when(process: subprocess.Popen, ready, what: str, timeout_s: float = 600, sig=signal.SIGKILL) -> None:
    """Send `sig` to `process` as soon as `ready()` holds (polled) and wait; fail if it ended first.
    On any failure the process is SIGKILLed too: no stage outlives the test."""
    try:
        _wait_for(process, ready, what, timeout_s)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def _popen_stage(root: Path, name: str, cache: Path, sigint_ignored: bool = False) -> subprocess.Popen:
    """The stage as its own process; sigint_ignored: started as a script's background job (`cmd &`)
    is, with SIGINT ignored, which Python keeps unless the program restores it."""
    env = {**os.environ, "RETRAIN_CACHE_DIR": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen(
        [sys.executable, str(REPO / "stages" / f"{name}.py")],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore,
    )


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A project whose bottlenecks stage was SIGKILLed mid-way; records what the cache held."""
    base = tmp_path_factory.mktemp("killed")
    backbone = _save_slow_backbone(base / "slow_backbone")
    root = _plain_project(
        base / "project",
        backbone,
        **{
            "bottlenecks.batch_size": 1,
            "train.epochs": 2,
            "train.batch_size": 8,
            "data.validation_percentage": 20,
            "data.testing_percentage": 20,
        },
    )
    make_class_folders(root / "data/raw/photos", CLASSES, per_class=60, size=(32, 32))
    cache = base / "cache"
    assert _stage(root, "split").returncode == 0
    entries = lambda: [p for p in cache.glob("features/*/*/*/*.npy") if not p.name.startswith(".tmp-")]  # noqa: E731
    process = _popen_stage(root, "bottlenecks", cache)
    _kill_when(process, lambda: len(entries()) >= 5, "5 cached features")
    return {"root": root, "cache": cache, "entries": entries, "backbone": backbone, "killed_rc": process.returncode}


@pytest.mark.slow
def test_a_killed_bottlenecks_stage_reruns_only_the_missing_features_and_skips_damaged_entries(killed):
    root, done = killed["root"], killed["entries"]()
    assert killed["killed_rc"] == -signal.SIGKILL and 5 <= len(done) < 120
    assert not (root / "data/features/train.npz").exists()
    # Ctrl-C keeps what SIGKILL keeps, and says so in one line instead of a traceback; also when the
    # stage was started with SIGINT ignored (a script's background job).
    process = _popen_stage(root, "bottlenecks", killed["cache"], sigint_ignored=True)
    _kill_when(process, lambda: len(killed["entries"]()) >= len(done) + 3, "3 more cached features", sig=signal.SIGINT)
    err = process.stderr.read()
    assert process.returncode == 130, err[-3000:]
    assert (
        "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted: finished work is kept; rerun to go on"
    ), err
    assert not list(killed["cache"].rglob(".tmp-*")) and not (root / "data/features/train.npz").exists()
    done = killed["entries"]()
    assert len(done) < 120
    # A damaged entry (a disk that lost the file's tail) must be detected, not read.
    damaged = done[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = _stage(root, "bottlenecks", {"RETRAIN_CACHE_DIR": str(killed["cache"])})
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    assert stats["images"] == 120
    assert stats["cache_hits"] == len(done) - 1 and stats["computed"] == 120 - len(done) + 1

    import tensorflow as tf

    from retrain.backbones import load_backbone
    from retrain.images import load_image

    sha = damaged.stem
    (path,) = [p for p, row in _csv(root / "data/split.csv").items() if row["sha256"] == sha]
    split = _csv(root / "data/split.csv")[path]["split"]
    with np.load(root / f"data/features/{split}.npz", allow_pickle=False) as arrays:
        stored = arrays["features"][[str(p) for p in arrays["paths"]].index(path)]
    backbone = load_backbone(str(killed["backbone"]))
    image = load_image(root / path, backbone.image_size)
    # The stage runs the backbone on XNNPACK where it converts: within 1e-4 of TensorFlow's features.
    np.testing.assert_allclose(stored, backbone.features(tf.constant(image[None])).numpy()[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_killed_train_keeps_the_previous_head_and_its_record(killed):
    from retrain.head import load_head

    root, cache = killed["root"], killed["cache"]
    if not (root / "data/features/train.npz").exists():
        assert _stage(root, "bottlenecks", {"RETRAIN_CACHE_DIR": str(cache)}).returncode == 0
    first = _stage(root, "train", {"RETRAIN_CACHE_DIR": str(cache)})
    assert first.returncode == 0, first.stderr[-3000:]
    head = (root / "data/train/head.npz").read_bytes()
    record = (root / "data/runs/train.json").read_bytes()  # what the log stage would put in MLflow

    set_params(root, **{"train.epochs": 100_000, "train.early_stopping_patience": 100_000, "train.batch_size": 1})
    env = {**os.environ, "RETRAIN_CACHE_DIR": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "train.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "stages" / "train.py")],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _kill_when(process, lambda: "epoch 2/" in log.read_text(), "a finished epoch")  # mid-fit
    assert (root / "data/train/head.npz").read_bytes() == head  # the previous head, intact
    assert (root / "data/runs/train.json").read_bytes() == record  # nothing half-recorded
    assert not list((root / "data/train").glob(".tmp-*")) and not list((root / "data/runs").glob(".tmp-*"))
    load_head(root / "data/train/head.npz")  # whole: it loads

    set_params(root, **{"train.epochs": 2, "train.batch_size": 8})
    again = _stage(root, "train", {"RETRAIN_CACHE_DIR": str(cache)})
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((root / "data/runs/train.json").read_text())
    assert rerun["record_id"] != json.loads(record)["record_id"] and len(rerun["metrics"]["train/loss"]) == 2


# --- 4. same data, same params: same bytes -----------------------------------------------------


@pytest.mark.slow
def test_two_pipelines_from_scratch_give_identical_features_head_and_metrics(tmp_path, tiny_backbone, monkeypatch):
    from retrain.head import load_head

    images = tmp_path / "flowers"
    make_class_folders(images, {**CLASSES, "green": (20, 200, 40)}, per_class=10, size=(48, 48))
    roots = []
    for name in ("first", "second"):
        monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / f"cache-{name}"))  # nothing shared
        (tmp_path / name).mkdir()
        root = make_project(tmp_path / name, str(images), None, tiny_backbone)
        set_params(root, **{"train.epochs": 8})
        run(root, "dvc", "repro", "evaluate")
        roots.append(root)
    first, second = roots
    files = [
        "data/split.csv",
        "data/features/labels.txt",
        "data/features/meta.json",
        "data/evaluate/metrics.json",
        *(f"data/features/{split}.npz" for split in ("train", "validation", "test")),
    ]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for (k1, b1, a1), (k2, b2, a2) in zip(*(load_head(r / "data/train/head.npz").layers for r in roots)):
        assert a1 == a2 and np.array_equal(k1, k2) and np.array_equal(b1, b2)


# --- 5. security: nothing unpickles what a user hands in ----------------------------------------

_UNSAFE = {
    r"\bpickle\.loads?\(": "pickle.load runs code named in the file",
    r"\b(cloudpickle|dill|joblib|marshal|shelve)\.": "these unpickle (or unmarshal) arbitrary objects",
    r"\btorch\.load\(": "torch.load unpickles",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True) unpickles",
    r"\byaml\.(unsafe_)?load\(": "use yaml.safe_load",
    r"safe_mode\s*=\s*False": "Keras' safe_mode=False runs lambdas from the file",
    r"\b(eval|exec)\(": "no eval/exec of data",
}


def test_no_source_file_unpickles_or_evals_user_input():
    offenders = []
    for path in sorted([*REPO.glob("retrain/**/*.py"), *REPO.glob("stages/*.py"), *REPO.glob("benchmarks/**/*.py")]):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            offenders += [
                f"{path.relative_to(REPO)}:{number}: {why}"
                for pattern, why in _UNSAFE.items()
                if re.search(pattern, code)
            ]
    assert offenders == []


class _Runs:
    """Pickles to a call of `function(*args)`, as a hostile weights file would."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _weights_files(folder: Path, payload: object) -> dict[str, Path]:
    """The payload pickled in both layouts the one unpickler reads, with every pickle protocol."""
    import pickle
    import zipfile

    files = {}
    for protocol in (2, 4, 5):
        main = pickle.dumps({"conv.weight": payload}, protocol=protocol)
        legacy = folder / f"legacy-p{protocol}.pth"
        with open(legacy, "wb") as f:  # magic, protocol, sys info, then the main pickle
            for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(main)
        zipped = folder / f"zip-p{protocol}.pth"
        with zipfile.ZipFile(zipped, "w") as zf:
            zf.writestr("archive/data.pkl", main)
        files |= {legacy.name: legacy, zipped.name: zipped}
    return files


@pytest.mark.parametrize("call", ["os.system", "subprocess.check_call", "builtins.exec", "pathlib.Path.touch"])
def test_a_weights_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, call):
    import builtins

    from retrain.backbones.torch_pickle import load_state_dict
    from retrain.errors import RetrainError

    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Runs(os.system, f"touch {marker}"),
        "subprocess.check_call": _Runs(subprocess.check_call, ["touch", str(marker)]),
        "builtins.exec": _Runs(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "pathlib.Path.touch": _Runs(Path.touch, marker),
    }[call]
    for name, path in _weights_files(tmp_path, payload).items():
        with pytest.raises(RetrainError, match="refuses pickle global") as error:
            load_state_dict(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), name
        assert not marker.exists(), f"{name}: the pickle ran {call}"


# --- 6. a full disk, a file-size limit, and the permissions of what is written ------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs the test mounts (needs root, as in CI's container); skipped where mounting is not allowed."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test still runs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Fill the disk with one file until only about `leave_bytes` are free."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.write(bytes(max(0, stats.f_bavail * stats.f_frsize - leave_bytes)))
    return filler


def _one_error_line(capsys, exit_info) -> str:
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def test_a_full_disk_stops_bottlenecks_with_one_line_and_the_rerun_computes_only_the_rest(
    tmp_path, tiny_backbone, small_disk, monkeypatch, capsys
):
    from retrain.errors import exit_on_error

    root = _plain_project(tmp_path / "project", tiny_backbone, **{"bottlenecks.batch_size": 4})
    make_class_folders(root / "data/raw/photos", CLASSES, per_class=30, size=(32, 32))
    monkeypatch.chdir(root)
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(small_disk, cache / "features")  # the feature cache lives on the small disk
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(cache))
    _stage_function("split")()
    filler = _fill(small_disk, leave_bytes=100 * 1024)  # room for ~25 of the 60 entries (a page each)

    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(_stage_function("bottlenecks"))
    line = _one_error_line(capsys, exit_info)
    assert line.startswith(f"error: disk full writing {cache / 'features'}/") or line.startswith(
        f"error: disk full writing {small_disk}/"
    ), line
    assert line.endswith(": free space and rerun; finished work is kept"), line
    entries = [p for p in small_disk.rglob("*.npy")]
    assert not [p for p in entries if p.name.startswith(".tmp-")]  # no temp file left behind
    assert 5 <= len(entries) < 60
    for entry in entries:  # each entry that exists is whole
        vector = np.load(entry, allow_pickle=False)
        assert vector.shape == (12,) and vector.dtype == np.float32 and np.isfinite(vector).all()
    assert not (root / "data/features/train.npz").exists()

    filler.unlink()  # space again: only the missing features are computed
    _stage_function("bottlenecks")()
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    assert (stats["images"], stats["cache_hits"], stats["computed"]) == (60, len(entries), 60 - len(entries))


def test_a_full_disk_during_export_leaves_no_model_folder_and_a_later_save_gets_umask_permissions(
    tmp_path, tiny_backbone, small_disk, capsys
):
    from retrain.backbones import load_backbone
    from retrain.errors import exit_on_error
    from retrain.head import Head
    from retrain.tf.export import build_classifier, save_classifier

    backbone = load_backbone(str(tiny_backbone))
    head = Head([np.ones((backbone.feature_dim, 2), np.float32)], [np.zeros(2, np.float32)], ["softmax"])
    classifier = build_classifier(backbone, head, ["a", "b"], top_k=1)
    filler = _fill(small_disk, leave_bytes=24 * 1024)  # the SavedModel needs far more
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: save_classifier(classifier, small_disk / "model", tflite=False))
    line = _one_error_line(capsys, exit_info)
    assert line.startswith(f"error: disk full writing {small_disk}/") and "finished work is kept" in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no model/, no .tmp-model-*

    filler.unlink()
    save_classifier(classifier, small_disk / "model", tflite=False)
    _assert_umask_permissions(small_disk / "model")


def _assert_umask_permissions(folder: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat_mode(folder) == 0o777 & ~mask, oct(stat_mode(folder))  # not mkdtemp's 0700
    for path in folder.rglob("*"):
        assert stat_mode(path) & 0o444 == 0o444 & ~mask, path  # readable as any output is


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_outputs_get_the_umask_permissions_of_any_other_output(tmp_path):
    from retrain.atomic import atomic_dir, atomic_file

    for mask in (0o022, 0o027, 0o002):
        old = os.umask(mask)
        try:
            with atomic_dir(tmp_path / f"model-{mask:o}") as temp:
                (temp / "labels.txt").write_text("a\n")
            with atomic_file(tmp_path / f"split-{mask:o}.csv") as temp:
                temp.write_text("path\n")
            (tmp_path / f"plain-{mask:o}").mkdir()
        finally:
            os.umask(old)
        assert stat_mode(tmp_path / f"model-{mask:o}") == stat_mode(tmp_path / f"plain-{mask:o}") == 0o777 & ~mask
        assert stat_mode(tmp_path / f"split-{mask:o}.csv") == 0o666 & ~mask


_FSIZE_CHILD = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from retrain.atomic import atomic_file
from retrain.errors import exit_on_error
from retrain.download import fetch_dataset
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
out = Path(sys.argv[1])
if sys.argv[3] == "atomic_file":
    def write():
        with atomic_file(out / "features.npz") as temp, open(temp, "wb") as f:
            f.write(bytes(300_000))
else:
    def write():
        fetch_dataset(str(out / "photos.tgz"), None, out / "raw", out / "cache")
exit_on_error(write)
"""


@pytest.mark.parametrize("writer", ["atomic_file", "extraction"])
def test_a_file_size_limit_gives_one_line_not_a_damaged_archive_or_a_traceback(tmp_path, writer):
    import tarfile

    with tarfile.open(tmp_path / "photos.tgz", "w:gz") as tar:
        noise = tmp_path / "noise.jpg"
        noise.write_bytes(os.urandom(200_000))
        tar.add(noise, arcname="photos/red/noise.jpg")
    noise.unlink()
    result = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path), str(REPO), writer],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    written = tmp_path / ("features.npz" if writer == "atomic_file" else "raw")
    assert line.startswith(f"error: file too large writing {written}"), line
    assert "ulimit -f" in line and "damaged" not in line
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith((".tmp-", ".extract-"))]
    assert leftovers == [] and not (tmp_path / "features.npz").exists()
