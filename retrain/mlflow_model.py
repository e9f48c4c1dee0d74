"""The exported model as an MLflow pyfunc model (logged "from code": nothing is pickled).

Input: a DataFrame with a binary column `image` of encoded images (`mlflow models serve` takes
them base64-encoded in JSON). Output: one row per image with the top-1 `label`, its
`probability`, and the `top_k_labels` / `top_k_probabilities` lists. It runs export's
`model.tflite` on LiteRT with the project's one decoder (`retrain.images`, logged beside it as
code), so serving needs no TensorFlow. A request with more than `MAX_IMAGES_PER_REQUEST` images
or `MAX_REQUEST_BYTES` of them, an image over the byte or pixel limit, or one that is no image,
is refused with a message naming the limit (HTTP 400 when served) before anything is decoded.
"""

import base64
import binascii
import json
import threading

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from retrain.images import ImageError, decode_image, resize_image, sniff_image
from retrain.limits import MAX_FILE_BYTES as MAX_IMAGE_BYTES
from retrain.limits import MAX_IMAGE_PIXELS

MAX_IMAGES_PER_REQUEST = 64  # images decoded per call; a client sends more in several requests
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # encoded bytes of all images of one request together


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from retrain.backbones.xnnpack import interpreter

        info = json.loads(open(context.artifacts["classes"], encoding="utf-8").read())
        self.labels, self.top_k = info["labels"], int(info["top_k"])
        self.mean, self.std = np.float32(info["mean"]), np.float32(info["std"])
        self.interpreter = interpreter(model_path=context.artifacts["tflite"])
        (self.input,), (self.output,) = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        self.size = (int(self.input["shape"][1]), int(self.input["shape"][2]))
        self.lock = threading.Lock()  # one interpreter, one invoke at a time

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        column = pd.DataFrame(model_input)["image"]
        if len(column) > MAX_IMAGES_PER_REQUEST:
            raise _bad_input(
                f"{len(column)} images in one request, over the limit of {MAX_IMAGES_PER_REQUEST}; "
                "send them in several requests"
            )
        images, total = [], 0
        for i, value in enumerate(column):
            images.append(checked_image(i, value))
            total += len(images[-1])
            if total > MAX_REQUEST_BYTES:
                raise _bad_input(f"request over the {MAX_REQUEST_BYTES} byte limit of images; send fewer per request")
        probabilities = (
            np.stack([self._probabilities(i, image) for i, image in enumerate(images)])
            if images
            else np.zeros((0, len(self.labels)), np.float32)
        )
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
        labels = [[self.labels[j] for j in row] for row in order]
        top = [[float(p[j]) for j in row] for p, row in zip(probabilities, order)]
        return pd.DataFrame(
            {
                "label": [row[0] for row in labels],
                "probability": [row[0] for row in top],
                "top_k_labels": labels,
                "top_k_probabilities": top,
            }
        )

    def _probabilities(self, index: int, contents: bytes) -> np.ndarray:
        try:
            image = resize_image(decode_image(contents), self.size)
        except ImageError as error:
            raise _bad_input(f"image {index}: {error}") from None
        pixels = ((image * np.float32(255) - self.mean) / self.std)[None].astype(np.float32)
        with self.lock:
            self.interpreter.set_tensor(self.input["index"], pixels)
            self.interpreter.invoke()
            return self.interpreter.get_tensor(self.output["index"])[0].astype(np.float32)


def checked_image(index: int, value) -> bytes:
    """Row `index`'s encoded image (bytes, or base64 text) after the byte and pixel limits."""
    if isinstance(value, (bytes, bytearray)):
        image = bytes(value)
    elif isinstance(value, str):
        if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _bad_input(f"image {index}: over the {MAX_IMAGE_BYTES} byte limit")
        try:
            image = base64.b64decode(value)
        except (binascii.Error, ValueError):
            raise _bad_input(f"image {index}: not base64-encoded image bytes") from None
    else:
        raise _bad_input(f"image {index}: expected encoded image bytes, got {type(value).__name__}")
    if len(image) > MAX_IMAGE_BYTES:
        raise _bad_input(f"image {index}: {len(image)} bytes, over the {MAX_IMAGE_BYTES} byte limit")
    header = sniff_image(image)
    if header is None:
        raise _bad_input(f"image {index}: not an image (send JPEG, PNG, GIF, BMP or WebP bytes)")
    width, height = header[1]
    if width * height > MAX_IMAGE_PIXELS:
        raise _bad_input(f"image {index}: {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} pixel limit")
    return image


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(ImageClassifier())
