"""The command line end to end on real files: ``python -m m3bind`` in subprocesses (two ranks under
``torchrun``, gloo on CPU, whose merged library must equal the single-process one; a bad file's exit
code and message) and every command through ``main()`` in this process, while the subprocesses run."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import m3bind
from m3bind.cli import main
from m3bind.library import Library

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
NOT_AN_IMAGE = ("scan.png is not a supported format. Supported: PNG, JPEG, TIFF, BMP, WebP, DICOM images and ECG "
                "waveforms, WFDB records (.hea with .dat or .mat), CSV and NPY ECGs.")


@pytest.fixture(scope="module")
def model_dir(tiny_config, tmp_path_factory) -> Path:
    """The tiny model (pathology tiles go to its colour tower), saved as a model directory."""
    config = dataclasses.replace(tiny_config, modality_towers={**tiny_config.modality_towers, "pathology": "retina"})
    torch.manual_seed(0)
    return m3bind.M3BindModel(config).save_pretrained(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    """Real X-rays, pathology tiles and PTB-XL records (linked in place) and one file that is not an image."""
    root = tmp_path_factory.mktemp("inputs")
    files = sorted((shared_data / "covid_cxr" / "images").iterdir())[:6]
    files += sorted((shared_data / "pathology" / "lc25000_lung" / "lung_n").iterdir())[:4]
    ptbxl = shared_data / "ecg" / "ptbxl" / "records100" / "00000"
    files += [ptbxl / f"{stem}.{ext}" for stem in ("00003_lr", "00008_lr") for ext in ("hea", "dat")]
    for f in files:
        os.symlink(f, root / f.name)
    (root / "scan.png").write_text("this is not an image\n")
    return root


def start(*args: str, torchrun: bool = False) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    return subprocess.Popen([sys.executable, *launcher, "-m", "m3bind", *args], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(*args: str) -> subprocess.CompletedProcess:
    """One command through ``main()`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def runs(model_dir, inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    m = ["--model", str(model_dir)]
    lib = str(out / "lib")
    sharded = start(*m, "--json", "index", str(inputs), "--library", str(out / "sharded"), torchrun=True)
    bad_file = start(*m, "classify", str(inputs / "scan.png"))
    done = {
        "info": cli(*m, "info", "--json"),
        "index": cli(*m, "--json", "index", str(inputs), "--library", lib),
        "reindex": cli(*m, "index", str(inputs), "-l", lib, "--json"),
        "embed": cli(*m, "embed", str(inputs), "-o", str(out / "emb")),
        "classify": cli(*m, "classify", str(inputs / "00003_lr.hea"), "--json"),
        "classify_labels": cli("classify", str(inputs / "lungn1.jpg"), "benign lung tissue", "adenocarcinoma",
                               *m, "--json"),
        "search_text": cli(*m, "--json", "search", "pleural effusion", "-l", lib, "-k", "3"),
        "search_per_modality": cli(*m, "--json", "search", "pleural effusion", "-l", lib, "-k", "3",
                                   "--per-modality"),
        "search_file": cli(*m, "search", "--file", str(inputs / "lungn1.jpg"), "-l", lib,
                           "--exclude-modality", "pathology", "--json"),
        "info_library": cli(*m, "info", "--library", lib),
    }
    return {**done, "sharded": finish(sharded), "bad_file": finish(bad_file), "out": out}


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return run


@pytest.mark.slow
def test_info(runs, model_dir):
    info = json.loads(ok(runs["info"]).stdout)
    config = m3bind.ModelConfig.load(model_dir / "config.json")
    assert info["model"] == "tiny" and info["dim"] == 32 and info["fingerprint"].startswith("tiny-")
    assert info["modalities"] == list(config.modality_towers) and info["device"] == "cpu"


@pytest.mark.slow
def test_index_reports_refused_files_and_resumes(runs, inputs):
    first = json.loads(ok(runs["index"]).stdout)
    assert first["added"] == 12 and first["skipped"] == 0
    assert [(Path(r["source"]).name, r["reason"]) for r in first["refused"]] == [("scan.png", NOT_AN_IMAGE)]
    assert sum(first["stats"]["per_modality"].values()) == 12
    assert first["stats"]["per_modality"]["pathology"] == 4 and first["stats"]["per_modality"]["ecg"] == 2
    again = json.loads(ok(runs["reindex"]).stdout)
    assert again["added"] == 0 and again["skipped"] == 12 and again["stats"]["count"] == 12
    info = ok(runs["info_library"]).stdout
    assert "12 items" in info and "Flat (exact)" in info


@pytest.mark.slow
def test_two_ranks_under_torchrun_merge_into_the_single_process_library(runs):
    report = json.loads(ok(runs["sharded"]).stdout)  # only rank 0 prints
    assert report["added"] == 12 and [Path(r["source"]).name for r in report["refused"]] == ["scan.png"]

    def contents(path: Path) -> dict[str, tuple[str, str, np.ndarray]]:
        with Library.load(path) as library:
            ids, vectors = library.vectors()
            items = [library.item(int(i)) for i in ids]
        return {it["sha256"]: (it["source"], it["modality"], v) for it, v in zip(items, vectors)}

    single, sharded = contents(runs["out"] / "lib"), contents(runs["out"] / "sharded")
    assert len(single) == 12 and sorted(single) == sorted(sharded)
    for sha, (source, modality, vector) in single.items():
        assert sharded[sha][:2] == (source, modality)
        np.testing.assert_allclose(sharded[sha][2], vector, atol=1e-5)


@pytest.mark.slow
def test_embed_writes_vectors_and_items(runs):
    run = ok(runs["embed"])
    vectors = np.load(runs["out"] / "emb.npy")
    items = [json.loads(line) for line in (runs["out"] / "emb.jsonl").read_text().splitlines()]
    assert vectors.shape == (12, 32) and len(items) == 12
    assert {Path(i["source"]).suffix for i in items} == {".jpg", ".hea"}
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert "Embedded 12 inputs" in run.stdout and "scan.png" in run.stdout


@pytest.mark.slow
def test_search_by_text_and_by_file(runs):
    text = json.loads(ok(runs["search_text"]).stdout)
    assert len(text["hits"]) == 3
    assert [h["score"] for h in text["hits"]] == sorted((h["score"] for h in text["hits"]), reverse=True)
    by_file = json.loads(ok(runs["search_file"]).stdout)
    assert len(by_file["hits"]) == 8 and {h["modality"] for h in by_file["hits"]} == {"xray", "ecg"}


@pytest.mark.slow
def test_search_is_the_one_search_service_plain_or_per_modality(runs, model_dir):
    from m3bind.search import search

    model = m3bind.load_model(str(model_dir), device="cpu")
    with Library.load(runs["out"] / "lib", model.fingerprint) as library:
        plain = search(library, model, "pleural effusion", 3)
        each = search(library, model, "pleural effusion", 3, per_modality=True)
        assert [h.id for h in plain] == [h.id for h in library.search(model.embed_text(["pleural effusion"])[0], 3)]
    assert [h["id"] for h in json.loads(ok(runs["search_text"]).stdout)["hits"]] == [h.id for h in plain]
    per_modality = json.loads(ok(runs["search_per_modality"]).stdout)["hits"]
    assert [h["id"] for h in per_modality] == [h.id for h in each]
    assert sorted(h["modality"] for h in per_modality) == ["ecg", "pathology", "xray"]  # the best of each


@pytest.mark.slow
def test_classify_with_default_and_given_labels(runs):
    ecg = json.loads(ok(runs["classify"]).stdout)
    assert ecg["modality"] == "ecg"
    assert list(ecg["probabilities"]) == sorted(ecg["probabilities"], key=lambda k: -ecg["probabilities"][k])
    assert set(ecg["probabilities"]) == set(m3bind.get_modality("ecg").default_labels)
    tile = json.loads(ok(runs["classify_labels"]).stdout)
    assert set(tile["probabilities"]) == {"benign lung tissue", "adenocarcinoma"}
    assert abs(sum(tile["probabilities"].values()) - 1) < 1e-6


@pytest.mark.slow
def test_a_bad_file_exits_2_with_one_readable_line(runs):
    run = runs["bad_file"]
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"m3bind: error: {NOT_AN_IMAGE}\n"
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", [[], ["embed"], ["index"], ["search"], ["classify"], ["info"]])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: m3bind") and "--model" in text and "--json" in text


def test_user_errors_exit_2_before_loading_a_model(tmp_path, capsys):
    assert main(["search", "-l", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "m3bind: error: Give either a text query or --file FILE, not both.\n"
    assert main(["--device", "quantum", "info"]) == 2
    assert "Unknown device 'quantum'" in capsys.readouterr().err


def test_console_entry_point_is_the_cli_main():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["m3bind"] == "m3bind.cli:main"
