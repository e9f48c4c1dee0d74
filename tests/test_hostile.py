"""Hostile inputs (issue 26): each is refused in one line, or handled, at the boundary where it enters.

Sections follow the issue's numbered items: 2 labels that would split, 5 credentials in URLs,
6 the hub cache, 7 unbounded reads, 8 the weights unpickler, 9 tracebacks that are now one line,
10 params.yaml, 11 CSV formulas and the MLflow lock. Every input is made here, offline.
"""

import http.server
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import free_port
from default_params import default_params, default_raw
from retrain import layouts, tracking
from retrain.errors import RetrainError
from retrain.params import flatten, load_params
from retrain.records import stage_record
from retrain.run_log import log_execution
from retrain.split import ImageRow, assign_split, class_names, list_dataset, write_split

# Every character str.splitlines() splits on: each would turn one label into two in labels.txt.
LINE_BREAKS = [c for c in map(chr, range(sys.maxunicode + 1)) if len(f"a{c}b".splitlines()) > 1]


def _one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 1000, message[:300]
    return message


def _write_labels_csv(root: Path, rows: list[tuple[str, str]]) -> None:
    import csv

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


# --- 2. a label with a line break or control character ------------------------------------------


def test_the_line_breaks_are_the_ones_the_issue_names():
    assert {"\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"} == set(LINE_BREAKS)


@pytest.mark.parametrize("bad", [*LINE_BREAKS, "\x00", "\x07", "\u200b", "\u202e"], ids=ascii)
def test_a_labels_csv_class_that_would_split_or_hide_is_refused_naming_the_line(tmp_path, bad):
    label = f"Rosa{bad}red"  # "\n": a spreadsheet's Alt+Enter
    _write_labels_csv(tmp_path, [("a.jpg", "daisy"), ("b.jpg", label), ("c.jpg", "tulip")])
    with pytest.raises(RetrainError) as error:
        list_dataset(tmp_path, labels="labels.csv")
    message = _one_line(error)
    assert "labels.csv line 3" in message and "class name" in message


@pytest.mark.parametrize(
    "name", ["rosa\rred", "rosa\x1cred", "rosa\x85red", "rosa\u2028red", "rosa\tred", "rosa "], ids=ascii
)
def test_a_class_folder_whose_name_would_split_is_refused(tmp_path, name):
    for folder in ("daisy", name):
        (tmp_path / folder).mkdir()
    with pytest.raises(RetrainError) as error:
        class_names(tmp_path)
    assert "rename the folder" in _one_line(error)


def test_a_class_folder_not_in_utf8_is_one_line_and_a_file_not_in_utf8_is_rejected(tmp_path):
    root = tmp_path / "photos"
    for name in ("daisy", "tulip"):
        (root / name).mkdir(parents=True)
        (root / name / "1.jpg").write_bytes(b"x")
    (root / "tulip" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"x")  # Latin-1, as an old camera names it
    listing = list_dataset(root)
    (rejection,) = [r for r in listing.rejected if "UTF-8" in r.reason]
    assert str(rejection.path).endswith(r"caf\xe9.jpg")
    str(rejection.path).encode("utf-8")  # it can be written to rejected.csv
    (root / os.fsdecode(b"ros\xe9")).mkdir()
    with pytest.raises(RetrainError) as error:
        class_names(root)
    assert r"'ros\xe9' is not valid UTF-8" in _one_line(error)


def test_the_split_stage_names_a_non_utf8_class_folder_in_one_line_and_exits_1(tmp_path):
    root = tmp_path / "photos"
    for name in (b"daisy", b"ros\xe9"):
        os.makedirs(os.path.join(os.fsencode(root), name))
    code = (
        "import sys; from retrain.errors import exit_on_error; from retrain.split import list_dataset; "
        "exit_on_error(lambda: list_dataset(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: class folder") and result.stderr.count("\n") == 1


def _oxford(root: Path, names: dict | str | None = None, labels=None) -> Path:
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([labels if labels is not None else [1, 2, 2, 1]])})
    if names is not None:
        (root / "label_map.json").write_text(names if isinstance(names, str) else json.dumps(names), encoding="utf-8")
    return root


