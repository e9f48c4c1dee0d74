"""Fetch the dataset into `raw_dir/<name>/<class>/<image>`, from a URL, a local archive or a folder.

`fetch_dataset` is the one entry point. An http(s) archive is streamed to
`cache_dir/downloads/<key>.part` (resumed with an HTTP Range request after an interruption,
retried with exponential backoff), checked against its sha256, and only then renamed to its final
cached name, so the final name never holds a partial or unverified file and a complete archive is
never downloaded twice. Archives are extracted into a temporary folder inside `raw_dir` and renamed
into place only when every entry was safe: an entry that would land outside `raw_dir` (absolute
path, `..`, a link pointing out) or a device file stops the stage and leaves nothing behind.
"""

import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from retrain.errors import RetrainError

DEFAULT_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"
DEFAULT_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
OFFLINE_HINT = "point data.url at a local copy: dvc exp run -S data.url=/path/to/flower_photos.tgz"
_CHUNK_BYTES = 1 << 20
# Errors worth another try: the connection broke or the server had a bad moment.
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _TransientError(Exception):
    """A download attempt failed in a way that retrying may fix."""


def fetch_dataset(
    source: str,
    sha256: str | None,
    raw_dir: Path,
    cache_dir: Path,
    *,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
) -> Path:
    """Put the dataset at `raw_dir/<name>` and return that folder.

    source: an http/https/file URL of a .tgz/.tar.gz/.tar/.zip archive, a local path to one, or a
    local folder of class folders (copied). sha256: expected hex digest of the archive, or None to
    skip the check (folders are never checked). <name> is the archive's single top-level folder
    (e.g. flower_photos), else the archive's or folder's name without suffix. A download makes at
    most `retries` attempts, sleeping backoff_s, 2*backoff_s, ... between them.
    """
    raw_dir, cache_dir = Path(raw_dir), Path(cache_dir)
    scheme = urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        archive = _cached_download(source, sha256, cache_dir, retries, backoff_s, timeout_s)
        return _extract(archive, raw_dir, _archive_stem(urlparse(source).path))
    if scheme == "file":
        path = Path(url2pathname(unquote(urlparse(source).path)))
    elif len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise RetrainError(
            f"data.url {source!r}: unsupported scheme {scheme!r}; use http(s)://, file:// or a local path"
        )
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        return _copy_folder(path, raw_dir)
    if not path.is_file():
        raise RetrainError(
            f"data.url {source!r}: {path} does not exist; set data.url to an archive URL, archive or folder"
        )
    if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise RetrainError(f"data.url {path}: not a .tgz/.tar.gz/.tar/.zip archive or a folder of class folders")
    _verify_sha256(path, sha256, remove_on_mismatch=False)
    return _extract(path, raw_dir, _archive_stem(path.name))


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


def _verify_sha256(path: Path, expected: str | None, remove_on_mismatch: bool, origin: str | None = None) -> None:
    if not expected:
        return
    actual = file_sha256(path)
    if actual != expected.lower():
        if remove_on_mismatch:
            path.unlink(missing_ok=True)
        raise RetrainError(
            f"checksum mismatch for {origin or path}: expected sha256 {expected}, got {actual}; "
            f"if this is the archive you want, set data.sha256 to {actual} (or null)"
        )


# --- download ----------------------------------------------------------------------------------


def _cached_download(url, sha256, cache_dir, retries, backoff_s, timeout_s) -> Path:
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
            _download_once(url, part, timeout_s)
            break
        except _TransientError as e:
            if attempt + 1 >= max(1, retries):
                raise RetrainError(f"cannot download {url}: {e} (after {attempt + 1} tries); {OFFLINE_HINT}") from None
            time.sleep(backoff_s * 2**attempt)
    _verify_sha256(part, sha256, remove_on_mismatch=True, origin=url)
    os.replace(part, final)
    return final


def _download_once(url: str, part: Path, timeout_s: float) -> None:
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
            _stream_to(response, part, offset, total, label=posixpath.basename(urlparse(url).path))
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        raise _TransientError(_short_reason(e)) from None


def _resumes_at(response, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == offset


def _content_range_total(response) -> int | None:
    match = re.match(r"bytes [^/]*/(\d+)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _stream_to(response, part: Path, offset: int, total: int | None, label: str) -> None:
    written = offset
    with open(part, "ab" if offset else "wb") as f, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False
    ) as bar:
        # Raw bytes: a server that labels a .tgz "Content-Encoding: gzip" must not get it unpacked.
        for chunk in response.raw.stream(_CHUNK_BYTES, decode_content=False):
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


# --- extraction --------------------------------------------------------------------------------


def _extract(archive: Path, raw_dir: Path, stem: str) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=raw_dir))
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, tmp)
        else:
            _extract_tar(archive, tmp)
        return _move_into_place(tmp, raw_dir, stem)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _tar_filter(archive: Path):
    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
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
            else:  # whatever modes the archive carries, its owner can read and later delete it
                if safe.mode is None:  # links: no mode of their own
                    return safe
                return safe.replace(mode=safe.mode | (0o700 if safe.isdir() else 0o600), deep=False)
        raise RetrainError(f"unsafe entry {member.name!r} in {archive} ({reason}); nothing was extracted")

    return check


def _extract_tar(archive: Path, dest: Path) -> None:
    check = _tar_filter(archive)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=check)  # one pass over the stream, checking each entry
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RetrainError(f"cannot extract {archive}: {e}; the archive is damaged, delete it and retry") from None


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_zip_entry(archive, zf, info)
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError) as e:
        raise RetrainError(f"cannot extract {archive}: {e}; the archive is damaged, delete it and retry") from None


def _check_zip_entry(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    reason = _unsafe_name(info.filename)
    if stat.S_ISLNK(mode):
        target = zf.read(info).decode("utf-8", "replace")
        if _link_escapes(info.filename, target, relative_to_entry=True):
            reason = f"symlink to {target!r} outside the archive"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        reason = "device file or fifo"
    if reason:
        raise RetrainError(f"unsafe entry {info.filename!r} in {archive} ({reason}); nothing was extracted")


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
    return final


def _replace_dir(new: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent))
        final.rename(old / "x")
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


# --- local folder ------------------------------------------------------------------------------


def _copy_folder(src: Path, raw_dir: Path) -> Path:
    """Copy a folder of class folders to raw_dir/<its name>, following symlinks, skipping loops."""
    src = src.resolve()
    final = raw_dir / src.name
    if final.resolve() == src:
        return final
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=raw_dir))
    try:
        here = raw_dir.stat()
        seen = {(here.st_dev, here.st_ino)}  # never copy raw_dir into itself
        for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
            info = os.stat(dirpath)
            if (info.st_dev, info.st_ino) in seen:  # a symlink loop: been here already
                dirnames.clear()
                continue
            seen.add((info.st_dev, info.st_ino))
            target = tmp / Path(dirpath).relative_to(src)
            target.mkdir(parents=True, exist_ok=True)
            for name in filenames:
                if os.path.exists(os.path.join(dirpath, name)):  # skip dangling symlinks
                    shutil.copy2(os.path.join(dirpath, name), target / name)
        _replace_dir(tmp, final)
    except OSError as e:
        raise RetrainError(f"cannot copy {src} to {final}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
