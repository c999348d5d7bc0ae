"""The one atomic write (factlens.storage.atomic_write): a crash mid-write leaves the old file, the mode follows the
umask, and every writer in src goes through it."""

from __future__ import annotations

import ast
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factlens.errors import StorageError
from factlens.storage import atomic_write

SRC = Path(__file__).resolve().parents[1] / "src" / "factlens"


def test_text_and_bytes_round_trip(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    target = tmp_path / "report.html"
    target.write_text("old")
    import factlens.storage as storage

    def boom(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    if where == "write":
        real_fdopen = os.fdopen

        class Failing:
            def __init__(self, fd, mode):
                self.f = real_fdopen(fd, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # half the bytes reach the temporary file, then the crash
                boom()

        monkeypatch.setattr(storage.os, "fdopen", Failing)
    else:
        monkeypatch.setattr(storage.os, where, boom)
    with pytest.raises(OSError):
        atomic_write(target, "new " * 1000)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import factlens.storage as storage
    real_fsync = os.fsync
    def fsync_then_die(fd):
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)  # the new bytes are on disk, the rename never happens
    storage.os.fsync = fsync_then_die
    storage.atomic_write(sys.argv[1], "new " * 1000)
""")


def test_sigkill_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == "old"
    # nothing can clean up after SIGKILL: what is left is a hidden temporary that no reader looks at
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["summary.json"]


@settings(max_examples=12, deadline=None)
@given(mask=st.integers(min_value=0, max_value=0o777))
def test_the_mode_follows_the_umask(tmp_path_factory, mask):
    path = tmp_path_factory.mktemp("umask") / "x.csv"
    old = os.umask(mask)
    try:
        atomic_write(path, "a,b\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_read_only_directory_is_a_storage_error_naming_the_fix(tmp_path, monkeypatch):
    import factlens.storage as storage

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    with pytest.raises(StorageError, match="writable directory"):
        atomic_write(tmp_path / "x.txt", "x")


# directory-level atomic swaps (a whole checkpoint or tokenizer folder renamed into place) are the other kind
_DIRECTORY_SWAPS = {"checkpoints.py", "tokenizers.py"}


def _calls(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            name = base.id if isinstance(base, ast.Name) else ""
            out.add(f"{name}.{node.func.attr}")
    return out


def test_no_writer_implements_its_own_atomic_write():
    own = {}
    for path in SRC.rglob("*.py"):
        if path.name == "storage.py" or (path.name in _DIRECTORY_SWAPS and path.parent == SRC):
            continue
        calls = _calls(ast.parse(path.read_text()))
        found = calls & {"tempfile.mkstemp", "os.replace", "os.rename", "os.fchmod"}
        found |= {c for c in calls if c.rpartition(".")[2] in ("write_html", "write_image", "write_text", "write_bytes")}
        if found:
            own[str(path.relative_to(SRC))] = sorted(found)
    assert not own, f"modules writing files atomically by hand instead of factlens.storage.atomic_write: {own}"
