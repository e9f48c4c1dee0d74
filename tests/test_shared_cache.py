"""A feature cache shared by a team: entries readable under the users' umask, checked on read, and
converted backbones (code, when loaded) only from a folder of the user's own.

Real processes with their own umasks share one real folder; nothing is mocked.
"""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from imagegen import split_examples
from retrain.backbones import load_backbone
from retrain.cache import backbones_root
from retrain.errors import RetrainError
from retrain.features import FeatureCache, compute_features

FILL = """
import os, pickle, sys
os.umask(int(sys.argv[1], 8))
from retrain.backbones import load_backbone
from retrain.features import FeatureCache, compute_features
examples = pickle.loads(bytes.fromhex(sys.argv[2]))
backbone = load_backbone(sys.argv[3], runtime="xnnpack")
cache = FeatureCache(os.path.join(os.environ["RETRAIN_CACHE_DIR"], "features"), backbone.id, backbone.feature_dim)
print(compute_features(examples, backbone, cache, batch_size=4)["computed"])
"""


def _fill(examples, backbone: str, umask: int, cache_dir) -> int:
    """compute_features in a process of its own with `umask`; how many vectors it computed."""
    import pickle

    env = {**os.environ, "RETRAIN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        [sys.executable, "-c", FILL, f"{umask:o}", pickle.dumps(examples).hex(), backbone],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_two_users_with_their_umasks_share_entries_instead_of_recomputing(tmp_path, tiny_backbone):
    examples = split_examples(tmp_path / "images", ["train", "test"])
    first, second = examples[: len(examples) // 2], examples
    shared = tmp_path / "shared-cache"
    assert _fill(first, str(tiny_backbone), 0o002, shared) == len(first)  # a team member, group-writable umask
    entries = list((shared / "features").rglob("*.npy"))
    assert entries and all(stat.S_IMODE(p.stat().st_mode) == 0o664 for p in entries)
    assert _fill(second, str(tiny_backbone), 0o077, shared) == len(second) - len(first)  # reuses, adds the rest
    mine = [p for p in (shared / "features").rglob("*.npy") if p not in entries]
    assert mine and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in mine)  # a private umask stays private


def test_an_entry_copied_over_another_keys_is_recomputed_not_used(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    examples = split_examples(tmp_path / "images", ["train", "test", "validation"])
    backbone = load_backbone(str(tiny_backbone), runtime="xnnpack")
    cache = FeatureCache(tmp_path / "cache" / "features", backbone.id, backbone.feature_dim)
    compute_features(examples, backbone, cache, batch_size=4)
    victim, other = examples[0].sha256, examples[-1].sha256
    truth = cache.get(victim)
    assert not np.array_equal(truth, cache.get(other))
    cache.path(victim).write_bytes(cache.path(other).read_bytes())  # a swapped vector, valid on its own
    assert cache.get(victim) is None and not cache.path(victim).exists()
    assert compute_features(examples, backbone, cache, batch_size=4)["computed"] == 1
    np.testing.assert_array_equal(cache.get(victim), truth)


def test_backbones_load_only_from_a_folder_nobody_else_can_write(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    folder = backbones_root()
    assert folder.parent == tmp_path / "cache" / "backbones" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    load_backbone(str(tiny_backbone), runtime="xnnpack")  # converted and memoised there
    folder.chmod(0o777)  # a teammate could now replace the converted model with one that runs their code
    with pytest.raises(RetrainError, match="writable by others") as error:
        load_backbone(str(tiny_backbone), runtime="xnnpack")
    assert str(folder) in str(error.value) and "\n" not in str(error.value)
    folder.chmod(0o700)
    if os.getuid() == 0:  # root can hand the folder to another user, as a planted folder would be
        os.chown(folder, 12345, -1)
        with pytest.raises(RetrainError, match="owned by uid 12345"):
            load_backbone(str(tiny_backbone), runtime="xnnpack")
        os.chown(folder, 0, -1)
    assert load_backbone(str(tiny_backbone), runtime="xnnpack").runtime == "xnnpack"
