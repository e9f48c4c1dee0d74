"""`bottlenecks.engine: ray` on a real two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`).

The head and a second node get one CPU each, so the two backbone actors must land on different
nodes. `dvc repro` runs the real stage with RAY_ADDRESS pointing at the cluster; the arrays it
writes must equal, bit for bit, those of the local engine, and each engine must compute exactly
the entries the other left missing. The cluster is stopped when the module ends, pass or fail.
"""

import json
import shutil

import numpy as np
import pytest

from imagegen import make_class_folders, make_tgz
from project import CLASSES, make_project, run, set_params
from retrain.download import file_sha256

pytestmark = pytest.mark.slow
ARRAYS = ("train.npz", "validation.npz", "test.npz")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # 80 MB object stores (Ray's floor is 75 MB): only paths and counts travel through them.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    try:
        nodes.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_backbone):
    images = tmp_path_factory.mktemp("images") / "flowers"
    make_class_folders(images, CLASSES, per_class=8, size=(48, 48))
    archive = make_tgz(images, tmp_path_factory.mktemp("served") / "flowers.tgz", arcname="flowers")
    root = make_project(tmp_path_factory.mktemp("project"), str(archive), file_sha256(archive), tiny_backbone)
    set_params(root, **{"augment.copies": 1, "bottlenecks.batch_size": 4, "bottlenecks.ray_actors": 2})
    return root


def repro(root, engine: str) -> dict:
    """`dvc repro bottlenecks` with `engine`; the stage's stats."""
    set_params(root, **{"bottlenecks.engine": engine})
    # No run cache: DVC would otherwise restore an earlier run's outputs for the same params.
    run(root, "dvc", "repro", "--no-run-cache", "bottlenecks")
    return json.loads((root / "data/bottlenecks.json").read_text())


def arrays(root) -> dict[str, np.ndarray]:
    found = {}
    for name in (*ARRAYS, "train_augmented.npz"):
        with np.load(next(root.glob(f"data/**/{name}")), allow_pickle=False) as data:
            found.update({f"{name}:{key}": data[key] for key in data.files})
    return found


def assert_same(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].dtype == right[key].dtype and np.array_equal(left[key], right[key]), key


def drop_entries(features, count: int, augmented: bool) -> int:
    """Delete `count` cached originals (or augmented views); return how many were deleted."""
    entries = sorted(p for p in features.rglob("*.npy") if ("-" in p.stem) == augmented)[:count]
    for entry in entries:
        entry.unlink()
    return len(entries)


def test_ray_engine_on_two_nodes_matches_local_and_shares_its_cache(cluster, project, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    # One cache root (the converted backbone is made once); each engine's features folder in turn.
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    features, made_locally = tmp_path / "cache/features", tmp_path / "made-locally"

    local = repro(project, "local")
    expected = arrays(project)
    assert local["computed"] == 24 and local["augmented_computed"] > 0
    features.rename(made_locally)

    on_ray = repro(project, "ray")
    assert (on_ray["computed"], on_ray["cache_hits"]) == (24, 0)
    assert on_ray["augmented_computed"] == local["augmented_computed"]
    assert on_ray["ray_nodes"] == 2 and on_ray["ray_nodes_used"] == 2
    # Issue #25: the photos' actors load only what they run (the .tflite, the decoder), checked in
    # the actors' own sys.modules; augmented views still use TensorFlow's random ops.
    assert on_ray["ray_actors_imported_tensorflow"] is False
    assert_same(arrays(project), expected)

    # Local reuses what Ray wrote, computing exactly the entries removed...
    assert (drop_entries(features, 5, augmented=False), drop_entries(features, 2, augmented=True)) == (5, 2)
    again = repro(project, "local")
    assert (again["computed"], again["cache_hits"], again["augmented_computed"]) == (5, 19, 2)
    assert_same(arrays(project), expected)

    # ...and Ray reuses what the local engine wrote.
    shutil.rmtree(features)
    made_locally.rename(features)
    drop_entries(features, 3, augmented=False)
    back = repro(project, "ray")
    assert (back["computed"], back["cache_hits"], back["augmented_computed"]) == (3, 21, 0)
    assert_same(arrays(project), expected)


def _hammer(folder: str, seed: int, rounds: int) -> None:
    """One writer process (forked: only numpy and files, no TensorFlow op): the same keys, its own values."""
    from retrain.features import FeatureCache

    cache = FeatureCache(folder, "shared", 256)
    for r in range(rounds):
        for k in range(8):
            cache.put(f"{k:064x}", np.full(256, seed * 1000 + r, np.float32))


def test_concurrent_writers_on_one_cache_never_leave_a_partial_entry(tmp_path):
    """Two processes (two nodes on a shared mount) write the same entries while a reader reads them."""
    import multiprocessing

    from retrain.features import FeatureCache

    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_hammer, args=(str(tmp_path), seed, 100)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    reader, seen = FeatureCache(tmp_path, "shared", 256), 0
    whole = reader._size  # header, 256 float32s, the digest
    while any(w.is_alive() for w in writers):
        for k in range(8):
            try:  # the raw bytes, not `get`: it would quietly remove a damaged entry
                data = reader.path(f"{k:064x}").read_bytes()
            except FileNotFoundError:
                continue
            vector = np.frombuffer(data[len(reader._header) : whole - 32], "<f4")
            assert len(data) == whole and np.all(vector == vector[0]), k  # one writer's one value, all of it
            seen += 1
    assert all(w.exitcode == 0 for w in writers) and seen > 0
    names = sorted(p.name for p in tmp_path.rglob("*"))  # no temporary file left behind
    assert names == sorted(
        {"shared", reader.folder.name, *(f"{k:064x}"[:2] for k in range(8)), *(f"{k:064x}.npy" for k in range(8))}
    )


def test_losing_a_worker_node_mid_run_finishes_or_stops_in_one_line_and_a_rerun_computes_only_the_rest(
    project, tmp_path, monkeypatch
):
    """A node of its own cluster dies once the first vectors are in: the stage finishes, or stops with
    one line; either way the next run computes exactly the images still missing."""
    import subprocess
    import sys
    import time

    from ray.cluster_utils import Cluster

    run(project, "dvc", "repro", "split")  # then 100 photos per class instead of 8, split by the script itself
    make_class_folders(project / "data/raw/flowers", CLASSES, per_class=100, size=(48, 48))
    run(project, sys.executable, "stages/split.py")
    set_params(
        project,
        **{
            "bottlenecks.engine": "ray",
            "bottlenecks.batch_size": 1,
            "bottlenecks.ray_actors": None,
            "augment.copies": 0,
        },
    )
    features = tmp_path / "cache/features"
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    try:
        worker = nodes.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        nodes.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", nodes.address)
        stage = subprocess.Popen(
            [sys.executable, "stages/bottlenecks.py"],
            cwd=project,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        while stage.poll() is None and sum(1 for _ in features.rglob("*.npy")) < 20:
            time.sleep(0.05)
        nodes.remove_node(worker)  # its raylet and its actor die with it
        out, err = stage.communicate(timeout=600)
        done = sum(1 for _ in features.rglob("*.npy"))
        if stage.returncode != 0:
            last = err.strip().splitlines()[-1]
            assert last.startswith("error: bottlenecks.engine ray:") and "Traceback" not in err, err[-3000:]
        else:
            assert done == 300, out
        run(project, sys.executable, "stages/bottlenecks.py")  # on the head alone now
        again = json.loads((project / "data/bottlenecks.json").read_text())
        assert (again["computed"], again["cache_hits"]) == (300 - done, done)
    finally:
        nodes.shutdown()
