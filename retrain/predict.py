"""`retrain predict`: classify image files with an exported model, as predict.py always did.

The model is an exported folder (its `model.tflite` when it has one, run on LiteRT with no
TensorFlow; else its SavedModel), any of export's .tflite files (labels and input normalisation
read from its TFLite metadata) or a SavedModel folder, with the same flags and output.

Prints every label's probability (or the top K) per image; `--category_names` maps labels to
display names (keys are label names, or 1-based class indices as in Oxford 102's label_map.json);
`--min_confidence P` answers "unsure" when the top probability is below P; `--json` prints
machine-readable output; `--show` draws the image beside its top predictions. A bad file named
on the command line gets its own error line and the others go on; a file in a folder that is no
image is skipped with a note.
"""

import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.images import ImageError, sniff_image
from retrain.limits import MAX_FILE_BYTES, MAX_IMAGE_PIXELS

UNSURE = "unsure"
MAX_CATEGORY_FILE_BYTES = 10 * 1024 * 1024


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)  # display names, most probable first
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None
    unsure: bool = False  # the top probability is below --min_confidence

    def as_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        ranked = [{"label": n, "probability": round(p, 6)} for n, p in zip(self.labels, self.probabilities)]
        return {"path": self.path, "answer": UNSURE if self.unsure else self.labels[0], "predictions": ranked}


def image_files(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """(files to classify, files skipped): the files named, and every non-hidden regular file under
    the folders named whose header is an image's, in a stable order. A named path is always
    classified (and gets an error line if it is no image)."""
    files, skipped = [], []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)
            continue
        for folder, dirs, names in os.walk(item):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                path = Path(folder) / name
                (files if _is_regular(path) and sniff_image(_head(path)) is not None else skipped).append(path)
    return files, skipped


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _head(path: Path, size: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def load_category_names(path: Path | None, labels: list[str]) -> list[str]:
    """Display names in label order: a JSON object keyed by label name or 1-based class index.

    A label the file does not map keeps its own name, and one line on stderr names it (a partial
    file would otherwise silently mix display names and raw labels)."""
    if path is None:
        return labels
    mapping = _read_category_file(Path(path))
    names = {str(value) for value in mapping.values()}
    display, unmapped = [], []
    for i, label in enumerate(labels):
        # A label that already is a display name (classes named from Oxford's label_map.json) stays as
        # it is: its alphabetical index is not its 1-based class id.
        if label in mapping:
            display.append(str(mapping[label]))
        elif label in names:
            display.append(label)
        elif str(i + 1) in mapping:
            display.append(str(mapping[str(i + 1)]))
        else:
            display.append(label)
            unmapped.append(f"{label!r} (class {i + 1})")
    if unmapped:
        print(f"note: {path} has no display name for {', '.join(unmapped)}; shown by label", file=sys.stderr)
    if bad := next((n for n in display if not n.isprintable()), None):
        raise RetrainError(f"{path}: display name {bad!r} holds a line break or control character; remove it")
    return display


def _read_category_file(path: Path) -> dict:
    try:
        if not _is_regular(path):
            raise RetrainError(f"{path}: not a regular file; give a JSON object of label → display name")
        if path.stat().st_size > MAX_CATEGORY_FILE_BYTES:
            raise RetrainError(
                f"{path}: over {MAX_CATEGORY_FILE_BYTES} bytes; give a JSON object of label → display name"
            )
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise RetrainError(f"{path}: cannot read category names ({type(error).__name__}); give a JSON object") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, int, float)) for v in mapping.values()):
        raise RetrainError(f"{path}: expected a JSON object mapping labels (or 1-based indices) to names")
    return mapping


def _read_checked(path: Path) -> bytes:
    """The file's bytes, refused when no regular file, too large in bytes or in pixels (header only)."""
    from retrain.split import rejection_reason

    if not _is_regular(path):  # a FIFO or a device would block or never end
        raise RetrainError("not a regular file" if path.exists() else "no such file")
    if (size := path.stat().st_size) > MAX_FILE_BYTES:
        raise RetrainError(f"{size} bytes, over the {MAX_FILE_BYTES} byte limit")
    with open(path, "rb") as handle:
        contents = handle.read(MAX_FILE_BYTES + 1)  # the file may grow after the stat
    if len(contents) > MAX_FILE_BYTES:
        raise RetrainError(f"over the {MAX_FILE_BYTES} byte limit")
    header = sniff_image(contents)
    if header is None:  # empty, text or unknown: split's words, found without decoding
        raise RetrainError(rejection_reason(contents, MAX_IMAGE_PIXELS))
    _, (width, height) = header
    if width * height > MAX_IMAGE_PIXELS:
        raise RetrainError(f"{width}x{height} pixels, over the {MAX_IMAGE_PIXELS} pixel limit")
    return contents


