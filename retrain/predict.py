"""`retrain predict`: classify image files with an exported model, as predict.py always did.

The model is the exported SavedModel folder or any of export's .tflite files (labels and input
normalisation read from its TFLite metadata), with the same flags and output.

Prints every label's probability (or the top K) per image; `--category_names` maps labels to
display names (keys are label names, or 1-based class indices as in Oxford 102's label_map.json);
`--json` prints machine-readable output; `--show` draws the image beside its top predictions.
A bad file gets its own error line and the others go on.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError

MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)  # display names, most probable first
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        ranked = [{"label": n, "probability": round(p, 6)} for n, p in zip(self.labels, self.probabilities)]
        return {"path": self.path, "predictions": ranked}


def image_files(inputs: list[str]) -> list[Path]:
    """The files named, and every non-hidden file under the folders named, in a stable order."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            for folder, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(Path(folder) / n for n in sorted(names) if not n.startswith("."))
        else:
            files.append(item)
    return files


def load_category_names(path: Path | None, labels: list[str]) -> list[str]:
    """Display names in label order: a JSON object keyed by label name or 1-based class index."""
    if path is None:
        return labels
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RetrainError(f"{path}: cannot read category names ({error}); give a JSON object") from None
    if not isinstance(mapping, dict):
        raise RetrainError(f"{path}: expected a JSON object mapping labels (or 1-based indices) to names")
    names = {str(value) for value in mapping.values()}
    # A label that already is a display name (classes named from Oxford's label_map.json) stays as
    # it is: its alphabetical index is not its 1-based class id.
    return [str(mapping[label]) if label in mapping else label if label in names else
            str(mapping.get(str(i + 1), label)) for i, label in enumerate(labels)]


def _read_checked(path: Path) -> bytes:
    """The file's bytes, refused when too large in bytes or in pixels (from the header: no pixels decoded)."""
    from retrain.split import rejection_reason, sniff_image

    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RetrainError(f"{size} bytes, over the {MAX_FILE_BYTES} byte limit")
    contents = path.read_bytes()
    header = sniff_image(contents)
    if header is None:  # empty, text or unknown: split's words, found without decoding
        raise RetrainError(rejection_reason(contents, MAX_IMAGE_PIXELS))
    _, (width, height) = header
    if width * height > MAX_IMAGE_PIXELS:
        raise RetrainError(f"{width}x{height} pixels, over the {MAX_IMAGE_PIXELS} pixel limit")
    return contents


def predict_files(model, files: list[Path], names: list[str], top_k: int | None) -> list[Prediction]:
    """Classify each file alone, so one bad file cannot spoil the others' answers.

    model: a loaded SavedModel (`retrain.export.load_model`) or a `TfliteModel`."""
    import tensorflow as tf

    from retrain.split import rejection_reason

    probabilities_of = _probabilities_function(model)
    results = []
    for path in files:
        result = Prediction(str(path))
        try:
            contents = _read_checked(path)
            probabilities = probabilities_of(contents)
        except RetrainError as error:
            result.error = str(error)
        except OSError as error:
            result.error = f"cannot read file ({error.strerror or error})"
        except tf.errors.OpError:  # its message is a graph trace: say what split would say
            result.error = rejection_reason(contents, MAX_IMAGE_PIXELS) or "cannot be decoded"
        else:
            order = np.argsort(-probabilities, kind="stable")[: top_k or len(probabilities)]
            result.labels = [names[i] for i in order]
            result.probabilities = [float(probabilities[i]) for i in order]
        results.append(result)
    return results


def _probabilities_function(model):
    """encoded bytes → float32 [C], through the SavedModel's serving signature or the TFLite interpreter."""
    import tensorflow as tf

    if not hasattr(model, "signatures"):
        return model.probabilities
    serve = model.signatures["serving_default"]
    return lambda contents: serve(image_bytes=tf.constant([contents]))["probabilities"].numpy()[0]


def load_classifier(model_path: Path):
    """(model, labels): a .tflite file (labels from its metadata) or an exported SavedModel folder."""
    model_path = Path(model_path)
    if model_path.suffix == ".tflite" and not model_path.is_dir():
        from retrain.tflite_variants import TfliteModel

        model = TfliteModel.from_file(model_path)
        return model, model.labels
    from retrain.export import load_model

    model = load_model(model_path)
    return model, [label.decode() for label in model.signatures["labels"]()["labels"].numpy()]


def print_text(results: list[Prediction], out=None) -> None:
    out = out or sys.stdout
    for result in results:
        if result.error:
            print(f"{result.path}: error: {result.error}", file=out)
            continue
        print(result.path, file=out)
        width = max(len(n) for n in result.labels)
        for name, probability in zip(result.labels, result.probabilities):
            print(f"  {name:<{width}}  {probability:.4f}", file=out)


def show(result: Prediction) -> Path | None:
    """Draw the image and its top predictions; with no display, save a PNG beside the image."""
    import matplotlib

    headless = not os.environ.get("DISPLAY") and sys.platform.startswith("linux")
    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    with Image.open(result.path) as image:
        left.imshow(image.convert("RGB"))
    left.set_title(f"{result.labels[0]} ({result.probabilities[0]:.1%})")
    left.axis("off")
    shown = min(5, len(result.labels))
    right.barh(range(shown)[::-1], result.probabilities[:shown])
    right.set_yticks(range(shown)[::-1], result.labels[:shown])
    right.set_xlim(0, 1)
    right.set_xlabel("probability")
    figure.tight_layout()
    if headless:
        target = Path(f"{result.path}.prediction.png")
        figure.savefig(target, dpi=100)
        plt.close(figure)
        return target
    plt.show()
    return None


def run(args) -> int:
    """The predict command; returns the exit status (1 when any file failed)."""
    if args.top_k is not None and args.top_k < 1:
        raise RetrainError(f"--top_k must be at least 1 (got {args.top_k})")
    files = image_files(args.inputs)
    if not files:
        raise RetrainError(f"no files found in {' '.join(args.inputs)}")
    model, labels = load_classifier(Path(args.model))
    names = load_category_names(args.category_names, labels)
    results = predict_files(model, files, names, args.top_k)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2, ensure_ascii=False))
    else:
        print_text(results)
    if args.show:
        for result in results:
            if not result.error and (saved := show(result)):
                print(f"saved {saved}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0
