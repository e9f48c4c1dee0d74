"""Parts A and C of benchmarks/run.py, and the table: in-process throughput measured side by side.

Part A runs, on one subset and in interleaved rounds (so a burst of other work on a shared machine
hits every method alike; each keeps its best round): the backbone alone on in-memory tensors,
decode+resize alone (the stage's own tf.data input pipeline, no model), the bottlenecks compute
path `compute_features` on a cold cache, a retrain.py-style loop (one image per model call, one
text file per image, as retrain.py's bottleneck files) and the Keras tutorial way
(`image_dataset_from_directory` + `model.predict` with the same backbone wrapped in a layer).
Process CPU time per image is recorded beside each. The targets are judged on ratios taken within
each round (median over rounds): this machine's speed drifts by a third within minutes.
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

from project import image_paths

MODEL_BATCHES = (16, 32, 64)
STAGE_BATCH = 32  # params.yaml bottlenecks.batch_size


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
    from retrain.features import Example, FeatureCache, _image_dataset, compute_features

    files = image_paths(images)[:n]
    n = len(files)
    subset = work / "subset"
    for path in files:  # the Keras way reads a folder of class folders
        (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, subset / path.parent.name / path.name)
    examples = [Example(str(p), p.parent.name, "train", file_sha256(p)) for p in files]
    backbone = load_backbone("efficientnet_lite0")
    features = tf.function(backbone.features)
    keras_model = _keras_model(backbone)

    def model_alone(batch):
        x = tf.constant(np.random.default_rng(0).random((batch, *backbone.image_size, 3), np.float32))
        features(x).numpy()  # warm-up: tracing, oneDNN primitives
        calls = max(3, n // batch)
        return lambda: [features(x).numpy() for _ in range(calls)], calls * batch

    # Built once: what is timed is decoding, as the model is timed after its warm-up.
    dataset = _image_dataset([str(p) for p in files], [e.sha256 for e in examples], backbone.image_size, STAGE_BATCH)

    def decode_alone():
        for _ in dataset:
            pass

    def ours(r):
        cache = FeatureCache(work / f"cache-{r}", backbone.id, backbone.feature_dim)
        return lambda: compute_features(examples, backbone, cache, STAGE_BATCH)

    methods = {f"model_b{b}": lambda b=b, r=0: model_alone(b) for b in MODEL_BATCHES}
    methods.update({
        "decode": lambda r: (decode_alone, n),
        "compute_features": lambda r: (ours(r), n),
        "retrain_py_loop": lambda r: (lambda: _retrain_py_loop(files, backbone, work / f"txt-{r}"), n),
        "keras_tutorial": lambda r: (lambda: _keras_tutorial(subset, keras_model), n),
    })
    best, samples = {}, {name: [] for name in methods}
    for r in range(rounds):
        for name, make in methods.items():
            fn, count = make(r=r)
            sample = _timed(fn, count)
            sample["load"] = round(os.getloadavg()[0], 2)
            samples[name].append({k: round(v, 2) for k, v in sample.items()})
            if sample["images_per_s"] > best.get(name, {}).get("images_per_s", 0):
                best[name] = sample
            print(f"A: round {r + 1}/{rounds} {name:<18} {sample['images_per_s']:7.1f} images/s "
                  f"(load {sample['load']})", flush=True)
    model_batch = max(MODEL_BATCHES, key=lambda b: best[f"model_b{b}"]["images_per_s"])
    model, decode = best[f"model_b{model_batch}"], best["decode"]
    ceiling = 1 / (1 / model["images_per_s"] + 1 / decode["images_per_s"])

    def ceiling_now() -> float:
        """The ceiling again, one round: part B brackets the cold stage with it (same minutes)."""
        fn, count = model_alone(model_batch)
        now = (_timed(fn, count)["images_per_s"], _timed(decode_alone, n)["images_per_s"])
        return round(1 / (1 / now[0] + 1 / now[1]), 1)

    return {
        "_ceiling_now": ceiling_now,
        "images": n, "rounds": rounds, "samples": samples, "paired": _paired(samples, rounds), "best_model_batch": model_batch,
        "model_images_per_s": round(model["images_per_s"], 1), "decode_images_per_s": round(decode["images_per_s"], 1),
        "ceiling_images_per_s": round(ceiling, 1),
        "ceiling_cpu_ms_per_image": round(model["cpu_ms_per_image"] + decode["cpu_ms_per_image"], 2),
        **{f"{k}_images_per_s": round(best[k]["images_per_s"], 1) for k in ("compute_features", "retrain_py_loop", "keras_tutorial")},
        "compute_features_cpu_ms_per_image": round(best["compute_features"]["cpu_ms_per_image"], 2),
    }


def _paired(samples: dict, rounds: int) -> dict:
    """The compute path's ratios within each round, and their median over rounds.

    The machine's speed drifts by a third within minutes; a ratio of two figures from the same
    round cancels most of that, where a ratio of two best-of-rounds figures (each from its own
    lucky moment) does not.
    """
    def rate(name, r):
        return samples[name][r]["images_per_s"]

    per_round = []
    for r in range(rounds):
        ceiling = 1 / (1 / max(rate(f"model_b{b}", r) for b in MODEL_BATCHES) + 1 / rate("decode", r))
        ours = rate("compute_features", r)
        per_round.append({"vs_ceiling": ours / ceiling, "vs_retrain_py_loop": ours / rate("retrain_py_loop", r),
                          "vs_keras_tutorial": ours / rate("keras_tutorial", r)})
    return {key: {"median": round(statistics.median(p[key] for p in per_round), 2),
                  "rounds": [round(p[key], 2) for p in per_round]} for key in per_round[0]}


def _retrain_py_loop(files, backbone, folder: Path) -> None:
    """retrain.py's bottleneck loop: per image, decode, run the model on it alone, write a text file."""
    import tensorflow as tf

    from retrain.images import decode_image, resize_image

    folder.mkdir(parents=True, exist_ok=True)
    @tf.function(autograph=False)
    def decode(contents):
        return resize_image(decode_image(contents), backbone.image_size)

    features = tf.function(backbone.features)
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
        folder, image_size=model.input_shape[1:3], batch_size=STAGE_BATCH, shuffle=False, verbose=False)
    def images_only(images, labels):
        return images

    return model.predict(dataset.map(images_only).prefetch(tf.data.AUTOTUNE), verbose=0)


