"""The ``SHA256SUMS`` manifest that seals a bundle: one ``<sha256>  <path>`` line per file, in the format
``sha256sum -c`` reads.

:func:`write_manifest` writes it, last, over every other file of a folder; :func:`check_manifest` compares a
folder with it, file by file, never following a link or opening anything but a regular file, and walks the folder
within :data:`~scoring.entry.files.MAX_DEPTH` folders, :data:`~scoring.entry.files.MAX_FILES` entries and
:data:`~scoring.entry.files.MAX_BUNDLE_BYTES`, and, given the layout of the folder (the files it may hold), refuses
any other file or folder. An entry folder inside a run dir has no manifest of its own:
entry.json already pins the weights, and the bundle's manifest covers entry.json.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from scoring.entry.files import MAX_BUNDLE_BYTES, MAX_DEPTH, MAX_FILES, MAX_MANIFEST_BYTES, EntryError, file_kind, \
    atomic_write, open_regular, read_regular, sha256_file, sha256_stream

#: The bundle's manifest: sha256 of every other file of the bundle, in ``sha256sum`` format.
MANIFEST_FILE = "SHA256SUMS"
#: A manifest line: hex digest, a space, then " " (text mode, what we write) or "*" (``sha256sum -b``), the path.
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


@dataclass(frozen=True)
class FileCheck:
    """One file of a folder compared with the folder's manifest."""

    #: Path relative to the folder, with ``/`` separators (as in the manifest).
    path: str
    #: sha256 the manifest records; None when the file is not listed.
    listed: str | None
    #: sha256 of the file on disk; None when it is missing or not a plain file.
    found: str | None
    #: "ok", "CHANGED", "MISSING", "NOT LISTED" or "NOT A PLAIN FILE".
    status: str

    @property
    def ok(self) -> bool:
        """Whether the file is on disk, listed, and has the listed content."""
        return self.status == "ok"


@dataclass(frozen=True)
class _Tree:
    """What a folder holds: its files (links and other non-folders too, never followed) by relative POSIX path with
    their ``lstat``, and its folders' relative paths."""

    files: dict[str, tuple[Path, os.stat_result]]
    folders: list[str]


def _folder_tree(folder: Path) -> _Tree:
    """Every file and folder under ``folder`` but its top-level manifest.

    Links (to files or folders) and other non-folders are listed as files, never followed, so that a check can
    refuse them. Iterative, and bounded: :class:`EntryError` for more than :data:`MAX_FILES` files and folders, a
    folder more than :data:`MAX_DEPTH` deep, or more than :data:`MAX_BUNDLE_BYTES` in all.
    """
    tree = _Tree({}, [])
    pending, entries, total = [(folder, 0)], 0, 0
    while pending:
        directory, depth = pending.pop()
        items = []
        try:
            with os.scandir(directory) as listing:
                for item in listing:  # counted while listed: a folder of millions stops at the limit
                    entries += 1
                    if entries > MAX_FILES:
                        raise EntryError(f"{folder} holds more than {MAX_FILES:,} files and folders, the limit for a "
                                         "bundle; send the bundle as `python -m scoring.export` writes it")
                    items.append((Path(item.path), item.stat(follow_symlinks=False)))
        except OSError as err:
            raise EntryError(f"{directory} cannot be listed ({err.strerror}); get an intact copy of the bundle") \
                from None
        for path, info in items:
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 > MAX_DEPTH:
                    raise EntryError(f"{path} is {depth + 1} folders deep, over the limit of {MAX_DEPTH} for a "
                                     "bundle; send the bundle as `python -m scoring.export` writes it")
                pending.append((path, depth + 1))
                tree.folders.append(path.relative_to(folder).as_posix())
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
            if total > MAX_BUNDLE_BYTES:
                raise EntryError(f"{folder} holds more than {MAX_BUNDLE_BYTES:,} bytes, the limit for a bundle; "
                                 "send the bundle as `python -m scoring.export` writes it")
            tree.files[path.relative_to(folder).as_posix()] = (path, info)
    tree.files.pop(MANIFEST_FILE, None)
    return tree


