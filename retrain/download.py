"""Fetch the dataset into `raw_dir/<name>/<class>/<image>`, from a URL, a local archive or a folder.

`fetch_dataset` is the one entry point. An http(s) archive is streamed to
`cache_dir/downloads/<key>.part` (resumed with an HTTP Range request after an interruption,
retried with exponential backoff), checked against its sha256, and only then renamed to its final
cached name, so the final name never holds a partial or unverified file and a complete archive is
never downloaded twice. Archives (.tgz, .tar, .tar.bz2, .tar.xz, .zip, told apart by their first
bytes) are extracted into a temporary folder inside `raw_dir` and renamed into place only when
every entry was safe: an entry that would land outside `raw_dir` (absolute path, `..`, a link
pointing out), a device file, a fifo or a duplicate name stops the stage and leaves nothing behind;
so does crossing one of the `Limits` (bytes downloaded, bytes extracted, entries, compression
ratio), which are counted while streaming, before anything is written past them. Archives inside
the archive are not extracted (said so on stderr). A folder source is copied without following
links that point out of it and without opening fifos, sockets or devices.
"""

import hashlib
import lzma
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from retrain.errors import NO_SPACE_ERRNOS, RetrainError
from retrain.limits import MAX_ARCHIVE_ENTRIES, MAX_COMPRESSION_RATIO, MAX_DOWNLOAD_BYTES, MAX_EXTRACTED_BYTES
from retrain.urls import without_credentials

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
# Names that are archives themselves: kept out of raw_dir (split could not use them anyway).
NESTED_ARCHIVE_SUFFIXES = (*ARCHIVE_SUFFIXES, ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")
OFFLINE_HINT = "point data.url at a local copy: dvc exp run -S data.url=/path/to/flower_photos.tgz"
_CHUNK_BYTES = 1 << 20
# Errors worth another try: the connection broke or the server had a bad moment.
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# What a damaged .tgz / .tar.xz / .zip raises besides its module's own error (bzip2 raises OSError).
_DECOMPRESS_ERRORS = (EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Limits:
    """What one dataset may cost, each checked while streaming; the params that set them.

    The defaults are retrain.limits', defined there once with their reasons.
    """

    download_bytes: int = MAX_DOWNLOAD_BYTES  # data.max_download_bytes: bytes one download may fetch
    extracted_bytes: int = MAX_EXTRACTED_BYTES  # data.max_extracted_bytes: bytes written into raw_dir
    entries: int = MAX_ARCHIVE_ENTRIES  # data.max_archive_entries: files, folders and links in the dataset
    compression_ratio: float = MAX_COMPRESSION_RATIO  # data.max_compression_ratio: extracted bytes / archive bytes

    @classmethod
    def of(cls, data) -> "Limits":
        """The limits set in params.yaml's `data:` section (a DataParams)."""
        return cls(
            data.max_download_bytes, data.max_extracted_bytes, data.max_archive_entries, data.max_compression_ratio
        )


class _TransientError(Exception):
    """A download attempt failed in a way that retrying may fix."""


@without_credentials
def fetch_dataset(
    source: str,
    sha256: str | None,
    raw_dir: Path,
    cache_dir: Path,
    *,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    limits: Limits = Limits(),
) -> Path:
    """Put the dataset at `raw_dir/<name>` and return that folder; on success it is all raw_dir holds.

    source: an http/https/file URL of an archive, a local path to one, or a local folder of class
    folders (copied). sha256: expected hex digest of the archive, or None to skip the check
    (folders are never checked). <name> is the archive's single top-level folder (e.g.
    flower_photos), else the archive's or folder's name without suffix. A download makes at most
    `retries` attempts, sleeping backoff_s, 2*backoff_s, ... between them. On any error raw_dir
    is left as it was.
    """
    raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
    scheme = urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        archive = _cached_download(source, sha256, cache_dir, retries, backoff_s, timeout_s, limits)
        return _extract(archive, raw_dir, _archive_stem(urlparse(source).path), limits, downloaded=True)
    if scheme == "file":
        path = Path(url2pathname(unquote(urlparse(source).path)))
    elif len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise RetrainError(
            f"data.url {source!r}: unsupported scheme {scheme!r}; use http(s)://, file:// or a local path"
        )
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        return _copy_folder(path, raw_dir, limits)
    if not path.is_file():
        raise RetrainError(
            f"data.url {source!r}: {path} does not exist; set data.url to an archive URL, archive or folder"
        )
    if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise RetrainError(f"data.url {path}: not a .tgz/.tar(.gz/.bz2/.xz)/.zip archive or a folder of class folders")
    verify_sha256(path, sha256)
    return _extract(path, raw_dir, _archive_stem(path.name), limits, downloaded=False)


def dataset_root(raw_dir: Path) -> Path:
    """The one dataset folder `fetch_dataset` left in raw_dir (what the split stage reads)."""
    raw_dir = Path(raw_dir)
    children = raw_dir.iterdir() if raw_dir.is_dir() else []
    found = sorted(p for p in children if p.is_dir() and not p.name.startswith("."))
    if len(found) != 1:
        what = "nothing" if not found else ", ".join(p.name for p in found)
        raise RetrainError(f"{raw_dir} should hold one dataset folder but holds {what}; run: dvc repro download")
    return found[0]


def _archive_stem(name: str) -> str:
    base = posixpath.basename(name.rstrip("/")) or "dataset"
    for suffix in ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] or "dataset"
    return base


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(
    path: Path, expected: str | None, *, key: str = "data", origin: str | None = None, remove_on_mismatch: bool = False
) -> None:
    """Nothing when `expected` is None or is path's sha256; else a RetrainError naming the file (and
    `origin`, the URL it came from), both digests and the param to set (`key`.sha256).
    remove_on_mismatch: delete the file first, so a download that failed its check is never reused."""
    if not expected:
        return
    actual = file_sha256(path)
    if actual != expected.lower():
        if remove_on_mismatch:
            path.unlink(missing_ok=True)
        name = f"{posixpath.basename(origin.rstrip('/'))} ({origin})" if origin else str(path)
        raise RetrainError(
            f"checksum mismatch for {name}: expected sha256 {expected}, got {actual}; "
            f"download it again, or if this is the file you want set {key}.sha256 to {actual} (or null)"
        )


# --- download ----------------------------------------------------------------------------------


@without_credentials
def _cached_download(url, sha256, cache_dir, retries, backoff_s, timeout_s, limits: Limits) -> Path:
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(urlparse(url).path)) or "archive"
    final = downloads / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
    part = final.with_name(final.name + ".part")
    if final.is_file():
        if not sha256 or file_sha256(final) == sha256.lower():
            return final
        final.unlink()  # cached under an older expected checksum: fetch it again
    for attempt in range(max(1, retries)):
        try:
            _download_once(url, part, timeout_s, limits)
            break
        except _TransientError as e:
            if attempt + 1 >= max(1, retries):
                raise RetrainError(f"cannot download {url}: {e} (after {attempt + 1} tries); {OFFLINE_HINT}") from None
            time.sleep(backoff_s * 2**attempt)
    verify_sha256(part, sha256, origin=url, remove_on_mismatch=True)
    os.replace(part, final)
    return final


