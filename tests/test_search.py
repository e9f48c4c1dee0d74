"""The head search: seeded TPE, deterministic, scored on validation, params that TrainParams takes."""

import numpy as np
import pytest

from default_params import default_params, default_raw
from retrain.errors import RetrainError
from retrain.params import TrainParams, parse_params
from retrain.tf.search import HIDDEN_UNITS, search_head


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.eye(3, 8, dtype=np.float32) * 2
    return (centres[labels] + rng.normal(size=(n, 8))).astype(np.float32), labels.astype(np.int32)


TRAIN, VALIDATION = _blobs(60, 0), _blobs(24, 1)


def _params(trials=3, **search):
    train = default_params().train
    return train.model_copy(
        update={"epochs": 3, "search": train.search.model_copy(update={"trials": trials, **search})}
    )


@pytest.fixture(scope="module")
def searches():
    """Seed 0 twice (the second with an on_trial callback) and seed 1 once: 9 small fits."""
    seen = []
    return {
        "first": search_head(TRAIN, VALIDATION, 3, _params(), seed=0),
        "again": search_head(TRAIN, VALIDATION, 3, _params(), seed=0, on_trial=seen.append),
        "other": search_head(TRAIN, VALIDATION, 3, _params(), seed=1),
        "seen": seen,
    }


def test_same_seed_same_trials_values_and_best(searches):
    first, again = searches["first"], searches["again"]
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert [t.value for t in first.trials] == [t.value for t in again.trials]
    assert [t.history for t in first.trials] == [t.history for t in again.trials]
    assert (first.best_params, first.best_value) == (again.best_params, again.best_value)


def test_another_seed_samples_other_trials(searches):
    assert [t.params for t in searches["first"].trials] != [t.params for t in searches["other"].trials]


def test_trials_are_reported_in_order_and_the_best_is_the_lowest(searches):
    result = searches["again"]
    assert searches["seen"] == result.trials and [t.number for t in result.trials] == [0, 1, 2]
    assert result.best_value == min(t.value for t in result.trials) and np.isfinite(result.best_value)
    best = next(t for t in result.trials if t.value == result.best_value)
    assert result.best_params == best.params
    for trial in result.trials:
        assert trial.epochs == len(trial.history["val_loss"]) >= 1


def test_best_params_are_valid_train_params(searches):
    params = _params()
    best = searches["first"].best_params
    assert set(best) <= set(TrainParams.model_fields) - {"search"}
    final = TrainParams.model_validate({**params.model_dump(), **best})  # ranges checked, not just names
    assert final.hidden_units in HIDDEN_UNITS and 1e-4 <= final.learning_rate <= 1e-2
    assert params.model_copy(update=best).model_dump() == final.model_dump()


def test_no_validation_data_or_no_trials_is_a_one_line_error():
    empty = np.zeros((0, 8), np.float32), np.zeros(0, np.int32)
    with pytest.raises(RetrainError, match="validation split is empty") as error:
        search_head(TRAIN, empty, 3, _params(), seed=0)
    assert "\n" not in str(error.value)
    with pytest.raises(RetrainError, match="train.search.trials is 0"):
        search_head(TRAIN, VALIDATION, 3, _params(trials=0), seed=0)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"trials": -1}, "'train.search.trials': Input should be greater than or equal to 0 (got -1)"),
        ({"trials": 20, "timeout_s": 0}, "'train.search.timeout_s': Input should be greater than 0 (got 0)"),
        ({"trials": 20, "trails": 3}, "unknown key 'train.search.trails'"),
    ],
)
def test_a_bad_search_config_names_its_key(search, message):
    raw = default_raw(**{"train.search": search})
    with pytest.raises(RetrainError) as error:
        parse_params(raw)
    assert message in str(error.value) and "\n" not in str(error.value)
