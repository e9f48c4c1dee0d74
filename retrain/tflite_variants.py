"""TFLite for phones: float32, float16, dynamic-range and full-integer int8 variants, each judged.

Every variant is the classifier's single-image function ([1,H,W,3] in, probabilities [1,C] out)
with MediaPipe metadata (`retrain.tflite_metadata`). float32, float16 and dynamic-range take float32
pixels in [0, 1]; int8 takes uint8 pixels 0..255 as they are (input scale 1/255, zero point 0) and
gives uint8 probabilities (scale 1/256), calibrated on a seeded sample of train images
(`retrain.tf.tflite_convert` converts). The export stage runs each on the test split as
`TfliteModel` runs it for `retrain predict`: accuracy on every test image, file size, and the
median latency of one image per invoke on one thread, as a phone app runs it. A variant more than
`export.max_quantization_drop` points below float32 is refused (not written); the others are.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.backbones.xnnpack import interpreter
from retrain.errors import RetrainError
from retrain.features import image_batches, read_split
from retrain.images import decode_image, resize_image
from retrain.tflite_metadata import read_metadata

VARIANTS = ("float32", "float16", "dynamic_range", "int8")
BASELINE = "float32"
METRICS_FILE = "tflite_metrics.json"
EVALUATION_THREADS = 1  # latency as a phone app's usual interpreter runs; also steadier timings on a shared machine
LATENCY_IMAGES = 32  # test images timed per variant (median): enough for a steady median, cheap per experiment


def file_name(variant: str) -> str:
    """model.tflite for float32 (as before variants existed), model_<variant>.tflite for the others."""
    return "model.tflite" if variant == BASELINE else f"model_{variant}.tflite"


def load_image(contents: bytes, size: tuple[int, int]) -> np.ndarray:
    """encoded bytes → float32 [H,W,3] in [0, 1]: retrain.images, the decoder training saw."""
    return resize_image(decode_image(contents), size)


class TfliteModel:
    """A .tflite classifier with metadata, run as a phone app runs it: one image in, probabilities out."""

    def __init__(self, model: bytes, source: str, threads: int | None = None):
        self.metadata = read_metadata(model, source)
        self.labels = self.metadata.labels
        self.size_bytes = len(model)
        self._interpreter = interpreter(model_content=model, num_threads=threads)
        (self._input,), (self._output,) = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        self.image_size = (int(self._input["shape"][1]), int(self._input["shape"][2]))
        if self._output["shape"][-1] != len(self.labels):
            raise RetrainError(
                f"{source}: {self._output['shape'][-1]} outputs but {len(self.labels)} labels in its metadata"
            )

    @classmethod
    def from_file(cls, path: Path, threads: int | None = None) -> "TfliteModel":
        try:
            return cls(Path(path).read_bytes(), str(path), threads)
        except OSError as error:
            raise RetrainError(f"{path}: cannot read the model ({error.strerror or error})") from None

    def probabilities(self, contents: bytes) -> np.ndarray:
        """float32 [C] for encoded image bytes (retrain.images.ImageError when undecodable)."""
        return self.probabilities_of_image(load_image(contents, self.image_size))

    def probabilities_of_image(self, image: np.ndarray) -> np.ndarray:
        """float32 [C] for one float32 image [H,W,3] in [0, 1]."""
        self._interpreter.set_tensor(self._input["index"], self._input_tensor(image)[None])
        self._interpreter.invoke()
        output = self._interpreter.get_tensor(self._output["index"])[0]
        scale, zero_point = self._output["quantization"]
        return (output.astype(np.float32) - zero_point) * scale if scale else output.astype(np.float32)

    def _input_tensor(self, image: np.ndarray) -> np.ndarray:
        pixels = image * 255.0
        if self._input["dtype"] == np.uint8:  # quantized: the pixels themselves, as MediaPipe feeds them
            return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return ((pixels - np.array(self.metadata.mean)) / np.array(self.metadata.std)).astype(np.float32)


@dataclass
class VariantResult:
    file: str
    accuracy: float
    size_bytes: int
    latency_ms: float  # median of single-image, single-thread invokes over the first LATENCY_IMAGES test images
    drop_points: float = 0.0  # float32's test accuracy minus this one's, in percentage points
    written: bool = True
    refused: str | None = None
    max_abs_difference: float | None = None  # float32: largest probability difference from evaluate's


REPRODUCE_TOLERANCE = 1e-3  # an exported model's probabilities against evaluate's, any image, any class


def reproduction_error(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    """The largest probability difference of an exported model from evaluate's; RetrainError past the tolerance."""
    if got.shape != expected.shape:
        raise RetrainError(f"{what} gives shape {got.shape}, evaluate had {expected.shape}; rerun dvc repro")
    worst = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if worst > REPRODUCE_TOLERANCE:
        raise RetrainError(
            f"{what} differs from evaluate's test predictions by {worst:.2e} (> {REPRODUCE_TOLERANCE}); "
            "a preprocessing mismatch: please report it"
        )
    return worst


