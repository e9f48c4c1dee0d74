"""finetune: write the model that goes on to evaluate and export, fine-tuned when enabled, calibrated.

Enabled (`finetune.enabled`), it unfreezes the backbone's top blocks and trains them with the
head on augmented images (TensorFlow). Disabled (the default), it copies the frozen head and the
cached validation/test features into data/finetune/ as they are, without loading TensorFlow.
Either way it then fits a temperature on the validation split and folds it into the head's last
layer (`retrain.calibration`), so every exported model emits calibrated probabilities; evaluate
and export read only data/finetune/.
"""

import json
import shutil
import time

from retrain import paths
from retrain.calibration import fit_temperature
from retrain.errors import exit_on_error
from retrain.features import load_split_arrays
from retrain.head import load_head, save_head
from retrain.model_input import write_backbone_spec, write_frozen
from retrain.params import load_params
from retrain.records import stage_record


def finetune():
    params = load_params()
    shutil.rmtree(paths.FINETUNE_DIR, ignore_errors=True)
    if params.finetune.enabled:
        summary = _finetune(params)
    else:
        write_frozen(
            paths.FINETUNE_DIR, paths.FEATURES_DIR, paths.HEAD, params.backbone.name, params.backbone.image_size
        )
        summary = {"enabled": False}
        print("fine-tuning is off (finetune.enabled: false): the frozen model goes on")
    summary["temperature"] = _calibrate()
    paths.FINETUNE_JSON.write_text(json.dumps(summary, indent=2) + "\n")
    with stage_record("finetune") as record:
        for epoch, values in enumerate(zip(*(summary.get(k, []) for k in ("loss", "val_loss", "val_accuracy")))):
            record.log_metrics(
                dict(zip(("finetune/loss", "finetune/val_loss", "finetune/val_accuracy"), values)), step=epoch
            )
        record.log_metrics({"calibration/temperature": summary["temperature"]})
        record.set_tags(
            {"finetune.enabled": summary["enabled"]}
            | (
                {
                    "finetune.seconds": summary["seconds"],
                    "finetune.blocks": ",".join(summary["blocks"]),
                    "finetune.best_epoch": summary["best_epoch"],
                }
                if summary["enabled"]
                else {}
            )
        )


MIN_CALIBRATION_IMAGES = 20  # fewer validation images say little about confidence


def _calibrate() -> float:
    """Fit the temperature on validation and fold it into data/finetune's head.

    1.0 (left as trained) when validation is too small or has no mistake to learn from: with every
    answer right, the lowest validation loss lies at T → 0, a head sure of everything.
    """
    head = load_head(paths.FINETUNE_HEAD)
    x_val, y_val, _ = load_split_arrays(paths.FINETUNE_DIR, "validation")
    logits = head.logits(x_val)
    if len(y_val) < MIN_CALIBRATION_IMAGES or (logits.argmax(axis=1) == y_val).all():
        print(
            f"not calibrated: {len(y_val)} validation images, {int((logits.argmax(axis=1) != y_val).sum())} of "
            f"them wrong; calibration needs {MIN_CALIBRATION_IMAGES} or more and a mistake to learn from"
        )
        return 1.0
    temperature = fit_temperature(logits, y_val)
    save_head(head.with_temperature(temperature), paths.FINETUNE_HEAD)
    print(f"calibrated: temperature {temperature:.3f} fitted on {len(y_val)} validation images")
    return float(temperature)


def _finetune(params) -> dict:
    started = time.perf_counter()
    from retrain.backbones import load_backbone
    from retrain.features import read_split
    from retrain.tf import finetune as tuning
    from retrain.tf.head_training import keras_head, to_head

    examples = read_split(paths.SPLIT_CSV)
    size = params.backbone.image_size
    backbone = load_backbone(params.backbone.name, image_size=(size, size) if size else None)
    head = keras_head(load_head(paths.HEAD), params.train.dropout)
    history = tuning.finetune(
        backbone, head, examples, params.augment, params.finetune, params.train.label_smoothing, params.seed
    )
    paths.FINETUNE_DIR.mkdir(parents=True)
    tuning.save_backbone(backbone, paths.FINETUNE_BACKBONE)
    save_head(to_head(head), paths.FINETUNE_HEAD)
    tuning.write_split_features(backbone, examples, paths.FINETUNE_DIR, params.bottlenecks.batch_size)
    shutil.copyfile(paths.FEATURES_DIR / "labels.txt", paths.FINETUNE_DIR / "labels.txt")
    write_backbone_spec(paths.FINETUNE_DIR, str(paths.FINETUNE_BACKBONE), backbone.image_size[0])
    blocks = [name for name, _ in tuning.unfrozen_blocks(backbone, params.finetune.blocks)]
    summary = {"enabled": True, "blocks": blocks, "seconds": round(time.perf_counter() - started, 1), **history}
    print(
        f"fine-tuned backbone blocks {', '.join(blocks)} with the classifier for {params.finetune.epochs} epochs in "
        f"{summary['seconds']:.0f} s; best validation accuracy {max(history['val_accuracy']):.4f}"
    )
    return summary


if __name__ == "__main__":
    exit_on_error(finetune)
