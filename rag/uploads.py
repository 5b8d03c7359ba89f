"""Uploads: a file attached in the chat, checked and saved into the corpus folder.

An uploaded file is parsed before it is saved: one that cannot be read never enters the corpus.
It never overwrites anything: a different file with the same name keeps its name and the upload
gets ``name (2)``; a file with the same content is reused. The indexer then picks it up like any
other file (``rag.library``); one saved but not indexed is removed again by the app, so a
failed upload changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rag.errors import LoadError
from rag.loaders import SUPPORTED_SUFFIXES, load_bytes

MAX_NAME_CHARS = 120
FILE_TYPES = "PDF, Markdown, text or HTML"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESERVED = re.compile(r'[<>:"|?*]')


def safe_upload_name(name: str) -> str:
    """A file name safe to create in the corpus folder: no folders, not hidden, no control
    characters, a supported type. Raises ``LoadError`` when nothing usable is left.

    >>> safe_upload_name("../../etc/.notes.md"), safe_upload_name("C:\\\\x\\\\Report?.PDF")
    ('notes.md', 'Report_.PDF')
    """
    base = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    base = _RESERVED.sub("_", _CONTROL.sub("", base)).strip().lstrip(". ").rstrip(". ")
    suffix = Path(base).suffix
    if suffix.lower() not in SUPPORTED_SUFFIXES or not Path(base).stem.strip():
        shown = suffix or "(none)"
        raise LoadError(name, f"unsupported file type {shown!r}: attach a {FILE_TYPES} file")
    stem = Path(base).stem[: MAX_NAME_CHARS - len(suffix)].rstrip()
    return stem + suffix


def candidate_names(name: str) -> Iterator[str]:
    """``name``, then ``name (2)``, ``name (3)``… keeping the suffix.

    >>> from itertools import islice
    >>> list(islice(candidate_names("a.pdf"), 3))
    ['a.pdf', 'a (2).pdf', 'a (3).pdf']
    """
    yield name
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in range(2, 10_000):
        yield f"{stem} ({n}){suffix}"


@dataclass(frozen=True)
class SavedUpload:
    """Where an upload went: ``created`` is False when an identical file was already there."""

    asked: str
    source: str
    path: Path
    created: bool

    @property
    def renamed(self) -> bool:
        return self.created and Path(self.source).name != self.asked


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_upload(corpus_dir: Path, name: str, data: bytes, *, max_bytes: int) -> SavedUpload:
    """Check an uploaded file and save it into ``corpus_dir`` without overwriting anything.

    The file must be small enough and readable by our loaders (checked before saving). A
    different file with the same name keeps its name; the upload gets ``name (2)``. A file
    with the same content is reused. Raises ``LoadError`` with a reason otherwise.
    """
    safe = safe_upload_name(name)
    check_size(name, len(data), max_bytes)
    load_bytes(safe, data)  # raises LoadError: unreadable, empty, encrypted…
    digest = hashlib.sha256(data).hexdigest()
    corpus_dir.mkdir(parents=True, exist_ok=True)
    # Written under a hidden name (the indexer skips those), then linked into place:
    # os.link never replaces an existing file, so a file that appears meanwhile is safe.
    tmp = corpus_dir / f".upload-{os.getpid()}-{time.monotonic_ns()}.tmp"
    tmp.write_bytes(data)
    try:
        for candidate in candidate_names(safe):
            path = corpus_dir / candidate
            if path.exists():
                if path.is_file() and path.stat().st_size == len(data) and _sha256_file(path) == digest:
                    return SavedUpload(safe, candidate, path, created=False)
                continue
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            return SavedUpload(safe, candidate, path, created=True)
        raise LoadError(name, "too many files with this name already")
    finally:
        tmp.unlink(missing_ok=True)


def check_size(name: str, size: int, max_bytes: int) -> None:
    """Raise ``LoadError`` for a file larger than ``max_bytes``.

    >>> check_size("a.pdf", 10, 100)
    """
    if size > max_bytes:
        raise LoadError(name, f"too large: {size / 2**20:.1f} MB, the limit is {max_bytes / 2**20:g} MB")
