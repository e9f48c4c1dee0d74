"""TensorBoard event files of one stage: learning curves, weights, misclassified test images.

Train and evaluate write them into their own outputs (data/train/tensorboard/,
data/evaluate/tensorboard/); the log stage copies them to <workspace>/logs/<run name>/ for
`tensorboard --logdir logs` (queued experiments' copies included) and uploads them to the run.
Written with TensorBoard's own record writer and protos: no TensorFlow, so evaluate stays light.
"""

import io
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from retrain.images import ImageError, decode_image


class _EventFile:
    """One events.out.tfevents.* file, as tf.summary's file writer names and fills it."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._handle = open(folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.retrain.v2", "wb")
        self._records = RecordWriter(self._handle)
        self._write(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def add(self, step: int, value: summary_pb2.Summary.Value) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value])))

    def close(self) -> None:
        self._handle.close()


def _histogram(array: np.ndarray, bins: int = 30) -> summary_pb2.HistogramProto:
    values = np.asarray(array, np.float64).ravel()
    counts, edges = np.histogram(values, bins=bins) if values.size else (np.zeros(0), np.zeros(1))
    return summary_pb2.HistogramProto(
        min=float(values.min()) if values.size else 0.0,
        max=float(values.max()) if values.size else 0.0,
        num=float(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.sum(values**2)),
        bucket_limit=[float(e) for e in edges[1:]],
        bucket=[float(c) for c in counts],
    )


class TensorBoard:
    """The event files of one run: learning curves, weight histograms, misclassified test images."""

    def __init__(self, folder: Path):
        """folder: the stage's own TensorBoard output; what it held from the last run is removed."""
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)

    def write_history(self, history: dict[str, list[float]], weights: dict[int, list] | None = None) -> None:
        """history: key → per-epoch values (loss, accuracy, val_*); weights: epoch → [(name, array)]."""
        files = {"train": _EventFile(self.folder / "train"), "validation": _EventFile(self.folder / "validation")}
        for key, values in history.items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            for epoch, value in enumerate(values):
                files[split].add(epoch, summary_pb2.Summary.Value(tag=f"epoch_{name}", simple_value=float(value)))
        for epoch, arrays in (weights or {}).items():
            for name, array in arrays:
                files["train"].add(epoch, summary_pb2.Summary.Value(tag=name, histo=_histogram(array)))
        for file in files.values():
            file.close()

    def write_misclassified(self, misclassified: list, limit: int = 8, size: int = 160) -> int:
        """A few of the worst misclassified test images, captioned true → predicted."""
        shown, file = 0, _EventFile(self.folder / "test")
        try:
            for step, miss in enumerate(misclassified[:limit]):
                try:
                    image = Image.fromarray(decode_image(Path(miss.path).read_bytes()))
                except (ImageError, OSError):
                    continue
                image.thumbnail((size, size))
                png = io.BytesIO()
                image.save(png, format="PNG")
                picture = summary_pb2.Summary.Image(
                    height=image.height, width=image.width, colorspace=3, encoded_image_string=png.getvalue()
                )
                name = f"misclassified/{miss.true_label} as {miss.predicted_label} ({miss.confidence:.2f})"
                file.add(step, summary_pb2.Summary.Value(tag=name, image=picture))
                shown += 1
        finally:
            file.close()
        return shown
