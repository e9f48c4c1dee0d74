"""`mlflow models serve` of the registered model: an image in a JSON request, its top-k labels out.

A small `dvc repro` (tiny backbone) fills a default SQLite store; the model is then served from the
registry exactly as a user would, with MLflow's own server, and asked over loopback HTTP.
"""

import base64
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import mlflow
import pytest

from conftest import free_port, wait_until_serving
from imagegen import image_bytes
from project import BIN, CLASSES, generated_project, run

pytestmark = pytest.mark.slow

MODEL_URI = "models:/retrain-classifier@champion"  # what `retrain promote` registers


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_backbone):
    """A project after one `dvc repro`; yields its default store's tracking URI."""
    root = generated_project(tmp_path_factory, "serving", tiny_backbone)
    run(root, "dvc", "repro")
    run(root, "retrain", "promote", "workspace", "--alias", "champion")  # experiments log, promote registers
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`mlflow models serve` of the registered model; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            MODEL_URI,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/ping", process, log, timeout_s=300)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started
        process.wait(timeout=60)


def _invoke(url: str, body: str) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as error:
        raise AssertionError(f"HTTP {error.code}: {error.read().decode()[:2000]}") from None


def test_a_served_model_names_the_class_of_a_posted_image(server):
    images = [
        image_bytes("JPEG", CLASSES["green"], (90, 70), seed=77),
        image_bytes("PNG", CLASSES["blue"], (50, 50), seed=78),
    ]
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()] for image in images]}}
    green, blue = _invoke(server, json.dumps(body))
    assert green["label"] == "green" and blue["label"] == "blue"
    assert green["top_k_labels"][0] == "green" and len(green["top_k_labels"]) == 2
    assert green["probability"] == pytest.approx(green["top_k_probabilities"][0]) and green["probability"] > 0.5


def test_the_logged_model_carries_a_signature_and_examples_that_serve(store, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    local = mlflow.artifacts.download_artifacts(MODEL_URI)
    model = mlflow.models.Model.load(local)
    assert model.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert {"label", "probability", "top_k_labels", "top_k_probabilities"} <= set(model.signature.outputs.input_names())
    example = model.load_input_example(local)
    assert isinstance(example["image"][0], bytes) and example["image"][0][:2] == b"\xff\xd8"  # a JPEG
    (answer,) = _invoke(server, model.get_serving_input(local))  # what the MLflow UI offers to paste
    assert answer["label"] in CLASSES


def test_a_request_of_thousands_of_tiny_images_is_refused_naming_the_limit_and_the_server_lives_on(server):
    from retrain.mlflow_model import MAX_IMAGES_PER_REQUEST

    gif = base64.b64encode(image_bytes("GIF", (1, 2, 3), (1, 1))).decode()  # 1x1: tiny to send, costly to decode
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[gif]] * 6000}})
    request = urllib.request.Request(
        f"{server}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == 400
    message = json.loads(refused.value.read())["message"]
    assert f"6000 images in one request, over the limit of {MAX_IMAGES_PER_REQUEST}" in message
    green = base64.b64encode(image_bytes("PNG", CLASSES["green"], (40, 40), seed=1)).decode()
    (answer,) = _invoke(server, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[green]]}}))
    assert answer["label"] == "green"  # still serving
