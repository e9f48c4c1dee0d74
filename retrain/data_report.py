"""The data report: which photos to doubt, found on the cached features in seconds.

A classifier is only as good as its labels, and a test score only means something when no test
photo has a twin in training. After bottlenecks, every photo already has a feature vector, so:

- **Likely label errors.** A seeded k-fold logistic regression on all photos (train, validation
  and test together) gives each one an out-of-fold probability: a prediction by a model that never
  saw it. cleanlab's `find_label_issues` (confident learning) picks the photos whose given label
  disagrees with those probabilities, ranked by self-confidence (the probability of the given
  label, lowest first). Each comes with the most probable other class as a suggestion.
- **Near-duplicates.** Pairs of photos whose features have cosine similarity of at least
  `data_report.min_cosine`; a pair in two different splits is leakage. Split keeps look-alikes
  together by perceptual hash (`retrain.phash`); this finds what the hash misses.

Outputs: label_issues.csv, near_duplicates.csv and suspects.png (a contact sheet of the top
suspects) in one folder, and a metrics JSON with counts under a `data/` prefix for
`dvc metrics show`. A person looks, then lists the photos to drop in `data.exclude`. No
TensorFlow: numpy, scikit-learn, cleanlab and PIL; same features + same seed = same report.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.atomic import atomic_file
from retrain.errors import RetrainError
from retrain.paths import SPLITS

# L2 strength per photo on standardised features (sklearn's C = 1 / (strength * photos), so it means the
# same for 30 photos as for 3,000): 0.01 gives the best out-of-fold log loss on the flowers (C 0.05 there).
L2_STRENGTH = 0.01
_CHUNK = 2048  # rows of the similarity matrix held at once (2048 x N float32)
ISSUES_HEADER = ["path", "split", "given", "suggested", "score"]
PAIRS_HEADER = ["path_a", "path_b", "split_a", "split_b", "cosine", "crosses_splits"]


@dataclass(frozen=True)
class Dataset:
    """Every photo with cached features: features float32 [N, D], labels int64 [N] indices into
    `classes`, and per photo its path (as split.csv has it) and split."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    splits: list[str]
    classes: list[str]


@dataclass(frozen=True)
class LabelIssue:
    """A photo whose label the out-of-fold model doubts; score: its probability for the given label."""

    path: str
    split: str
    given: str
    suggested: str
    score: float


@dataclass(frozen=True)
class Pair:
    """Two photos whose features point the same way (cosine similarity in [-1, 1])."""

    path_a: str
    path_b: str
    split_a: str
    split_b: str
    cosine: float

    @property
    def crosses_splits(self) -> bool:
        return self.split_a != self.split_b


def load_features(features_dir: Path) -> Dataset:
    """The bottlenecks stage's <split>.npz arrays (features, labels, paths) and labels.txt, joined."""
    from retrain.features import load_labels, load_split_arrays

    classes = load_labels(features_dir)
    features, labels, paths, splits = [], [], [], []
    for split in SPLITS:
        x, y, names = load_split_arrays(features_dir, split)
        features.append(x.astype(np.float32))
        labels.append(y.astype(np.int64))
        paths += names
        splits += [split] * len(y)
    return Dataset(np.concatenate(features), np.concatenate(labels), paths, splits, classes)


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, seed: int
) -> np.ndarray:
    """float64 [N, C]: each photo's class probabilities from a model trained on the other folds.

    Stratified k-fold, shuffled with `seed`; fewer folds when a class has fewer photos than
    `folds` (at least 2 photos per class are needed). A class with no photo gets probability 0.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        raise RetrainError("the data report needs at least two classes with at least 2 photos each")
    probabilities = np.zeros((len(labels), num_classes))
    splitter = StratifiedKFold(n_splits=int(min(folds, present.min())), shuffle=True, random_state=seed)
    for train, held_out in splitter.split(features, labels):
        strength = L2_STRENGTH * len(train)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1 / strength, max_iter=2000))
        model.fit(features[train], labels[train])
        probabilities[np.ix_(held_out, model.classes_)] = model.predict_proba(features[held_out])
    return probabilities


def find_label_issues(dataset: Dataset, folds: int, seed: int) -> list[LabelIssue]:
    """cleanlab's likely label errors, most doubtful first (lowest out-of-fold probability of the
    given label), each with the most probable other class as the suggestion.

    A class with a single photo cannot be cross-validated: its photo is left out of the analysis
    (and with fewer than two such classes there is nothing to compare: no issues).
    """
    from cleanlab.filter import find_label_issues as cleanlab_issues

    counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
    classes = np.flatnonzero(counts >= 2)
    if len(classes) < 2:
        return []
    rows = np.flatnonzero(np.isin(dataset.labels, classes))
    labels = np.searchsorted(classes, dataset.labels[rows])  # 0..K'-1 over the classes kept
    probabilities = out_of_fold_probabilities(dataset.features[rows], labels, len(classes), folds, seed)
    ranked = cleanlab_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1.0
    return [
        LabelIssue(
            dataset.paths[rows[i]],
            dataset.splits[rows[i]],
            dataset.classes[classes[labels[i]]],
            dataset.classes[classes[int(others[i].argmax())]],
            float(probabilities[i, labels[i]]),
        )
        for i in ranked.tolist()
    ]


def near_duplicates(dataset: Dataset, min_cosine: float) -> list[Pair]:
    """Every pair of photos with feature cosine similarity >= min_cosine, most similar first."""
    vectors = dataset.features.astype(np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    pairs = []
    for start in range(0, len(vectors), _CHUNK):
        similarity = vectors[start : start + _CHUNK] @ vectors.T
        rows, columns = np.nonzero(similarity >= min_cosine)
        for row, column in zip(rows.tolist(), columns.tolist()):
            i = start + row
            if i < column:
                pairs.append(
                    Pair(
                        dataset.paths[i],
                        dataset.paths[column],
                        dataset.splits[i],
                        dataset.splits[column],
                        float(min(similarity[row, column], 1.0)),
                    )
                )
    return sorted(pairs, key=lambda p: (-p.cosine, p.path_a, p.path_b))


def report_metrics(dataset: Dataset, issues: list[LabelIssue], pairs: list[Pair]) -> dict:
    """Counts for `dvc metrics show`, every key under `data/`; per-class numbers nested by class."""
    per_class = {name: {"photos": 0, "label_issues": 0} for name in dataset.classes}
    for label in dataset.labels.tolist():
        per_class[dataset.classes[label]]["photos"] += 1
    for issue in issues:
        per_class[issue.given]["label_issues"] += 1
    return {
        "data/photos": len(dataset.labels),
        "data/label_issues": len(issues),
        "data/label_issues_in_train": sum(issue.split == "train" for issue in issues),
        "data/near_duplicate_pairs": len(pairs),
        "data/cross_split_pairs": sum(pair.crosses_splits for pair in pairs),
        "data/per_class": per_class,
    }


def write_report(
    out_dir: Path,
    metrics_json: Path,
    dataset: Dataset,
    issues: list[LabelIssue],
    pairs: list[Pair],
    *,
    contact_sheet_size: int,
    image_root: Path = Path("."),
) -> dict:
    """Write label_issues.csv, near_duplicates.csv, suspects.png into out_dir and the metrics JSON.

    image_root: where the photos' paths start (the project root). Returns the metrics, per-class
    counts included; the JSON (`dvc metrics show`, `dvc exp show`) holds the totals only, so an
    experiments table stays readable at any number of classes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(
        out_dir / "label_issues.csv",
        ISSUES_HEADER,
        [(i.path, i.split, i.given, i.suggested, f"{i.score:.6f}") for i in issues],
    )
    _write_csv(
        out_dir / "near_duplicates.csv",
        PAIRS_HEADER,
        [(p.path_a, p.path_b, p.split_a, p.split_b, f"{p.cosine:.6f}", str(p.crosses_splits).lower()) for p in pairs],
    )
    draw_contact_sheet(issues[:contact_sheet_size], out_dir / "suspects.png", image_root)
    metrics = report_metrics(dataset, issues, pairs)
    Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(metrics_json)) as temp:
        totals = {key: value for key, value in metrics.items() if not isinstance(value, dict)}
        temp.write_text(json.dumps(totals, indent=2, sort_keys=True) + "\n")
    return metrics


