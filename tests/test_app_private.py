"""Privacy and web safety of the served app (issue 18): `python app.py` run as a real process, stopped with
SIGTERM; uploads in the app's own private folder; file content and names never rendered as HTML."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
CT = get_testdata_file("CT_small.dcm")
MARKER = "PID-MARKER-4242"

pytestmark = pytest.mark.slow  # apps started in child processes: ~45 s in all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp: Path, **env: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = open(tmp / f"app-{port}.log", "w")
    full = {**os.environ, "M3BIND_RUNTIME_DIR": str(tmp / "runtime"), "M3BIND_HOME": str(tmp / "home"),
            "GRADIO_SERVER_PORT": str(port), "OMP_NUM_THREADS": "1", **env}
    full.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{(tmp / f'app-{port}.log').read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url, tmp / f"app-{port}.log"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError("the app did not start within 240 s")


@pytest.fixture(scope="module")
def dead_leftover(tmp_path_factory) -> Path:
    """The folder a SIGKILLed app process left: its lock is free, an upload with identifiers still inside."""
    tmp = tmp_path_factory.mktemp("private")
    leftover = tmp / "runtime" / "app-999999-killed"
    (leftover / "uploads" / "abc").mkdir(parents=True)
    (leftover / ".lock").write_text("")
    (leftover / "uploads" / "abc" / "scan.dcm").write_text(MARKER)
    return leftover


@pytest.fixture(scope="module")
def app_process(dead_leftover):
    tmp = dead_leftover.parent.parent
    proc, url, log = start_app(tmp)
    yield proc, url, tmp, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def marked_dicom(tmp_path_factory) -> Path:
    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID = "Doe^John", MARKER
    path = tmp_path_factory.mktemp("phi") / "Doe_John.dcm"
    ds.save_as(path)
    return path


def uploads_holding(folder: Path, marker: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]


def test_other_apps_uploads_are_refused(app_process, tmp_path):
    proc, url, tmp, log = app_process
    other = Path("/tmp/gradio") / "another-app-upload"
    other.mkdir(parents=True, exist_ok=True)
    foreign = other / "theirs.dcm"
    foreign.write_bytes(Path(CT).read_bytes())
    try:
        payload = {"data": [[{"path": str(foreign), "meta": {"_type": "gradio.FileData"}}], "auto", "a\nb",
                            None, None, None]}
        event = httpx.post(f"{url}gradio_api/call/classify", json=payload).json()["event_id"]
        stream = httpx.get(f"{url}gradio_api/call/classify/{event}", timeout=60).text
        assert "event: error" in stream and "CT" not in stream
        assert "it was not uploaded by a user" in log.read_text()  # refused by the upload-folder check
    finally:
        foreign.unlink(missing_ok=True)


def test_uploads_live_in_a_private_folder_and_go_with_sigterm(app_process, dead_leftover, marked_dicom):
    proc, url, tmp, log = app_process
    runtime = tmp / "runtime"
    assert not dead_leftover.exists()  # a dead process's leftovers are cleaned at start
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    (mine,) = runtime.glob("app-*")
    assert mine.name.startswith(f"app-{proc.pid}-") and stat.S_IMODE(mine.stat().st_mode) == 0o700

    client = Client(url, verbose=False)
    status = client.predict([handle_file(marked_dicom)], "", None, api_name="/open_file")[0]
    assert "**CT**" in status
    assert uploads_holding(mine / "uploads", MARKER)  # the upload is in the app's own folder

    # an upload added to the library stays until swept, like every upload (another client may share its file)
    ds = pydicom.dcmread(marked_dicom)
    ds.PatientID = MARKER + "-added"
    ds.save_as(tmp / "Roe_Richard.dcm")
    added = client.predict([handle_file(tmp / "Roe_Richard.dcm")], "", "auto", api_name="/add_to_library")[0]
    assert "Added **1**" in added
    assert uploads_holding(mine / "uploads", MARKER)  # stays until swept
    assert list((mine / "tmp").glob("m3bind-library-*"))  # the library's working copy is private too

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert not mine.exists() and not list(runtime.iterdir())
    assert "removing the app's temporary folders" in log.read_text()


def test_old_uploads_are_swept(tmp_path, monkeypatch):
    from ui import private as private_module

    monkeypatch.setenv("M3BIND_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # restored afterwards
    monkeypatch.setattr(private_module, "_private", None)
    private = private_module.private_dirs()
    try:
        assert os.environ["GRADIO_TEMP_DIR"] == str(private.uploads)
        (private.uploads / "old").mkdir()
        old, new = private.uploads / "old" / "a.dcm", private.uploads / "b.dcm"
        old.write_text(MARKER)
        time.sleep(1.5)
        new.write_text("fresh")
        example = tmp_path / "example.dcm"  # an old file copied in now (copy2 keeps its mtime) is fresh
        example.write_text("example")
        os.utime(example, (time.time() - 3600, time.time() - 3600))
        shutil.copy2(example, private.uploads / "example.dcm")
        assert private.sweep(1.0) == 1 and not old.exists() and not old.parent.exists() and new.exists()
        assert (private.uploads / "example.dcm").exists()
        first, second = private.results_folder(), private.results_folder()  # one per response, never shared
        assert first != second and first.parent == second.parent == private.uploads
        private.sweep(1.0)
        assert first.is_dir()  # a new (empty) one is about to be filled: kept
        os.utime(first, (time.time() - 60, time.time() - 60))
        private.sweep(1.0)
        assert not first.exists() and second.is_dir()
    finally:
        private.remove()


def test_concurrent_clients_share_uploads_and_results_safely_until_the_ttl(tmp_path, shared_data):
    """Found by the soak (bench/bench_soak.py): Gradio stores uploads by content, so clients sending the same
    bytes share one file, which /add_to_library deleted under the others' calls ("no longer available"); and
    result images, named by content too, were rewritten by concurrent searches while being downloaded. Now
    every concurrent call succeeds, every image downloads whole, and after the TTL nothing of it remains."""
    ttl = 8
    proc, url, log = start_app(tmp_path, M3BIND_UPLOAD_TTL=str(ttl))
    try:
        (mine,) = (tmp_path / "runtime").glob("app-*")
        tiles = sorted((shared_data / "pathology" / "lc25000_lung" / "lung_n").glob("*.jpg"))[:3]
        clients = [Client(url, verbose=False) for _ in range(6)]

        def add(client: Client, tile: Path) -> str:
            return client.predict([handle_file(tile)], "", "auto", api_name="/add_to_library")[0]

        def classify(client: Client, tile: Path) -> dict:
            return client.predict([handle_file(tile)], "auto", "normal\nmass", None, None, None,
                                  api_name="/classify")[-1]

        def search(client: Client) -> list:
            return client.predict("lung tissue", [], 12, False, api_name="/search_text")[0]

        with ThreadPoolExecutor(len(clients)) as pool:
            for tile in tiles:  # the same bytes from four clients at once, two of them adding
                calls = [pool.submit(f, c, tile) for f, c in zip((add, classify, add, classify), clients)]
                outcomes = [call.result() for call in calls]  # an error is raised here
                assert sum("Added **1**" in o for o in outcomes[::2]) == 1 and all(outcomes[1::2])
            for _ in range(5):  # the same results for six clients at once
                for shown in [call.result() for call in [pool.submit(search, c) for c in clients]]:
                    assert shown
                    for item in shown:
                        with Image.open(item["image"]) as image:
                            image.load()  # whole: a truncated or empty download raises here
        uploads = mine / "uploads"
        assert any(p.name.startswith("results-") for p in uploads.iterdir())
        # files go one TTL after they were written; a folder something else emptied goes one TTL after that
        time.sleep(2 * ttl + ttl / 2 + 4)
        assert not [p for p in uploads.rglob("*") if p.is_file()] and not list(uploads.iterdir())
        assert "Traceback" not in log.read_text()
    finally:
        proc.kill()
        proc.wait()