def evaluate_variants(
    models: dict[str, bytes], test_paths: list[str], test_labels: np.ndarray, expected: np.ndarray | None = None
) -> dict[str, VariantResult]:
    """Run every variant on each test image (decoded once): accuracy, size and median latency.

    Accuracy on every test image with an interpreter per core; latency, as a phone app runs the
    model (one thread, one image per invoke), as the median over the first `LATENCY_IMAGES`.
    With `expected` (evaluate's probabilities [N,C]), float32 must reproduce them on every image:
    it is the model `retrain predict` and the served MLflow model run.
    """
    if not test_paths:
        raise RetrainError("no test images to evaluate the TFLite variants on; raise data.testing_percentage")
    runners = {v: TfliteModel(m, file_name(v), threads=os.cpu_count() or 1) for v, m in models.items()}
    phone = {v: TfliteModel(m, file_name(v), threads=EVALUATION_THREADS) for v, m in models.items()}
    size = next(iter(runners.values())).image_size
    correct = {v: 0 for v in runners}
    seconds = {v: [] for v in runners}
    baseline = []
    seen = 0
    # The one image pipeline (threaded decode, order kept); a file it cannot read never arrives.
    for images, indices, labels in image_batches(test_paths, size, 16, extra=(np.arange(len(test_paths)), test_labels)):
        for image, i, label in zip(images, indices, labels):
            if i != seen:  # image_batches skipped it
                raise RetrainError(f"{test_paths[seen]}: cannot read this test image any more; rerun dvc repro")
            seen += 1
            for variant, runner in runners.items():
                probabilities = runner.probabilities_of_image(image)
                correct[variant] += int(np.argmax(probabilities) == label)
                if variant == BASELINE:
                    baseline.append(probabilities)
                if i < LATENCY_IMAGES:
                    start = time.perf_counter()
                    phone[variant].probabilities_of_image(image)
                    seconds[variant].append(time.perf_counter() - start)
    if seen < len(test_paths):
        raise RetrainError(f"{test_paths[seen]}: cannot read this test image any more; rerun dvc repro")
    results = {
        v: VariantResult(
            file_name(v), correct[v] / len(test_paths), runners[v].size_bytes, 1000 * float(np.median(seconds[v]))
        )
        for v in runners
    }
    if expected is not None and BASELINE in results:
        results[BASELINE].max_abs_difference = reproduction_error(np.stack(baseline), expected, file_name(BASELINE))
    return results


def apply_drop_gate(results: dict[str, VariantResult], max_drop: float) -> None:
    """Mark each variant more than `max_drop` points below float32 as refused (in place)."""
    baseline = results[BASELINE].accuracy
    for variant, result in results.items():
        result.drop_points = round(100 * (baseline - result.accuracy), 4)
        if result.drop_points > max_drop:
            result.written = False
            result.refused = (
                f"{variant}: refused, test accuracy {result.accuracy:.4f} is {result.drop_points:.1f} points below "
                f"float32's {baseline:.4f} (export.max_quantization_drop {max_drop}); {result.file} not written"
            )


def representative_images(train_paths: list[str], count: int, seed: int, size: tuple[int, int]) -> np.ndarray:
    """A seeded sample of `count` train images, decoded as training saw them: int8's calibration set."""
    if not train_paths:
        raise RetrainError("no train images to calibrate the int8 TFLite variant; check data/split.csv")
    chosen = np.random.default_rng(seed).choice(len(train_paths), size=min(count, len(train_paths)), replace=False)
    return np.stack([load_image(Path(train_paths[i]).read_bytes(), size) for i in sorted(chosen)])


def train_image_paths(split_csv: Path) -> list[str]:
    """The train split's image paths, in split.csv's order: where int8's calibration sample comes from."""
    return [example.path for example in read_split(split_csv) if example.split == "train"]


def flat_metrics(results: dict[str, VariantResult]) -> dict[str, float]:
    flat = {}
    for variant, result in results.items():
        flat |= {
            f"tflite_{variant}_accuracy": result.accuracy,
            f"tflite_{variant}_size_bytes": float(result.size_bytes),
            f"tflite_{variant}_latency_ms": result.latency_ms,
            f"tflite_{variant}_written": float(result.written),
        }
    return flat
