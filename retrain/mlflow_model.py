"""The exported SavedModel as an MLflow pyfunc model (logged "from code": nothing is pickled).

Input: a DataFrame with a binary column `image` of encoded images (`mlflow models serve` takes
them base64-encoded in JSON). Output: one row per image with the top-1 `label`, its
`probability`, and the `top_k_labels` / `top_k_probabilities` lists. Depends on nothing of this
project, so the logged model serves wherever TensorFlow and MLflow are installed.
"""

import base64

import mlflow
import pandas as pd
import tensorflow as tf


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.serve = tf.saved_model.load(context.artifacts["saved_model"]).signatures["serving_default"]

    def predict(self, context, model_input, params=None):
        images = [value if isinstance(value, (bytes, bytearray)) else base64.b64decode(value)
                  for value in pd.DataFrame(model_input)["image"]]
        out = self.serve(image_bytes=tf.constant([bytes(image) for image in images]))
        labels = [[label.decode() for label in row] for row in out["top_k_labels"].numpy()]
        probabilities = out["top_k_probabilities"].numpy().tolist()
        return pd.DataFrame({
            "label": [row[0] for row in labels],
            "probability": [row[0] for row in probabilities],
            "top_k_labels": labels,
            "top_k_probabilities": probabilities,
        })


mlflow.models.set_model(ImageClassifier())
