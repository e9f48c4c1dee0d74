"""The classification head, defined once: its layers, its forward pass, its file.

features float32 [N, D] → optional hidden dense layer (`train.activation`) → dropout (training
only) → dense → softmax over the classes. `architecture` says which layers a head has and
`logits` how they are applied; training (`retrain.tf.head_training`), evaluation and
`retrain predict`'s check (numpy, here) and export (`retrain.tf.export`, in the SavedModel and
every .tflite) all run these two functions, each with its runtime's ops (`NUMPY_OPS` here,
`retrain.tf.TF_OPS`), so a change of architecture reaches every path at once.

A trained head is data: `Head` (a kernel, a bias and an activation per dense layer), stored as
one .npz file; reading it needs numpy only.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.atomic import atomic_file
from retrain.errors import RetrainError

HIDDEN_ACTIVATIONS = ("relu", "tanh", "sigmoid")  # train.activation; each is a TFLite built-in op


def architecture(feature_dim: int, num_classes: int, hidden_units: int, activation: str) -> list[tuple[int, int, str]]:
    """The dense layers of a head, input to output: (inputs, units, activation) each."""
    if hidden_units:
        return [(feature_dim, hidden_units, activation), (hidden_units, num_classes, "softmax")]
    return [(feature_dim, num_classes, "softmax")]


def logits(layers, x, ops: dict, dropout=None):
    """The head's forward pass up to the softmax: layers is [(kernel, bias, activation)] as
    `architecture` orders them, ops the runtime's `matmul` and activations, dropout an optional
    function applied to the last layer's input (training only)."""
    for kernel, bias, activation in layers[:-1]:
        x = ops[activation](ops["matmul"](x, kernel) + bias)
    if dropout is not None:
        x = dropout(x)
    kernel, bias, _ = layers[-1]
    return ops["matmul"](x, kernel) + bias


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / np.sum(shifted, axis=-1, keepdims=True)


NUMPY_OPS = {
    "matmul": np.matmul,
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}


@dataclass
class Head:
    """A trained head: float32 kernels [in, out] and biases [out] and an activation per dense layer."""

    kernels: list[np.ndarray]
    biases: list[np.ndarray]
    activations: list[str]

    @property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray, str]]:
        return list(zip(self.kernels, self.biases, self.activations))

    @property
    def feature_dim(self) -> int:
        return int(self.kernels[0].shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.kernels[-1].shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        return logits(self.layers, np.asarray(features, np.float32), NUMPY_OPS).astype(np.float32)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float32 [N, D] features → float32 [N, C] probabilities (dropout off)."""
        return softmax(self.logits(features)).astype(np.float32)

    def with_temperature(self, temperature: float) -> "Head":
        """The same head with its logits divided by temperature: calibrated, with no new op."""
        kernels = [*self.kernels[:-1], (self.kernels[-1] / temperature).astype(np.float32)]
        biases = [*self.biases[:-1], (self.biases[-1] / temperature).astype(np.float32)]
        return Head(kernels, biases, list(self.activations))


def save_head(head: Head, path: Path) -> None:
    """Save atomically: a killed stage leaves the previous head or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"kernel_{i}": k for i, k in enumerate(head.kernels)} | {
        f"bias_{i}": b for i, b in enumerate(head.biases)
    }
    with atomic_file(path, ".npz") as temp:
        np.savez(temp, activations=np.array(json.dumps(head.activations)), **arrays)


def load_head(path: Path) -> Head:
    """The head saved at path; one-line RetrainError when it is missing or no head file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            activations = json.loads(str(data["activations"]))
            kernels = [data[f"kernel_{i}"].astype(np.float32) for i in range(len(activations))]
            biases = [data[f"bias_{i}"].astype(np.float32) for i in range(len(activations))]
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run the train stage first (dvc repro train)") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RetrainError(f"{path}: not a head file ({type(error).__name__}); rerun `dvc repro train`") from None
    allowed = set(HIDDEN_ACTIVATIONS) | {"softmax"}
    if not activations or activations[-1] != "softmax" or not set(activations) <= allowed:
        raise RetrainError(f"{path}: unknown head layers {activations}; rerun `dvc repro train`")
    return Head(kernels, biases, activations)
