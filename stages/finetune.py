"""finetune: opt-in; unfreeze the backbone's top blocks and train them with the head on images.

Disabled (the default) it only writes data/finetune/finetune.json saying so, without loading
TensorFlow, and evaluate and export use the frozen backbone and the train stage's head.
"""

import json
import shutil
import time

from retrain import paths
from retrain.errors import exit_on_error
from retrain.params import load_params


def finetune():
    params = load_params()
    shutil.rmtree(paths.FINETUNE_DIR, ignore_errors=True)
    paths.FINETUNE_DIR.mkdir(parents=True)
    if not params.finetune.enabled:
        paths.FINETUNE_JSON.write_text(json.dumps({"enabled": False}, indent=2) + "\n")
        print("fine-tuning is off (finetune.enabled: false)")
        return
    started = time.perf_counter()
    import mlflow  # only now: the disabled stage must cost nothing

    from retrain import finetune as tuning, tracking
    from retrain.backbones import load_backbone
    from retrain.features import read_split
    from retrain.head import load_head, save_head

    examples = read_split(paths.SPLIT_CSV)
    size = params.backbone.image_size
    backbone = load_backbone(params.backbone.name, image_size=(size, size) if size else None)
    head = load_head(paths.HEAD)
    history = tuning.finetune(backbone, head, examples, params.augment, params.finetune,
                              params.train.label_smoothing, params.seed)
    tuning.save_backbone(backbone, paths.FINETUNE_BACKBONE)
    save_head(head, paths.FINETUNE_HEAD)
    tuning.write_split_features(backbone, examples, paths.FINETUNE_DIR, params.bottlenecks.batch_size)
    blocks = [name for name, _ in tuning.unfrozen_blocks(backbone, params.finetune.blocks)]
    summary = {"enabled": True, "blocks": blocks, "seconds": round(time.perf_counter() - started, 1), **history}
    paths.FINETUNE_JSON.write_text(json.dumps(summary, indent=2) + "\n")
    with tracking.resumed_run(paths.RUN_FILE):
        for epoch, (loss, val_loss, val_accuracy) in enumerate(zip(history["loss"], history["val_loss"], history["val_accuracy"])):
            mlflow.log_metrics({"finetune_loss": loss, "finetune_val_loss": val_loss,
                                "finetune_val_accuracy": val_accuracy}, step=epoch)
        mlflow.log_metric("finetune_seconds", summary["seconds"])
    print(f"fine-tuned backbone blocks {', '.join(blocks)} with the classifier for {params.finetune.epochs} epochs in "
          f"{summary['seconds']:.0f} s; best validation accuracy {max(history['val_accuracy']):.4f}")


if __name__ == "__main__":
    exit_on_error(finetune)
