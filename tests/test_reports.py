"""Reports land as files a person can open: plots, tables and the misclassified-images page."""

import base64
import csv
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import classification_report

from retrain.evaluation import confusion_matrix
from retrain.reports import (
    Misclassified,
    per_class_rows,
    thumbnail_data_uri,
    top_misclassified,
    write_reports,
)

LABELS = ["daisy", "roses & <tulips>", "löwenzahn"]
COLOURS = [(230, 230, 40), (200, 20, 40), (240, 200, 0)]


class MisclassifiedRows(HTMLParser):
    """Collects the text of each <td class=...> cell of every <tr class="miss">, and the <img>s."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self._cell = [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and attrs.get("class") == "miss":
            self.rows.append({})
        elif tag == "td" and self.rows and attrs.get("class"):
            self._cell = attrs["class"]
            self.rows[-1][self._cell] = ""
        elif tag == "img" and attrs.get("src", "").startswith("data:image/jpeg;base64,"):
            self.images += 1

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            self.rows[-1][self._cell] += data


@pytest.fixture
def test_split(tmp_path, monkeypatch):
    """Eight tiny images (non-ASCII names, one corrupt) and predictions with four mistakes."""
    monkeypatch.chdir(tmp_path)
    y_true = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    predicted = [0, 1, 1, 2, 2, 0, 2, 1]
    confidence = [0.9, 0.6, 0.8, 0.95, 0.7, 0.75, 0.5, 0.6]
    probabilities = np.zeros((8, 3))
    for i, (p, c) in enumerate(zip(predicted, confidence)):
        probabilities[i] = (1 - c) / 2
        probabilities[i, p] = c
    paths = []
    for i, label in enumerate(y_true):
        path = tmp_path / "raw" / f"class_{label}" / f"blüte_{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (320, 240), COLOURS[label]).save(path)
        paths.append(str(path.relative_to(tmp_path)))
    (tmp_path / paths[6]).write_bytes(b"not a jpeg")  # misclassified and unreadable
    return y_true, probabilities, paths


# Worst first: image 3 (0.95, roses → löwenzahn), 5 (0.75), 1 (0.6), 6 (0.5, unreadable).
EXPECTED_WORST_FIRST = [
    (3, "roses & <tulips>", "löwenzahn", 0.95),
    (5, "löwenzahn", "daisy", 0.75),
    (1, "daisy", "roses & <tulips>", 0.6),
    (6, "daisy", "löwenzahn", 0.5),
]

HISTORY = {
    "loss": [1.0, 0.6, 0.4],
    "accuracy": [0.5, 0.7, 0.8],
    "val_loss": [1.1, 0.7, 0.6],
    "val_accuracy": [0.4, 0.6, 0.7],
}


def test_write_reports_writes_every_file(tmp_path, test_split):
    y_true, probabilities, paths = test_split
    out_dir = tmp_path / "reports"

    written = write_reports(out_dir, y_true, probabilities, LABELS, paths, HISTORY, top_k=[1, 2])

    expected = {
        "confusion_matrix.png",
        "confusion.csv",
        "per_class.csv",
        "per_class.md",
        "reliability.png",
        "learning_curves.png",
        "misclassified.html",
    }
    assert set(written) == expected
    assert all(written[name] == out_dir / name and written[name].is_file() for name in expected)
    for name in ["confusion_matrix.png", "reliability.png", "learning_curves.png"]:
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG"
            assert 300 <= image.width <= 3000 and 300 <= image.height <= 3000


def test_learning_curves_skipped_without_history(tmp_path, test_split):
    y_true, probabilities, paths = test_split

    written = write_reports(tmp_path / "out", y_true, probabilities, LABELS, paths, None)

    assert "learning_curves.png" not in written
    assert not (tmp_path / "out" / "learning_curves.png").exists()


def test_confusion_csv_has_one_row_per_image_for_dvc(tmp_path, test_split):
    y_true, probabilities, paths = test_split
    write_reports(tmp_path, y_true, probabilities, LABELS, paths)

    with open(tmp_path / "confusion.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    assert len(rows) == 8 and list(rows[0]) == ["actual", "predicted"]
    assert rows[3] == {"actual": "roses & <tulips>", "predicted": "löwenzahn"}


def test_per_class_tables_list_every_class_and_averages(tmp_path, test_split):
    y_true, probabilities, paths = test_split
    write_reports(tmp_path, y_true, probabilities, LABELS, paths)

    markdown = (tmp_path / "per_class.md").read_text(encoding="utf-8")
    with open(tmp_path / "per_class.csv", newline="", encoding="utf-8") as f:
        rows = {row["class"]: row for row in csv.DictReader(f)}

    for name in [*LABELS, "macro avg", "weighted avg"]:
        assert f"| {name} |" in markdown
        assert name in rows
    # daisy: 3 true images, 2 predicted daisy of which 1 right.
    assert rows["daisy"]["support"] == "3" and float(rows["daisy"]["precision"]) == 0.5
    assert rows["weighted avg"]["support"] == "8"


def test_misclassified_page_lists_mistakes_worst_first(tmp_path, test_split):
    y_true, probabilities, paths = test_split
    write_reports(tmp_path, y_true, probabilities, LABELS, paths, top_k=[2])

    page = MisclassifiedRows()
    page.feed((tmp_path / "misclassified.html").read_text(encoding="utf-8"))

    assert [(row["path"], row["true"], row["predicted"], float(row["confidence"])) for row in page.rows] == [
        (paths[i], t, p, c) for i, t, p, c in EXPECTED_WORST_FIRST
    ]
    assert page.images == 3  # the corrupt image is listed without a thumbnail
    assert "&lt;tulips&gt;" in (tmp_path / "misclassified.html").read_text(encoding="utf-8")


def test_top_misclassified_worst_first_with_limit(test_split):
    y_true, probabilities, paths = test_split

    worst = top_misclassified(y_true, probabilities, LABELS, paths, limit=2)

    assert worst == [Misclassified(paths[i], t, p, pytest.approx(c)) for i, t, p, c in EXPECTED_WORST_FIRST[:2]]
    assert len(top_misclassified(y_true, probabilities, LABELS, paths)) == 4


def test_thumbnail_fits_in_160_pixels(tmp_path):
    path = tmp_path / "große.png"
    Image.new("RGB", (800, 400), (10, 200, 10)).save(path)

    uri = thumbnail_data_uri(path)

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.format == "JPEG" and image.size == (160, 80)
    assert thumbnail_data_uri(tmp_path / "missing.jpg") is None


def test_per_class_rows_match_sklearn_classification_report():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    report = classification_report(y_true, y_pred, target_names=LABELS, output_dict=True)

    for name, precision, recall, f1, support in per_class_rows(confusion_matrix(y_true, y_pred, 3), LABELS):
        expected = report[name]
        assert (precision, recall, f1, support) == pytest.approx(
            (expected["precision"], expected["recall"], expected["f1-score"], expected["support"])
        )
