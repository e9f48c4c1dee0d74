"""Parts A and C of benchmarks/run.py, and the table: in-process throughput measured side by side.

Part A runs, on one subset and in interleaved rounds (so a burst of other work on a shared machine
hits every method alike): the backbone alone on in-memory tensors on the stage's runtime (XNNPACK)
and on TensorFlow, decode+resize alone (the stage's own image pipeline, no model), the bottlenecks
compute path `compute_features` on a cold cache, a retrain.py-style loop (one image per model call,
one text file per image, as retrain.py's bottleneck files; its functions traced once per run, as
retrain.py's graph is built once) and the Keras tutorial way (`image_dataset_from_directory` +
`model.predict` with the same backbone wrapped in a layer, as users write it). Every method is
reported as its median img/s over rounds, never its best; ratios are taken within each round
(median over rounds): this machine's speed drifts by a third within minutes. Process CPU time per
image is recorded beside each.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_pipeline import image_paths
from default_params import default_params

TF_BATCH = 32
STAGE_BATCH = default_params().bottlenecks.batch_size  # the stage's, at the shipped default
# Zen-class cores with two 256-bit FMA pipes: 2 x 8 float32 lanes x 2 flops per cycle; with
# AVX-512 on a full-width datapath (Zen 5, CPU family 26) twice that.
FLOPS_PER_CYCLE = {"avx2": 32, "avx512": 64}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn, images: int) -> dict:
    cpu, start = _cpu(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return {"images_per_s": images / wall, "cpu_ms_per_image": 1000 * (_cpu() - cpu) / images}


def side_by_side(images: Path, n: int, rounds: int, work: Path) -> dict:
    import tensorflow as tf

    from retrain.backbones import load_backbone
    from retrain.download import file_sha256
    from retrain.features import Example, FeatureCache, compute_features, image_batches

    files = image_paths(images)[:n]
    n = len(files)
    subset = work / "subset"
    for path in files:  # the Keras way reads a folder of class folders
        (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, subset / path.parent.name / path.name)
    examples = [Example(str(p), p.parent.name, "train", file_sha256(p)) for p in files]
    backbone = load_backbone("efficientnet_lite0", runtime="xnnpack")  # as the stage loads it
    on_tf = load_backbone("efficientnet_lite0")  # the same path on TensorFlow: the runtime's gain, paired
    keras_model = _keras_model(backbone)
    x = np.random.default_rng(0).random((n, *backbone.image_size, 3), np.float32)
    tf_batches = [tf.constant(x[i : i + TF_BATCH]) for i in range(0, n, TF_BATCH)]
    backbone.extract(x[:2]), backbone.features(tf_batches[0]).numpy()  # warm-up: XNNPACK packing, oneDNN
    retrain_py = _retrain_py_functions(backbone)  # traced once per run, as retrain.py builds its graph once

    def decode_alone():  # the stage's own pipeline (threaded Pillow decode + resize), no model
        for _ in image_batches(
            [str(p) for p in files], backbone.image_size, STAGE_BATCH, extra=[[e.sha256 for e in examples]]
        ):
            pass

    def ours(r, model=backbone):
        cache = FeatureCache(work / f"cache-{model.runtime}-{r}", model.id, model.feature_dim)
        return lambda: compute_features(examples, model, cache, STAGE_BATCH)

    methods = {
        "model": lambda r: (lambda: backbone.extract(x), n),
        "model_tensorflow": lambda r: (lambda: [backbone.features(b).numpy() for b in tf_batches], n),
        "decode": lambda r: (decode_alone, n),
        "compute_features": lambda r: (ours(r), n),
        "compute_features_tensorflow": lambda r: (ours(r, on_tf), n),
        "retrain_py_loop": lambda r: (lambda: _retrain_py_loop(files, retrain_py, work / f"txt-{r}"), n),
        "keras_tutorial": lambda r: (lambda: _keras_tutorial(subset, keras_model), n),
    }
    samples = {name: [] for name in methods}
    for r in range(rounds):
        for name, make in methods.items():
            fn, count = make(r=r)
            sample = _timed(fn, count)
            sample["load"] = round(os.getloadavg()[0], 2)
            samples[name].append({k: round(v, 2) for k, v in sample.items()})
            print(
                f"A: round {r + 1}/{rounds} {name:<18} {sample['images_per_s']:7.1f} images/s (load {sample['load']})",
                flush=True,
            )
    median = {
        name: {k: statistics.median(s[k] for s in v) for k in ("images_per_s", "cpu_ms_per_image")}
        for name, v in samples.items()
    }
    model, decode = median["model"], median["decode"]

    def ceiling_now() -> float:
        """The ceiling again, one round: part B brackets the cold stage with it (same minutes)."""
        now = (_timed(lambda: backbone.extract(x), n)["images_per_s"], _timed(decode_alone, n)["images_per_s"])
        return round(1 / (1 / now[0] + 1 / now[1]), 1)

    return {
        "_ceiling_now": ceiling_now,
        "images": n,
        "rounds": rounds,
        "samples": samples,
        "paired": _paired(samples, rounds),
        "runtime": backbone.runtime,
        "flop_limit": flop_limit(backbone),
        "ceiling_images_per_s": round(1 / (1 / model["images_per_s"] + 1 / decode["images_per_s"]), 1),
        "ceiling_cpu_ms_per_image": round(model["cpu_ms_per_image"] + decode["cpu_ms_per_image"], 2),
        **{f"{k}_images_per_s": round(v["images_per_s"], 1) for k, v in median.items()},
        "compute_features_cpu_ms_per_image": round(median["compute_features"]["cpu_ms_per_image"], 2),
    }


def _paired(samples: dict, rounds: int) -> dict:
    """The compute path's ratios within each round, and their median over rounds.

    The machine's speed drifts by a third within minutes; a ratio of two figures from the same
    round cancels most of that, where a ratio of two figures from different moments does not.
    """

    def rate(name, r):
        return samples[name][r]["images_per_s"]

    per_round = []
    for r in range(rounds):
        ceiling = 1 / (1 / rate("model", r) + 1 / rate("decode", r))
        ours = rate("compute_features", r)
        per_round.append(
            {
                "vs_ceiling": ours / ceiling,
                "vs_retrain_py_loop": ours / rate("retrain_py_loop", r),
                "vs_keras_tutorial": ours / rate("keras_tutorial", r),
                "vs_tensorflow_runtime": ours / rate("compute_features_tensorflow", r),
            }
        )
    return {
        key: {
            "median": round(statistics.median(p[key] for p in per_round), 2),
            "rounds": [round(p[key], 2) for p in per_round],
        }
        for key in per_round[0]
    }


def flop_limit(backbone) -> dict:
    """What the cores could do: FLOPs of one image (TF's profiler on the loop-free graph) against
    cores x clock x FLOPs per cycle of the vector unit /proc/cpuinfo names."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, *backbone.image_size, 3], tf.float32)
    graph = convert_variables_to_constants_v2(
        tf.function(backbone.single_pass_features, autograph=False).get_concrete_function(spec)
    ).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    flops = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    mhz = max((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), default=0.0)
    family = next((int(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu family")), 0)
    unit = "avx512" if " avx512f" in info and family >= 26 else "avx2"  # earlier Zens split AVX-512 in halves
    peak = (os.cpu_count() or 1) * mhz * 1e6 * FLOPS_PER_CYCLE[unit]
    return {
        "gflop_per_image": round(flops / 1e9, 3),
        "cores": os.cpu_count(),
        "mhz": mhz,
        "unit": unit,
        "peak_gflop_per_s": round(peak / 1e9, 1),
        "images_per_s": round(peak / flops, 1) if flops else None,
    }


def _retrain_py_functions(backbone):
    """retrain.py's decode and model, traced (and run) once, as its graph is built once per run."""
    import tensorflow as tf

    from retrain.tf.graph_images import decode_image, resize_image  # TensorFlow's decode, as retrain.py's

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    def decode(contents):
        return resize_image(decode_image(contents), backbone.image_size)

    features = tf.function(backbone.features, input_signature=[tf.TensorSpec([1, *backbone.image_size, 3], tf.float32)])
    features(decode(tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)))[tf.newaxis])  # warm-up
    return decode, features


def _retrain_py_loop(files, functions, folder: Path) -> None:
    """retrain.py's bottleneck loop: per image, decode, run the model on it alone, write a text file."""
    import tensorflow as tf

    decode, features = functions
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        image = decode(tf.io.read_file(str(path)))
        values = features(image[tf.newaxis]).numpy()[0]
        (folder / f"{path.name}.txt").write_text(",".join(str(x) for x in values))


def _keras_model(backbone):
    """The Keras tutorial's model: Rescaling(1/255) then the backbone as a layer (no head needed)."""
    import keras

    class FeatureVector(keras.layers.Layer):
        def __init__(self):
            super().__init__(trainable=False)
            self._call = backbone.features

        def call(self, images):
            return self._call(images)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], backbone.feature_dim)

    return keras.Sequential([keras.Input((*backbone.image_size, 3)), keras.layers.Rescaling(1 / 255), FeatureVector()])


