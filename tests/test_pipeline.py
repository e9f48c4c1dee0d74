"""`dvc repro` end to end, for real: a generated flower-like archive served over loopback HTTP.

A temporary git + DVC repo holds a copy of the project's pipeline (dvc.yaml, stages/, retrain/)
and the tests' own params.yaml. The backbone is a tiny real SavedModel (fast); everything else — download with checksum,
split, cached bottlenecks, training, evaluation, export, MLflow, `retrain predict` — is the real
thing. The tests run in file order and share one project.
"""

import json
import sys

import pytest

from imagegen import image_bytes, make_class_folders
from project import CLASSES, every_stage, make_project, publish, ran_stages, run, serve_folder, set_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = tmp_path_factory.mktemp("served")
    with serve_folder(served) as url:
        yield served, url


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images") / "flowers"
    make_class_folders(folder, CLASSES, per_class=16, size=(64, 64))
    return folder


@pytest.fixture(scope="module")
def own_feature_cache(tmp_path_factory):
    """This module counts computed features, so it starts from an empty cache of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETRAIN_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, own_feature_cache, server, images, tiny_backbone, mlflow_server):
    """The pipeline run once with `dvc repro`, logging to a real MLflow server."""
    served, url = server
    root = make_project(
        tmp_path_factory.mktemp("project"), f"{url}/flowers.tgz", publish(images, served), tiny_backbone
    )
    first = run(root, "dvc", "repro", tracking_uri=mlflow_server)
    return {
        "root": root,
        "images": images,
        "served": served,
        "first": first,
        "tracking_uri": mlflow_server,
        "url": f"{url}/flowers.tgz",
    }


def test_repro_runs_every_stage_and_exports_a_working_classifier(project):
    root = project["root"]
    assert ran_stages(project["first"]) == every_stage(root)  # in dvc.yaml's order
    assert (root / "data/raw/flowers/red").is_dir()
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    assert stats["computed"] == 48 and stats["cache_hits"] == 0
    metrics = json.loads((root / "data/evaluate/metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9
    assert (root / "model/labels.txt").read_text().split() == ["blue", "green", "red"]
    assert (root / "model/saved_model/saved_model.pb").is_file() and (root / "model/model.tflite").is_file()
    assert (root / "reports/confusion_matrix.png").is_file()


def test_predict_names_the_right_class(project, tmp_path):
    root = project["root"]
    (tmp_path / "new_green.png").write_bytes(image_bytes("PNG", CLASSES["green"], (80, 60), seed=999))
    result = run(root, "retrain", "predict", str(tmp_path / "new_green.png"), "--top_k", "1", "--json")
    answer = json.loads(result.stdout)
    assert answer[0]["predictions"][0]["label"] == "green"
    text = run(root, sys.executable, "-m", "retrain", "predict", str(tmp_path), "--top_k", "2").stdout
    assert text.splitlines()[1].split()[0] == "green" and len(text.splitlines()) == 3


def test_the_mlflow_server_received_the_whole_run(project):
    import mlflow

    client = mlflow.MlflowClient(project["tracking_uri"])
    experiment = client.get_experiment_by_name("retrain")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    (run_info,) = client.search_runs([experiment.experiment_id])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["train.learning_rate"] == "0.05" and "data.url" in run_info.data.params
    tags = run_info.data.tags
    assert tags["dataset_hash"] and tags["backbone_id"] and tags["bottlenecks.computed"] == "48"
    assert all(
        tags[f"retrain.ran.{stage}"] == "true"
        for stage in ("download", "split", "bottlenecks", "train", "evaluate", "export")
    )
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.name"] == "dvc repro"
    assert len(client.get_metric_history(run_info.info.run_id, "val/loss")) > 1
    assert run_info.data.metrics["test/accuracy"] >= 0.9
    assert not any(key.startswith("bottlenecks") for key in run_info.data.metrics)  # bookkeeping is no chart
    inputs = {d.dataset.name: d for d in run_info.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "validation"]
    counts = {t.key: t.value for t in inputs["train"].tags}
    assert sum(int(counts[f"class.{c}"]) for c in CLASSES) == int(counts["images"]) > 0
    assert project["url"] in inputs["train"].dataset.source
    reports = {a.path.split("/")[-1] for a in client.list_artifacts(run_info.info.run_id, "reports")}
    assert {
        "confusion_matrix.png",
        "misclassified.html",
        "per_class.md",
        "reliability.png",
        "learning_curves.png",
    } <= reports
    top = {a.path for a in client.list_artifacts(run_info.info.run_id)}
    assert {"labels.txt", "tensorboard"} <= top
    assert tags["retrain.model_uri"].startswith("models:/")
    registry = mlflow.MlflowClient(project["tracking_uri"], registry_uri=project["tracking_uri"])
    assert registry.search_registered_models() == []  # an experiment logs its model; promote registers it


def test_promote_registers_a_version_that_predicts_through_pyfunc(project, monkeypatch):
    import mlflow
    import pandas as pd

    run(project["root"], "retrain", "promote", "workspace", "--alias", "champion", tracking_uri=project["tracking_uri"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project["tracking_uri"])
    version = mlflow.MlflowClient().get_model_version_by_alias("retrain-classifier", "champion")
    assert version.version == "1"
    model = mlflow.pyfunc.load_model("models:/retrain-classifier@champion")
    image = image_bytes("JPEG", CLASSES["red"], (70, 70), seed=4242)
    answer = model.predict(pd.DataFrame({"image": [image]}))
    assert answer["label"][0] == "red" and len(answer["top_k_labels"][0]) == 2


def test_second_repro_changes_nothing_and_makes_no_run(project):
    import mlflow

    result = run(project["root"], "dvc", "repro", tracking_uri=project["tracking_uri"])
    assert ran_stages(result) == []
    client = mlflow.MlflowClient(project["tracking_uri"])
    assert len(client.search_runs([client.get_experiment_by_name("retrain").experiment_id])) == 1


def test_new_images_compute_only_their_features(project):
    root, images = project["root"], project["images"]
    for i in range(3):
        (images / "blue" / f"blue_new_{i}.jpg").write_bytes(image_bytes("JPEG", CLASSES["blue"], seed=5000 + i))
    set_params(root, **{"data.sha256": publish(images, project["served"])})
    result = run(root, "dvc", "repro", tracking_uri=project["tracking_uri"])
    assert ran_stages(result)[:3] == ["download", "split", "bottlenecks"]
    stats = json.loads((root / "data/bottlenecks.json").read_text())
    assert stats["computed"] == 3 and stats["cache_hits"] == 48


def test_learning_rate_change_reruns_only_the_head_and_a_dead_server_costs_only_the_log_step(project):
    import mlflow

    from conftest import free_port

    root = project["root"]
    set_params(root, **{"train.learning_rate": 0.02})
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    failed = run(root, "dvc", "repro", tracking_uri=dead, check=False)
    assert ran_stages(failed) == ["train", "finetune", "evaluate", "export", "log"]  # finetune (off) only notes it
    assert failed.returncode != 0 and f"error: MLflow tracking store {dead} failed" in failed.stderr, failed.stderr
    result = run(root, "dvc", "repro", tracking_uri=project["tracking_uri"])  # the server is back
    assert ran_stages(result) == ["log"]  # the head, its evaluation and export are kept
    client = mlflow.MlflowClient(project["tracking_uri"])
    logged = client.get_run(json.loads((root / "data/runs/log.json").read_text())["run_id"])
    assert logged.data.params["train.learning_rate"] == "0.02" and logged.data.tags["retrain.ran.train"] == "true"
    assert logged.data.tags["retrain.reused.bottlenecks"] and "test/accuracy" in logged.data.metrics


LIGHT_STAGES = [
    "download",
    "split",
    "bottlenecks",
    "data_report",
    "finetune",
    "evaluate",
]  # finetune: with fine-tuning off


def _tensorflow_loaded_after(root, code: str, module: str = "tensorflow") -> bool:
    """Run code in a fresh interpreter in the project; whether it had imported `module` at exit."""
    probe = f"import atexit, sys\natexit.register(lambda: print('MODULE-LOADED', {module!r} in sys.modules))\n" + code
    result = run(root, sys.executable, "-c", probe, tracking_uri=None)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("MODULE-LOADED")]
    return line.split()[1] == "True"


# Last in this file: it reruns stages outside DVC, which logs runs the tests above count.
def test_light_stages_predict_and_the_served_model_never_import_tensorflow(project, tmp_path):
    root = project["root"]
    for stage in LIGHT_STAGES:  # each a real run, on the outputs of the stages before it
        script = f"stages/{stage}.py"
        code = f"import runpy; sys.argv = [{script!r}]; runpy.run_path({script!r}, run_name='__main__')"
        assert not _tensorflow_loaded_after(root, code), f"stage {stage} imported tensorflow"
    export = "import runpy; sys.argv = ['stages/export.py']; runpy.run_path('stages/export.py', run_name='__main__')"
    assert not _tensorflow_loaded_after(root, export, "keras"), "export imported Keras (TensorFlow alone does)"
    (tmp_path / "red.jpg").write_bytes(image_bytes("JPEG", CLASSES["red"], (70, 70), seed=77))
    predict = f"from retrain.cli import main; assert main(['predict', {str(tmp_path / 'red.jpg')!r}]) == 0"
    assert not _tensorflow_loaded_after(root, predict), "retrain predict (model/model.tflite) imported tensorflow"
    import mlflow

    logged = json.loads((root / "data/runs/log.json").read_text())["run_id"]
    model_uri = mlflow.MlflowClient(project["tracking_uri"]).get_run(logged).data.tags["retrain.model_uri"]
    serve = (
        "import mlflow, pandas as pd, pathlib\n"
        f"mlflow.set_tracking_uri({project['tracking_uri']!r})\n"
        f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
        f"answer = model.predict(pd.DataFrame({{'image': [pathlib.Path({str(tmp_path / 'red.jpg')!r}).read_bytes()]}}))\n"
        "assert answer['label'][0] == 'red', answer\n"
    )
    assert not _tensorflow_loaded_after(root, serve), "the served MLflow model imported tensorflow"
