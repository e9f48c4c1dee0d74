"""params.yaml: the schema and the one loader.

Every knob of the pipeline lives in params.yaml and is validated here, before any stage does any
work: an unknown key (a typo), a wrong type or an out-of-range value is a `RetrainError` naming
the key path and what it accepts. Stages call `load_params()` once and read attributes.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retrain.errors import RetrainError

PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtraFile(_Section):
    """A file fetched into the dataset folder beside the archive (e.g. Oxford 102's .mat files)."""

    url: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class DataParams(_Section):
    url: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    extra_files: list[ExtraFile] = []
    layout: Literal["folders", "oxford102"] = "folders"
    labels: str | None = Field(default=None, min_length=1)
    split: Literal["hash", "official"] = "hash"
    validation_percentage: float = Field(ge=0, le=100)
    testing_percentage: float = Field(ge=0, le=100)
    min_images_per_class: int = Field(ge=1)
    max_image_pixels: int = Field(ge=1)
    # Caps on one dataset, checked while downloading, extracting or copying (see download.Limits).
    max_download_bytes: int = Field(default=2_000_000_000, ge=1)
    max_extracted_bytes: int = Field(default=5_000_000_000, ge=1)
    max_archive_entries: int = Field(default=100_000, ge=1)
    max_compression_ratio: float = Field(default=100.0, ge=1)

    @model_validator(mode="after")
    def _layout_fits(self):
        if self.split == "official" and self.layout != "oxford102":
            raise ValueError("split: official needs layout: oxford102 (only Oxford 102 ships its own split); use split: hash")
        if self.labels and self.layout != "folders":
            raise ValueError(f"labels: a labels CSV goes with layout: folders, not {self.layout}")
        if self.labels and (self.labels.startswith(("/", "\\")) or ".." in self.labels.replace("\\", "/").split("/")):
            raise ValueError(f"labels must be a path inside the dataset folder, like labels.csv (got {self.labels!r})")
        return self

    @model_validator(mode="after")
    def _percentages_fit(self):
        if self.validation_percentage + self.testing_percentage >= 100:
            raise ValueError(
                "validation_percentage + testing_percentage must be below 100 "
                f"(got {self.validation_percentage} + {self.testing_percentage})"
            )
        return self


class BackboneParams(_Section):
    name: str = Field(min_length=1)
    image_size: int | None = Field(default=None, ge=16, le=1024)


class BottlenecksParams(_Section):
    batch_size: int = Field(ge=1, le=1024)
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(default=None, min_length=1)
    ray_actors: int | None = Field(default=None, ge=1)


class AugmentParams(_Section):
    copies: int = Field(ge=0, le=50)
    crop_area_min: float = Field(gt=0, le=1)
    flip: bool
    brightness: float = Field(ge=0, le=1)


class SearchParams(_Section):
    """The opt-in head search (retrain/search.py); its space is documented in code there."""

    trials: int = Field(ge=0, le=1000)
    timeout_s: float | None = Field(default=None, gt=0)


class TrainParams(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adam", "sgd", "rmsprop", "adamw"]
    learning_rate: float = Field(gt=0, le=10)
    lr_schedule: Literal["constant", "cosine"]
    dropout: float = Field(ge=0, lt=1)
    hidden_units: int = Field(ge=0)
    label_smoothing: float = Field(ge=0, lt=1)
    l2: float = Field(ge=0)
    early_stopping_patience: int = Field(ge=0)
    class_weights: Literal["none", "balanced"]
    search: SearchParams


class FinetuneParams(_Section):
    enabled: bool
    blocks: int = Field(ge=1, le=1000)
    epochs: int = Field(ge=1, le=1000)
    learning_rate: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1, le=1024)


class EvaluateParams(_Section):
    top_k: list[int] = Field(min_length=1)
    min_accuracy: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _positive_k(self):
        if any(k < 1 for k in self.top_k):
            raise ValueError(f"every k must be at least 1 (got {self.top_k})")
        return self


class ExportParams(_Section):
    top_k: int = Field(ge=1)
    tflite: bool
    tflite_quantized: list[Literal["float16", "dynamic_range", "int8"]] = []
    max_quantization_drop: float = Field(default=1.0, ge=0, le=100)
    representative_images: int = Field(default=100, ge=1, le=10000)


class TrackingParams(_Section):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)


class Params(_Section):
    seed: int = Field(ge=0)
    data: DataParams
    backbone: BackboneParams
    bottlenecks: BottlenecksParams
    augment: AugmentParams
    train: TrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    export: ExportParams
    tracking: TrackingParams


def _key_path(loc) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _one_line(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    key = _key_path(first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}' (a typo?); remove it or see params.yaml's comments"
    if first["type"] == "missing":
        return f"{path}: missing key '{key}'"
    given = first.get("input")
    given = "" if isinstance(given, dict) else f" (got {given!r})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: '{key}': {message}{given}"


def parse_params(raw: dict, path: Path = PARAMS_FILE) -> Params:
    """Validate a params mapping; one-line RetrainError naming the key path on the first problem."""
    if not isinstance(raw, dict):
        raise RetrainError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise RetrainError(_one_line(path, error)) from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (the only configuration)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as error:
        raise RetrainError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return parse_params(raw, path)


def flatten(params: Params) -> dict[str, object]:
    """{'train.learning_rate': 0.001, ...}: the form MLflow logs and compares."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", params.model_dump())
    return flat