def _keras_tutorial(folder: Path, model) -> np.ndarray:
    import keras
    import tensorflow as tf

    dataset = keras.utils.image_dataset_from_directory(
        folder, image_size=model.input_shape[1:3], batch_size=STAGE_BATCH, shuffle=False, verbose=False
    )

    def images_only(images, labels):
        return images

    return model.predict(dataset.map(images_only).prefetch(tf.data.AUTOTUNE), verbose=0)


# ---- part C: the exported model ---------------------------------------------------------------

_PREDICT_PARTS = r"""
import json, sys, time
started = time.time()
from pathlib import Path
from retrain.predict import load_classifier, predict_files
imported = time.time()
model, names = load_classifier(Path(sys.argv[1]))
loaded = time.time()
answer = predict_files(model, [Path(sys.argv[2])], names, 1)[0]
done = time.time()
print(json.dumps({"started": started, "import_s": imported - started, "load_s": loaded - imported,
                  "inference_s": done - loaded, "label": answer.labels[0],
                  "imports_tensorflow": "tensorflow" in sys.modules}))
"""


def predict_figures(root: Path, images: Path, n: int) -> dict:
    """Throughput of the exported SavedModel (TensorFlow, batches) and of model.tflite as `retrain
    predict` runs it (LiteRT, one image per invoke, the one decoder), and where a cold `retrain
    predict` process spends its time (imports, model load, inference)."""
    from retrain.predict import load_classifier
    from retrain.tf.export import load_model, predict_bytes

    model_dir = root / "model"
    files = image_paths(images)[:n]
    contents = [p.read_bytes() for p in files]
    model = load_model(model_dir)
    predict_bytes(model, contents[:STAGE_BATCH])  # warm-up
    saved = _timed(lambda: predict_bytes(model, contents, STAGE_BATCH), len(contents))
    lite, _ = load_classifier(model_dir)  # what `retrain predict` runs: model/model.tflite on LiteRT

    def tflite(batch=contents):
        for c in batch:
            lite.probabilities(c)

    tflite(contents[:4])  # warm-up
    on_lite = _timed(tflite, len(contents))
    return {
        "images": len(contents),
        "saved_model_images_per_s": round(saved["images_per_s"], 1),
        "tflite_images_per_s": round(on_lite["images_per_s"], 1),
        "cold_predict_parts": _predict_parts(model_dir, files[0]),
    }


