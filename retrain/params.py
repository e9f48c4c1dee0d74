"""params.yaml: the schema and the one loader.

Every knob of the pipeline lives in params.yaml and is validated here, before any stage does any
work: an unknown key (a typo), a wrong type or an out-of-range value is a `RetrainError` naming
the key path and what it accepts. Stages call `load_params()` once and read attributes.
"""

import reprlib
import unicodedata
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retrain import limits
from retrain.errors import RetrainError
from retrain.small_files import read_capped_text
from retrain.urls import redact_values

PARAMS_FILE = Path("params.yaml")
MAX_PARAMS_BYTES = 1024 * 1024  # params.yaml is ~5 kB; a MB is a mistake, not a config
MAX_YAML_DEPTH = 20  # params.yaml nests 3 deep (train.search.trials)
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_UNITS = 65_536  # hidden units, batch sizes, k: beyond this a head or a step does not fit in memory
MAX_COUNT = 1_000_000  # epochs, patience: beyond this nothing finishes


class _Section(BaseModel):
    # inf and nan are never a setting: `l2: .inf` would train a head of NaNs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _one_line_text(cls, value):
        """Text settings end up in paths, URLs, tags and log lines: no NUL, line break or control character."""
        if isinstance(value, str) and any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") for c in value):
            raise ValueError("must be one line of text without control characters (a NUL, a line break?)")
        return value


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
    max_image_pixels: int = Field(default=limits.MAX_IMAGE_PIXELS, ge=1)
    # Caps on one dataset, checked while downloading, extracting or copying (see download.Limits).
    max_download_bytes: int = Field(default=limits.MAX_DOWNLOAD_BYTES, ge=1)
    max_extracted_bytes: int = Field(default=limits.MAX_EXTRACTED_BYTES, ge=1)
    max_archive_entries: int = Field(default=limits.MAX_ARCHIVE_ENTRIES, ge=1)
    max_compression_ratio: float = Field(default=limits.MAX_COMPRESSION_RATIO, ge=1)
    # Reviewed data (issue 28): photos a person took out, and look-alikes kept in one split.
    exclude: str | None = Field(default=None, min_length=1)  # a path,reason CSV in the repo (retrain.exclusions)
    near_duplicate_distance: int | None = Field(default=None, ge=0, le=32)  # pHash bits; None: identical files only

    @model_validator(mode="after")
    def _layout_fits(self):
        if self.split == "official" and self.layout != "oxford102":
            raise ValueError(
                "split: official needs layout: oxford102 (only Oxford 102 ships its own split); use split: hash"
            )
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
    ray_actors: int | None = Field(default=None, ge=1, le=MAX_UNITS)


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
    epochs: int = Field(ge=1, le=MAX_COUNT)
    batch_size: int = Field(ge=1, le=MAX_UNITS)  # above the training images is fine: one step per epoch
    optimizer: Literal["adam", "sgd", "rmsprop", "adamw"]
    learning_rate: float = Field(gt=0, le=10)
    lr_schedule: Literal["constant", "cosine"]
    dropout: float = Field(ge=0, lt=1)
    hidden_units: int = Field(ge=0, le=MAX_UNITS)
    activation: Literal["relu", "tanh", "sigmoid"]
    label_smoothing: float = Field(ge=0, lt=1)
    l2: float = Field(ge=0)
    early_stopping_patience: int = Field(ge=0, le=MAX_COUNT)
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
        if any(not 1 <= k <= MAX_UNITS for k in self.top_k):
            raise ValueError(f"every k must be at least 1 (got {self.top_k})")
        return self


class ExportParams(_Section):
    top_k: int = Field(ge=1, le=MAX_UNITS)
    tflite_quantized: list[Literal["float16", "dynamic_range", "int8"]] = []
    max_quantization_drop: float = Field(default=1.0, ge=0, le=100)
    representative_images: int = Field(default=100, ge=1, le=10000)


class TrackingParams(_Section):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)


class DataReportParams(_Section):
    """The data report (retrain/data_report.py): likely label errors and near-duplicates."""

    folds: int = Field(default=5, ge=2, le=50)
    min_cosine: float = Field(default=0.93, gt=0, le=1)
    contact_sheet: int = Field(default=20, ge=0, le=500)


class Params(_Section):
    seed: int = Field(ge=0, le=MAX_SEED)
    data: DataParams
    backbone: BackboneParams
    bottlenecks: BottlenecksParams
    augment: AugmentParams
    train: TrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    data_report: DataReportParams = DataReportParams()
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
    given = "" if isinstance(given, dict) else f" (got {_short_repr(given)})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: '{key}': {message}{given}"


def _short_repr(value) -> str:
    """repr of a given value, short whatever it is (a 4,000-digit number, a nested list)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, 80, 80, 40
    return short.repr(value)


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
        raw = _ParamsLoader.parse(read_capped_text(path, MAX_PARAMS_BYTES, what="params file"))
    except FileNotFoundError:
        raise RetrainError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as error:
        raise RetrainError(f"{path}: not valid YAML ({' '.join(str(error).split())[:300]})") from None
    except ValueError as error:  # a number of more than 4,300 digits
        raise RetrainError(f"{path}: a value cannot be read ({str(error).split(';')[0][:120]}); fix it") from None
    except RecursionError:
        raise RetrainError(f"{path}: nested too deeply (params.yaml nests 3 levels)") from None
    return parse_params(raw, path)


class _ParamsLoader(yaml.SafeLoader):
    """yaml.safe_load, stricter where params.yaml meets DVC and a bad edit:

    - a duplicate key is an error (DVC refuses the file; PyYAML would keep the last silently);
    - an alias (`*name`) is refused: a 1 kB "billion laughs" expands to gigabytes;
    - nesting deeper than MAX_YAML_DEPTH is refused before Python recursion gives out.
    """

    @classmethod
    def parse(cls, text: str):
        """The one document in `text` (what yaml.safe_load does, with this loader's rules)."""
        loader = cls(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"aliases (*{event.anchor}) are not allowed in params.yaml, at {_line(event)}; write the value out"
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep at {_line(self.peek_event())}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.YAMLError(
                        f"duplicate key {str(key)[:80]!r} at {_line(key_node)}; keep one (DVC refuses the file)"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _line(mark_holder) -> str:
    mark = mark_holder.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


def flatten(params: Params) -> dict[str, object]:
    """{'train.learning_rate': 0.001, ...}: the form MLflow logs and compares."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", redact_values(params.model_dump()))  # a password in data.url must not reach MLflow
    return flat