def _check_layout(folder: Path, tree: _Tree, layout: Collection[str]) -> None:
    """Every file under ``folder`` is one of ``layout`` (relative POSIX paths), every folder one that holds them."""
    folders = {parent.as_posix() for name in layout for parent in PurePosixPath(name).parents} - {"."}
    for name in sorted(tree.folders) + sorted(tree.files):
        path, expected = folder / name, "a folder" if name in folders else "a file"
        if name not in folders and name not in layout:
            shown = name if name.isprintable() else ascii(name)
            raise EntryError(f"{folder} holds {shown}, which is not part of an entry bundle (it holds "
                             f"{', '.join(sorted(layout))} and nothing else; an extra file or folder, e.g. a *.py, "
                             "could be run by a Python started in the bundle); send the bundle as "
                             "`python -m scoring.export` writes it")
        if (name in folders) != (name in tree.folders):
            mode = tree.files[name][1].st_mode if name in tree.files else stat.S_IFDIR
            raise EntryError(f"{path} is {file_kind(mode)}, not {expected}; send the bundle as `python -m scoring.export` "
                             "writes it")


def write_manifest(folder: Path) -> Path:
    """Write ``folder/SHA256SUMS`` covering every other file under ``folder``, atomically; return its path.

    Call it last: a file written after it is reported as not listed.
    """
    lines = []
    for name, (path, info) in sorted(_folder_tree(folder).files.items()):
        if not stat.S_ISREG(info.st_mode):
            raise EntryError(f"{path} is not a plain file; a bundle holds plain files only — remove it")
        if "\\" in name or "\n" in name:  # sha256sum would escape such names; nothing we write has them
            raise EntryError(f"{path}: bundle file names must not contain backslashes or newlines — rename it")
        lines.append(f"{sha256_file(path)}  {name}\n")
    manifest = folder / MANIFEST_FILE
    atomic_write(manifest, lambda tmp: tmp.write_text("".join(lines)))
    return manifest


def _read_manifest(manifest: Path) -> dict[str, str]:
    """The manifest's ``{path: sha256}``; :class:`EntryError` for any line that is not a safe relative path."""
    data = read_regular(manifest, within=manifest.parent, limit=MAX_MANIFEST_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EntryError(f"{manifest} cannot be read ({err}); get an intact copy of the bundle") from None
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _MANIFEST_LINE.fullmatch(line)
        name = match.group(2) if match else ""
        pure = PurePosixPath(name)
        # Only normalized paths inside the folder: no "/abs", "../x", "./x", "a//b".
        if not match or pure.is_absolute() or ".." in pure.parts or pure.as_posix() != name or name in listed:
            raise EntryError(f"{manifest} line {number} is not '<sha256>  <relative path>' (or repeats a path): "
                             f"{line[:80]!r}; get an intact copy of the bundle or re-export it")
        listed[name] = match.group(1).lower()
    return listed


def check_manifest(folder: Path, *, layout: Collection[str] | None = None) -> list[FileCheck] | None:
    """Compare every file under ``folder`` with ``folder/SHA256SUMS``, sorted by path; None without a manifest.

    Each listed file must be on disk, a plain file, with the listed sha256; each file on disk must be listed.
    Raises :class:`EntryError` when ``folder`` is not a folder or the manifest is malformed, and, given a
    ``layout`` (the relative paths of the files ``folder`` may hold, its manifest among them), for any other file
    or folder under it.
    """
    if not folder.is_dir():
        raise EntryError(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    manifest = folder / MANIFEST_FILE
    if not os.path.lexists(manifest):
        return None
    listed = _read_manifest(manifest)
    tree = _folder_tree(folder)
    if layout is not None:
        _check_layout(folder, tree, layout)
    on_disk = tree.files
    checks = []
    for name in sorted(listed.keys() | on_disk.keys()):
        (path, info), recorded = on_disk.get(name, (None, None)), listed.get(name)
        if path is None:
            checks.append(FileCheck(name, recorded, None, "MISSING"))
        elif not stat.S_ISREG(info.st_mode):  # never opened: a FIFO would block, a link points anywhere
            checks.append(FileCheck(name, recorded, None, "NOT A PLAIN FILE"))
        else:
            with open_regular(path, within=folder, limit=MAX_BUNDLE_BYTES) as f:
                digest = sha256_stream(f)
            status = "NOT LISTED" if recorded is None else "ok" if digest == recorded else "CHANGED"
            checks.append(FileCheck(name, recorded, digest, status))
    return checks