def _predict_parts(model_dir: Path, image: Path) -> dict:
    """A cold process doing what `retrain predict` does, timed step by step."""
    python = sys.executable
    spawned = time.time()
    result = subprocess.run(
        [python, "-c", _PREDICT_PARTS, str(model_dir), str(image)], check=True, capture_output=True, text=True
    )
    ended = time.time()
    parts = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "interpreter_start_s": round(parts["started"] - spawned, 2),
        "import_s": round(parts["import_s"], 2),
        "model_load_s": round(parts["load_s"], 2),
        "inference_s": round(parts["inference_s"], 2),
        "total_s": round(ended - spawned, 2),
        "imports_tensorflow": parts["imports_tensorflow"],
    }


def whole_process(command: list[str], cwd: Path, env: dict) -> dict:
    """Run command to its end: wall seconds from spawn to exit, its peak RSS, its exit code and the
    tail of its output. The RSS is GNU time's %M (the child's `ru_maxrss`) where /usr/bin/time
    exists: a child forked straight from this process would report at least this process's own
    RSS (Linux carries the pre-exec high-water mark over), and this process holds TensorFlow."""
    import tempfile

    timer = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as usage_file:
        wrapped = [timer, "-f", "%e %M", "-o", usage_file.name, *command] if timer else command
        start = time.perf_counter()
        process = subprocess.Popen(wrapped, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode(errors="replace")
        reported = usage_file.read().split()
    peak_kb = int(reported[-1]) if timer and reported else usage.ru_maxrss
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "rss_from": "/usr/bin/time %M" if timer and reported else "wait4 ru_maxrss (includes the parent's)",
        "returncode": process.returncode,
        "output": output[-3000:],
    }