def _download_once(url: str, part: Path, timeout_s: float, limits: Limits) -> None:
    """Append the rest of `url` to `part`; raise _TransientError when a retry may help."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
            if response.status_code == 416 and offset:  # the .part is complete, or not this file
                if _content_range_total(response) == offset:
                    return
                part.unlink()
                raise _TransientError("server refused to resume; restarting")
            if response.status_code in _TRANSIENT_STATUS:
                raise _TransientError(f"HTTP {response.status_code} {response.reason}")
            if response.status_code not in (200, 206):
                status = f"HTTP {response.status_code} {response.reason}"
                raise RetrainError(f"cannot download {url}: {status}; {OFFLINE_HINT}")
            if response.status_code == 206 and not _resumes_at(response, offset):
                part.unlink()
                raise _TransientError("server resumed at the wrong offset; restarting")
            if response.status_code == 200:
                offset = 0  # the server ignored Range: start over
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            if total is not None and total > limits.download_bytes:  # refused before a byte lands
                _over_download_limit(url, part, limits, f"the server announces {total} bytes")
            _stream_to(response, part, offset, total, url, limits)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        raise _TransientError(_short_reason(e)) from None


def _over_download_limit(url: str, part: Path, limits: Limits, what: str) -> None:
    part.unlink(missing_ok=True)
    raise RetrainError(
        f"{url}: {what}, over the {limits.download_bytes} byte limit (data.max_download_bytes); "
        "nothing was kept; if the archive is really that big, raise data.max_download_bytes"
    )


def _resumes_at(response, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == offset


def _content_range_total(response) -> int | None:
    match = re.match(r"bytes [^/]*/(\d+)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _stream_to(response, part: Path, offset: int, total: int | None, url: str, limits: Limits) -> None:
    written = offset
    label = posixpath.basename(urlparse(url).path)
    with (
        open(part, "ab" if offset else "wb") as f,
        tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False) as bar,
    ):
        # Raw bytes: a server that labels a .tgz "Content-Encoding: gzip" must not get it unpacked.
        for chunk in response.raw.stream(_CHUNK_BYTES, decode_content=False):
            if written + len(chunk) > limits.download_bytes:  # a server that lies about its length
                f.close()
                _over_download_limit(url, part, limits, f"the server sent more than {written} bytes")
            f.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    if total is not None and written < total:
        raise _TransientError(f"connection closed after {written} of {total} bytes")


def _short_reason(error: Exception) -> str:
    """One readable phrase for a requests exception (its str() is a paragraph)."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    text = str(error)
    if "Failed to resolve" in text or "Name or service not known" in text or "nodename nor servname" in text:
        return "host not found (offline?)"
    match = re.search(r"\[Errno -?\d+\] ([^'\"\)]+)", text)
    if match:
        return match.group(1).strip().rstrip(".").lower()
    return (text.splitlines() or [type(error).__name__])[0][:200]


