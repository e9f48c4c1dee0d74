"""Data you can trust (issue 28): the data report finds planted label errors and near-duplicates,
split keeps look-alike photos together and leaves out what a person excluded, and temperature
scaling calibrates a head made over- or underconfident on purpose."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from default_params import write_params
from imagegen import image_bytes, make_class_folders, make_image, png_16bit_bytes
from retrain import calibration
from retrain.data_report import Dataset, find_label_issues, near_duplicates, out_of_fold_probabilities
from retrain.errors import RetrainError
from retrain.phash import connected_groups, near_pairs, perceptual_hash
from retrain.split import assign_split, split_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "roses", "tulips"]
SPLIT_SETTINGS = dict(validation_percentage=20, testing_percentage=20, min_images_per_class=1)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --- the data report --------------------------------------------------------------------------


def _clustered_features(per_class: int = 40, dims: int = 24, seed: int = 0):
    """Features of 3 well-separated classes; photo 0 of class "roses" really is a daisy."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(len(CLASSES), dims))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    features = centres[labels] + rng.normal(0, 1, size=(len(labels), dims))
    planted = per_class  # the first "roses" photo
    features[planted] = centres[0] + rng.normal(0, 1, size=dims)
    splits = [("train", "train", "train", "validation", "test")[i % 5] for i in range(len(labels))]
    paths = [f"data/raw/gen/{CLASSES[label]}/{CLASSES[label]}_{i}.jpg" for i, label in enumerate(labels)]
    return Dataset(features.astype(np.float32), labels, paths, splits, CLASSES), planted


def test_a_photo_in_the_wrong_class_is_a_label_issue_with_its_true_class_suggested():
    dataset, planted = _clustered_features()
    issues = find_label_issues(dataset, folds=5, seed=42)
    assert issues, "the planted photo was not found"
    top = issues[0]
    assert (top.path, top.given, top.suggested) == (dataset.paths[planted], "roses", "daisy")
    assert top.score < 0.5
    assert len(issues) <= 3, "clean, well-separated photos are not suspects"


def test_the_report_is_reproducible_with_the_same_seed():
    dataset, _ = _clustered_features()
    first = out_of_fold_probabilities(dataset.features, dataset.labels, len(CLASSES), folds=5, seed=7)
    again = out_of_fold_probabilities(dataset.features, dataset.labels, len(CLASSES), folds=5, seed=7)
    np.testing.assert_array_equal(first, again)
    assert find_label_issues(dataset, folds=5, seed=7) == find_label_issues(dataset, folds=5, seed=7)