def _write_csv(path: Path, header: list[str], rows) -> None:
    with atomic_file(path, ".csv") as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# --- contact sheet -----------------------------------------------------------------------------

THUMBNAIL = 180  # pixels, longest side
_COLUMNS = 5
_CELL = (300, THUMBNAIL + 64)  # width, height: the thumbnail and three lines of text
_FONT_SIZE = 12


def draw_contact_sheet(issues: list[LabelIssue], path: Path, image_root: Path = Path(".")) -> Path:
    """A PNG grid of the suspects: thumbnail, rank and score, file, "given → suggested" and split.

    Photos are decoded with PIL here (EXIF orientation applied, as a person sees them); one that
    cannot be read is drawn as a grey box, so the sheet never fails the report.
    """
    from PIL import Image, ImageDraw

    font = _font()
    rows = max(1, -(-len(issues) // _COLUMNS))
    sheet = Image.new("RGB", (_CELL[0] * _COLUMNS, _CELL[1] * rows), "white")
    draw = ImageDraw.Draw(sheet)
    if not issues:
        draw.text((10, 10), "no likely label errors found", fill="black", font=font)
    for rank, issue in enumerate(issues):
        x, y = (rank % _COLUMNS) * _CELL[0], (rank // _COLUMNS) * _CELL[1]
        thumbnail = _thumbnail(Path(image_root) / issue.path)
        sheet.paste(thumbnail, (x + (_CELL[0] - thumbnail.width) // 2, y + 4 + (THUMBNAIL - thumbnail.height) // 2))
        lines = [
            f"#{rank + 1}  {issue.split}  p(given) = {issue.score:.3f}",
            issue.path,
            f"{issue.given} → {issue.suggested}",
        ]
        for number, line in enumerate(lines):
            draw.text(
                (x + 6, y + THUMBNAIL + 8 + 17 * number), _fit(line, font, _CELL[0] - 12), fill="black", font=font
            )
    path = Path(path)
    with atomic_file(path, ".png") as temp:
        sheet.save(temp, "PNG")
    return path


def _thumbnail(path: Path):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL * 2, THUMBNAIL * 2))  # JPEG: decode at a fraction of full size
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            return image
    except (OSError, ValueError, Image.DecompressionBombError):
        return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))


def _fit(text: str, font, pixels: int) -> str:
    """text, cut from the left ("…" first) until it fits in `pixels`: a path's end names the photo."""
    cut = 0
    while cut < len(text) and font.getlength(("…" if cut else "") + text[cut:]) > pixels:
        cut += 1
    return ("…" if cut else "") + text[cut:]


def _font():
    """DejaVu Sans from matplotlib (it has the → glyph; PIL's built-in font does not)."""
    import matplotlib
    from PIL import ImageFont

    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), _FONT_SIZE)
    except OSError:
        return ImageFont.load_default()
