"""The item store of a library: metadata in SQLite, and atomic saves of a library directory.

* **Metadata** (modality, label, notes, thumbnail, ...) sits in a private SQLite working file on disk, not
  in memory; a library's saved ``items.sqlite`` is copied into it when loaded and out of it when saved.
* **Sources** keep only a file's base name and a SHA-256, never a directory path.
* **Saving is atomic** (``save_directory``): everything is written and fsynced into a temporary directory
  beside the target, then the old directory is renamed to a backup, the new one to the target, and the
  backup is deleted. A crash at any point leaves a loadable library (``recover_directory`` renames a lone
  backup back). One process saves a given path at a time.

Not thread-safe on its own: the ``Library`` front serialises every call.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import ConfigError
from .modalities import get_modality

ITEM_FIELDS = ("modality", "source", "sha256", "label", "notes", "thumbnail")
_SCHEMA = """CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, modality TEXT NOT NULL, source TEXT, sha256 TEXT, label TEXT, notes TEXT,
    thumbnail BLOB, added_at TEXT NOT NULL)"""
_HIT_COLUMNS = "id, modality, label, source, sha256, notes, added_at"
_MAX_PARAMETERS = 10_000  # SQLite caps the parameters of one statement


class ItemStore:
    """Every item's metadata by id, in a scratch SQLite file deleted when the store is closed."""

    def __init__(self) -> None:
        fd, db_path = tempfile.mkstemp(prefix="m3bind-library-", suffix=".sqlite")
        os.close(fd)
        self._db = sqlite3.connect(db_path, check_same_thread=False)  # guarded by the library's lock
        self._db.execute("PRAGMA journal_mode=MEMORY")  # a scratch copy: rollback yes, durability no
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(_SCHEMA)
        self._finalizer = weakref.finalize(self, _discard, self._db, db_path)

    def close(self) -> None:
        self._finalizer()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything written inside is rolled back if the block raises (e.g. the vector index failed)."""
        with self._db:
            yield

    def insert(self, ids: Sequence[int], rows: Sequence[tuple[Any, ...]], added_at: str) -> None:
        """Adds one row (from ``item_row``) per id."""
        self._db.executemany(
            "INSERT INTO items (id, modality, source, sha256, label, notes, thumbnail, added_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(int(i), *row, added_at) for i, row in zip(ids, rows)])

    def delete(self, ids: Sequence[int]) -> None:
        self._db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    def item(self, item_id: int) -> dict[str, Any] | None:
        """Everything stored about one item, thumbnail included; None if there is none."""
        cur = self._db.execute(f"SELECT {_HIT_COLUMNS}, thumbnail FROM items WHERE id = ?", (int(item_id),))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def hit_rows(self, ids: set[int]) -> dict[int, dict[str, Any]]:
        """Per id, the fields of a search hit (all but the thumbnail)."""
        wanted, rows = sorted(ids), {}
        for start in range(0, len(wanted), _MAX_PARAMETERS):
            chunk = wanted[start:start + _MAX_PARAMETERS]
            cur = self._db.execute(f"SELECT {_HIT_COLUMNS} FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                                   chunk)
            names = [d[0] for d in cur.description]
            rows.update((row[0], dict(zip(names, row))) for row in cur)
        return rows

    def sha256s(self) -> set[str]:
        """The SHA-256 of every item that has one."""
        return {row[0] for row in self._db.execute("SELECT sha256 FROM items WHERE sha256 IS NOT NULL")}

    def ids_by_modality(self) -> list[tuple[str, np.ndarray]]:
        """(modality, its ids) for every modality present."""
        groups = []
        for name, count in self._db.execute("SELECT modality, COUNT(*) FROM items GROUP BY modality").fetchall():
            ids = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM items WHERE modality = ?", (name,))),
                              dtype=np.int64, count=count)
            groups.append((name, ids))
        return groups

    def write(self, path: Path) -> None:
        """Copies the store into a new SQLite file at ``path``."""
        dest = sqlite3.connect(path)
        try:
            self._db.backup(dest)
        finally:
            dest.close()

    def read(self, path: Path) -> None:
        """Replaces the store's content with the SQLite file at ``path`` (opened read-only)."""
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            source.backup(self._db)
        finally:
            source.close()


def item_row(item: dict[str, Any]) -> tuple[Any, ...]:
    """An item dict checked and reduced to a row: a registered modality, a source without its directories."""
    unknown = set(item) - set(ITEM_FIELDS)
    if unknown:
        raise ConfigError(f"unknown item fields {sorted(unknown)}; known: {ITEM_FIELDS}")
    modality = get_modality(str(item.get("modality"))).name
    source = item.get("source")
    if source is not None:
        source = PureWindowsPath(str(source)).name  # drops POSIX and Windows directories alike
    thumbnail = item.get("thumbnail")
    return (modality, source, item.get("sha256"), _text(item.get("label")), _text(item.get("notes")),
            None if thumbnail is None else bytes(thumbnail))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _discard(db: sqlite3.Connection, path: str) -> None:
    db.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------ atomic saves
def save_directory(target: Path, write: Callable[[Path], None]) -> Path:
    """Replaces the directory ``target`` atomically by what ``write`` puts into an empty directory."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent))
    try:
        write(tmp)
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        backup = _backup_path(target)
        if target.exists():
            if backup.exists():
                shutil.rmtree(backup)  # left by a crash after the new directory was in place
            os.rename(target, backup)
        os.rename(tmp, target)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return target


def recover_directory(target: Path) -> None:
    """Puts back the previous directory when a save crashed between its two renames."""
    backup = _backup_path(target)
    if not target.exists() and backup.is_dir():
        os.rename(backup, target)


def _backup_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.backup")


def _remove_stale_temporaries(target: Path) -> None:
    """Deletes temporary directories left by saves whose process has died."""
    prefix = f".{target.name}.tmp-"
    for tmp in target.parent.iterdir():
        if not tmp.name.startswith(prefix):
            continue
        try:
            pid = int(tmp.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue  # not ours to judge, or its process is alive


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # directories cannot be opened for fsync on some systems (Windows)
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
