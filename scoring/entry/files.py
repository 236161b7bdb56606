"""Files of entries, bundles and runs: written durably, and read from anyone within bounds.

Writing: :func:`atomic_write` replaces a file in one step that survives a crash or a power loss, and
:func:`new_folder_beside` makes the folder a bundle is assembled in; both give what they create the mode any new
file or folder gets (the umask decides), so a bundle copied to a shared folder stays readable by others.

Reading: an entry or bundle may come from anyone, so reading one is bounded and reads nothing else:

* only regular files inside the folder are opened: each folder on the way is checked with ``lstat`` (no
  symlinks), the file too (no link, FIFO, device or socket: refused before it is opened, so nothing blocks),
  and it is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked again (``fstat``) to be the file checked
  (:func:`open_regular`, :func:`read_regular`);
* every file has a size cap, checked before reading: :data:`MAX_JSON_BYTES` for entry.json and report.json,
  :data:`MAX_MANIFEST_BYTES` for the manifest, :data:`MAX_BUNDLE_BYTES` for any file and for a bundle in all,
  :data:`MAX_MARKDOWN_BYTES` for the bundle's markdown files, and the safetensors header
  :data:`MAX_HEADER_BYTES`; folder walks are at most :data:`MAX_DEPTH` folders deep and :data:`MAX_FILES`
  entries; a rebuilt architecture has at most :data:`MAX_MODULES` modules;
* JSON is plain data: NaN / Infinity and a key given twice in one object are refused (:func:`plain_json`).

Each refusal is an :class:`EntryError`: one line that names the file or value and the limit, and what to do.
This module imports nothing of ours but :mod:`scoring.errors`.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

from scoring.errors import UserError

# Limits on reading an entry or bundle. Real entries are far below each: of the registry's models compressed
# with block masks and 8-bit QAT, mixnet_s has the largest safetensors header (139 kB: 1,262 tensors at ~110 bytes)
# and compression state (29 kB); resnet50's weights file is 126 MB, wrn28_10's would be ~0.2 GB; a bundle holds
# 5 files, 2 folders deep. Parsing a 4 MiB header takes safetensors ~2 s (a 90 MB one took 283 s and 2.3 GB).
#: Bytes of any file of a bundle, and of all its files together.
MAX_BUNDLE_BYTES = 1 << 30
#: Bytes of entry.json and report.json.
MAX_JSON_BYTES = 4 << 20
#: Bytes of report.md and WRITEUP.md (a real one is under 100 kB: a line per layer).
MAX_MARKDOWN_BYTES = 4 << 20
#: Bytes of SHA256SUMS (about 1,000 lines).
MAX_MANIFEST_BYTES = 1 << 20
#: Bytes of the weights file's safetensors header (about 38,000 tensors).
MAX_HEADER_BYTES = 4 << 20
#: Folders below the top of a bundle, and files plus folders in it.
MAX_DEPTH, MAX_FILES = 8, 1000
#: Modules of an architecture rebuilt from an entry (the registry's largest, mixnet_s, has 406).
MAX_MODULES = 5_000


class EntryError(UserError, ValueError):
    """An entry cannot be written, read or rebuilt; the message says what to do."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``, durably.

    A crash, a power loss or a full disk leaves either the old file or the new one, never a torn one:
    the data is synced before the rename, and the folder after it (POSIX makes a rename durable only then).
    The file gets the mode of any new file (0666 less the umask), not ``tempfile``'s private 0600, whatever
    ``write`` does (safetensors' writer makes its file 0600).
    """
    tmp = _create_beside(path, ".tmp", lambda name: os.close(
        os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gives a new file, read without changing the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def new_folder_beside(path: Path) -> Path:
    """A new empty folder next to ``path`` (``.NAME.<random>.tmp``), with the mode of any new folder (0777 less the
    umask), not ``tempfile.mkdtemp``'s private 0700: a bundle assembled in it and renamed to ``path`` keeps it."""
    return _create_beside(path, ".tmp", lambda name: os.mkdir(name, 0o777))


def _create_beside(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """``create`` a new name next to ``path`` that nothing else holds (the creation must fail if it exists), as
    ``tempfile`` does, but with the caller's mode, which the umask reduces as usual."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name next to {path}")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    """Hex sha256 of an open binary file, read in chunks from where it stands."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is (from its ``st_mode``), in words for a refusal."""
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _not_regular(path: Path, mode: int, expected: str = "a regular file") -> EntryError:
    return EntryError(f"{path} is {file_kind(mode)}, not {expected}; a bundle holds regular files in folders only — "
                      "get an intact copy of the bundle or re-export it")


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise EntryError(f"{path} is missing; get an intact copy of the bundle or re-export it") from None
    except OSError as err:
        raise EntryError(f"{path} cannot be read ({err.strerror}); get an intact copy of the bundle") from None


@contextmanager
def open_regular(path: Path, *, within: Path, limit: int) -> Iterator[BinaryIO]:
    """Open ``path``, a file inside the folder ``within``, for reading, refusing anything but a regular file of
    at most ``limit`` bytes reached through real folders (:class:`EntryError`, one line).

    Each folder between ``within`` and the file, and the file, are checked with ``lstat`` before anything is
    opened (a FIFO is never opened, so nothing blocks; a device is never touched); the file is then opened with
    ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat`` must show the file that was checked.
    """
    folder = within
    for part in path.relative_to(within).parts[:-1]:
        folder = folder / part
        mode = _lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            raise _not_regular(folder, mode, "a folder")
    checked = _lstat(path)
    if not stat.S_ISREG(checked.st_mode):
        raise _not_regular(path, checked.st_mode)
    if checked.st_size > limit:
        raise EntryError(f"{path} is {checked.st_size:,} bytes, over the limit of {limit:,} for this file; "
                         "it is not a file this kit writes — get an intact copy of the bundle or re-export it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise EntryError(f"{path} cannot be opened ({err.strerror}); get an intact copy of the bundle") from None
    with os.fdopen(fd, "rb") as f:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino) or not stat.S_ISREG(opened.st_mode):
            raise EntryError(f"{path} changed while it was being opened; verify a bundle nothing else is writing")
        yield f


def read_regular(path: Path, *, within: Path, limit: int) -> bytes:
    """The bytes of ``path`` as :func:`open_regular` allows, never more than ``limit`` (even if it grows)."""
    with open_regular(path, within=within, limit=limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise EntryError(f"{path} grew over the limit of {limit:,} bytes while it was read; verify a bundle "
                         "nothing else is writing")
    return data


def plain_json(data: bytes, path: Path) -> Any:
    """``data`` parsed as strict JSON: no NaN / Infinity, and no key twice in one object (a reader would see only
    one of the two values, and not every reader the same one); :class:`EntryError` otherwise."""
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise EntryError(f"{path} holds the key {key[:120]!r} twice in one object; JSON this kit "
                                 "writes has each key once — get an intact copy of the bundle or re-export it")
            document[key] = value
        return document

    try:
        return json.loads(data.decode("utf-8"), parse_constant=refuse_constant, object_pairs_hook=refuse_repeated_keys)
    except EntryError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EntryError(f"{path} is not valid JSON ({reason}); get an intact copy of the bundle or re-export it") \
            from None
