"""The head search: Optuna's TPE over the head's knobs, seeded, on cached features.

`train.search.trials > 0` asks the train stage for it. Every trial fits a head with
`train_head` on the train split and scores it on the validation split; test data never reaches
this module (the function does not take it). For a given `seed` the search is deterministic: the
sampler is seeded, trials run one after another, nothing is pruned, and each trial's head is
seeded with the same `seed`, so trials differ only by their params. The best params come back as
TrainParams field names, ready for `params.model_copy(update=result.best_params)`.

The space (one place, here, so a change is one diff):

| param | range | why this range |
|---|---|---|
| learning_rate | 1e-4 … 1e-2, log | Adam's useful band for a small head; 1e-3 is the default |
| dropout | 0.0 … 0.7 | above 0.7 a 1,280-wide feature vector loses too much per step |
| hidden_units | 0, 256, 512, 1024 | 0 is retrain.py's single softmax layer |
| label_smoothing | 0.0 … 0.2 | beyond 0.2 the targets blur classes together |
| l2 | 1e-7 … 1e-3, log | 1e-7 is practically none; 1e-3 already dominates the loss of 1024 units |

The score is the validation cross-entropy of the trial's best epoch *without* label smoothing
and the L2 penalty (`retrain.evaluation.cross_entropy`, as fine-tuning's `val_loss`): both raise the training loss by design, and a score that included them would
favour the trials that use less of them rather than the heads that predict better.
"""

import math
import time
from dataclasses import dataclass

import numpy as np

from retrain.errors import RetrainError
from retrain.evaluation import cross_entropy
from retrain.params import TrainParams
from retrain.tf.head_training import to_head, train_head

HIDDEN_UNITS = (0, 256, 512, 1024)


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict[str, object]  # the searched TrainParams fields and their values
    value: float  # validation cross-entropy of the best epoch (lower is better)
    epochs: int  # epochs trained before early stopping
    history: dict[str, list[float]]  # train_head's history of this trial


@dataclass(frozen=True)
class SearchResult:
    best_params: dict[str, object]
    best_value: float
    trials: list[Trial]


def suggest(trial) -> dict[str, object]:
    """One point of the space (the table in the module docstring), keyed by TrainParams fields."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.7),
        "hidden_units": trial.suggest_categorical("hidden_units", HIDDEN_UNITS),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "l2": trial.suggest_float("l2", 1e-7, 1e-3, log=True),
    }


def search_head(
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    params: TrainParams,
    seed: int,
    on_trial=None,
) -> SearchResult:
    """Run `params.search.trials` trials (TPE, seeded); `on_trial(Trial)` after each one finishes."""
    _check(validation, params)
    import optuna  # here, not at the top: a train stage without a search doesn't pay its import

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours, below
    trials: list[Trial] = []

    def objective(optuna_trial) -> float:
        started = time.perf_counter()
        trial = _run_trial(optuna_trial.number, suggest(optuna_trial), train, validation, num_classes, params, seed)
        trials.append(trial)
        print(
            f"search trial {trial.number + 1}/{params.search.trials}: validation loss {trial.value:.4f} after "
            f"{trial.epochs} epochs ({_describe(trial.params)}) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        if on_trial is not None:
            on_trial(trial)
        return trial.value

    # multivariate: the knobs interact (dropout with hidden units, l2 with learning rate).
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=params.search.trials, timeout=params.search.timeout_s, n_jobs=1)
    best = min(trials, key=lambda t: (t.value, t.number))  # ties: the earlier trial, as Optuna does
    return SearchResult(best_params=dict(best.params), best_value=best.value, trials=trials)


def _check(validation: tuple[np.ndarray, np.ndarray], params: TrainParams) -> None:
    if params.search.trials < 1:
        raise RetrainError("train.search.trials is 0 (the search is off); set it to 1 or more to search")
    if len(validation[1]) == 0:
        raise RetrainError(
            "train.search: the validation split is empty, and the search scores trials on it; "
            "raise data.validation_percentage or set train.search.trials: 0"
        )


def _run_trial(number, searched, train, validation, num_classes, params, seed) -> Trial:
    model, history = train_head(train, validation, num_classes, params.model_copy(update=searched), seed)
    return Trial(
        number=number, params=searched, value=_score(model, validation), epochs=len(history["loss"]), history=history
    )


def _score(model, validation: tuple[np.ndarray, np.ndarray]) -> float:
    """Plain validation cross-entropy (`evaluation.cross_entropy` of the logits); a diverged trial scores +inf."""
    features, labels = validation
    value = cross_entropy(labels, logits=to_head(model).logits(features))
    return value if math.isfinite(value) else math.inf


def _describe(searched: dict[str, object]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in searched.items())