def predict_files(
    model, files: list[Path], names: list[str], top_k: int | None, min_confidence: float | None = None
) -> list[Prediction]:
    """Classify each file alone, so one bad file cannot spoil the others' answers.

    model: anything with `probabilities(encoded bytes) → float32 [C]` (`load_classifier`)."""
    results = []
    for path in files:
        result = Prediction(str(path))
        try:
            probabilities = model.probabilities(_read_checked(path))
        except (RetrainError, ImageError) as error:
            result.error = str(error)
        except OSError as error:
            result.error = f"cannot read file ({error.strerror or error})"
        else:
            order = np.argsort(-probabilities, kind="stable")[: top_k or len(probabilities)]
            result.labels = [names[i] for i in order]
            result.probabilities = [float(probabilities[i]) for i in order]
            result.unsure = min_confidence is not None and result.probabilities[0] < min_confidence
        results.append(result)
    return results


def load_classifier(model_path: Path):
    """(model, labels): a .tflite file (labels from its metadata), an exported folder (its
    model.tflite when present) or a SavedModel folder (TensorFlow)."""
    from retrain.tflite_variants import TfliteModel

    model_path = Path(model_path)
    tflite = model_path / "model.tflite" if model_path.is_dir() else model_path
    if tflite.suffix == ".tflite" and tflite.is_file():
        model = TfliteModel.from_file(tflite)
        return model, model.labels
    if model_path.suffix == ".tflite":
        raise RetrainError(f"{model_path}: no such model file; run `dvc repro` or pass --model")
    from retrain.tf.export import SavedModelClassifier

    model = SavedModelClassifier(model_path)
    return model, model.labels


def _printable(text: str) -> str:
    """A file name as one line: line breaks and control characters escaped, as repr does."""
    return text if text.isprintable() else repr(text)[1:-1]


def print_text(results: list[Prediction], out=None) -> None:
    out = out or sys.stdout
    for result in results:
        if result.error:
            print(f"{_printable(result.path)}: error: {result.error}", file=out)
            continue
        print(f"{_printable(result.path)}" + (f"  ({UNSURE})" if result.unsure else ""), file=out)
        width = max(len(n) for n in result.labels)
        for name, probability in zip(result.labels, result.probabilities):
            print(f"  {name:<{width}}  {probability:.4f}", file=out)


def show(result: Prediction, out_dir: Path) -> Path | None:
    """Draw the image and its top predictions; with no display, save a PNG in out_dir (never
    beside the user's photo, and never through a link)."""
    import matplotlib

    headless = not os.environ.get("DISPLAY") and sys.platform.startswith("linux")
    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    with Image.open(result.path) as image:
        left.imshow(image.convert("RGB"))
    left.set_title(f"{result.labels[0]} ({result.probabilities[0]:.1%})", usetex=False)
    left.axis("off")
    shown = min(5, len(result.labels))
    right.barh(range(shown)[::-1], result.probabilities[:shown])
    right.set_yticks(range(shown)[::-1], [label.replace("$", r"\$") for label in result.labels[:shown]])
    right.set_xlim(0, 1)
    right.set_xlabel("probability")
    figure.tight_layout()
    if headless:
        target = out_dir / f"{Path(result.path).name}.prediction.png"
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        plt.close(figure)
        return target
    plt.show()
    return None


def _check_args(args) -> None:
    if args.top_k is not None and args.top_k < 1:
        raise RetrainError(f"--top_k must be at least 1 (got {args.top_k})")
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise RetrainError(f"--min_confidence must be between 0 and 1 (got {args.min_confidence})")


def run(args) -> int:
    """The predict command; returns the exit status (1 when any file failed)."""
    _check_args(args)
    files, skipped = image_files(args.inputs)
    for path in skipped:
        print(f"skipped {_printable(str(path))}: not an image", file=sys.stderr)
    if not files:
        raise RetrainError(f"no image files found in {' '.join(args.inputs)}")
    model, labels = load_classifier(Path(args.model))
    if args.top_k is not None and args.top_k > len(labels):
        print(
            f"note: --top_k {args.top_k} is more than the model's {len(labels)} classes; showing all {len(labels)}",
            file=sys.stderr,
        )
    names = load_category_names(args.category_names, labels)
    results = predict_files(model, files, names, args.top_k, getattr(args, "min_confidence", None))
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2, ensure_ascii=False))
    else:
        print_text(results)
    failed = any(r.error for r in results)
    if args.show:
        for result in results:
            try:
                if not result.error and (saved := show(result, Path.cwd())):
                    print(f"saved {_printable(str(saved))}", file=sys.stderr)
            except OSError as error:  # a link or an unwritable folder where the picture would go
                print(
                    f"error: cannot save the picture of {_printable(result.path)} in {Path.cwd()} "
                    f"({error.strerror or error}); run from a folder you can write to",
                    file=sys.stderr,
                )
                failed = True
    return 1 if failed else 0