@pytest.mark.parametrize("bad", ["pink\nprimrose", "pink\u2028primrose", "pink\x00", "\u200bpink"], ids=ascii)
def test_an_oxford_label_map_name_that_would_split_is_refused(tmp_path, bad):
    _oxford(tmp_path, {"1": "daisy", "2": bad})
    with pytest.raises(RetrainError) as error:
        layouts.read_oxford102(tmp_path, official_split=False)
    assert "label_map.json class 2" in _one_line(error)


# --- 5. credentials in URLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://ann:s3cret@example.com/f.tgz", "https://***@example.com/f.tgz"),
        ("http://ann:p@ss@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://token@example.com/a.tgz?v=1", "https://***@example.com/a.tgz?v=1"),
        (
            "https://h/f.tgz?X-Amz-Signature=abc&X-Amz-Expires=60",
            "https://h/f.tgz?X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        ("https://h/f.tgz?access_token=abc", "https://h/f.tgz?access_token=***"),
        ("http://download.tensorflow.org/example_images/flower_photos.tgz", None),
        ("/data/flowers.tgz", None),
        ("sqlite:////work/mlflow.db", None),
    ],
)
def test_redact_url_removes_passwords_and_tokens_and_nothing_else(url, shown):
    from retrain.urls import redact_url

    assert redact_url(url) == (shown or url)


def test_flattened_params_for_mlflow_carry_no_password(tmp_path):
    params = default_params(
        **{
            "data.url": "https://ann:s3cret@example.com/f.tgz?token=t0ken",
            "data.extra_files": [{"url": "https://bob:hunter2@example.com/x.mat"}],
        }
    )
    flat = json.dumps(flatten(params), default=str)
    assert "s3cret" not in flat and "t0ken" not in flat and "hunter2" not in flat
    assert "example.com/f.tgz" in flat


class _Answers(http.server.BaseHTTPRequestHandler):
    status = 401

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("answer", ["401", "refused"])
def test_a_download_error_line_never_shows_the_password(tmp_path, refusing_server, answer):
    from retrain.download import fetch_dataset

    port = refusing_server if answer == "401" else free_port()
    url = f"http://ann:s3cret@127.0.0.1:{port}/flowers.tgz?token=t0ken"
    with pytest.raises(RetrainError) as error:
        fetch_dataset(url, None, tmp_path / "raw", tmp_path / "cache", retries=1, backoff_s=0, timeout_s=5)
    message = _one_line(error)
    assert "s3cret" not in message and "t0ken" not in message and "***@127.0.0.1" in message


def test_extra_files_error_lines_never_show_the_password(tmp_path, refusing_server):
    from retrain.params import ExtraFile

    extra = ExtraFile(url=f"http://ann:s3cret@127.0.0.1:{refusing_server}/imagelabels.mat")
    with pytest.raises(RetrainError) as error:
        layouts.fetch_extra_files([extra], tmp_path, tmp_path / "cache", retries=1, backoff_s=0)
    assert "s3cret" not in _one_line(error)


def test_a_dead_tracking_server_with_a_password_is_named_without_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:pw0rd@127.0.0.1:{free_port()}")
    with pytest.raises(RetrainError) as error:
        log_execution(default_params(), stages=["train"])
    message = _one_line(error)
    assert "pw0rd" not in message and "http://***@127.0.0.1" in message


def test_a_run_on_a_server_with_a_password_stores_and_logs_no_secret(tmp_path, monkeypatch, mlflow_server, capfd):
    import mlflow

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)

    monkeypatch.chdir(tmp_path)
    uri = mlflow_server.replace("http://", "http://bob:pw0rd@")  # the server ignores it; requests sends it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "split.csv").write_text(
        "path,label,split,sha256\n"
        + "".join(f"a/{i}.jpg,a,{s},{i:064x}\n" for i, s in enumerate(["train", "validation", "test"]))
    )
    # An experiment of its own: the session's server is shared, and others count the runs in "retrain".
    params = default_params(
        **{"data.url": "https://ann:s3cret@example.com/f.tgz?token=t0ken", "tracking.experiment": "password-in-urls"}
    )
    with stage_record("bottlenecks"):
        pass
    run_id = log_execution(params, stages=["bottlenecks"])["run_id"]
    printed = capfd.readouterr()
    assert "pw0rd" not in printed.out + printed.err  # MLflow's "View run at <uri>" line
    stored = (tmp_path / "data" / "runs" / "log.json").read_text()
    assert "pw0rd" not in stored and "***@127.0.0.1" in stored
    logged = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    sources = [d.dataset.source for d in logged.inputs.dataset_inputs]
    everything = json.dumps([logged.data.params, logged.data.tags, sources])
    assert len(sources) == 3 and "s3cret" not in everything and "t0ken" not in everything
    assert logged.data.params["data.url"] == "https://***@example.com/f.tgz?token=***"


