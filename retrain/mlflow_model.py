"""The exported SavedModel as an MLflow pyfunc model (logged "from code": nothing is pickled).

Input: a DataFrame with a binary column `image` of encoded images (`mlflow models serve` takes
them base64-encoded in JSON). Output: one row per image with the top-1 `label`, its
`probability`, and the `top_k_labels` / `top_k_probabilities` lists. Depends on nothing of this
project, so the logged model serves wherever TensorFlow and MLflow are installed. A request
with an image over the byte or pixel limit, or one that is no image, is refused with a clear
message (HTTP 400 when served) before anything is decoded.
"""

import base64
import binascii
import io
import warnings

import mlflow
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# The same limits as `retrain predict` (retrain/predict.py): this file must not import retrain.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 89_478_485


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.serve = tf.saved_model.load(context.artifacts["saved_model"]).signatures["serving_default"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [checked_image(i, value) for i, value in enumerate(pd.DataFrame(model_input)["image"])]
        try:
            out = self.serve(image_bytes=tf.constant(images))
        except tf.errors.OpError as error:  # PIL read the header, TensorFlow not the rest
            raise _bad_input(f"an image cannot be decoded ({error.message.splitlines()[0][:200]})") from None
        labels = [[label.decode() for label in row] for row in out["top_k_labels"].numpy()]
        probabilities = out["top_k_probabilities"].numpy().tolist()
        return pd.DataFrame({
            "label": [row[0] for row in labels],
            "probability": [row[0] for row in probabilities],
            "top_k_labels": labels,
            "top_k_probabilities": probabilities,
        })


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
    width, height = _header_size(index, image)
    if width * height > MAX_IMAGE_PIXELS:
        raise _bad_input(f"image {index}: {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} pixel limit")
    return image


def _header_size(index: int, image: bytes) -> tuple[int, int]:
    """(width, height) from the header alone: PIL's open reads no pixels."""
    from PIL import Image  # MLflow depends on matplotlib, which depends on Pillow

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as opened:
                return opened.size
    except Image.DecompressionBombError:
        raise _bad_input(f"image {index}: over the {MAX_IMAGE_PIXELS} pixel limit") from None
    except Exception:  # any bytes can arrive here
        raise _bad_input(f"image {index}: not an image (send JPEG, PNG, GIF, BMP or WebP bytes)") from None


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(ImageClassifier())