# --- limits and notes --------------------------------------------------------------------------


class _Budget:
    """Counts the entries and bytes written for one dataset and stops at the first limit crossed.

    Called before each entry is written and before each chunk of it, so a breach leaves at most
    the bytes under the limit in the temporary folder (which the caller then removes).
    """

    def __init__(self, origin: Path, limits: Limits, archive_bytes: int | None):
        self.origin, self.limits, self.archive_bytes = origin, limits, archive_bytes
        self.entries = self.written = 0
        self.skipped: list[tuple[str, str]] = []  # (entry, why): reported once, at the end

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.entries:
            self._breach(f"more than {self.limits.entries} entries", "data.max_archive_entries")

    def add(self, nbytes: int) -> None:
        self.written += nbytes
        if self.written > self.limits.extracted_bytes:
            self._breach(f"more than {self.limits.extracted_bytes} bytes", "data.max_extracted_bytes")
        if self.archive_bytes is not None and self.written > self.limits.compression_ratio * self.archive_bytes:
            ratio = f"{self.limits.compression_ratio:g}"
            self._breach(
                f"more than {ratio} times its own {self.archive_bytes} bytes (a zip bomb?)",
                "data.max_compression_ratio",
            )

    def _breach(self, what: str, param: str) -> None:
        raise RetrainError(
            f"{self.origin}: would extract {what}, over the limit {param}; the partial output "
            f"was removed and data/raw left as it was; if the data is trusted, raise {param}"
        )

    def report(self) -> None:
        """One stderr line per kind of skipped entry, naming the first few."""
        by_reason: dict[str, list[str]] = {}
        for name, why in self.skipped:
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            print(f"note: {self.origin}: skipped {len(names)} {why}: {shown}", file=sys.stderr)


def _copy_stream(source, target: Path, budget: _Budget) -> None:
    """Copy an open binary stream to a new file, counting every chunk against the budget first."""
    with open(target, "xb") as out:
        while chunk := source.read(_CHUNK_BYTES):
            budget.add(len(chunk))
            out.write(chunk)


def _is_nested_archive(name: str) -> bool:
    return name.lower().endswith(NESTED_ARCHIVE_SUFFIXES)


# --- extraction --------------------------------------------------------------------------------


def _extract(archive: Path, raw_dir: Path, stem: str, limits: Limits, downloaded: bool) -> Path:
    kind = _archive_kind(archive, downloaded)
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=raw_dir))
    budget = _Budget(archive, limits, archive.stat().st_size)
    try:
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp, budget)
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:  # the disk, not the data: exit_on_error says so
                raise
            raise RetrainError(f"cannot extract {archive}: {e}; the archive is damaged, delete it and retry") from None
        final = _move_into_place(tmp, raw_dir, stem)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    budget.report()
    return final