def test_a_class_too_small_for_k_folds_gets_fewer_folds_and_a_one_photo_class_is_left_out():
    dataset, _ = _clustered_features(per_class=3)
    probabilities = out_of_fold_probabilities(dataset.features, dataset.labels, len(CLASSES), folds=10, seed=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    with pytest.raises(RetrainError, match="at least 2 photos"):
        out_of_fold_probabilities(dataset.features[:4], np.array([0, 0, 0, 1]), len(CLASSES), folds=5, seed=0)
    dataset, planted = _clustered_features(per_class=20)
    keep = [i for i in range(len(dataset.labels)) if dataset.labels[i] != 2 or i == 40]  # one "tulips" photo
    lonely = Dataset(
        dataset.features[keep],
        dataset.labels[keep],
        [dataset.paths[i] for i in keep],
        [dataset.splits[i] for i in keep],
        CLASSES,
    )
    issues = find_label_issues(lonely, folds=5, seed=0)
    assert issues[0].path == dataset.paths[planted] and issues[0].suggested == "daisy"
    assert dataset.paths[40] not in {issue.path for issue in issues}
    one_class = Dataset(dataset.features[:21], dataset.labels[:21], dataset.paths[:21], dataset.splits[:21], CLASSES)
    assert find_label_issues(one_class, folds=5, seed=0) == []


def test_near_duplicate_features_are_paired_and_a_pair_across_splits_is_called_out():
    dataset, _ = _clustered_features()
    features = dataset.features.copy()
    features[1] = features[0] * 1.01 + 0.001  # same photo, re-encoded: points the same way
    assert (dataset.splits[0], dataset.splits[3]) == ("train", "validation")
    features[3] = features[2] * 0.99
    dataset = Dataset(features, dataset.labels, dataset.paths, dataset.splits, CLASSES)
    pairs = near_duplicates(dataset, min_cosine=0.999)
    assert {(p.path_a, p.path_b) for p in pairs} == {
        (dataset.paths[0], dataset.paths[1]),
        (dataset.paths[2], dataset.paths[3]),
    }
    crossing = {p.path_a: p.crosses_splits for p in pairs}
    assert crossing == {dataset.paths[0]: False, dataset.paths[2]: True}
    assert all(p.cosine >= 0.999 for p in pairs)


def _project_with_features(root: Path) -> tuple[Dataset, int]:
    """A project folder as bottlenecks leaves it: params.yaml, data/features/*.npz, the photos."""
    dataset, planted = _clustered_features()
    write_params(root, **{"data_report.contact_sheet": 4, "data_report.min_cosine": 0.999})
    features_dir = root / "data/features"
    features_dir.mkdir(parents=True)
    (features_dir / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    features = dataset.features.copy()
    features[1] = features[0]  # an exact twin, in the same split
    for split in ("train", "validation", "test"):
        rows = [i for i, s in enumerate(dataset.splits) if s == split]
        np.savez(
            features_dir / f"{split}.npz",
            features=features[rows],
            labels=dataset.labels[rows].astype(np.int32),
            paths=np.array([dataset.paths[i] for i in rows]),
        )
    colours = {"daisy": (250, 250, 250), "roses": (220, 20, 60), "tulips": (250, 200, 0)}
    for i, path in enumerate(dataset.paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        truth = "daisy" if i == planted else CLASSES[dataset.labels[i]]
        make_image(colours[truth], (48, 40), seed=i).save(root / path)
    return dataset, planted


def test_the_stage_writes_its_outputs_and_never_imports_tensorflow(tmp_path):
    dataset, planted = _project_with_features(tmp_path)
    run = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='stage')['data_report'](); "
        "print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", run, str(REPO / "stages/data_report.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False", "the data report imported TensorFlow"

    issues = _read_csv(tmp_path / "data/data_report/label_issues.csv")
    assert (issues[0]["path"], issues[0]["given"], issues[0]["suggested"]) == (dataset.paths[planted], "roses", "daisy")
    assert list(issues[0]) == ["path", "split", "given", "suggested", "score"]
    pairs = _read_csv(tmp_path / "data/data_report/near_duplicates.csv")
    assert [(p["path_a"], p["path_b"], p["crosses_splits"]) for p in pairs] == [
        (dataset.paths[0], dataset.paths[1], "false")
    ]
    metrics = json.loads((tmp_path / "data/data_report.json").read_text())
    assert metrics["data/label_issues"] == len(issues)
    assert (metrics["data/near_duplicate_pairs"], metrics["data/cross_split_pairs"]) == (1, 0)
    assert not any(isinstance(value, dict) for value in metrics.values())  # totals: one column each in dvc exp show
    assert provenance_metrics(tmp_path)["data/per_class/roses/photos"] == 40  # per class: in MLflow
    with Image.open(tmp_path / "data/data_report/suspects.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 4 * 180
    assert provenance_metrics(tmp_path)["data/label_issues"] == len(issues)


def provenance_metrics(root) -> dict:
    """The metrics the stage logged to its MLflow run, as data/runs/data_report.json records them."""
    provenance = json.loads((root / "data/runs/data_report.json").read_text())
    return {key: values[-1][1] for key, values in provenance["metrics"].items()}


# --- split: look-alikes together, excluded photos out --------------------------------------------


def _names_in_two_splits() -> tuple[str, str]:
    """Two file names that retrain.py's rule puts in different splits."""
    names = [f"burst_{i}.jpg" for i in range(100)]
    first = names[0]
    return first, next(n for n in names if assign_split(n, **_percentages()) != assign_split(first, **_percentages()))


def _percentages():
    return {k: SPLIT_SETTINGS[k] for k in ("validation_percentage", "testing_percentage")}


def _noise_photo(seed: int, size=(160, 120)) -> Image.Image:
    """A photo-like image (smooth random blobs) whose perceptual hash is its own."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _dataset_with_a_burst(root: Path) -> tuple[str, str]:
    make_class_folders(root / "flowers", per_class=4, size=(48, 48))
    first, second = _names_in_two_splits()
    photo = _noise_photo(seed=1)
    photo.save(root / "flowers/red" / first, quality=95)
    buffer = io.BytesIO()  # the same shot, smaller and re-encoded: other bytes, same look
    photo.resize((150, 112), Image.LANCZOS).save(buffer, "JPEG", quality=60)
    (root / "flowers/red" / second).write_bytes(buffer.getvalue())
    _noise_photo(seed=2).save(root / "flowers/green/other.jpg", quality=95)
    return f"flowers/red/{first}", f"flowers/red/{second}"


def _split(root: Path, **options) -> dict[str, str]:
    split_dataset(
        root / "flowers", root / "split.csv", root / "rejected.csv", base_dir=root, **SPLIT_SETTINGS, **options
    )
    return {row["path"]: row["split"] for row in _read_csv(root / "split.csv")}


def test_near_identical_photos_never_land_in_different_splits(tmp_path):
    first, second = _dataset_with_a_burst(tmp_path)
    apart = _split(tmp_path)  # by the name rule alone they would part
    assert apart[first] != apart[second]

    together = _split(tmp_path, near_duplicate_distance=6)
    assert together[first] == together[second] == apart[first], "the group goes where its first path goes"
    listed = _read_csv(tmp_path / "near_duplicates.csv")
    assert [(row["path"], row["group"], row["moved_from"]) for row in listed] == [
        (first, first, ""),
        (second, first, apart[second]),
    ]
    assert "flowers/green/other.jpg" not in {row["path"] for row in listed}
    moved = {path for path in together if together[path] != apart[path]}
    assert moved == {second}, "only the look-alike moved"


def test_look_alikes_chain_into_one_group_and_an_unreadable_hash_pairs_with_nothing(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    assert perceptual_hash(tmp_path / "text.jpg") is None
    hashes = [0b0000, 0b0011, 0b1111, None, 0b1111 << 40]
    assert near_pairs(hashes, 2) == [(0, 1, 2), (1, 2, 2)]
    assert connected_groups(len(hashes), near_pairs(hashes, 2)) == [
        0,
        0,
        0,
        3,
        4,
    ]  # 0 and 2 are 4 bits apart, joined through 1


def test_split_hashes_every_format_it_accepts(tmp_path):
    folders = {
        "a": [("photo.png", image_bytes("PNG", seed=1)), ("grey16.png", png_16bit_bytes())],
        "b": [("anim.gif", image_bytes("GIF", seed=2)), ("photo.webp", image_bytes("WEBP", seed=3))],
    }
    for label, files in folders.items():
        (tmp_path / "flowers" / label).mkdir(parents=True)
        for name, data in files:
            (tmp_path / "flowers" / label / name).write_bytes(data)
    assert len(_split(tmp_path, near_duplicate_distance=6)) == 4


def test_an_excluded_photo_is_in_rejected_csv_with_its_reason_and_in_no_split(tmp_path):
    first, _ = _dataset_with_a_burst(tmp_path)
    exclusions = tmp_path / "exclusions.csv"
    exclusions.write_text(f'path,reason\n{first},"a lotus, not a rose"\n\n')
    splits = _split(tmp_path, exclude=exclusions)
    assert first not in splits and len(splits) == 14  # 12 class photos, the burst pair and one more, less one
    rejected = {row["path"]: row["reason"] for row in _read_csv(tmp_path / "rejected.csv")}
    assert "a lotus, not a rose" in rejected[first] and "exclusions.csv" in rejected[first]


def test_an_exclusion_that_matches_no_photo_is_one_line_naming_it(tmp_path):
    _dataset_with_a_burst(tmp_path)
    exclusions = tmp_path / "exclusions.csv"
    exclusions.write_text("path,reason\nflowers/red/typo.jpg,blurred\n")
    with pytest.raises(RetrainError, match=r"exclusions.csv: 1 path match no image.*flowers/red/typo.jpg"):
        _split(tmp_path, exclude=exclusions)
    exclusions.write_text("file,why\n")
    with pytest.raises(RetrainError, match="header 'path,reason'"):
        _split(tmp_path, exclude=exclusions)


def test_the_shipped_exclusion_list_is_just_its_header():
    assert (REPO / "exclusions.csv").read_text() == "path,reason\n"


# --- calibration --------------------------------------------------------------------------------


def _calibrated_logits(count: int = 4000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from them, so softmax(logits) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(count, classes))
    probabilities = calibration.softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, labels


@pytest.mark.parametrize("scale", [5.0, 0.3], ids=["overconfident", "underconfident"])
def test_temperature_scaling_lowers_ece_of_a_miscalibrated_head(scale):
    logits, labels = _calibrated_logits()
    distorted = logits * scale
    validation, test = slice(0, 2000), slice(2000, None)
    temperature = calibration.fit_temperature(distorted[validation], labels[validation])
    assert temperature == pytest.approx(scale, rel=0.15), "T undoes the distortion"
    before = calibration.softmax(distorted[test])
    after = calibration.softmax(distorted[test], temperature)
    ece_before = calibration.expected_calibration_error(before, labels[test])
    ece_after = calibration.expected_calibration_error(after, labels[test])
    assert ece_after < ece_before / 2 and ece_after < 0.05
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))  # accuracy unchanged
    assert calibration.log_loss(distorted[test], labels[test], temperature) < calibration.log_loss(
        distorted[test], labels[test]
    )


def test_a_head_that_outputs_probabilities_is_calibrated_through_their_logs():
    logits, labels = _calibrated_logits(seed=1)
    probabilities = calibration.softmax(logits * 0.3)  # underconfident, as label smoothing makes a head
    temperature = calibration.fit_temperature(calibration.logits_from_probabilities(probabilities), labels)
    assert temperature == pytest.approx(0.3, rel=0.15)


def test_the_reliability_diagram_is_a_png(tmp_path):
    logits, labels = _calibrated_logits(count=500)
    path = calibration.reliability_diagram(calibration.softmax(logits), labels, tmp_path / "reliability.png")
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_bad_calibration_input_is_one_line():
    with pytest.raises(RetrainError, match="logits"):
        calibration.fit_temperature(np.zeros((3, 2)), np.zeros(4, dtype=int))


# --- the loop through DVC: report, review, exclude ----------------------------------------------


@pytest.mark.slow
def test_dvc_repro_reports_a_photo_in_the_wrong_folder_and_excluding_it_takes_it_out(tmp_path_factory, tiny_backbone):
    from project import CLASSES as COLOURS
    from project import make_project, publish, ran_stages, run, set_params

    images = tmp_path_factory.mktemp("images") / "flowers"
    make_class_folders(images, COLOURS, per_class=12, size=(64, 64))
    (images / "green/planted.jpg").write_bytes(image_bytes("JPEG", COLOURS["red"], (64, 64), seed=999))
    archive = tmp_path_factory.mktemp("archive")
    root = make_project(
        tmp_path_factory.mktemp("project"), str(archive / "flowers.tgz"), publish(images, archive), tiny_backbone
    )
    set_params(root, **{"data.exclude": "exclusions.csv", "data.near_duplicate_distance": 6})

    result = run(root, "dvc", "repro", "data_report")
    assert ran_stages(result) == ["download", "split", "bottlenecks", "data_report"]
    planted = "data/raw/flowers/green/planted.jpg"
    issues = _read_csv(root / "data/data_report/label_issues.csv")
    assert (issues[0]["path"], issues[0]["given"], issues[0]["suggested"]) == (planted, "green", "red")
    shown = run(root, "dvc", "metrics", "show", "--json").stdout
    assert '"data/label_issues"' in shown and '"data/cross_split_pairs"' in shown

    (root / "exclusions.csv").write_text(f"path,reason\n{planted},a red photo in the green folder\n")
    result = run(root, "dvc", "repro", "data_report")
    assert ran_stages(result) == ["split", "bottlenecks", "data_report"]
    assert planted not in {row["path"] for row in _read_csv(root / "data/split.csv")}
    assert {row["path"]: row["reason"] for row in _read_csv(root / "data/rejected.csv")}[planted].endswith(
        "a red photo in the green folder"
    )
    assert planted not in {row["path"] for row in _read_csv(root / "data/data_report/label_issues.csv")}