# ---- start-up: each stage process's imports and model load, and a cold `retrain predict` -------

STAGES = ("download", "split", "bottlenecks", "train", "finetune", "evaluate", "export")
# Issue #25: only these train or export, so only these may import TensorFlow (finetune when enabled;
# the benchmark project runs it off).
TF_STAGES = ("train", "export")
LEAN_RATIO = 0.25  # a lean process's start-up ÷ a bare `import tensorflow`, same round
PREDICT_RSS_MB = 300
_STARTUP = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("stage", f"stages/{sys.argv[1]}.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # its imports; main() is guarded
if sys.argv[1] == "bottlenecks":  # and its model, loaded as the stage loads it, run on one image
    import numpy as np
    from retrain.backbones import load_backbone
    from retrain.params import load_params
    size = load_params().backbone.image_size
    backbone = load_backbone(load_params().backbone.name, (size, size) if size else None, runtime="xnnpack")
    backbone.extract(np.zeros((1, *backbone.image_size, 3), np.float32))
elif sys.argv[1] == "evaluate":  # and its model (the head) with the test features it scores
    from retrain import paths
    from retrain.features import load_split_arrays
    from retrain.head import load_head
    x, _, _ = load_split_arrays(paths.FINETUNE_DIR, "test")
    load_head(paths.FINETUNE_HEAD).logits(x[:1])
print("tensorflow" in sys.modules)
"""


def startup_figures(root: Path, rounds: int, image: Path | None = None) -> dict:
    """Per stage: wall seconds and peak RSS from spawn to exit of its imports + model load, and of
    a cold `retrain predict one.jpg` on the project's model folder, whole process; each in rounds
    interleaved with a bare `python -c "import tensorflow"` (the order turned every round), so a
    ratio to that import is taken within a round (median over rounds)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(root), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    commands = {"bare_import_tensorflow": [sys.executable, "-c", "import tensorflow; print(True)"]}
    commands.update(
        {stage: [sys.executable, "-c", _STARTUP, stage] for stage in STAGES if (root / f"stages/{stage}.py").exists()}
    )
    if image is not None and (root / "model").is_dir():
        commands["predict"] = [str(bin_dir / "retrain"), "predict", str(image)]  # the default model folder
    runs = {name: [] for name in commands}
    for r in range(rounds):
        order = list(commands) if r % 2 == 0 else list(reversed(commands))
        for name in order:
            done = whole_process(commands[name], root, env)
            if done["returncode"]:
                raise SystemExit(f"start-up of {name} failed:\n{done['output'][-2000:]}")
            runs[name].append(done)
            print(
                f"start-up: round {r + 1}/{rounds} {name:<24} {done['wall_s']:5.2f} s {done['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    bare = runs.pop("bare_import_tensorflow")
    out = {
        "bare_import_tensorflow": {
            "median_s": round(statistics.median(b["wall_s"] for b in bare), 2),
            "rounds_s": [b["wall_s"] for b in bare],
            "peak_rss_mb": statistics.median(b["peak_rss_mb"] for b in bare),
        }
    }
    for name, done in runs.items():
        ratios = [d["wall_s"] / b["wall_s"] for d, b in zip(done, bare)]
        last = done[-1]["output"].strip().splitlines()
        out[name] = {
            "median_s": round(statistics.median(d["wall_s"] for d in done), 2),
            "rounds_s": [d["wall_s"] for d in done],
            "vs_bare_import": round(statistics.median(ratios), 3),
            "vs_bare_import_rounds": [round(x, 3) for x in ratios],
            "peak_rss_mb": statistics.median(d["peak_rss_mb"] for d in done),
            "imports_tensorflow": (last[-1] == "True") if name != "predict" and last else None,
        }
    return out


# ---- the table --------------------------------------------------------------------------------


def table(result: dict) -> list[dict]:
    a, b, p = result["compare"], result["pipeline"], result["predict"]
    paired, flop = a["paired"], a["flop_limit"]
    cold, inc, x4, train = b["cold"], b["incremental"], b["x4"], b["train"]
    stage_rate = cold["stats"]["images_per_second"]
    around = (b["ceiling_before_cold"] + b["ceiling_after_cold"]) / 2  # measured minutes apart from part A
    extra = x4["output_bytes"] - cold["output_bytes"]
    growth = (x4["peak_rss_mb"] - cold["peak_rss_mb"]) * 2**20
    cp, start = p["cold_predict_parts"], result.get("startup", {})

    def row(figure, value, target="", ok=None):
        return {"figure": figure, "value": value, "target": target, "pass": ok}

    def rounds(key):
        return f"median of rounds {paired[key]['rounds']}"

    rows = [
        row(
            f"backbone alone, {a['runtime']}, in-memory tensors",
            f"{a['model_images_per_s']} img/s "
            f"(TensorFlow SavedModel, batch {TF_BATCH}: {a['model_tensorflow_images_per_s']} img/s)",
        ),
        row(
            "backbone alone ÷ FLOP limit",
            f"{a['model_images_per_s'] / flop['images_per_s']:.2f}: limit "
            f"{flop['images_per_s']} img/s = {flop['cores']} cores x {flop['mhz']:.0f} MHz x "
            f"{FLOPS_PER_CYCLE[flop['unit']]} flop/cycle ({flop['unit']}) / {flop['gflop_per_image']} GFLOP per image",
            "≥ 0.7",
            a["model_images_per_s"] >= 0.7 * flop["images_per_s"],
        ),
        row("decode+resize alone, all cores", f"{a['decode_images_per_s']} img/s"),
        row(
            "ceiling 1/(1/model+1/decode); again just before / after the cold stage",
            f"{a['ceiling_images_per_s']} img/s; {b['ceiling_before_cold']} / {b['ceiling_after_cold']} img/s",
        ),
        row(
            f"cold bottlenecks stage, {b['images']} images ÷ the ceiling around it",
            f"{stage_rate} img/s = {stage_rate / around:.2f} x",
            "≥ 0.9",
            stage_rate >= 0.9 * around,
        ),
        row(
            "compute path on XNNPACK ÷ the same on TensorFlow",
            f"{paired['vs_tensorflow_runtime']['median']} x, "
            f"{rounds('vs_tensorflow_runtime')}; {a['compute_features_tensorflow_images_per_s']} img/s on TensorFlow",
        ),
        row(
            f"compute path in process ÷ ceiling, same {a['images']} images",
            f"{paired['vs_ceiling']['median']} x, {rounds('vs_ceiling')}; {a['compute_features_images_per_s']} img/s",
            "≥ 0.9",
            paired["vs_ceiling"]["median"] >= 0.9,
        ),
        row(
            "cold stage ÷ Keras tutorial way",
            f"{stage_rate / a['keras_tutorial_images_per_s']:.2f} x "
            f"({a['keras_tutorial_images_per_s']} img/s); in process {paired['vs_keras_tutorial']['median']} x, "
            f"{rounds('vs_keras_tutorial')}",
            "≥ 1.5x",
            stage_rate >= 1.5 * a["keras_tutorial_images_per_s"],
        ),
        row(
            "cold stage ÷ retrain.py-style loop, traced once",
            f"{stage_rate / a['retrain_py_loop_images_per_s']:.2f} x "
            f"({a['retrain_py_loop_images_per_s']} img/s); in process {paired['vs_retrain_py_loop']['median']} x, "
            f"{rounds('vs_retrain_py_loop')}",
            "≥ 2x",
            stage_rate >= 2 * a["retrain_py_loop_images_per_s"],
        ),
        row(
            "train, default params: the head's fit",
            f"{train['fit_s']} s ({train['epochs']} epochs; stage {train['stage_s']} s)",
            "≤ 4 s",
            train["fit_s"] <= 4,
        ),
    ]
    if start:
        bare = start["bare_import_tensorflow"]
        for stage, figure in start.items():
            if stage in ("bare_import_tensorflow", "predict"):
                continue
            versus = f"{figure['vs_bare_import']} x a bare import tensorflow ({bare['median_s']} s) in the same rounds"
            if stage in TF_STAGES:
                rows.append(
                    row(
                        f"start-up (imports): {stage}",
                        f"{figure['median_s']} s = {versus}",
                        "≤ bare + 1 s",
                        figure["median_s"] - bare["median_s"] <= 1,
                    )
                )
                continue
            what = {"bottlenecks": " + model load + 1 image", "evaluate": " + head and test features"}.get(stage, "")
            rows.append(
                row(
                    f"start-up (imports{what}): {stage}",
                    f"{figure['median_s']} s = {versus}; rounds {figure['vs_bare_import_rounds']}; "
                    f"{figure['peak_rss_mb']:.0f} MB; "
                    + ("imports TensorFlow" if figure["imports_tensorflow"] else "no TensorFlow"),
                    f"≤ {LEAN_RATIO}x, no TensorFlow",
                    figure["vs_bare_import"] <= LEAN_RATIO and not figure["imports_tensorflow"],
                )
            )
    rows += [
        row(
            "+10 images, warm cache: recomputed",
            f"{inc['stats']['computed']}",
            "exactly 10",
            inc["stats"]["computed"] == 10,
        ),
        row(
            "+10 images: the work after start-up",
            f"{inc['stats']['seconds']} s compute (cold {cold['stats']['seconds']} s)",
            "≤ 10% of cold",
            inc["stats"]["seconds"] <= 0.1 * cold["stats"]["seconds"],
        ),
        row(
            "no-op `dvc repro`",
            f"{min(b['noop']['wall_s'])} s (runs: {b['noop']['wall_s']})",
            "≤ 5 s, nothing ran",
            min(b["noop"]["wall_s"]) <= 5 and not any(b["noop"]["ran"]),
        ),
        row(
            f"bottlenecks peak RSS, {b['images']} / {x4['images']} images",
            f"{cold['peak_rss_mb']} / {x4['peak_rss_mb']} MB",
        ),
        row(
            "RSS growth vs extra output arrays",
            f"{growth / 2**20:.1f} MB vs {extra / 2**20:.1f} MB",
            "≤ extra arrays + 10%",
            growth <= 1.1 * extra,
        ),
        row("exported SavedModel, batches of 32", f"{p['saved_model_images_per_s']} img/s"),
        row("model.tflite as `retrain predict` runs it, one image per invoke", f"{p['tflite_images_per_s']} img/s"),
    ]
    if "predict" in start:
        cli, bare = start["predict"], start["bare_import_tensorflow"]
        rows.append(
            row(
                "cold `retrain predict one.jpg`, default model folder, whole process ÷ bare import tensorflow",
                f"{cli['median_s']} s = {cli['vs_bare_import']} x ({bare['median_s']} s), rounds "
                f"{cli['vs_bare_import_rounds']}; steps: start {cp['interpreter_start_s']} + import {cp['import_s']} "
                f"+ load {cp['model_load_s']} + inference {cp['inference_s']} s"
                + (", imports TensorFlow" if cp["imports_tensorflow"] else ", no TensorFlow"),
                f"≤ {LEAN_RATIO}x",
                cli["vs_bare_import"] <= LEAN_RATIO,
            )
        )
        rows.append(
            row(
                "cold `retrain predict one.jpg`: peak RSS",
                f"{cli['peak_rss_mb']:.0f} MB (bare import tensorflow {bare['peak_rss_mb']:.0f} MB)",
                f"≤ {PREDICT_RSS_MB} MB",
                cli["peak_rss_mb"] <= PREDICT_RSS_MB,
            )
        )
    if "head" in result:  # benchmarks/bench_head.py: the fit beside Keras fit, and the search
        import bench_head

        rows += bench_head.rows(result["head"])
    if "sweep" in result:  # benchmarks/bench_sweep.py: a queued head-only sweep
        import bench_sweep

        rows += bench_sweep.rows(result["sweep"])
    if "ray" in result:  # benchmarks/bench_ray.py: Ray against local, whole stage processes
        import bench_ray

        rows += bench_ray.rows(result["ray"])
    return rows


def render(rows: list[dict], result: dict) -> str:
    m = result["machine"]
    lines = [
        f"{m['cores']} cores, {m['cpu']}, TensorFlow {m['tensorflow']}; load average {m['load_average_at_start'][0]} "
        f"at start, {m.get('load_average_at_end', ['?'])[0]} at end; {result['data']}",
        "",
        "| figure | value | target | |",
        "|---|---|---|---|",
    ]
    for r in rows:
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['figure']} | {r['value']} | {r['target']} | {verdict} |")
    return "\n".join(lines)
