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


def repro(root, monkeypatch, cache, engine: str) -> dict:
    """`dvc repro bottlenecks` with `engine` and feature cache folder `cache`; the stage's stats."""
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(cache))
    set_params(root, **{"bottlenecks.engine": engine})
    run(root, "dvc", "repro", "bottlenecks")
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


def drop_entries(cache, count: int, augmented: bool) -> int:
    """Delete `count` cached originals (or augmented views); return how many were deleted."""
    entries = sorted(p for p in cache.rglob("*.npy") if ("-" in p.stem) == augmented)[:count]
    for entry in entries:
        entry.unlink()
    return len(entries)


def test_ray_engine_on_two_nodes_matches_local_and_shares_its_cache(cluster, project, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    local_cache, ray_cache = tmp_path / "local-cache", tmp_path / "ray-cache"
    # Each cache root also holds the converted backbone: only the features folder is engine-made.
    for cache in (local_cache, ray_cache):
        cache.mkdir()

    local = repro(project, monkeypatch, local_cache, "local")
    expected = arrays(project)
    assert local["computed"] == 24 and local["augmented_computed"] > 0

    on_ray = repro(project, monkeypatch, ray_cache, "ray")
    assert (on_ray["computed"], on_ray["cache_hits"]) == (24, 0)
    assert on_ray["augmented_computed"] == local["augmented_computed"]
    assert on_ray["ray_nodes"] == 2 and on_ray["ray_nodes_used"] == 2
    assert_same(arrays(project), expected)

    # Local reuses what Ray wrote, computing exactly the entries removed...
    dropped = drop_entries(ray_cache, 5, augmented=False), drop_entries(ray_cache, 2, augmented=True)
    again = repro(project, monkeypatch, ray_cache, "local")
    assert (again["computed"], again["cache_hits"], again["augmented_computed"]) == (5, 19, 2) and dropped == (5, 2)
    assert_same(arrays(project), expected)

    # ...and Ray reuses what the local engine wrote.
    drop_entries(local_cache, 3, augmented=False)
    back = repro(project, monkeypatch, local_cache, "ray")
    assert (back["computed"], back["cache_hits"], back["augmented_computed"]) == (3, 21, 0)
    assert_same(arrays(project), expected)
    shutil.rmtree(ray_cache)
