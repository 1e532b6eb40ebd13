"""The app's private temporary folders.

Uploads (DICOM headers full of patient identifiers), previews and the library's working copy never go to
the machine-wide /tmp/gradio: each app process owns <parent>/app-<pid>-*/ (mode 0700, under a 0700 parent
of this user), holding uploads/ (Gradio's cache: GRADIO_TEMP_DIR) and tmp/ (the process's temporary files
when served by ``app.main``). Gradio stores an upload by its content, so clients uploading the same bytes
share one file: no call deletes an upload (another client may be about to use it); every upload, and each
response's result images (``results_folder``), is swept UPLOAD_TTL_S seconds after it was written. The
folder goes when the process ends (SIGTERM/SIGINT included), and the folders of dead processes (SIGKILL)
are removed when the next app starts.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("m3bind.app")

UPLOAD_TTL_S = float(os.environ.get("M3BIND_UPLOAD_TTL", "600"))
_private: "PrivateDirs | None" = None
_private_lock = threading.Lock()


class PrivateDirs:
    """One app process's private folders: uploads/ (Gradio's cache) and tmp/, removed with the process."""

    def __init__(self, root: Path, lock: int):
        self.root, self.uploads, self.tmp, self._lock = root, root / "uploads", root / "tmp", lock
        for folder in (self.uploads, self.tmp):
            folder.mkdir(mode=0o700, exist_ok=True)
        self._sweeper: threading.Thread | None = None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def results_folder(self) -> Path:
        """A new folder for one response's files (a gallery's images): each response gets its own, so no
        file a client is downloading is ever rewritten by another request; swept with the uploads."""
        return Path(tempfile.mkdtemp(prefix="results-", dir=self.uploads))

    def sweep(self, max_age_s: float = UPLOAD_TTL_S) -> int:
        """Deletes uploads (and cached previews) older than ``max_age_s``; returns how many."""
        cutoff, removed, emptied = time.time() - max_age_s, 0, set()
        for folder, dirs, names in os.walk(self.uploads, topdown=False):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                    # ctime too: Gradio copies an example into the cache keeping the example's old mtime
                    if max(st.st_mtime, st.st_ctime) < cutoff:
                        os.unlink(path)
                        removed += 1
                        emptied.add(folder)
                except OSError:
                    pass
            for name in dirs:
                path = os.path.join(folder, name)
                try:  # only empty ones, emptied now or old (one just made is about to be filled)
                    if path in emptied or os.lstat(path).st_mtime < cutoff:
                        os.rmdir(path)
                        emptied.add(folder)
                except OSError:
                    pass
        return removed

    def start_sweeper(self, *also: Callable[[], object]) -> None:
        """Sweeps every half TTL (at most a minute), then runs ``also`` (e.g. dropping cached decodes of
        uploads idle that long)."""
        if self._sweeper is None:
            def loop() -> None:
                while self.root.exists():
                    time.sleep(max(1.0, min(60.0, UPLOAD_TTL_S / 2)))
                    self.sweep()
                    for task in also:
                        task()
            self._sweeper = threading.Thread(target=loop, name="m3bind-upload-sweeper", daemon=True)
            self._sweeper.start()


def private_parent() -> Path:
    """This user's private parent folder (M3BIND_RUNTIME_DIR, default <tmp>/m3bind-<uid>), mode 0700."""
    parent = Path(os.environ.get("M3BIND_RUNTIME_DIR") or Path(tempfile.gettempdir()) / f"m3bind-{os.getuid()}")
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(parent)
    if not os.path.isdir(parent) or os.path.islink(parent) or st.st_uid != os.getuid():
        raise RuntimeError(f"{parent} is not a private folder of this user; set M3BIND_RUNTIME_DIR.")
    if st.st_mode & 0o077:
        os.chmod(parent, 0o700)
    return parent


def clean_dead_processes(parent: Path) -> list[str]:
    """Removes the folders of app processes that are gone (their lock is free); returns their names."""
    removed = []
    for folder in parent.glob("app-*"):
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except FileNotFoundError:  # being created right now, or broken: only an old one is removed
            if folder.is_dir() and time.time() - folder.stat().st_mtime > 60:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # alive
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def private_dirs() -> PrivateDirs:
    """This process's private folders, made (and the leftovers of dead processes removed) on first use;
    Gradio's cache is pointed at them before any component exists."""
    global _private
    with _private_lock:
        if _private is None or not _private.root.exists():
            parent = private_parent()
            gone = clean_dead_processes(parent)
            if gone:
                log.info("removed the temporary folders of %d stopped app process(es)", len(gone))
            root = Path(tempfile.mkdtemp(prefix=f"app-{os.getpid()}-", dir=parent))  # mode 0700
            lock = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)  # held (open) for the life of the process
            _private = PrivateDirs(root, lock)
            atexit.register(_private.remove)
        os.environ["GRADIO_TEMP_DIR"] = str(_private.uploads)
        return _private
