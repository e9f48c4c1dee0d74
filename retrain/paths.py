"""Every path the pipeline reads or writes, relative to the project root; dvc.yaml names the same."""

from pathlib import Path

SPLITS = ("train", "validation", "test")  # split.csv's split column; data/features/<split>.npz
RAW_DIR = Path("data/raw")  # download: data/raw/<name>/<class>/<image>
SPLIT_CSV = Path("data/split.csv")  # split: path,label,split,sha256
REJECTED_CSV = Path("data/rejected.csv")  # split: path,reason
DUPLICATES_CSV = Path("data/duplicates.csv")  # split: path,label,split,sha256,moved_from (identical files)
NEAR_DUPLICATES_CSV = Path("data/near_duplicates.csv")  # split: path,label,split,group,moved_from (look-alike photos)
FEATURES_DIR = Path("data/features")  # bottlenecks: <split>.npz, train_augmented.npz, labels.txt, meta.json
TRAIN_AUGMENTED = FEATURES_DIR / "train_augmented.npz"  # bottlenecks: augment.copies views per train image
BOTTLENECKS_STATS = Path("data/bottlenecks.json")  # bottlenecks: counts and images/s
TRAIN_DIR = Path("data/train")  # train: head.npz, history.csv, search.json
HEAD = TRAIN_DIR / "head.npz"
HISTORY_CSV = TRAIN_DIR / "history.csv"
SEARCH_JSON = TRAIN_DIR / "search.json"  # train: the head search's best params and score (dvc exp show)
TRAIN_TENSORBOARD = TRAIN_DIR / "tensorboard"  # train: train/ and validation/ event files
# finetune: the model that goes on to evaluate and export, fine-tuned or the frozen one as it is:
# head.npz, backbone.json (what load_backbone loads), labels.txt, validation/test .npz, finetune.json
FINETUNE_DIR = Path("data/finetune")
FINETUNE_JSON = FINETUNE_DIR / "finetune.json"
FINETUNE_BACKBONE = FINETUNE_DIR / "backbone"  # the fine-tuned SavedModel, when enabled
FINETUNE_HEAD = FINETUNE_DIR / "head.npz"
EVALUATE_DIR = Path("data/evaluate")  # evaluate: metrics.json, predictions.npz, confusion.csv
METRICS = EVALUATE_DIR / "metrics.json"
PREDICTIONS = EVALUATE_DIR / "predictions.npz"
EVALUATE_TENSORBOARD = EVALUATE_DIR / "tensorboard"  # evaluate: test/ event files (misclassified images)
REPORTS_DIR = Path("reports")  # evaluate: pictures and pages a person looks at
MODEL_DIR = Path("model")  # export: saved_model/, labels.txt, model.tflite
LOGS_DIR = Path("logs")  # log: TensorBoard's logs/<run name>/, under the workspace root (tracking.logs_dir)
RUNS_DIR = Path("data/runs")  # every stage: <stage>.json, what it logs (retrain.records); log: log.json, the run
DATA_REPORT_DIR = Path("data/data_report")  # data_report: label_issues.csv, near_duplicates.csv, suspects.png
DATA_REPORT_JSON = Path("data/data_report.json")  # data_report: counts, `dvc metrics` (data/ prefix)
