"""Files a person reads after evaluation: plots, tables and a page of the model's mistakes.

`write_reports` writes them all into one folder that the evaluate stage declares as an output
and logs to MLflow as artifacts. The numbers come from `retrain.evaluation`, so a report and the
metrics file cannot disagree. Plots are drawn on bare `matplotlib.figure.Figure` objects (the
Agg renderer, no pyplot), which leaves any global backend alone and needs no display.
`misclassified.html` embeds its thumbnails as base64 JPEGs: one self-contained file that still
shows its pictures when moved, attached, or opened in MLflow's artifact viewer.
"""

import base64
import csv
import html
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from retrain import evaluation

THUMBNAIL_PIXELS = 160  # longest side of a thumbnail in misclassified.html
ANNOTATE_MAX_CLASSES = 25  # above this, confusion-matrix cells are too small for numbers


class Misclassified(NamedTuple):
    """A test image the model got wrong; confidence is the probability of the predicted class."""

    path: str
    true_label: str
    predicted_label: str
    confidence: float


def write_reports(out_dir, y_true, probabilities, labels, image_paths, history=None, top_k=(1,)):
    """Write every report into out_dir (created if missing); returns {file name: Path}.

    y_true: int [N] indices into labels; probabilities: float [N, C] softmax output;
    image_paths: N paths, relative to the current directory; history: Keras `History.history`
    ({"loss": [...], "val_loss": [...], ...}, one value per epoch), or None to skip
    learning_curves.png; top_k: misclassified.html lists the max(top_k) most probable classes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(axis=1)
    confusion = evaluation.confusion_matrix(y_true, y_pred, len(labels))
    bins = evaluation.calibration_bins(y_true, probabilities)
    shown = min(max(top_k), len(labels))
    writers = {
        "confusion_matrix.png": lambda p: plot_confusion_matrix(p, confusion, labels),
        "confusion.csv": lambda p: write_confusion_csv(p, y_true, y_pred, labels),
        "per_class.csv": lambda p: write_per_class_csv(p, confusion, labels),
        "per_class.md": lambda p: write_per_class_markdown(p, confusion, labels),
        "reliability.png": lambda p: plot_reliability(p, bins),
        "misclassified.html": lambda p: write_misclassified_html(p, y_true, probabilities, labels, image_paths, shown),
    }
    if history:
        writers["learning_curves.png"] = lambda p: plot_learning_curves(p, history)
    return {name: write(out_dir / name) for name, write in writers.items()}


# --- Tables ---------------------------------------------------------------------------------


def write_confusion_csv(path, y_true, y_pred, labels):
    """One row per test image, columns `actual,predicted` (label names): DVC's confusion plot."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((spreadsheet_safe(labels[t]), spreadsheet_safe(labels[p])) for t, p in zip(y_true, y_pred))
    return Path(path)


def per_class_rows(confusion, labels):
    """[(name, precision, recall, f1, support)] per class, then "macro avg" and "weighted avg".

    The averages match sklearn's classification_report; both rows carry the total support.
    """
    precision, recall, f1, support = evaluation.precision_recall_f1(confusion)
    rows = [(label, *map(float, values), int(n)) for label, *values, n in zip(labels, precision, recall, f1, support)]
    columns = np.stack([precision, recall, f1])
    total = int(support.sum())
    weighted = columns @ support / total if total else np.zeros(3)
    rows.append(("macro avg", *map(float, columns.mean(axis=1)), total))
    rows.append(("weighted avg", *map(float, weighted), total))
    return rows


def write_per_class_csv(path, confusion, labels):
    """per_class.csv: class,precision,recall,f1,support, full precision for machines."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        writer.writerows((spreadsheet_safe(name), *numbers) for name, *numbers in per_class_rows(confusion, labels))
    return Path(path)


# A cell a spreadsheet would run as a formula (`=HYPERLINK(...)`, `+cmd|...`, `@SUM(...)`).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A class name as a CSV cell: with a leading ' when a spreadsheet would read it as a formula
    (OWASP's advice for CSV injection); any other name as is."""
    return f"'{text}" if str(text).startswith(_FORMULA_STARTS) else text