def _archive_kind(archive: Path, downloaded: bool) -> str:
    """'zip' or 'tar' from the first bytes (tarfile itself tells gzip, bzip2 and xz apart)."""
    with open(archive, "rb") as f:
        head = f.read(1024)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        if downloaded:  # a cached error page would be served again on the next run
            archive.unlink(missing_ok=True)
        raise RetrainError(
            f"{archive} is an HTML page, not an archive (the server sent an error or login "
            "page?); open data.url in a browser, or point it at a local copy"
        )
    return "tar"


def _unsafe_name(name: str) -> str | None:
    """Why an archive entry name would escape the extraction folder, or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in path"
    return None


def _link_escapes(entry: str, target: str, relative_to_entry: bool) -> bool:
    if _unsafe_name(target) == "absolute path":
        return True
    base = posixpath.dirname(entry) if relative_to_entry else ""
    return posixpath.normpath(posixpath.join(base, target)).split("/")[0] == ".."


def _refuse(archive: Path, name: str, reason: str):
    raise RetrainError(f"unsafe entry {name!r} in {archive} ({reason}); nothing was extracted")


class _Names:
    """Entry names seen so far, normalised ('a//b', './a/b' and 'a/b' are one file)."""

    def __init__(self, archive: Path):
        self.archive, self.seen = archive, {}

    def add(self, name: str, is_dir: bool) -> None:
        key = posixpath.normpath(name.replace("\\", "/"))
        if key in self.seen and not (is_dir and self.seen[key]):  # the second would overwrite the first
            _refuse(self.archive, name, "duplicate entry name: a later entry would overwrite an earlier one")
        self.seen[key] = is_dir


def _tar_filter(archive: Path, budget: _Budget):
    names = _Names(archive)

    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        reason = _unsafe_name(member.name)
        if member.issym() and _link_escapes(member.name, member.linkname, relative_to_entry=True):
            reason = f"symlink to {member.linkname!r} outside the archive"
        elif member.islnk() and _link_escapes(member.name, member.linkname, relative_to_entry=False):
            reason = f"hard link to {member.linkname!r} outside the archive"
        elif member.ischr() or member.isblk() or member.isfifo():
            reason = "device file or fifo"
        if reason is None:
            try:
                safe = tarfile.data_filter(member, dest)  # second line of defence, from the stdlib
            except tarfile.FilterError as e:
                reason = str(e)
        if reason is not None:
            _refuse(archive, member.name, reason)
        names.add(member.name, member.isdir())
        budget.entry()
        if member.isfile() and _is_nested_archive(member.name):
            budget.skipped.append((member.name, "archive(s) inside the archive, not extracted"))
            return None
        budget.add(member.size if member.isfile() else 0)  # tar writes exactly member.size bytes
        if safe.mode is None:  # links: no mode of their own
            return safe
        # Whatever modes the archive carries, its owner can read and later delete it.
        return safe.replace(mode=safe.mode | (0o700 if safe.isdir() else 0o600), deep=False)

    return check


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=_tar_filter(archive, budget))  # one pass over the stream
    except (tarfile.TarError, *_DECOMPRESS_ERRORS) as e:
        reason = str(e).splitlines()[0].rstrip(":")  # tarfile lists each method it tried, a line each
        raise RetrainError(
            f"cannot extract {archive}: {reason}; the archive is damaged or not an archive, delete it and retry"
        ) from None


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            wanted = [info for info in infos if _check_zip_entry(archive, zf, info, budget)]
            names = _Names(archive)
            for info in infos:
                names.add(info.filename, info.is_dir())
            # What the directory claims, refused before a byte is written; the copy counts again
            # (a directory can under-state a size).
            _Budget(archive, budget.limits, budget.archive_bytes).add(sum(info.file_size for info in wanted))
            for info in wanted:
                _write_zip_entry(zf, info, dest, budget)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, *_DECOMPRESS_ERRORS) as e:
        raise RetrainError(
            f"cannot extract {archive}: {e}; the archive is damaged or not an archive, delete it and retry"
        ) from None


def _check_zip_entry(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> bool:
    """Refuse an unsafe entry; False for one that is skipped (a link, an archive), True to extract."""
    mode = info.external_attr >> 16
    reason = _unsafe_name(info.filename)
    if stat.S_ISLNK(mode):
        with zf.open(info) as link:  # a link's target is a short path, not a bomb
            target = link.read(4096).decode("utf-8", "replace")
        if _link_escapes(info.filename, target, relative_to_entry=True):
            reason = f"symlink to {target!r} outside the archive"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        reason = "device file or fifo"
    if reason:
        _refuse(archive, info.filename, reason)
    budget.entry()
    if stat.S_ISLNK(mode):  # zipfile would write the link's target as a text file: skip it
        budget.skipped.append((info.filename, "symlink(s) inside the zip, not followed"))
        return False
    if not info.is_dir() and _is_nested_archive(info.filename):
        budget.skipped.append((info.filename, "archive(s) inside the archive, not extracted"))
        return False
    return True


def _write_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: _Budget) -> None:
    """Write one checked entry, streaming it: the sizes in a zip's directory can lie."""
    target = dest.joinpath(*[part for part in re.split(r"[/\\]", info.filename) if part not in ("", ".")])
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as source:
        _copy_stream(source, target, budget)


