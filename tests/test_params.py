"""params.yaml is validated before any work: each mistake is one line naming the key."""

from pathlib import Path

import pytest

from default_params import default_raw
from retrain.errors import RetrainError
from retrain.params import flatten, load_params, parse_params

SHIPPED = Path(__file__).resolve().parents[1] / "params.yaml"


def with_change(change):
    raw = default_raw()
    change(raw)
    return raw


def test_the_shipped_params_are_valid():
    """The only test that reads the repo's params.yaml (other tests own theirs): valid as shipped or with any valid experiment applied."""
    params = load_params(SHIPPED)
    assert flatten(params)["train.learning_rate"] == params.train.learning_rate


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r["train"].update(lerning_rate=0.1), "unknown key 'train.lerning_rate'"),
        (lambda r: r["train"].update(learning_rate=-1), "'train.learning_rate': Input should be greater than 0"),
        (lambda r: r["train"].update(epochs="many"), "'train.epochs'"),
        (lambda r: r["data"].update(validation_percentage=60, testing_percentage=50), "below 100"),
        (lambda r: r["evaluate"].update(top_k=[0]), "'evaluate'"),
        (lambda r: r["train"].update(optimizer="adamax"), "'train.optimizer'"),
        (lambda r: r.pop("seed"), "missing key 'seed'"),
        (lambda r: r.update(extra={}), "unknown key 'extra'"),
    ],
)
def test_a_bad_param_is_one_line_naming_its_key(change, expected):
    with pytest.raises(RetrainError) as error:
        parse_params(with_change(change))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_broken_yaml_and_missing_file_are_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RetrainError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(RetrainError, match="not found"):
        load_params(tmp_path / "nope.yaml")
