"""finetune: write the model that goes on to evaluate and export, fine-tuned when enabled.

Enabled (`finetune.enabled`), it unfreezes the backbone's top blocks and trains them with the
head on augmented images. Disabled (the default), it copies the frozen head and the cached
validation/test features into data/finetune/ as they are, without loading TensorFlow. Either way
evaluate and export read only data/finetune/.
"""

import json
import shutil
import time

from retrain import paths, tracking
from retrain.errors import exit_on_error
from retrain.model_input import write_backbone_spec, write_frozen
from retrain.params import load_params


def finetune():
    params = load_params()
    shutil.rmtree(paths.FINETUNE_DIR, ignore_errors=True)
    if not params.finetune.enabled:
        write_frozen(paths.FINETUNE_DIR, paths.FEATURES_DIR, paths.HEAD, params.backbone.name, params.backbone.image_size)
        paths.FINETUNE_JSON.write_text(json.dumps({"enabled": False}, indent=2) + "\n")
        with tracking.stage_run("finetune", params) as run:
            run.set_tags({"finetune.enabled": False})
        print("fine-tuning is off (finetune.enabled: false): the frozen model goes on")
        return
    started = time.perf_counter()
    from retrain import finetune as tuning
    from retrain.backbones import load_backbone
    from retrain.features import read_split
    from retrain.head import load_head, save_head

    examples = read_split(paths.SPLIT_CSV)
    size = params.backbone.image_size
    backbone = load_backbone(params.backbone.name, image_size=(size, size) if size else None)
    head = load_head(paths.HEAD)
    history = tuning.finetune(backbone, head, examples, params.augment, params.finetune,
                              params.train.label_smoothing, params.seed)
    paths.FINETUNE_DIR.mkdir(parents=True)
    tuning.save_backbone(backbone, paths.FINETUNE_BACKBONE)
    save_head(head, paths.FINETUNE_HEAD)
    tuning.write_split_features(backbone, examples, paths.FINETUNE_DIR, params.bottlenecks.batch_size)
    shutil.copyfile(paths.FEATURES_DIR / "labels.txt", paths.FINETUNE_DIR / "labels.txt")
    write_backbone_spec(paths.FINETUNE_DIR, str(paths.FINETUNE_BACKBONE), backbone.image_size[0])
    blocks = [name for name, _ in tuning.unfrozen_blocks(backbone, params.finetune.blocks)]
    summary = {"enabled": True, "blocks": blocks, "seconds": round(time.perf_counter() - started, 1), **history}
    paths.FINETUNE_JSON.write_text(json.dumps(summary, indent=2) + "\n")
    with tracking.stage_run("finetune", params) as run:
        for epoch, (loss, val_loss, val_accuracy) in enumerate(zip(history["loss"], history["val_loss"], history["val_accuracy"])):
            run.log_metrics({"finetune/loss": loss, "finetune/val_loss": val_loss,
                             "finetune/val_accuracy": val_accuracy}, step=epoch)
        run.set_tags({"finetune.enabled": True, "finetune.seconds": summary["seconds"],
                      "finetune.blocks": ",".join(blocks), "finetune.best_epoch": history["best_epoch"]})
    print(f"fine-tuned backbone blocks {', '.join(blocks)} with the classifier for {params.finetune.epochs} epochs in "
          f"{summary['seconds']:.0f} s; best validation accuracy {max(history['val_accuracy']):.4f}")


if __name__ == "__main__":
    exit_on_error(finetune)
