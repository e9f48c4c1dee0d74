"""The reviewed exclusion list (`data.exclude`): photos a person decided the model must not see.

A user reads the data report (likely label errors, near-duplicates), looks at the photos, and
copies the paths they judge wrong into a CSV kept in the repo, with a reason:

    path,reason
    data/raw/flower_photos/roses/123.jpg,a lotus, not a rose

Paths are the ones split.csv and the report show (relative to the project root). Split then lists
each excluded photo in rejected.csv with "excluded (<file>): <reason>" and puts it in no split, so
it is never trained, validated or tested on. The list is data under version control: same photos,
same list, same splits.
"""

import csv
from pathlib import Path

from retrain.errors import RetrainError

HEADER = ["path", "reason"]


def read_exclusions(path: Path) -> dict[str, str]:
    """{path: reason} from an exclusion CSV (columns path,reason); a bad file is one line naming it."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise RetrainError(
            f"{path}: not found (data.exclude); create it with the header 'path,reason' or set data.exclude: null"
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RetrainError(
            f"{path}: cannot be read as CSV ({error}); data.exclude expects columns path,reason"
        ) from None
    if not rows or [cell.strip() for cell in rows[0][:2]] != HEADER:
        raise RetrainError(f"{path}: the first line must be the header 'path,reason' (data.exclude)")
    excluded = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue  # blank lines are allowed
        photo = row[0].strip().replace("\\", "/")
        if not photo:
            raise RetrainError(f"{path}, line {number}: no path; each line is path,reason")
        excluded[photo] = ",".join(row[1:]).strip() or "no reason given"
    return excluded


def exclusion_reason(source: Path, reason: str) -> str:
    """The reason rejected.csv gives for an excluded photo."""
    return f"excluded ({Path(source).as_posix()}): {reason}"
