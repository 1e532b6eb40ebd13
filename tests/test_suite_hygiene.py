"""The test suite's own rules (issue 18, test-suite hygiene): real-data tests cannot pass in CI by skipping, and
the browser test leaves the tracked screenshots alone unless asked to refresh them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, require_shared_data


def test_missing_shared_data_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    absent = tmp_path / "no-data"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_shared_data(absent)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="M3BIND_DATA"):
        require_shared_data(absent)
    assert require_shared_data(tmp_path) == tmp_path


def test_the_data_mark_and_the_fixture_fail_a_ci_run_without_the_data(tmp_path):
    """End to end, in a child pytest: with CI=true and no data, a case marked ``shared_data`` errors at setup
    (it used to be skipped by an ad-hoc skipif) while a case that needs no data still passes."""
    env = {**os.environ, "CI": "true", "M3BIND_DATA": str(tmp_path / "no-data")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_malformed_ecg.py",
                          "-k", "dat_without_hea or empty_csv"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 passed" in run.stdout and "1 error" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
    assert "CI=true, so tests that need it fail instead of skipping" in run.stdout


def test_browser_screenshots_refresh_the_docs_only_when_asked(monkeypatch):
    import test_app_browser as browser

    monkeypatch.delenv("M3BIND_REFRESH_SCREENSHOTS", raising=False)
    target = browser.screenshot_dir()
    assert target.is_relative_to(REPO / "test-artifacts") and not target.is_relative_to(REPO / "docs")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(target / "classify.png")], cwd=REPO)
    assert ignored.returncode == 0, "the default screenshot folder is not ignored by git"
    monkeypatch.setenv("M3BIND_REFRESH_SCREENSHOTS", "1")
    assert browser.screenshot_dir() == REPO / "docs" / "screenshots"


def test_markers_are_registered():
    ini = (REPO / "pytest.ini").read_text()
    assert "\n    slow:" in ini and "\n    shared_data:" in ini


def test_one_test_command_that_ci_runs_too():
    """README's test command is ``scripts/test``, executable, and ``.ci/run`` calls it after the setup command, so
    a fresh machine needs only the two commands README gives (issue 20)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("Test command", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.strip() == "scripts/test"
    for script in ("scripts/test", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), f"{script} is not executable"
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("pip install -q -r requirements.txt") < ci.index("exec scripts/test")
    assert 'CI="${CI:-true}"' in ci
    test = (REPO / "scripts" / "test").read_text()
    assert "requirements-dev.txt" in test and "apt-get install -y -qq chromium" in test
    assert 'exec python3 -m pytest -q "$@"' in test


def test_the_test_command_passes_its_arguments_to_pytest_and_installs_nothing_here():
    """On a machine that has the test tools already, ``scripts/test`` goes straight to pytest (no pip, no
    apt-get: no network) with the arguments it was given."""
    run = subprocess.run([str(REPO / "scripts" / "test"), "--collect-only", "tests/test_suite_hygiene.py",
                          "-k", "markers_are_registered"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test_markers_are_registered" in run.stdout and "1/" in run.stdout
    assert "installing" not in run.stderr
