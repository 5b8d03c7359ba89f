"""Saving an attached file into the corpus folder (rag.uploads): safe names, never overwriting,
never saving what cannot be read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rag.errors import LoadError
from rag.uploads import safe_upload_name, save_upload


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("guide.pdf", "guide.pdf"),
        ("../../etc/passwd.md", "passwd.md"),
        ("..\\..\\Windows\\win.txt", "win.txt"),
        (".hidden.md", "hidden.md"),
        ("...dots.md", "dots.md"),
        ("  Report.PDF  ", "Report.PDF"),
        ("a\x00b\x1fc.md", "abc.md"),
        ('evil<script>:"|?*.html', "evil_script______.html"),
        ("résumé 📄.md", "résumé 📄.md"),
        ("x" * 300 + ".md", "x" * 117 + ".md"),
    ],
)
def test_safe_upload_name(name: str, expected: str) -> None:
    assert safe_upload_name(name) == expected


@pytest.mark.parametrize("name", ["", "..", "/", "x.docx", "noext", ".md", "archive.pdf.exe", "a/b/"])
def test_unsafe_or_unsupported_names_are_refused(name: str) -> None:
    with pytest.raises(LoadError, match="unsupported file type"):
        safe_upload_name(name)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_upload_is_saved_under_its_name(tmp_path: Path) -> None:
    saved = save_upload(tmp_path, "../notes.md", b"# Notes\n\nHello.", max_bytes=1000)
    assert (saved.source, saved.created, saved.renamed) == ("notes.md", True, False)
    assert listing(tmp_path) == {"notes.md": b"# Notes\n\nHello."}


def test_upload_never_overwrites_a_different_file(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_bytes(b"original")
    (tmp_path / "notes (2).md").write_bytes(b"second original")
    saved = save_upload(tmp_path, "notes.md", b"# New\n\nnew text", max_bytes=1000)
    assert (saved.source, saved.created, saved.renamed) == ("notes (3).md", True, True)
    assert listing(tmp_path) == {"notes (2).md": b"second original", "notes (3).md": b"# New\n\nnew text",
                                 "notes.md": b"original"}  # fmt: skip


def test_identical_upload_reuses_the_existing_file(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_bytes(b"different")
    (tmp_path / "notes (2).md").write_bytes(b"# Same\n\ntext")
    saved = save_upload(tmp_path, "notes.md", b"# Same\n\ntext", max_bytes=1000)
    assert (saved.source, saved.created) == ("notes (2).md", False)
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("big.txt", b"x" * 2000, "too large"),
        ("empty.md", b"   \n", "empty"),
        ("binary.txt", bytes(range(256)) * 4, "binary"),
        ("broken.pdf", b"%PDF-1.4 not really", "PDF"),
        ("tool.exe", b"MZ", "unsupported"),
    ],
)
def test_bad_uploads_change_nothing(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    (tmp_path / "keep.md").write_bytes(b"keep")
    with pytest.raises(LoadError, match=re.compile(reason, re.I)):
        save_upload(tmp_path, name, data, max_bytes=1000)
    assert listing(tmp_path) == {"keep.md": b"keep"}  # no temp file left behind either
