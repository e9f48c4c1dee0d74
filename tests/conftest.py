"""Shared fixtures. Tests run offline, make their own images and never touch ~/.cache."""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports retrain: converted backbones and features go to a throwaway cache
# (CI passes one in, so a session converts EfficientNet-Lite0 once).
os.environ.setdefault("RETRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="retrain-test-cache-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def _mlflow_store_per_test():
    """A stage run in this process points MLflow at its project's store for good: set_tracking_uri
    sets a global and exports MLFLOW_TRACKING_URI. A later test that names its own store through the
    environment would silently read the earlier test's, so each test starts from what it inherited."""
    inherited = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)  # clears the global and the exported variable
    if inherited is not None:
        os.environ["MLFLOW_TRACKING_URI"] = inherited


def save_tiny_backbone(path: Path, size: int | None = 32) -> Path:
    """A real SavedModel in TF Hub's feature-vector convention: [N,size,size,3] in [0,1] → [N,12] (size None: any).

    Its features (per-channel mean, spread and a fixed 3x3 conv's mean response) separate images of
    different colours and shapes, which is all a pipeline test needs, in milliseconds.
    """
    import numpy as np
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.kernel = tf.Variable(rng.normal(size=(3, 3, 3, 6)).astype("float32"), trainable=True)

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2])
            spread = tf.math.reduce_std(images, axis=[1, 2])
            edges = tf.reduce_mean(tf.abs(tf.nn.conv2d(images, self.kernel, 1, "SAME")), axis=[1, 2])
            return tf.concat([mean, spread, edges], axis=1)

    tf.saved_model.save(Tiny(), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny_backbone")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process, log: Path, timeout_s: float) -> None:
    """Poll url until it answers; RuntimeError with the log's tail if the process dies or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def running_mlflow_server(folder: Path, port: int | None = None):
    """A real `mlflow server` on loopback with a SQLite backend in `folder`; yields its tracking URI
    and stops it afterwards, even on failure. The same folder and port serve the same runs again."""
    import subprocess

    port = port or free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    with open(folder / "server.log", "a") as log:
        process = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(folder / "artifacts"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `mlflow server` runs uvicorn as a child
        )
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(f"{uri}/health", process, folder / "server.log", timeout_s=120)
            yield uri
        finally:
            kill_process_group(process)


def kill_process_group(process) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite backend; yields its tracking URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


COLOURS = {"blue": (30, 40, 230), "green": (20, 200, 40), "red": (230, 20, 20)}


@pytest.fixture(scope="session")
def colour_classifier(tmp_path_factory, tiny_backbone):
    """A `retrain.tf.export.Classifier` (tiny backbone + trained head) that tells COLOURS apart.

    Returns {"classifier", "labels", "paths": its 30 training images, "expected": the head's
    probabilities on them}; shared by the export, predict and TFLite tests.
    """
    import numpy as np

    from default_params import default_params
    from imagegen import image_bytes
    from retrain.backbones import load_backbone
    from retrain.features import Example, FeatureCache, compute_features
    from retrain.tf.export import build_classifier
    from retrain.tf.head_training import to_head, train_head

    folder = tmp_path_factory.mktemp("colour-train")
    backbone = load_backbone(str(tiny_backbone))
    examples = []
    for label, colour in COLOURS.items():
        for i in range(10):
            path = folder / f"{label}_{i}.png"
            path.write_bytes(image_bytes("PNG", colour, (48, 48), seed=i))
            examples.append(Example(str(path), label, "train", f"{label}{i:062d}"))
    cache = FeatureCache(folder / "cache", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, cache, batch_size=8)
    x = np.stack([cache.get(e.sha256) for e in examples])
    y = np.array([list(COLOURS).index(e.label) for e in examples])
    params = default_params(**{"train.learning_rate": 0.05, "train.epochs": 60}).train
    head, _ = train_head((x, y), (x, y), 3, params, seed=0)
    classifier = build_classifier(backbone, to_head(head), list(COLOURS), top_k=2)
    return {
        "classifier": classifier,
        "labels": list(COLOURS),
        "paths": [e.path for e in examples],
        "expected": to_head(head).probabilities(x),
    }


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory, colour_classifier) -> Path:
    """colour_classifier as export writes it: saved_model/, labels.txt, model.tflite. Read-only:
    a test that adds files copies it first."""
    from retrain.tf.export import save_classifier

    out = tmp_path_factory.mktemp("colour-export") / "model"
    save_classifier(colour_classifier["classifier"], out, tflite=True)
    return out