# --- 6. the TF Hub cache ----------------------------------------------------------------------------


def test_the_hub_cache_defaults_to_the_users_own_folder_never_the_shared_temp_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TFHUB_CACHE_DIR", "XDG_CACHE_HOME")}
    code = (
        "import os, hashlib; from retrain.backbones import presets; "
        "print(os.environ['TFHUB_CACHE_DIR']); print(presets.hub_cache_path(presets.PRESETS['inception_v3'].handle))"
    )
    # A module planted where tensorflow_hub would look by default: another user can write there.
    planted = Path(tempfile.gettempdir(), "tfhub_modules")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "HOME": str(tmp_path)},
        cwd=Path(__file__).parents[1],
    )
    cache, found = result.stdout.splitlines()
    assert cache == str(tmp_path / ".cache" / "tfhub_modules")
    assert not Path(cache).is_relative_to(planted) and found == "None"


# --- 7. unbounded reads --------------------------------------------------------------------------


def _in_thread(function, timeout_s=60):
    """function() run in a thread; its result or exception, or a failure if it never returns."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function()
        except BaseException as error:  # reported below
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the read hung"
    return outcome


def test_a_labels_csv_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "labels.csv")
    outcome = _in_thread(lambda: list_dataset(tmp_path, labels="labels.csv"))
    assert isinstance(outcome.get("error"), RetrainError), outcome
    assert "not a regular file" in _one_line(outcome["error"])


def test_params_from_a_device_or_an_oversized_file_are_refused(tmp_path):
    outcome = _in_thread(lambda: load_params(Path("/dev/zero")))
    assert isinstance(outcome.get("error"), RetrainError) and "not a regular file" in _one_line(outcome["error"])
    big = tmp_path / "params.yaml"
    big.write_text(yaml.safe_dump(default_raw()) + "#" * (2 * 1024 * 1024))
    with pytest.raises(RetrainError) as error:
        load_params(big)
    assert "byte limit" in _one_line(error)


def test_a_mat_file_that_unpacks_beyond_the_cap_is_refused_before_scipy_unpacks_it(tmp_path, monkeypatch):
    import scipy.io

    monkeypatch.setattr(layouts, "MAX_SMALL_FILE_BYTES", 1024 * 1024)  # the cap, scaled down for a quick test
    labels = np.ones((1, 300_000))  # 2.4 MB of doubles, a few kB compressed
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": labels}, do_compression=True)
    assert (tmp_path / "imagelabels.mat").stat().st_size < 50_000
    with pytest.raises(RetrainError) as error:
        layouts.read_oxford102(tmp_path, official_split=False)
    assert "unpack to more than" in _one_line(error)


def test_a_mat_file_within_the_cap_still_reads(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[1, 2, 2, 1]])}, do_compression=True)
    table = layouts.read_oxford102(tmp_path, official_split=False)
    assert [entry.label for entry in table] == ["class_001", "class_002", "class_002", "class_001"]


# --- 8. the weights unpickler ---------------------------------------------------------------------


def _p(value) -> bytes:
    """The opcodes that push `value` (a pickled int, str or tuple of them), without PROTO and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


_FLOAT_STORAGE = b"ctorch\nFloatStorage\n"


def _tensor(offset, size, stride, numel=4) -> bytes:
    """Opcodes pushing torch._utils._rebuild_tensor_v2(<float storage "0" of numel>, offset, size, stride)."""
    pid = b"(" + _p("storage") + _FLOAT_STORAGE + _p("0") + _p("cpu") + _p(numel) + b"tQ"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + _p(offset)
        + _p(tuple(size))
        + _p(tuple(stride))
        + b"\x89ccollections\nOrderedDict\n)R"
        + b"tR"
    )