def write_per_class_markdown(path, confusion, labels):
    """per_class.md: the same table rounded for people (a README, a PR comment, `cat`)."""
    lines = ["| class | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
    for name, precision, recall, f1, support in per_class_rows(confusion, labels):
        cell = name.replace("|", "\\|")
        lines.append(f"| {cell} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {support} |")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


# --- Plots ----------------------------------------------------------------------------------


def plot_confusion_matrix(path, confusion, labels):
    """Counts (left) and rows normalised to recall (right), true classes down, predicted across."""
    num_classes = len(labels)
    small = num_classes <= 30
    font = 9 if small else 6  # points; 6 still prints on a 0.14-inch row
    side = max(4.5, (0.3 if small else 0.14) * num_classes + 2.5)  # inches per panel
    support = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    fig = Figure(figsize=(2 * side + 1.5, side + 1), layout="constrained")
    panels = fig.subplots(1, 2)
    for ax, values, title, fmt in [
        (panels[0], confusion, "Counts", "d"),
        (panels[1], normalised, "Normalised by true class", ".2f"),
    ]:
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ticks = np.arange(num_classes)
        # parse_math=False: a class named "$\notacommand$" is text, not TeX that fails the savefig
        ax.set_xticks(ticks, labels, rotation=90, fontsize=font, parse_math=False)
        ax.set_yticks(ticks, labels, fontsize=font, parse_math=False)
        if num_classes <= ANNOTATE_MAX_CLASSES:
            _annotate_cells(ax, values, fmt)
    fig.savefig(path, dpi=100)
    return Path(path)


def _annotate_cells(ax, values, fmt):
    """Write each cell's value in it, white on dark cells so it stays readable."""
    threshold = values.max() / 2 if values.size else 0
    for (row, column), value in np.ndenumerate(values):
        colour = "white" if value > threshold else "black"
        ax.text(column, row, format(value, fmt), ha="center", va="center", color=colour, fontsize=8)


def plot_reliability(path, bins):
    """Reliability diagram (accuracy against confidence per bin) over a histogram of counts."""
    ece = evaluation.expected_calibration_error(bins)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = np.diff(bins.edges)
    filled = bins.counts > 0
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(
        centres[filled], bins.accuracy[filled], width[filled], edgecolor="black", color="tab:blue", label="Accuracy"
    )
    gap = bins.confidence[filled] - bins.accuracy[filled]
    top.bar(
        centres[filled],
        gap,
        width[filled],
        bottom=bins.accuracy[filled],
        color="tab:red",
        alpha=0.3,
        hatch="//",
        edgecolor="tab:red",
        label="Gap to confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="grey", label="Perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=f"Reliability diagram (ECE = {ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(centres, bins.counts, width, edgecolor="black", color="tab:grey")
    bottom.set(xlabel="Confidence (max probability)", ylabel="Images")
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_learning_curves(path, history):
    """One panel per metric in a Keras history, training and validation (`val_*`) together."""
    names = list(dict.fromkeys(key.removeprefix("val_") for key in history))
    fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
        for key, label in [(name, "training"), (f"val_{name}", "validation")]:
            values = history.get(key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=label)
        ax.set(title=name, xlabel="Epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.savefig(path, dpi=100)
    return Path(path)


# --- Misclassified images -------------------------------------------------------------------


def top_misclassified(y_true, probabilities, labels, image_paths, limit=None):
    """The misclassified test images, most confidently wrong first, as `Misclassified` tuples.

    limit: keep only the first `limit` (None: all). Equal confidences keep test-set order.
    """
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    return [
        Misclassified(
            str(image_paths[i]), labels[y_true[i]], labels[predicted[i]], float(probabilities[i, predicted[i]])
        )
        for i in _worst_first(y_true, probabilities)[:limit]
    ]


def _worst_first(y_true, probabilities):
    """Indices of misclassified rows, by descending confidence in the predicted class."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(y_true))
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")]


def write_misclassified_html(path, y_true, probabilities, labels, image_paths, top_k=1):
    """misclassified.html: a table of every wrong test image, worst first, with thumbnails.

    Each row shows the thumbnail (or nothing if the file cannot be read), the image path, the
    true label, the predicted label with its confidence, and the top_k most probable classes.
    """
    probabilities = np.asarray(probabilities)
    order = _worst_first(y_true, probabilities)
    rows = []
    for i in order:
        ranked = np.argsort(-probabilities[i], kind="stable")[:top_k]
        rows.append(
            _misclassified_row(
                image_paths[i],
                labels[y_true[i]],
                labels[ranked[0]],
                probabilities[i, ranked[0]],
                [(labels[c], probabilities[i, c]) for c in ranked],
            )
        )
    summary = f"{len(order)} of {len(y_true)} test images misclassified, most confident first."
    page = _HTML_PAGE.format(summary=html.escape(summary), rows="\n".join(rows), top_k=top_k)
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)


def _misclassified_row(image_path, true_label, predicted_label, confidence, ranked):
    """One <tr> of misclassified.html; every name is escaped."""
    thumbnail = thumbnail_data_uri(image_path)
    image = f'<img src="{thumbnail}" alt="">' if thumbnail else "(unreadable)"
    alternatives = "<br>".join(f"{html.escape(name)} {p:.3f}" for name, p in ranked)
    return (
        f'<tr class="miss"><td>{image}</td>'
        f'<td class="path">{html.escape(str(image_path))}</td>'
        f'<td class="true">{html.escape(true_label)}</td>'
        f'<td class="predicted">{html.escape(predicted_label)}</td>'
        f'<td class="confidence">{confidence:.3f}</td>'
        f'<td class="ranked">{alternatives}</td></tr>'
    )


def thumbnail_data_uri(image_path, size=THUMBNAIL_PIXELS):
    """A `data:image/jpeg;base64,...` thumbnail at most `size` px a side, or None if unreadable."""
    try:
        with Image.open(image_path) as image:
            image.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at reduced scale, much faster
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Misclassified test images</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }}
td.path {{ font-family: monospace; word-break: break-all; max-width: 30em; }}
td.confidence {{ text-align: right; }}
</style>
</head>
<body>
<h1>Misclassified test images</h1>
<p>{summary}</p>
<table>
<tr><th>Image</th><th>Path</th><th>True</th><th>Predicted</th><th>Confidence</th>
<th>Top {top_k}</th></tr>
{rows}
</table>
</body>
</html>
"""
