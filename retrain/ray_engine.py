"""The bottlenecks stage on a Ray cluster: Ray Data over the entries the feature cache lacks.

`bottlenecks.engine: ray` hands `compute_on_ray` to `features.compute_features` and
`augment.compute_views` as their engine: they find the missing entries and count, as for the
local engine; this engine gets only the missing ones (cache key → image path, view seed), the
transform (None, or `augment.Augmentation` for views) and the cache, and returns how many it
computed. The entries become a Ray dataset; `map_batches` sends them to a pool of actors, each of
which opens the backbone once and runs the local engine (`features.compute_locally`: the one
image pipeline into the same content-addressed `FeatureCache`, atomic entries) on its rows, so a
cache filled by either engine serves the other. The cache travels as its root (passed, never
read back from its layout) and the thread counts as numbers in the `Job`. The driver only counts
what comes back (a tqdm bar with images/s beside Ray Data's own progress). Workers must see the
images and the cache root at the same paths as the driver: a shared filesystem on a real cluster
(see docs/scale.md). Ray is imported only when this engine runs.
"""

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.features import FeatureCache

# A locally started Ray keeps its object store small: only paths, keys and counts travel through
# it (images are read and decoded inside the actors), and the machine is shared with TensorFlow.
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20
# Blocks the driver cuts the rows into: enough for every actor to get work and for a lost block to
# be cheap to redo, few enough that the driver does not hold millions of tiny objects.
MAX_BLOCKS = 1000
# Backbone batches per actor call: each call runs the local engine's pipeline over its rows, so a
# bigger call amortises building that pipeline; smaller ones still give every actor a share.
MAX_BATCHES_PER_CALL = 8
CALLS_PER_ACTOR = 4
CPUS_PER_ACTOR = 1  # Ray's CPU reservation per backbone actor (`ray_actors: null` = one actor per CPU)
ACTOR_THREADS = None  # XNNPACK threads per actor; None: the CPUs Ray gave it
ACTOR_DECODE_THREADS = None  # decoding threads per actor; None: the local engine's (one per core)
ACTOR_START_TIMEOUT_S = 600  # an actor opens the backbone's .tflite (no TensorFlow): seconds, not minutes


@dataclass(frozen=True)
class Job:
    """What every actor needs to rebuild the driver's backbone and to compute its rows."""

    backbone: str
    image_size: tuple[int, int]
    backbone_id: str
    runtime: str  # the driver's backbone.runtime: its features, its cache id
    weights_id: str  # backbone.weights_id: names its checked .tflite in the shared cache
    cache: FeatureCache  # pickled as (root, backbone id, feature dim): the driver's cache
    transform: Callable | None  # features.image_batches' transform: augment.Augmentation for views
    threads: int | None = None  # inference threads per actor; None: the CPUs Ray gave the actor
    decode_threads: int | None = None  # decoding threads per actor; None: the local engine's default


def feature_engine(params):
    """(compute_features, compute_views) on the engine `params.engine` names (BottlenecksParams).

    The local engine's functions, given Ray's engine where it is chosen: the same signatures and
    stats keys, so the stage calls them the same way whichever engine runs.
    """
    from retrain import augment, features

    if params.engine == "local":
        return features.compute_features, augment.compute_views
    engine = functools.partial(compute_on_ray, address=params.ray_address, actors=params.ray_actors)
    return (
        functools.partial(features.compute_features, engine=engine),
        functools.partial(augment.compute_views, engine=engine),
    )