def _legacy(path: Path, main: bytes, values=(1.0, 2.0, 3.0, 4.0), numel=None) -> Path:
    """A legacy torch file: magic, protocol, sys info, main pickle, keys ["0"], then storage "0"."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(b"\x80\x02" + main + b".")
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", len(values) if numel is None else numel))
        f.write(np.asarray(values, dtype="<f4").tobytes())
    return path


def _state_dict(*entries: tuple[str, bytes]) -> bytes:
    body = b"ccollections\nOrderedDict\n)R("
    for key, value in entries:
        body += _p(key) + value
    return body + b"u"


def _load(path):
    from retrain.backbones.torch_pickle import load_state_dict

    return load_state_dict(path)


def test_a_well_formed_tensor_and_its_views_load(tmp_path):
    path = _legacy(
        tmp_path / "ok.pth",
        _state_dict(
            ("w", _tensor(0, (2, 2), (2, 1))),
            ("t", _tensor(0, (2, 2), (1, 2))),
            ("row", _tensor(2, (1, 2), (2**62, 1))),
        ),
    )  # a size-1 dim: any stride
    loaded = _load(path)
    assert loaded["w"].tolist() == [[1, 2], [3, 4]] and loaded["t"].tolist() == [[1, 3], [2, 4]]
    assert loaded["row"].tolist() == [[3, 4]]


@pytest.mark.parametrize(
    "offset, size, stride",
    [
        (0, (100,), (1,)),  # more elements than the storage: heap bytes would be copied in
        (0, (2,), (2**40,)),  # a stride far past the storage: a segfault
        (0, (2,), (2**63 - 1,)),  # a stride that overflows when multiplied by the item size
        (-1, (2,), (1,)),  # a negative offset
        (3, (2,), (1,)),  # an offset plus size past the end
        (0, (2,), (-1,)),  # a negative stride
        (0, (-2,), (1,)),  # a negative size
        (0, (2, 2), (1,)),  # sizes and strides that do not pair up
        (True, (2,), (1,)),  # a bool where a count belongs
        (0, (2**40, 2**40), (0, 0)),  # a broadcast of one element to 10^24
    ],
    ids=str,
)
def test_a_tensor_that_reaches_outside_its_storage_is_refused(tmp_path, offset, size, stride):
    path = _legacy(tmp_path / "bad.pth", _state_dict(("w", _tensor(offset, size, stride))))
    with pytest.raises(RetrainError) as error:
        _load(path)
    assert str(path) in _one_line(error)


def test_a_storage_shorter_than_it_declares_is_refused(tmp_path):
    path = _legacy(tmp_path / "short.pth", _state_dict(("w", _tensor(0, (4,), (1,), numel=4))), values=(1.0,), numel=1)
    with pytest.raises(RetrainError) as error:
        _load(path)
    assert "declares 4 elements" in _one_line(error)


def test_deep_nesting_and_huge_counts_are_one_line(tmp_path):
    deep = b"]" * 50_000 + b"a" * 49_999
    many = b"](" + b"K\x01" * 1_100_000 + b"e"
    ok = ("t", _tensor(0, (4,), (1,)))
    for name, main in {"deep": _state_dict(ok, ("w", deep)), "many": _state_dict(ok, ("w", many))}.items():
        path = _legacy(tmp_path / f"{name}.pth", main)
        with pytest.raises(RetrainError) as error:
            _load(path)
        assert "nested more than" in _one_line(error), name


@pytest.mark.parametrize(
    "target",
    [_FLOAT_STORAGE, b"ctorch._utils\n_rebuild_tensor_v2\n", _tensor(0, (2,), (1,))],
    ids=["storage class", "rebuild function", "tensor"],
)
def test_build_cannot_rewrite_the_stand_ins(tmp_path, target):
    from retrain.backbones import torch_pickle

    for state in [_p(None) + b"(" + _p("dtype") + _p("int64") + b"d\x86", b"(" + _p("dtype") + _p("int64") + b"d"]:
        path = _legacy(tmp_path / "build.pth", _state_dict(("w", target + state + b"b")))
        with pytest.raises(RetrainError) as error:
            _load(path)
        assert "refuses to set the state" in _one_line(error)
    assert torch_pickle._ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == np.float32
    assert torch_pickle._rebuild_tensor_v2.__defaults__ == (False, None, None)


def test_build_on_the_state_dict_itself_still_sets_its_metadata(tmp_path):
    main = _state_dict(("w", _tensor(0, (4,), (1,)))) + b"(" + _p("_metadata") + _p("x") + b"db"
    assert _load(_legacy(tmp_path / "meta.pth", main))["w"].tolist() == [1, 2, 3, 4]


# --- 9. tracebacks that are now one line ------------------------------------------------------------


def _all_train_names(count: int) -> list[str]:
    names, i = [], 0
    while len(names) < count:
        if assign_split(f"img{i}.jpg", 10, 10) == "train":
            names.append(f"img{i}.jpg")
        i += 1
    return names


def test_a_split_with_an_empty_test_split_stops_there_in_one_line(tmp_path):
    names = _all_train_names(3)  # small classes whose file names repeat: every one lands in train
    rows = [
        ImageRow(tmp_path / label / name, label, f"{label}{name}".encode().hex().ljust(64, "0")[:64])
        for label in ("daisy", "tulip")
        for name in names
    ]
    with pytest.raises(RetrainError) as error:
        write_split(
            rows,
            [],
            tmp_path / "split.csv",
            tmp_path / "rejected.csv",
            classes=["daisy", "tulip"],
            base_dir=tmp_path,
            validation_percentage=10,
            testing_percentage=10,
            min_images_per_class=1,
        )
    assert "test split would be empty" in _one_line(error) and "data.testing_percentage" in str(error.value)
    assert not (tmp_path / "split.csv").exists()


def test_class_names_that_look_like_tex_draw_as_text(tmp_path):
    from retrain.reports import write_reports

    labels = [r"$\notacommand$", "$x^$", "price $5"]
    y_true = np.array([0, 1, 2, 0])
    probabilities = np.eye(3)[[0, 2, 2, 1]] * 0.8 + 0.2 / 3
    written = write_reports(tmp_path, y_true, probabilities, labels, ["a.jpg"] * 4)
    assert written["confusion_matrix.png"].stat().st_size > 0


def test_promote_of_a_name_with_a_quote_is_one_line(tmp_path, monkeypatch, capsys):
    from default_params import write_params
    from retrain.cli import main

    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    for name in ["it's", 'say "hi"', "both ' and \""]:
        with pytest.raises(SystemExit) as exit_info:
            main(["promote", name])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" not in err, err
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: no MLflow run named")


@pytest.mark.parametrize(
    "labels",
    [[[1, np.inf, 2]], [[1, np.nan, 2]], [[1, 1e300, 2]], [[1, -1, 2]], [[1.5, 2, 1]]],
    ids=["inf", "nan", "huge", "negative", "fraction"],
)
def test_a_mat_file_with_numbers_no_image_can_have_is_one_line(tmp_path, labels):
    _oxford(tmp_path, labels=labels[0])
    with pytest.raises(RetrainError) as error:
        layouts.read_oxford102(tmp_path, official_split=False)
    assert "positive whole numbers" in _one_line(error)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"1": ' * 5000 + "1" + "}" * 5000,
        '{"1": "daisy", "2": [[["tulip"]]]}',
        '{"1": "daisy", "2": ' + "9" * 5000 + "}",
        '{"1": "daisy", "2": "\\ud800"}',
    ],
    ids=["deep list", "deep object", "nested name", "5000 digits", "lone surrogate"],
)
def test_a_hostile_label_map_is_one_line(tmp_path, text):
    _oxford(tmp_path, text)
    with pytest.raises(RetrainError) as error:
        layouts.read_oxford102(tmp_path, official_split=False)
    assert "label_map.json" in _one_line(error)


# --- 9 (params) and 10. params.yaml ---------------------------------------------------------------


def _params_file(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


_BASE = yaml.safe_dump(default_raw(), sort_keys=False)


@pytest.mark.parametrize(
    "change, expected",
    [
        (("seed: 42", "seed: 4294967296"), "'seed'"),
        (("seed: 42", "seed: " + "9" * 5000), "cannot be read"),
        (("seed: 42", "seed: " + "9" * 4000), "'seed'"),
        (("l2: 0.0", "l2: .inf"), "'train.l2': Input should be a finite number"),
        (("l2: 0.0", "l2: .nan"), "'train.l2'"),
        (("hidden_units: 512", "hidden_units: 1000000000"), "'train.hidden_units'"),
        (("hidden_units: 512", "hidden_units: 1.0e+9"), "'train.hidden_units'"),
        (("batch_size: 64", "batch_size: 1000000000000"), "'train.batch_size'"),
        (("labels: null", 'labels: "labels\\0.csv"'), "'data.labels': must be one line"),
        (("experiment: retrain", 'experiment: "a\\nb"'), "'tracking.experiment': must be one line"),
        (("seed: 42", "seed: " + "[" * 10_000 + "]" * 10_000), "nested more than"),
        (("seed: 42", "seed: " + "{a: " * 500 + "1" + "}" * 500), "nested more than"),
        (("seed: 42", "seed: 42\nseed: 43"), "duplicate key 'seed'"),
    ],
    ids=[
        "seed 2^32",
        "5000 digits",
        "4000 digits",
        "inf",
        "nan",
        "hidden 1e9 int",
        "hidden 1e9 float",
        "batch 1e12",
        "NUL",
        "newline",
        "deep list",
        "deep map",
        "duplicate key",
    ],
)
def test_a_hostile_params_yaml_is_one_line_naming_the_key(tmp_path, change, expected):
    old, new = change
    assert old in _BASE
    with pytest.raises(RetrainError) as error:
        load_params(_params_file(tmp_path, _BASE.replace(old, new, 1)))
    assert expected in _one_line(error)


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    bomb = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))
    path = _params_file(tmp_path, "l0: &l0 [lol]\n" + bomb + _BASE)
    assert path.stat().st_size < 2000
    with pytest.raises(RetrainError) as error:
        load_params(path)
    assert "aliases" in _one_line(error)


def test_a_batch_size_above_the_dataset_but_sane_is_still_accepted(tmp_path):
    assert (
        load_params(_params_file(tmp_path, _BASE.replace("batch_size: 64", "batch_size: 4096", 1))).train.batch_size
        == 4096
    )


# --- 11. CSV formulas and the MLflow lock --------------------------------------------------------------


def test_class_names_that_a_spreadsheet_would_run_get_a_leading_apostrophe(tmp_path):
    import csv

    from retrain.reports import write_reports

    labels = ['=HYPERLINK("http://x","y")', "+cmd", "-1", "@SUM(A1)", "daisy"]
    y_true = np.arange(5)
    write_reports(tmp_path, y_true, np.eye(5), labels, ["a.jpg"] * 5)
    per_class = [row[0] for row in csv.reader(open(tmp_path / "per_class.csv", encoding="utf-8"))][1:6]
    confusion = [row[0] for row in csv.reader(open(tmp_path / "confusion.csv", encoding="utf-8"))][1:]
    expected = ["'" + label for label in labels[:4]] + ["daisy"]
    assert per_class == expected and confusion == expected


def test_the_mlflow_lock_lives_in_the_project_and_the_store_is_private(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    old_umask = os.umask(0o022)  # a usual umask: files would be world-readable
    try:
        with tracking._store_lock():
            pass
    finally:
        os.umask(old_umask)
    assert (tmp_path / "mlartifacts" / ".mlflow.db.lock").is_file()
    assert (tmp_path / "mlflow.db").stat().st_mode & 0o077 == 0
    # Where the lock used to be: a name any local user could create first, in the shared temp folder.
    digest = hashlib.sha256(tracking.tracking_uri().encode()).hexdigest()[:16]
    assert not Path(tempfile.gettempdir(), f"retrain-mlflow-{digest}.lock").exists()


def test_a_compressed_mat_variable_is_one_zlib_stream_as_the_expansion_check_reads_it():
    # _check_mat_expansion unpacks with zlib: a compressed MAT element is one zlib stream.
    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"x": np.zeros(1000)}, do_compression=True)
    data = buffer.getvalue()
    kind, size = struct.unpack("<II", data[128:136])
    assert kind == 15 and len(zlib.decompress(data[136 : 136 + size])) > 8000
