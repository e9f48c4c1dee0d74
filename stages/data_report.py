"""data_report: likely label errors and near-duplicates on the cached features, for a person to review.

Reads data/features/ (every split), writes data/data_report/ (label_issues.csv, near_duplicates.csv,
suspects.png) and data/data_report.json (`dvc metrics show`). No TensorFlow: seconds, not minutes.
"""

import time

from retrain import paths
from retrain.data_report import find_label_issues, load_features, near_duplicates, write_report
from retrain.errors import exit_on_error
from retrain.evaluation import flatten_metrics
from retrain.params import load_params
from retrain.records import stage_record


def data_report():
    params = load_params()
    started = time.perf_counter()
    dataset = load_features(paths.FEATURES_DIR)
    issues = find_label_issues(dataset, params.data_report.folds, params.seed)
    pairs = near_duplicates(dataset, params.data_report.min_cosine)
    metrics = write_report(
        paths.DATA_REPORT_DIR,
        paths.DATA_REPORT_JSON,
        dataset,
        issues,
        pairs,
        contact_sheet_size=params.data_report.contact_sheet,
    )
    seconds = time.perf_counter() - started
    with stage_record("data_report") as record:
        record.log_metrics(flatten_metrics(metrics))
        record.set_tags({"data_report.seconds": round(seconds, 2)})
        record.log_artifacts(paths.DATA_REPORT_DIR, "data_report")
        record.log_artifacts(paths.DATA_REPORT_JSON)
    print(
        f"{metrics['data/label_issues']} likely label errors, {metrics['data/near_duplicate_pairs']} near-duplicate "
        f"pairs ({metrics['data/cross_split_pairs']} across splits) in {len(dataset.labels)} photos, {seconds:.1f} s; "
        f"review {paths.DATA_REPORT_DIR}/suspects.png, list what goes in data.exclude"
    )


if __name__ == "__main__":
    exit_on_error(data_report)
