"""Export: backbone + head as one SavedModel that takes encoded image bytes.

The serving signature takes a string tensor of encoded images (any format split accepts, as
retrain.py's graph took `DecodeJpeg/contents:0`), decodes and resizes them in-graph to the very
pixels the bottlenecks stage got (`retrain.tf.graph_images`, checked against `retrain.images`),
runs the head of `retrain.head`, and returns every class probability and
the top-k labels. A user needs TensorFlow and nothing of this project to serve it. Beside it:
`labels.txt` and `model.tflite`, the float32 single-image model with TFLite metadata (quantized
variants: `retrain.tflite_variants`).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from retrain.atomic import atomic_dir
from retrain.cache import backbones_root
from retrain.errors import RetrainError
from retrain.head import Head, logits
from retrain.limits import MAX_IMAGE_PIXELS
from retrain.native_log import filtered_stderr
from retrain.tf import TF_OPS
from retrain.tf.graph_images import decode_image, resize_image
from retrain.tf.image_header import check_pixels
from retrain.tf.tflite_convert import float32_model
from retrain.tflite_metadata import write_metadata
from retrain.tflite_variants import reproduction_error


class Classifier(tf.Module):
    """Backbone + dense head, with signatures `serving_default` (bytes) and `classify_images`."""

    def __init__(self, backbone, head: Head, labels: list[str], top_k: int, max_image_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(name="retrain_classifier")
        self.max_image_pixels = max_image_pixels  # a constant of the serving graph
        # self.backbone (the restored module, tracked so its variables are saved) is set by a full
        # save_classifier only: a save from the template never restores the backbone.
        self._features = backbone.features
        self._single_pass_features = backbone.single_pass_features
        self.image_size = tuple(backbone.image_size)
        self._source, self._head = backbone, head  # plain attributes (not saved): for the cached TFLite conversion
        self.kernels = [tf.Variable(k, trainable=False, name=f"kernel_{i}") for i, k in enumerate(head.kernels)]
        self.biases = [tf.Variable(b, trainable=False, name=f"bias_{i}") for i, b in enumerate(head.biases)]
        self._activations = list(head.activations)
        self.label_table = tf.Variable(labels, trainable=False, name="labels")
        self.top_k = min(top_k, len(labels))
        height, width = self.image_size
        self.classify_images = tf.function(
            self._classify_images, input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")]
        )
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.labels = tf.function(lambda: {"labels": tf.identity(self.label_table)}, input_signature=[])

    def _decode_checked(self, contents):
        with tf.control_dependencies([check_pixels(contents, self.max_image_pixels)]):  # before decoding
            return resize_image(decode_image(contents), self.image_size)

    def _classify_images(self, images, single_pass=False):
        """float32 [N,H,W,3] in [0,1] → {"probabilities": float32 [N,C]}."""
        x = self._single_pass_features(images) if single_pass else self._features(images)
        layers = list(zip(self.kernels, self.biases, self._activations))
        return {"probabilities": tf.nn.softmax(logits(layers, x, TF_OPS))}

    def _serve(self, image_bytes):
        """string [N] of encoded images → probabilities [N,C], top_k_labels/_probabilities/_indices [N,K].

        An image whose header announces more than max_image_pixels fails the call with an
        InvalidArgumentError before any pixel is decoded (a client may send a decompression bomb).
        """
        images = tf.map_fn(
            self._decode_checked,
            image_bytes,
            fn_output_signature=tf.TensorSpec([*self.image_size, 3], tf.float32),
        )
        probabilities = self._classify_images(images)["probabilities"]
        top = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "probabilities": probabilities,
            "top_k_probabilities": top.values,
            "top_k_indices": top.indices,
            "top_k_labels": tf.gather(self.label_table, top.indices),
        }


def check_accuracy(accuracy: float, min_accuracy: float) -> None:
    """make_image_classifier's --assert_accuracy_at_least: a model below the bar is not exported."""
    if accuracy < min_accuracy:
        raise RetrainError(
            f"test accuracy {accuracy:.4f} is below evaluate.min_accuracy {min_accuracy}; "
            "not exporting (improve the model or lower the bar in params.yaml)"
        )