def _move_into_place(tmp: Path, raw_dir: Path, stem: str) -> Path:
    """Rename the extracted tree to raw_dir/<name>; <name> is its single top folder, else `stem`."""
    visible = [p for p in tmp.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    if len(visible) == 1 and visible[0].is_dir() and not visible[0].is_symlink():
        content, name = visible[0], visible[0].name
    else:
        content, name = tmp / stem, stem
        content.mkdir()
        for p in visible:
            p.rename(content / p.name)
    final = raw_dir / name
    _replace_dir(content, final)
    _remove_other_datasets(raw_dir, keep=final)
    return final


def _replace_dir(new: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
        final.rename(old / "x")
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


def _remove_other_datasets(raw_dir: Path, keep: Path) -> None:
    """After a success raw_dir holds only the new dataset (split reads the one folder there)."""
    for child in raw_dir.iterdir():
        if child != keep and not child.name.startswith((".extract-", ".copy-", ".old-")):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


# --- local folder ------------------------------------------------------------------------------


def _copy_folder(src: Path, raw_dir: Path, limits: Limits) -> Path:
    """Copy a folder of class folders to raw_dir/<its name>.

    Links are followed only while they stay inside the folder; fifos, sockets and devices are
    skipped without being opened (a fifo would block the read forever). Loops are copied once.
    """
    src = src.resolve()
    final = raw_dir / src.name
    if final.resolve() == src:
        return final
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=raw_dir))
    budget = _Budget(src, limits, archive_bytes=None)
    try:
        _copy_tree(src, tmp, raw_dir, budget)
        _replace_dir(tmp, final)
        _remove_other_datasets(raw_dir, keep=final)
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:  # the disk, not the data: exit_on_error says so
            raise
        raise RetrainError(f"cannot copy {src} to {final}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    budget.report()
    return final


def _copy_tree(src: Path, tmp: Path, raw_dir: Path, budget: _Budget) -> None:
    here = raw_dir.stat()
    seen = {(here.st_dev, here.st_ino)}  # never copy raw_dir into itself
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in seen:  # a symlink loop: been here already
            dirnames.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = [d for d in dirnames if _stays_inside(src, Path(dirpath, d), budget)]
        target = tmp / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        budget.entry()
        for name in filenames:
            path = Path(dirpath, name)
            if not _stays_inside(src, path, budget) or not os.path.exists(path):  # out, or dangling
                continue
            if not stat.S_ISREG(os.stat(path).st_mode):  # checked before opening: a fifo would block
                budget.skipped.append((str(path.relative_to(src)), "fifo(s), socket(s) or device(s), not read"))
                continue
            budget.entry()
            with open(path, "rb") as source:
                _copy_stream(source, target / name, budget)


def _stays_inside(src: Path, path: Path, budget: _Budget) -> bool:
    """False (and noted) for a symlink whose target is outside the folder being copied."""
    if not path.is_symlink() or Path(os.path.realpath(path)).is_relative_to(src):
        return True
    budget.skipped.append((str(path.relative_to(src)), "symlink(s) pointing out of the folder, not followed"))
    return False