def compute_on_ray(
    missing: dict,
    backbone,
    cache: FeatureCache,
    batch_size: int,
    transform,
    desc: str,
    *,
    address=None,
    actors=None,
    threads=ACTOR_THREADS,
    decode_threads=ACTOR_DECODE_THREADS,
) -> dict:
    """The Ray engine (see `features.fill_missing`): compute `missing` (cache key → (path, view
    seed)) on a pool of `actors` (None: one per CPU), each on `threads` inference and
    `decode_threads` decoding threads; how many were computed, and where the time went."""
    run = connect(address)
    job = Job(
        backbone=backbone.name,
        image_size=backbone.image_size,
        backbone_id=backbone.id,
        runtime=backbone.runtime,
        weights_id=backbone.weights_id,
        cache=cache,
        transform=transform,
        threads=threads,
        decode_threads=decode_threads,
    )
    mapped = time.perf_counter()
    computed, nodes, busy, tensorflow = _map(
        missing, job, batch_size, actors or max(1, run["ray_cpus"] // CPUS_PER_ACTOR), desc
    )
    # Where a job's time goes: the map (pool start, calls, the driver's iteration) and the
    # seconds actors spent inside calls (busy ÷ (map × actors) says how well the pool is fed).
    # And whether the actors loaded TensorFlow: photos need none (views do: TF's random ops).
    return {
        "computed": computed,
        **run,
        "ray_nodes_used": nodes,
        "ray_map_seconds": round(time.perf_counter() - mapped, 3),
        "ray_actor_busy_seconds": round(busy, 3),
        "ray_actors_imported_tensorflow": tensorflow,
    }


def connect(address: str | None = None) -> dict:
    """Join the Ray cluster at `address` (params), else $RAY_ADDRESS; with neither, start Ray here.

    Returns the seconds it took and the cluster's size. Connecting twice in a process is free.
    """
    try:
        import ray
    except ImportError:
        raise RetrainError(
            "bottlenecks.engine ray needs the ray extra: pip install 'retrain[ray]' (make venv EXTRAS=ray)"
        ) from None

    started = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        from retrain.cache import cache_root

        # Actors find converted backbones where the driver does (the shared cache root), and keep
        # TensorFlow's start-up chatter out of the logs Ray forwards to the driver.
        # Progress bars are off in the workers (tqdm reads TQDM_DISABLE when Ray imports it, before
        # any actor runs): the driver shows the one bar.
        env_vars = {
            "RETRAIN_CACHE_DIR": str(cache_root()),
            "TQDM_DISABLE": "1",
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        }
        try:
            if address:
                ray.init(address=address, runtime_env={"env_vars": env_vars}, logging_level="warning")
            else:
                # "local": a new Ray of its own, never one that happens to run on this machine. Its
                # workers inherit the environment it starts with, so they need no runtime_env (whose
                # per-worker set-up was ~2 s of every job's start on 2 cores).
                with _environment(env_vars):
                    ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise RetrainError(
                f"bottlenecks.engine ray: cannot start or join {where} ({_first_line(e)}); "
                "check bottlenecks.ray_address / RAY_ADDRESS, or set bottlenecks.engine: local"
            ) from None
    resources = ray.cluster_resources()
    return {
        "ray_start_seconds": round(time.perf_counter() - started, 3),
        "ray_nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
        "ray_cpus": max(1, int(resources.get("CPU", 1))),
    }


@contextlib.contextmanager
def _environment(values: dict):
    """os.environ with `values` set, restored after (the driver keeps its own progress bar)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _map(missing: dict, job: Job, batch_size: int, actors: int, desc: str) -> tuple[int, int, float, bool]:
    """Run the missing rows through an actor pool; (vectors computed, nodes that computed them,
    seconds the actors spent in calls, all together, whether any actor had imported TensorFlow)."""
    import ray.data
    from tqdm import tqdm

    # Start the whole pool before the first batch: otherwise the first actor up takes every block
    # of a small job while the others still load the backbone. A pool that cannot start fails.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    batches = math.ceil(len(missing) / (actors * CALLS_PER_ACTOR * batch_size))
    per_call = batch_size * min(MAX_BATCHES_PER_CALL, max(1, batches))
    dataset = ray.data.from_pandas(_blocks(missing, per_call))
    results = dataset.map_batches(
        _Embedder,
        fn_constructor_args=(job, batch_size),
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=CPUS_PER_ACTOR,
    )
    computed, nodes, busy, tensorflow = 0, set(), 0.0, False
    with tqdm(total=len(missing), unit="img", desc=f"{desc} (ray)", mininterval=1.0) as bar:
        try:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                done = int(batch["computed"].sum())
                computed += done
                nodes.update(batch["node"].tolist())
                busy += float(batch["busy"].sum())
                tensorflow = tensorflow or bool(batch["tensorflow"].any())
                bar.update(done)
        except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as e:
            # Every finished batch is already in the cache: a rerun computes only the rest.
            raise RetrainError(
                f"bottlenecks.engine ray: the Ray job stopped after {computed} of {len(missing)} "
                f"{desc} ({_first_line(e)}); rerun `dvc repro` to compute only the rest"
            ) from None
    return computed, len(nodes), busy, tensorflow


def _blocks(missing: dict, per_call: int):
    """The rows as pandas blocks of whole actor calls (whole backbone batches), in the order given.

    Whole batches per block make Ray's batches the local engine's batches (same images together),
    so even a backbone whose numbers depended on batch composition would give the same vectors.
    """
    import pandas as pd

    keys = list(missing)
    paths = [str(Path(path).resolve()) for path, _ in missing.values()]
    seeds = np.array([seed for _, seed in missing.values()], np.int32).reshape(-1, 2)
    rows = pd.DataFrame({"key": keys, "path": paths, "seed0": seeds[:, 0], "seed1": seeds[:, 1]})
    per_block = per_call * max(1, math.ceil(len(rows) / per_call / MAX_BLOCKS))
    return [rows.iloc[i : i + per_block] for i in range(0, len(rows), per_block)]


class _Embedder:
    """A Ray actor: the backbone's model opened once; each call runs the local engine over its rows.

    That is `features.compute_locally` (threaded decode with the one decoder, augmentation for
    views, the backbone on its runtime, cache writes on a background thread): the same code as
    `engine: local`, so the same vectors. Only the threads differ: an actor runs XNNPACK on as
    many threads as CPUs Ray gave it, where the local engine takes every core of the machine.
    """

    def __init__(self, job: Job, batch_size: int):
        import ray

        from retrain.backbones import xnnpack

        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        node = ray.get_runtime_context().get_node_id()
        if job.runtime == "xnnpack":
            # Only what it runs: the driver's checked .tflite (named by the weights' hash, so these are
            # the driver's weights) on `threads` XNNPACK threads, from the shared cache root. Nothing
            # to load or check in TensorFlow; the weights are packed here, once per actor.
            path = xnnpack.tflite_path(job.weights_id)
            if not path.is_file():
                raise RetrainError(
                    f"node {node[:12]} cannot read the converted backbone {path}; the cache root "
                    "must be the same shared path on every node (docs/scale.md)"
                )
            self.model = _OnXnnpack(xnnpack.Extractor(path, threads=job.threads or cpus), job.image_size)
        else:  # a backbone that did not convert runs its SavedModel in TensorFlow, loaded and checked here
            from retrain.backbones import load_backbone

            self.model = load_backbone(job.backbone, job.image_size)
            if self.model.id != job.backbone_id:
                raise RetrainError(
                    f"backbone {job.backbone!r} loads as {self.model.id[:12]} on node {node[:12]}, "
                    f"not the driver's {job.backbone_id[:12]}; give every node the same weights"
                )
        self.job, self.batch_size, self.node = job, batch_size, node

    def __call__(self, batch: dict) -> dict:
        from retrain.features import compute_locally

        started = time.perf_counter()
        seeds = zip(batch["seed0"].tolist(), batch["seed1"].tolist())
        missing = {str(key): (str(path), seed) for key, path, seed in zip(batch["key"], batch["path"], seeds)}
        run = compute_locally(
            missing, self.model, self.job.cache, self.batch_size, self.job.transform, "", self.job.decode_threads
        )
        return {
            "computed": np.array([run["computed"]]),
            "node": np.array([self.node]),
            "busy": np.array([time.perf_counter() - started]),
            "tensorflow": np.array(["tensorflow" in sys.modules]),
        }


class _OnXnnpack:
    """What `compute_locally` uses of a backbone (`extract`, `image_size`), on an XNNPACK extractor
    with the actor's thread count."""

    def __init__(self, extractor, image_size):
        self.extract, self.image_size = extractor.features, tuple(image_size)


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