def build_classifier(
    backbone, head: Head, labels: list[str], top_k: int, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> Classifier:
    return Classifier(backbone, head, labels, top_k, max_image_pixels)


def save_classifier(classifier: Classifier, out_dir: Path, tflite: bool):
    """Write out_dir/saved_model, out_dir/labels.txt and (optionally) out_dir/model.tflite atomically;
    returns the SavedModel as loaded back (what TF Serving would run).

    Tracing and saving the graph costs ~5 s, nearly all of it the backbone, which experiments on the
    head never change. So the first save of each graph (backbone, head shapes and activations, label
    count, top_k, pixel limit, this code) is kept as a template in `backbones_root()`; later saves
    copy its graph and write a checkpoint of its variables with this head's weights and labels in
    place of the template's. Anything unexpected falls back to a full save.
    """
    labels = [label.decode() for label in classifier.label_table.numpy()]
    with atomic_dir(out_dir) as temp:
        saved = temp / "saved_model"
        template = _template_dir(classifier)
        if not _save_from_template(classifier, template, saved):
            classifier.backbone = classifier._source.module  # tracked, so its variables are saved with the model
            signatures = {
                "serving_default": classifier.serve.get_concrete_function(),
                "classify_images": classifier.classify_images.get_concrete_function(),
                "labels": classifier.labels.get_concrete_function(),
            }
            tf.saved_model.save(classifier, str(saved), signatures=signatures)
            _keep_template(saved, template)
        model = load_model(saved)
        (temp / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        if tflite:
            classify = model.signatures["classify_images"]
            reference = lambda images: classify(images=images)["probabilities"]  # noqa: E731
            (temp / "model.tflite").write_bytes(write_metadata(float32_model(classifier, reference), labels))
    return model


# Bump when the saved graph changes in a way the sources in _GRAPH_MODULES do not show.
SAVED_TEMPLATE_VERSION = "1"
_GRAPH_MODULES = (
    "retrain.tf",
    "retrain.tf.export",
    "retrain.tf.graph_images",
    "retrain.tf.image_header",
    "retrain.head",
)
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _template_dir(classifier: Classifier) -> Path:
    head = classifier._head
    key = hashlib.sha256(
        json.dumps(
            [
                SAVED_TEMPLATE_VERSION,
                tf.__version__,
                classifier._source.weights_id,
                list(classifier.image_size),
                [list(k.shape) for k in head.kernels],
                head.activations,
                int(classifier.label_table.shape[0]),
                classifier.top_k,
                classifier.max_image_pixels,
                [hashlib.sha256(Path(sys.modules[m].__file__).read_bytes()).hexdigest() for m in _GRAPH_MODULES],
            ]
        ).encode()
    ).hexdigest()
    return backbones_root() / "classifiers" / f"{key[:32]}.savedmodel"


def _head_values(classifier: Classifier) -> dict[str, tf.Tensor]:
    """The checkpoint keys of what differs between classifiers of one template, with this one's values."""
    values = {"label_table/.ATTRIBUTES/VARIABLE_VALUE": classifier.label_table}
    for name, arrays in (("kernels", classifier.kernels), ("biases", classifier.biases)):
        values |= {f"{name}/{i}/.ATTRIBUTES/VARIABLE_VALUE": v for i, v in enumerate(arrays)}
    return {k: tf.convert_to_tensor(v) for k, v in values.items()}


def _save_from_template(classifier: Classifier, template: Path, saved: Path) -> bool:
    """saved/ = template's graph + a checkpoint of its variables with classifier's head; False when
    there is no usable template (nothing written then)."""
    prefix = template / "variables" / "variables"
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError):  # no template yet, or a damaged one: a full save replaces it
        return False
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    ours = _head_values(classifier)
    if _OBJECT_GRAPH not in dtypes or any(
        k not in dtypes or dtypes[k] != v.dtype or list(shapes[k]) != v.shape.as_list() for k, v in ours.items()
    ):
        return False
    shutil.copytree(template, saved, ignore=shutil.ignore_patterns("variables", "fingerprint.pb"))
    names = sorted(dtypes)
    tf.raw_ops.SaveV2(
        prefix=str(saved / "variables" / "variables"),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[ours[k] if k in ours else tf.constant(reader.get_tensor(k), dtype=dtypes[k]) for k in names],
    )
    from tensorflow.python.saved_model import fingerprinting_utils

    fingerprinting_utils.write_fingerprint(str(saved))  # fingerprint.pb hashes the new variables too
    return True


def _keep_template(saved: Path, template: Path) -> None:
    """A copy of a fully saved SavedModel as the template of its graph (best effort: a cache)."""
    try:
        with atomic_dir(template) as temp:
            shutil.copytree(saved, temp, dirs_exist_ok=True)
    except OSError:
        pass


def load_model(model_dir: Path):
    """Load an exported model: the folder holding saved_model/ or the SavedModel folder itself."""
    model_dir = Path(model_dir)
    saved = model_dir / "saved_model" if (model_dir / "saved_model").is_dir() else model_dir
    if not (saved / "saved_model.pb").is_file():
        raise RetrainError(f"{model_dir}: no exported model here; run `dvc repro` or pass --model DIR")
    try:
        return tf.saved_model.load(str(saved))
    except Exception as error:  # TF raises many types for a damaged model
        raise RetrainError(
            f"{saved}: cannot load the SavedModel ({type(error).__name__}); export it again (dvc repro export)"
        ) from None


class SavedModelClassifier:
    """An exported SavedModel as `retrain predict` runs it: encoded bytes in, probabilities [C] out."""

    def __init__(self, model_dir: Path):
        self.model = load_model(model_dir)
        signatures = getattr(self.model, "signatures", {})
        if "serving_default" not in signatures or "labels" not in signatures:
            raise RetrainError(
                f"{model_dir}: not a model exported by retrain (no serving_default and labels "
                "signatures); pass --model with an exported model folder or .tflite file"
            )
        self.labels = [label.decode() for label in signatures["labels"]()["labels"].numpy()]

    def probabilities(self, contents: bytes) -> np.ndarray:
        from retrain.images import ImageError
        from retrain.split import rejection_reason

        try:
            return predict_bytes(self.model, [contents])[0]
        except tf.errors.OpError:  # its message is a graph trace: say what split would say
            raise ImageError(rejection_reason(contents, MAX_IMAGE_PIXELS) or "cannot be decoded") from None


def predict_bytes(model, contents: list[bytes], batch_size: int = 32) -> np.ndarray:
    """Probabilities [N,C] from the exported serving signature, batch by batch."""
    serve = model.signatures["serving_default"]
    with filtered_stderr():  # TensorFlow's uint8 ops print a false alarm on AVX-512 machines
        out = [
            serve(image_bytes=tf.constant(contents[i : i + batch_size]))["probabilities"].numpy()
            for i in range(0, len(contents), batch_size)
        ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def check_reproduces(model, paths: list[str], expected: np.ndarray) -> float:
    """Run the exported SavedModel (its in-graph decoder) on test images; it must give evaluate's probabilities."""
    got = predict_bytes(model, [Path(p).read_bytes() for p in paths])
    return reproduction_error(got, expected, "the exported SavedModel")