# ---- part C: the exported model ---------------------------------------------------------------

_COLD = r"""
import json, sys, time
started = time.time()
import tensorflow as tf
from retrain.export import load_model
from retrain.predict import predict_files
from pathlib import Path
imported = time.time()
model = load_model(Path(sys.argv[1]))
loaded = time.time()
names = (Path(sys.argv[1]) / "labels.txt").read_text().split()
answer = predict_files(model, [Path(sys.argv[2])], names, 1)[0]
done = time.time()
print(json.dumps({"started": started, "import_s": imported - started, "load_s": loaded - imported,
                  "inference_s": done - loaded, "label": answer.labels[0]}))
"""


def predict_figures(root: Path, images: Path, n: int) -> dict:
    import tensorflow as tf

    from retrain.export import load_model, predict_bytes
    from retrain.images import decode_image, resize_image

    model_dir = root / "model"
    files = image_paths(images)[:n]
    contents = [p.read_bytes() for p in files]
    model = load_model(model_dir)
    predict_bytes(model, contents[:STAGE_BATCH])  # warm-up
    saved = _timed(lambda: predict_bytes(model, contents, STAGE_BATCH), len(contents))

    interpreter = tf.lite.Interpreter(str(model_dir / "model.tflite"), num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    (given,), taken = interpreter.get_input_details(), interpreter.get_output_details()[0]
    size = tuple(given["shape"][1:3])
    @tf.function(autograph=False)
    def decode(contents):
        return resize_image(decode_image(contents), size)[tf.newaxis]

    def tflite(batch=contents):
        for c in batch:
            interpreter.set_tensor(given["index"], decode(tf.constant(c)).numpy())
            interpreter.invoke()
            interpreter.get_tensor(taken["index"])

    tflite(contents[:4])  # warm-up
    lite = _timed(tflite, len(contents))
    one = files[0]
    cold = _cold_predict(model_dir, one)
    return {"images": len(contents), "saved_model_images_per_s": round(saved["images_per_s"], 1),
            "tflite_images_per_s": round(lite["images_per_s"], 1), "cold_predict": cold}


def _cold_predict(model_dir: Path, image: Path) -> dict:
    """`retrain predict one.jpg` from process start, split by a script doing the same three steps."""
    python = sys.executable
    env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run([str(Path(python).parent / "retrain"), "predict", str(image), "--model", str(model_dir)],
                   env=env, check=True, capture_output=True)
    cli = time.perf_counter() - start
    spawned = time.time()
    result = subprocess.run([python, "-c", _COLD, str(model_dir), str(image)], env=env, check=True,
                            capture_output=True, text=True)
    ended = time.time()
    parts = json.loads(result.stdout.strip().splitlines()[-1])
    return {"cli_wall_s": round(cli, 2), "interpreter_start_s": round(parts["started"] - spawned, 2),
            "import_s": round(parts["import_s"], 2), "model_load_s": round(parts["load_s"], 2),
            "inference_s": round(parts["inference_s"], 2), "split_total_s": round(ended - spawned, 2)}


# ---- the table --------------------------------------------------------------------------------

def table(result: dict) -> list[dict]:
    a, b, p = result["compare"], result["pipeline"], result["predict"]
    paired = a["paired"]
    ceiling = a["ceiling_images_per_s"]
    cold, inc, x4, train = b["cold"], b["incremental"], b["x4"], b["train"]
    stage_rate = cold["stats"]["images_per_second"]
    around = (b["ceiling_before_cold"] + b["ceiling_after_cold"]) / 2  # measured minutes apart from part A
    extra = x4["output_bytes"] - cold["output_bytes"]
    growth = (x4["peak_rss_mb"] - cold["peak_rss_mb"]) * 2**20
    cp = p["cold_predict"]

    def row(figure, value, target="", ok=None):
        return {"figure": figure, "value": value, "target": target, "pass": ok}

    return [
        row("1. backbone alone, in-memory tensors", f"{a['model_images_per_s']} img/s (batch {a['best_model_batch']})"),
        row("1. decode+resize alone, all cores", f"{a['decode_images_per_s']} img/s"),
        row("1. ceiling 1/(1/model+1/decode)", f"{ceiling} img/s"),
        row("1. ceiling again, just before / after the cold stage", f"{b['ceiling_before_cold']} / {b['ceiling_after_cold']} img/s"),
        row(f"2. bottlenecks stage, cold, {b['images']} images", f"{stage_rate} img/s = {stage_rate / around:.2f} x the ceiling "
            f"around it ({stage_rate / ceiling:.2f} x part A's)", "≥ 0.90 x ceiling", stage_rate >= 0.9 * around),
        row(f"2. compute path in process, same {a['images']} images as 1.",
            f"{paired['vs_ceiling']['median']} x ceiling, median of rounds {paired['vs_ceiling']['rounds']}; best "
            f"{a['compute_features_images_per_s']} img/s; CPU {a['compute_features_cpu_ms_per_image']} vs "
            f"{a['ceiling_cpu_ms_per_image']} ms/img", "≥ 0.90 x ceiling", paired["vs_ceiling"]["median"] >= 0.9),
        row("3. vs retrain.py-style loop (same images)", f"{paired['vs_retrain_py_loop']['median']}x, median of rounds "
            f"{paired['vs_retrain_py_loop']['rounds']}; best {a['retrain_py_loop_images_per_s']} img/s", "≥ 1.5x",
            paired["vs_retrain_py_loop"]["median"] >= 1.5),
        row("3. vs Keras tutorial way (same images)", f"{paired['vs_keras_tutorial']['median']}x, median of rounds "
            f"{paired['vs_keras_tutorial']['rounds']}; best {a['keras_tutorial_images_per_s']} img/s", "≥ 1.0x",
            paired["vs_keras_tutorial"]["median"] >= 1.0),
        row("4. +10 images, warm cache: recomputed", f"{inc['stats']['computed']}", "exactly 10", inc["stats"]["computed"] == 10),
        row("4. +10 images: stage process time", f"{inc['stage_s']} s = {inc['stage_s'] / cold['stage_s']:.1%} of cold {cold['stage_s']} s",
            "≤ 10% of cold", inc["stage_s"] <= 0.1 * cold["stage_s"]),
        row("4. +10 images: stage work after model load", f"{inc['stats']['seconds']} s compute (cold {cold['stats']['seconds']} s)",
            "≤ 10% of cold", inc["stats"]["seconds"] <= 0.1 * cold["stats"]["seconds"]),
        row("5. no-op `dvc repro`", f"{min(b['noop']['wall_s'])} s (runs: {b['noop']['wall_s']})", "≤ 5 s, nothing ran",
            min(b["noop"]["wall_s"]) <= 5 and not any(b["noop"]["ran"])),
        row("6. train, default params", f"{train['stage_s']} s ({train['epochs']} epochs) = "
            f"{train['stage_s'] / cold['stage_s']:.1%} of cold bottlenecks", "≤ 10% of cold", train["stage_s"] <= 0.1 * cold["stage_s"]),
        row("6. train: the head's fit alone (no imports, no MLflow set-up)", f"{train['fit_s']} s = "
            f"{train['fit_s'] / cold['stage_s']:.1%} of cold bottlenecks", "≤ 10% of cold", train["fit_s"] <= 0.1 * cold["stage_s"]),
        row(f"7. bottlenecks peak RSS, {b['images']} / {x4['images']} images", f"{cold['peak_rss_mb']} / {x4['peak_rss_mb']} MB"),
        row("7. RSS growth vs extra output arrays", f"{growth / 2**20:.1f} MB vs {extra / 2**20:.1f} MB",
            "≤ extra arrays + 10%", growth <= 1.1 * extra),
        row("8. exported SavedModel, batches of 32", f"{p['saved_model_images_per_s']} img/s"),
        row("8. TFLite, one image per invoke", f"{p['tflite_images_per_s']} img/s"),
        row("8. cold `retrain predict one.jpg`", f"{cp['cli_wall_s']} s: start {cp['interpreter_start_s']} + import "
            f"{cp['import_s']} + load {cp['model_load_s']} + inference {cp['inference_s']} s"),
    ]


def render(rows: list[dict], result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cores']} cores, {m['cpu']}, TensorFlow {m['tensorflow']}; load average {m['load_average_at_start'][0]} "
             f"at start, {m.get('load_average_at_end', ['?'])[0]} at end; {result['data']}", "",
             "| figure | value | target | |", "|---|---|---|---|"]
    for r in rows:
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['figure']} | {r['value']} | {r['target']} | {verdict} |")
    return "\n".join(lines)
