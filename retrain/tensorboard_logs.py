"""TensorBoard event files for one run under <workspace>/logs/<run name>/: curves, weights, errors.

They go to the workspace root (`tracking.logs_dir`), not the stage's working copy, so the files of
queued and temporary experiments survive beside the workspace's own runs for
`tensorboard --logdir logs`.
"""

from retrain.tracking import logs_dir


class TensorBoard:
    """The event files of one run: learning curves, weight histograms, misclassified test images."""

    def __init__(self, run_name: str):
        self.folder = logs_dir() / run_name

    def write_history(self, history: dict[str, list[float]], weights: dict[int, list] | None = None) -> None:
        """history: key → per-epoch values (loss, accuracy, val_*); weights: epoch → [(name, array)]."""
        import tensorflow as tf

        writers = {"train": tf.summary.create_file_writer(str(self.folder / "train")),
                   "validation": tf.summary.create_file_writer(str(self.folder / "validation"))}
        for key, values in history.items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with writers[split].as_default():
                for epoch, value in enumerate(values):
                    tf.summary.scalar(f"epoch_{name}", value, step=epoch)
        with writers["train"].as_default():
            for epoch, arrays in (weights or {}).items():
                for name, array in arrays:
                    tf.summary.histogram(name, array, step=epoch)
        for writer in writers.values():
            writer.flush()
            writer.close()

    def write_misclassified(self, misclassified: list, limit: int = 8, size: int = 160) -> int:
        """A few of the worst misclassified test images, captioned true → predicted."""
        import tensorflow as tf

        from retrain.images import decode_image

        shown = 0
        with tf.summary.create_file_writer(str(self.folder / "test")).as_default():
            for step, miss in enumerate(misclassified[:limit]):
                try:
                    image = decode_image(tf.io.read_file(miss.path))
                except (tf.errors.OpError, ValueError):
                    continue
                image = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (size, size), preserve_aspect_ratio=True)
                name = f"misclassified/{miss.true_label} as {miss.predicted_label} ({miss.confidence:.2f})"
                tf.summary.image(name, image[tf.newaxis], step=step)
                shown += 1
        return shown
