"""fetch_dataset against a real loopback HTTP server and real archives built on the fly."""

import functools
import hashlib
import http.server
import io
import os
import shutil
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from imagegen import make_class_folders, make_tgz, make_zip
from retrain.download import Limits, dataset_root, fetch_dataset
from retrain.errors import RetrainError

FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 5}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (the http.server API)
        server = self.server
        data = server.files.get(self.path)
        server.range_headers.append(self.headers.get("Range"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and not server.ignore_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if server.hide_length:  # no length: the body ends when the connection closes
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        if server.gzip_label:  # a common misconfiguration for .tgz files
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if server.drops_left > 0:  # send half, then hang up mid-transfer
            server.drops_left -= 1
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)
        server.bytes_served += len(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.range_headers = {}, []
    httpd.bytes_served, httpd.drops_left, httpd.ignore_range, httpd.gzip_label = 0, 0, False, False
    httpd.hide_length = False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def archive(tmp_path):
    """(bytes, sha256) of a .tgz holding flowers/{red,green,blue}/*.jpg and flowers/LICENSE.txt."""
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    (src / "LICENSE.txt").write_text("CC-BY\n")
    data = make_tgz(src, tmp_path / "flowers.tgz").read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _assert_dataset(root: Path):
    assert root.name == "flowers"
    assert (root / "LICENSE.txt").read_text() == "CC-BY\n"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["blue", "green", "red"]
    assert len(list((root / "red").glob("*.jpg"))) == 4


def _raw_leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


def test_download_verifies_and_extracts_then_reuses_the_cached_archive(server, archive, tmp_path):
    data, sha = archive
    server.files["/flowers.tgz"] = data
    root = fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", **FAST)
    assert root == tmp_path / "raw" / "flowers" == dataset_root(tmp_path / "raw")
    _assert_dataset(root)
    assert _raw_leftovers(tmp_path / "raw") == ["flowers"]  # no temp folder left behind
    cached = list((tmp_path / "cache" / "downloads").iterdir())
    assert len(cached) == 1 and not cached[0].name.endswith(".part") and cached[0].read_bytes() == data

    served = server.bytes_served
    fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", **FAST)
    assert server.bytes_served == served  # nothing downloaded the second time
    _assert_dataset(root)


def test_an_interrupted_download_resumes_with_a_range_request(server, archive, tmp_path):
    data, sha = archive
    server.files["/flowers.tgz"] = data
    server.drops_left = 1
    with pytest.raises(RetrainError):  # one try only: the drop leaves half a .part behind
        fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", retries=1)
    parts = list((tmp_path / "cache" / "downloads").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == len(data) // 2
    assert not (tmp_path / "raw" / "flowers").exists()

    server.bytes_served = 0
    _assert_dataset(fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", **FAST))
    assert server.range_headers[-1] == f"bytes={len(data) // 2}-"
    assert server.bytes_served == len(data) - len(data) // 2  # only the missing half was sent
    assert not list((tmp_path / "cache" / "downloads").glob("*.part"))


def test_a_server_that_ignores_range_restarts_the_download(server, archive, tmp_path):
    data, sha = archive
    server.files["/flowers.tgz"] = data
    server.drops_left, server.ignore_range = 1, True
    _assert_dataset(fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", **FAST))
    assert server.range_headers == [None, f"bytes={len(data) // 2}-"]  # asked to resume, got 200


def test_a_dropped_connection_is_retried(server, archive, tmp_path):
    data, sha = archive
    server.files["/flowers.tgz"] = data
    server.drops_left = 2
    _assert_dataset(fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", **FAST))
    assert len(server.range_headers) == 3


def test_an_archive_served_as_gzip_content_encoding_is_stored_as_is(server, archive, tmp_path):
    data, sha = archive
    server.files["/flowers.tgz"], server.gzip_label = data, True
    _assert_dataset(fetch_dataset(server.url + "/flowers.tgz", sha, tmp_path / "raw", tmp_path / "cache", **FAST))


def test_checksum_mismatch_extracts_nothing_and_removes_the_download(server, archive, tmp_path):
    data, sha = archive
    server.files["/flowers.tgz"] = data
    wrong = "0" * 64
    with pytest.raises(RetrainError) as error:
        fetch_dataset(server.url + "/flowers.tgz", wrong, tmp_path / "raw", tmp_path / "cache", **FAST)
    message = str(error.value)
    assert wrong in message and sha in message and "/flowers.tgz" in message and "\n" not in message
    assert _raw_leftovers(tmp_path / "raw") == []
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_a_missing_file_names_the_url_and_the_offline_workaround(server, tmp_path):
    url = server.url + "/missing.tgz"
    with pytest.raises(RetrainError) as error:
        fetch_dataset(url, None, tmp_path / "raw", tmp_path / "cache", **FAST)
    message = str(error.value)
    assert url in message and "404" in message and "data.url=" in message and "\n" not in message
    assert len(server.range_headers) == 1  # a 404 is not retried


def test_a_refused_connection_names_the_url_and_the_offline_workaround(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/flower_photos.tgz"
    with pytest.raises(RetrainError) as error:
        fetch_dataset(url, None, tmp_path / "raw", tmp_path / "cache", **FAST)
    message = str(error.value)
    assert url in message and "refused" in message and "dvc exp run -S data.url=" in message
    assert "\n" not in message


def test_local_archives_folders_and_file_urls(archive, tmp_path):
    data, sha = archive
    tgz = tmp_path / "copy.tgz"
    tgz.write_bytes(data)
    _assert_dataset(fetch_dataset(str(tgz), sha, tmp_path / "raw1", tmp_path / "cache"))
    _assert_dataset(fetch_dataset(tgz.as_uri(), sha, tmp_path / "raw2", tmp_path / "cache"))
    _assert_dataset(fetch_dataset(str(tmp_path / "src" / "flowers"), None, tmp_path / "raw3", tmp_path / "cache"))
    with pytest.raises(RetrainError, match="checksum mismatch"):
        fetch_dataset(str(tgz), "f" * 64, tmp_path / "raw4", tmp_path / "cache")
    assert tgz.exists()  # the user's own file is never deleted
    with pytest.raises(RetrainError, match="does not exist"):
        fetch_dataset(str(tmp_path / "nope.tgz"), None, tmp_path / "raw5", tmp_path / "cache")


def test_zip_source_and_archives_without_a_single_top_folder(tmp_path):
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    (src / "LICENSE.txt").write_text("CC-BY\n")
    _assert_dataset(fetch_dataset(str(make_zip(src, tmp_path / "f.zip")), None, tmp_path / "raw", tmp_path / "c"))
    flat = tmp_path / "flowers.tar"
    with tarfile.open(flat, "w") as tar:  # classes at the top: the archive's stem names the folder
        for child in src.iterdir():
            tar.add(child, arcname=child.name)
    _assert_dataset(fetch_dataset(str(flat), None, tmp_path / "raw2", tmp_path / "c"))


def test_read_only_folders_in_an_archive_stay_removable(tmp_path):
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    (src / "LICENSE.txt").write_text("CC-BY\n")
    tgz = tmp_path / "ro.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(
            src, arcname="flowers", filter=lambda info: info.replace(mode=0o555 if info.isdir() else 0o444, deep=False)
        )
    root = fetch_dataset(str(tgz), None, tmp_path / "raw", tmp_path / "cache")
    _assert_dataset(root)
    assert all(p.stat().st_mode & 0o700 == 0o700 for p in [root, *root.rglob("*")] if p.is_dir())
    shutil.rmtree(root)  # what the download stage does before fetching again


def test_a_folder_with_a_symlink_loop_is_copied_once(tmp_path):
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    (src / "LICENSE.txt").write_text("CC-BY\n")
    os.symlink("..", src / "red" / "loop")
    root = fetch_dataset(str(src), None, tmp_path / "raw", tmp_path / "cache")
    _assert_dataset(root)
    assert len(_files_under(root)) == 13


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        ok = tarfile.TarInfo("flowers/red/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _evil_tars(tmp_path: Path, mode: str = "w:gz") -> dict[str, Path]:
    outside = str(tmp_path / "outside.txt")
    _tar_with = functools.partial(globals()["_tar_with"], mode=mode)  # noqa: N806 (same helper, this kind)
    fifo = tarfile.TarInfo("flowers/red/pipe")
    fifo.type = tarfile.FIFOTYPE
    device = tarfile.TarInfo("flowers/red/tty")
    device.type = tarfile.CHRTYPE
    return {
        "dotdot": _tar_with(tmp_path / "dotdot.tgz", (tarfile.TarInfo("flowers/../../evil.txt"), b"evil")),
        "absolute": _tar_with(tmp_path / "abs.tgz", (tarfile.TarInfo(str(tmp_path / "abs_evil.txt")), b"evil")),
        "symlink": _tar_with(
            tmp_path / "sym.tgz",
            _link("flowers/red/link", "../../../outside.txt", tarfile.SYMTYPE),
            (tarfile.TarInfo("flowers/red/link"), b"evil"),  # would write through the link
        ),
        "symlink-absolute": _tar_with(tmp_path / "symabs.tgz", _link("flowers/red/l", outside, tarfile.SYMTYPE)),
        "hardlink": _tar_with(tmp_path / "hard.tgz", _link("flowers/red/h", outside, tarfile.LNKTYPE)),
        "hardlink-dotdot": _tar_with(tmp_path / "hard2.tgz", _link("flowers/red/h", "../outside.txt", tarfile.LNKTYPE)),
        "fifo": _tar_with(tmp_path / "fifo.tgz", (fifo, None)),
        "device": _tar_with(tmp_path / "dev.tgz", (device, None)),
    }


@pytest.mark.parametrize("mode", ["w:gz", "w", "w:bz2", "w:xz"])
def test_unsafe_tar_entries_are_refused_and_nothing_is_written(tmp_path, mode):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "outside.txt").write_text("precious")
    for kind, tgz in _evil_tars(work, mode).items():
        before = _files_under(tmp_path)
        raw = work / f"raw-{kind}" / "nested"
        with pytest.raises(RetrainError) as error:
            fetch_dataset(str(tgz), None, raw, work / "cache")
        assert "unsafe entry" in str(error.value) and str(tgz) in str(error.value), kind
        assert _raw_leftovers(raw) == [], kind  # the temp folder is gone
        assert _files_under(tmp_path) == before, kind
        assert (tmp_path / "outside.txt").read_text() == "precious"


def test_unsafe_zip_entries_are_refused(tmp_path):
    (tmp_path / "outside.txt").write_text("precious")
    cases = {"dotdot": ("flowers/../../evil.txt", 0o100644, b"evil"), "absolute": ("/tmp/evil.txt", 0o100644, b"e")}
    cases["symlink"] = ("flowers/red/link", 0o120777, b"../../../outside.txt")
    cases["fifo"] = ("flowers/red/pipe", 0o010644, b"")
    for kind, (name, mode, content) in cases.items():
        path = tmp_path / f"{kind}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("flowers/red/ok.txt", "ok")
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, content)
        before = _files_under(tmp_path)
        with pytest.raises(RetrainError, match="unsafe entry"):
            fetch_dataset(str(path), None, tmp_path / f"raw-{kind}", tmp_path / "cache")
        assert _raw_leftovers(tmp_path / f"raw-{kind}") == [], kind
        assert _files_under(tmp_path) == before, kind


# --- hostile and oversized archives: one table, every archive kind ------------------------------


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _zip_of(path: Path, *entries: tuple[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("flowers/red/ok.txt", "ok")
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _zeros_tar(path: Path, mode: str, nbytes: int) -> Path:
    return _tar_with(path, _file("flowers/red/zeros.bin", bytes(nbytes)), mode=mode)


_SMALL = Limits(download_bytes=10**6, extracted_bytes=2 * 10**6, entries=50, compression_ratio=100)

# name: (build(folder) -> archive, limits, the error it must raise, or None for a safe skip)
HOSTILE = {
    "tgz of zeros (ratio)": (
        lambda d: _zeros_tar(d / "z.tgz", "w:gz", 1_500_000),
        _SMALL,
        "data.max_compression_ratio",
    ),
    "tar.bz2 of zeros (ratio)": (
        lambda d: _zeros_tar(d / "z.tbz2", "w:bz2", 1_500_000),
        _SMALL,
        "data.max_compression_ratio",
    ),
    "tar.xz of zeros (ratio)": (
        lambda d: _zeros_tar(d / "z.txz", "w:xz", 1_500_000),
        _SMALL,
        "data.max_compression_ratio",
    ),
    "zip of zeros (ratio)": (
        lambda d: _zip_of(d / "z.zip", ("flowers/red/zeros.bin", bytes(1_500_000))),
        _SMALL,
        "data.max_compression_ratio",
    ),
    "plain tar over the byte cap": (
        lambda d: _zeros_tar(d / "big.tar", "w", 2_500_000),
        _SMALL,
        "data.max_extracted_bytes",
    ),
    "stored zip over the byte cap": (
        lambda d: _zip_of(d / "big.zip", ("flowers/red/a.bin", bytes(2_500_000)), compression=zipfile.ZIP_STORED),
        _SMALL,
        "data.max_extracted_bytes",
    ),
    "tgz with too many entries": (
        lambda d: _tar_with(d / "many.tgz", *[_file(f"flowers/red/{i}.txt", b"x") for i in range(60)]),
        _SMALL,
        "data.max_archive_entries",
    ),
    "zip with too many entries": (
        lambda d: _zip_of(d / "many.zip", *[(f"flowers/red/{i}.txt", b"x") for i in range(60)]),
        _SMALL,
        "data.max_archive_entries",
    ),
    "tar duplicate name": (
        lambda d: _tar_with(d / "dup.tgz", _file("flowers/red/ok.txt", b"again")),
        _SMALL,
        "duplicate entry name",
    ),
    "tar duplicate spelt ./": (
        lambda d: _tar_with(d / "dup2.tar", _file("./flowers//red/ok.txt", b"again"), mode="w"),
        _SMALL,
        "duplicate entry name",
    ),
    "zip duplicate name": (
        lambda d: _zip_of(d / "dup.zip", ("flowers/red/ok.txt", b"again")),
        _SMALL,
        "duplicate entry name",
    ),
    "truncated tgz": (lambda d: _truncated(_random_tar(d / "t.tgz", "w:gz")), _SMALL, "damaged"),
    "truncated tar.xz": (lambda d: _truncated(_random_tar(d / "t.tar.xz", "w:xz")), _SMALL, "damaged"),
    "truncated plain tar": (lambda d: _truncated(_random_tar(d / "t.tar", "w")), _SMALL, "damaged"),
    "truncated zip": (
        lambda d: _truncated(_zip_of(d / "t.zip", ("flowers/red/a.bin", os.urandom(5000)))),
        _SMALL,
        "damaged",
    ),
    "not an archive at all": (lambda d: _write(d / "junk.tgz", os.urandom(3000)), _SMALL, "damaged or not an archive"),
    "HTML error page as .tgz": (
        lambda d: _write(d / "page.tgz", b"\n<!DOCTYPE html><html><body>404</body></html>"),
        _SMALL,
        "is an HTML page, not an archive",
    ),
    "HTML error page as .zip": (
        lambda d: _write(d / "page.zip", b"<html><head><title>Sign in</title>"),
        _SMALL,
        "is an HTML page, not an archive",
    ),
    "nested zip in a tgz (skipped)": (
        lambda d: _tar_with(d / "nest.tgz", _file("flowers/red/more.zip", b"PK\x05\x06" + bytes(18))),
        _SMALL,
        None,
    ),
    "nested tgz in a zip (skipped)": (
        lambda d: _zip_of(d / "nest.zip", ("flowers/red/more.tar.gz", b"\x1f\x8b" + bytes(20))),
        _SMALL,
        None,
    ),
    "zip symlink inside (skipped)": (lambda d: _zip_with_link(d / "link.zip", "flowers/red/l", "ok.txt"), _SMALL, None),
}


def _random_tar(path: Path, mode: str) -> Path:
    return _tar_with(path, _file("flowers/red/noise.bin", os.urandom(200_000)), mode=mode)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    return _write(path, path.read_bytes()[: path.stat().st_size * 2 // 3])


def _zip_with_link(path: Path, name: str, target: str) -> Path:
    _zip_of(path)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = 0o120777 << 16
        zf.writestr(info, target)
    return path


def _previous_dataset(raw: Path) -> dict[str, bytes]:
    """A dataset from an earlier run: it must survive any refused fetch untouched."""
    old = raw / "old_flowers" / "red"
    old.mkdir(parents=True)
    (old / "kept.jpg").write_bytes(b"earlier run")
    return {"old_flowers/red/kept.jpg": b"earlier run"}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_or_skipped_and_nothing_else_changes(tmp_path, case, capsys):
    build, limits, refusal = HOSTILE[case]
    (tmp_path / "in").mkdir()
    archive = build(tmp_path / "in")
    raw = tmp_path / "raw"
    previous = _previous_dataset(raw)
    outside_before = _files_under(tmp_path) - {f"raw/{name}" for name in previous}
    if refusal is not None:
        with pytest.raises(RetrainError) as error:
            fetch_dataset(str(archive), None, raw, tmp_path / "cache", limits=limits)
        message = str(error.value)
        assert refusal in message and str(archive) in message and "\n" not in message, message
        assert {name: (raw / name).read_bytes() for name in previous} == previous  # the earlier data survives
        assert _raw_leftovers(raw) == ["old_flowers"]  # the partial extraction is gone
    else:
        root = fetch_dataset(str(archive), None, raw, tmp_path / "cache", limits=limits)
        assert _files_under(root) == {"red/ok.txt"}  # only the plain file; the old dataset is replaced
        assert _raw_leftovers(raw) == ["flowers"]
        note = capsys.readouterr().err
        assert f"note: {archive}: skipped 1 " in note and ("not extracted" in note or "not followed" in note), note
    assert _files_under(tmp_path) - {f"raw/{p}" for p in _files_under(raw)} == outside_before  # nothing elsewhere


def test_the_byte_cap_stops_a_zip_mid_entry_whatever_its_directory_claims(tmp_path):
    """A zip's central directory can under-state a size; the copy counts the bytes it writes."""
    path = _zip_of(tmp_path / "liar.zip", ("flowers/red/big.bin", os.urandom(300_000)), compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the central directory entry of big.bin: its size fields say 10
    data[at + 24 : at + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    limits = Limits(extracted_bytes=100_000, compression_ratio=1000)
    with pytest.raises(RetrainError, match="damaged|data.max_extracted_bytes"):
        fetch_dataset(str(path), None, tmp_path / "raw", tmp_path / "cache", limits=limits)
    assert _raw_leftovers(tmp_path / "raw") == []


def test_every_supported_archive_kind_extracts(tmp_path):
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    (src / "LICENSE.txt").write_text("CC-BY\n")
    for suffix, mode in {".tar": "w", ".tar.gz": "w:gz", ".tar.bz2": "w:bz2", ".tar.xz": "w:xz"}.items():
        path = tmp_path / f"flowers{suffix}"
        with tarfile.open(path, mode) as tar:
            tar.add(src, arcname="flowers")
        _assert_dataset(fetch_dataset(str(path), None, tmp_path / f"raw{suffix}", tmp_path / "cache"))
    misnamed = tmp_path / "really_a_zip.tgz"  # told apart by content, not by name
    misnamed.write_bytes(make_zip(src, tmp_path / "f.zip").read_bytes())
    _assert_dataset(fetch_dataset(str(misnamed), None, tmp_path / "raw-misnamed", tmp_path / "cache"))


def test_a_download_over_the_cap_is_refused_before_or_while_streaming(server, tmp_path):
    server.files["/big.tgz"] = bytes(300_000)
    limits = Limits(download_bytes=100_000)
    with pytest.raises(RetrainError) as error:  # Content-Length says 300000: refused before the body
        fetch_dataset(server.url + "/big.tgz", None, tmp_path / "raw", tmp_path / "cache", limits=limits, **FAST)
    message = str(error.value)
    assert "/big.tgz" in message and "100000 byte limit (data.max_download_bytes)" in message
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    server.hide_length = True  # no Content-Length: the stream itself is counted
    with pytest.raises(RetrainError, match=r"sent more than \d+ bytes, over the 100000 byte limit"):
        fetch_dataset(server.url + "/big.tgz", None, tmp_path / "raw", tmp_path / "cache", limits=limits, **FAST)
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    assert server.bytes_served == 0 or server.bytes_served >= 100_000


def test_a_downloaded_html_page_is_named_and_not_kept_in_the_cache(server, tmp_path):
    server.files["/flowers.tgz"] = b"<!doctype html><html><body>Please sign in</body></html>"
    with pytest.raises(RetrainError, match="is an HTML page, not an archive"):
        fetch_dataset(server.url + "/flowers.tgz", None, tmp_path / "raw", tmp_path / "cache", **FAST)
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []  # the next run asks the server again
    assert _raw_leftovers(tmp_path / "raw") == []


def _fetch_within(seconds: float, *args, **kwargs):
    """fetch_dataset in a thread: opening a fifo would block forever, so a hang fails the test."""
    result = {}

    def target():
        try:
            result["root"] = fetch_dataset(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "fetch_dataset hung (it opened a fifo?)"
    if "error" in result:
        raise result["error"]
    return result["root"]


def test_a_folder_source_never_follows_links_out_or_reads_special_files(tmp_path, capsys):
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    (src / "LICENSE.txt").write_text("CC-BY\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE")
    os.symlink(secret / "id_rsa", src / "red" / "key.jpg")  # a file link out
    os.symlink(secret, src / "stolen")  # a folder link out
    os.symlink("../red/red_0000.jpg", src / "blue" / "inside.jpg")  # a link inside: followed
    os.mkfifo(src / "red" / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "red" / "sock.jpg"))
        root = _fetch_within(60, str(src), None, tmp_path / "raw", tmp_path / "cache")
    _assert_dataset(root)
    files = _files_under(root)
    assert "blue/inside.jpg" in files and len(files) == 14
    assert not any("PRIVATE" in p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file())
    err = capsys.readouterr().err
    assert "skipped 2 symlink(s) pointing out of the folder" in err and "skipped 2 fifo(s), socket(s)" in err, err


def test_a_folder_over_the_caps_is_refused_and_the_previous_dataset_survives(tmp_path):
    src = tmp_path / "src" / "flowers"
    make_class_folders(src, per_class=4)
    previous = _previous_dataset(tmp_path / "raw")
    for limits, param in [
        (Limits(entries=5), "data.max_archive_entries"),
        (Limits(extracted_bytes=2000), "data.max_extracted_bytes"),
    ]:
        with pytest.raises(RetrainError, match=param):
            fetch_dataset(str(src), None, tmp_path / "raw", tmp_path / "cache", limits=limits)
        assert _raw_leftovers(tmp_path / "raw") == ["old_flowers"]
        assert (tmp_path / "raw" / "old_flowers/red/kept.jpg").read_bytes() == previous["old_flowers/red/kept.jpg"]


def test_the_default_limits_admit_the_official_archives():
    # the official archive (229 MB, 3,670 photos) and Oxford 102 (330 MB, 8,189)
    assert Limits().download_bytes > 330e6 and Limits().entries > 8_189 + 200
