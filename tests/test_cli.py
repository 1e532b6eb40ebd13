"""The command line end to end on real files: ``python -m m3bind`` in subprocesses (two ranks under
``torchrun``, gloo on CPU, whose merged library must equal the single-process one; a bad file's exit
code and message) and every command through ``main()`` in this process, while the subprocesses run.
File names are patient data: without ``--keep-names`` no input's name or path reaches the output, the
written files or the library (issue 18); labels come from ``--label`` / ``--labels-csv`` (issue 20)."""

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
from m3bind.batch import input_sha256
from m3bind.cli import main
from m3bind.library import Library

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
SUPPORTED = ("is not a supported format. Supported: PNG, JPEG, TIFF, BMP, WebP, DICOM images and ECG waveforms, "
             "WFDB records (.hea with .dat or .mat), CSV and NPY ECGs.")
NOT_AN_IMAGE, NOT_AN_IMAGE_NAMED = f"the file {SUPPORTED}", f"scan.png {SUPPORTED}"
PATIENT = "Doe_John_19610704"  # a patient-style file name: it must appear nowhere unless names are kept


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
    os.rename(root / files[0].name, root / f"{PATIENT}.jpg")
    (root / "scan.png").write_text("this is not an image\n")
    return root


@pytest.fixture(scope="module")
def labels_csv(inputs, tmp_path_factory) -> Path:
    """Labels for the four pathology tiles and one ECG record, by paths relative to the CSV's folder."""
    csv = tmp_path_factory.mktemp("labels") / "labels.csv"
    tiles = sorted(p.name for p in inputs.glob("lungn*.jpg"))
    rows = [f"{os.path.relpath(inputs / t, csv.parent)},benign lung tissue" for t in tiles]
    csv.write_text("file,label\n" + "\n".join(rows + [f"{inputs / '00003_lr.hea'},sinus rhythm"]) + "\n")
    return csv


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
def runs(model_dir, inputs, labels_csv, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    m = ["--model", str(model_dir)]
    lib, named = str(out / "lib"), str(out / "named")
    patient = str(inputs / f"{PATIENT}.jpg")
    sharded = start(*m, "--json", "index", str(inputs), "--library", str(out / "sharded"), torchrun=True)
    bad_file = start(*m, "classify", str(inputs / "scan.png"))
    done = {
        "info": cli(*m, "info", "--json"),
        "index": cli(*m, "--json", "index", str(inputs), "--library", lib, "--labels-csv", str(labels_csv)),
        "reindex": cli(*m, "index", str(inputs), "-l", lib, "--json"),
        "index_text": cli(*m, "index", str(inputs), "-l", lib),
        "index_named": cli(*m, "index", str(inputs), "-l", named, "--label", "teaching file", "--keep-names", "--json"),
        "embed": cli(*m, "embed", str(inputs), "-o", str(out / "emb")),
        "embed_named": cli(*m, "--keep-names", "embed", str(inputs), "-o", str(out / "emb_named")),
        "classify": cli(*m, "classify", str(inputs / "00003_lr.hea"), "--json"),
        "classify_patient": cli(*m, "classify", patient),
        "classify_labels": cli("classify", str(inputs / "lungn1.jpg"), "benign lung tissue", "adenocarcinoma",
                               *m, "--json"),
        "bad_file_named": cli(*m, "--keep-names", "classify", str(inputs / "scan.png")),
        "search_text": cli(*m, "--json", "search", "pleural effusion", "-l", lib, "-k", "3"),
        "search_labelled": cli(*m, "search", "benign lung tissue", "-l", lib, "--modality", "pathology", "-k", "4"),
        "search_per_modality": cli(*m, "--json", "search", "pleural effusion", "-l", lib, "-k", "3",
                                   "--per-modality"),
        "search_file": cli(*m, "search", "--file", patient, "-l", lib, "--exclude-modality", "pathology", "--json"),
        "search_named": cli(*m, "search", "--file", patient, "-l", named, "-k", "12", "--keep-names", "--json"),
        "search_named_hidden": cli(*m, "search", "--file", patient, "-l", named, "-k", "12"),
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


def sha_name(*files: Path) -> str:
    """How the CLI names an input without names: ``sha256:`` and 16 hex digits of its files' bytes."""
    return f"sha256:{input_sha256(tuple(files))[:16]}"


@pytest.mark.slow
def test_index_reports_refused_files_and_resumes(runs, inputs):
    first = json.loads(ok(runs["index"]).stdout)
    assert first["added"] == 12 and first["skipped"] == 0
    assert first["refused"] == [{"source": sha_name(inputs / "scan.png"), "reason": NOT_AN_IMAGE,
                                 "error": "UnsupportedFormatError"}]
    assert sum(first["stats"]["per_modality"].values()) == 12
    assert first["stats"]["per_modality"]["pathology"] == 4 and first["stats"]["per_modality"]["ecg"] == 2
    again = json.loads(ok(runs["reindex"]).stdout)
    assert again["added"] == 0 and again["skipped"] == 12 and again["stats"]["count"] == 12
    assert ok(runs["index_text"]).stdout.startswith("Added 0 items to ")
    info = ok(runs["info_library"]).stdout
    assert "12 items" in info and "Flat (exact)" in info


@pytest.mark.slow
def test_index_sets_labels_from_a_csv_by_content_or_one_label_for_all(runs, inputs):
    """``--labels-csv`` labels the inputs it lists (matched by their bytes, not their names), ``--label`` every
    item added; search shows the labels."""
    assert json.loads(ok(runs["index"]).stdout)["labelled"] == 5
    with Library.load(runs["out"] / "lib") as library:
        labels = {library.item(int(i))["sha256"]: library.item(int(i))["label"] for i in library.vectors()[0]}
    expected = {input_sha256((t,)): "benign lung tissue" for t in inputs.glob("lungn*.jpg")}
    expected[input_sha256((inputs / "00003_lr.dat", inputs / "00003_lr.hea"))] = "sinus rhythm"
    assert {sha: label for sha, label in labels.items() if label} == expected
    shown = ok(runs["search_labelled"]).stdout.splitlines()
    assert len(shown) == 5 and all(line.endswith("  [benign lung tissue]") for line in shown[1:])
    named = json.loads(ok(runs["index_named"]).stdout)
    assert named["added"] == named["labelled"] == 12
    hits = json.loads(ok(runs["search_named"]).stdout)["hits"]
    assert len(hits) == 12 and {h["label"] for h in hits} == {"teaching file"}


def test_a_bad_labels_csv_is_a_user_error_that_names_no_file(tmp_path, capsys):
    patient = tmp_path / f"{PATIENT}.png"
    bad = tmp_path / "labels.csv"
    for content, message in ((f"{patient.name},pneumonia\n", "Row 1 of the labels CSV names no existing file"),
                             ("file,label\nonly-a-name\n", "Row 1 of the labels CSV is not 'file,label'")):
        bad.write_text(content)
        assert main(["index", str(tmp_path), "-l", str(tmp_path / "lib"), "--labels-csv", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"m3bind: error: {message}") and PATIENT not in err
    bad.write_text(f"{patient.name},pneumonia\n")
    assert main(["index", str(tmp_path), "-l", str(tmp_path / "lib"), "--labels-csv", str(bad), "--keep-names"]) == 2
    assert PATIENT in capsys.readouterr().err  # the user asked for names
    assert not (tmp_path / "lib").exists()  # refused before the model loads or a library is made


@pytest.mark.slow
def test_two_ranks_under_torchrun_merge_into_the_single_process_library(runs, inputs):
    report = json.loads(ok(runs["sharded"]).stdout)  # only rank 0 prints
    assert report["added"] == 12 and [r["source"] for r in report["refused"]] == [sha_name(inputs / "scan.png")]

    def contents(path: Path) -> dict[str, tuple[str, str, np.ndarray]]:
        with Library.load(path) as library:
            ids, vectors = library.vectors()
            items = [library.item(int(i)) for i in ids]
        return {it["sha256"]: (it["source"], it["modality"], v) for it, v in zip(items, vectors)}

    single, sharded = contents(runs["out"] / "lib"), contents(runs["out"] / "sharded")
    assert len(single) == 12 and sorted(single) == sorted(sharded)
    for sha, (source, modality, vector) in single.items():
        assert sharded[sha][:2] == (source, modality) and source is None
        np.testing.assert_allclose(sharded[sha][2], vector, atol=1e-5)


@pytest.mark.slow
def test_embed_writes_vectors_and_items(runs):
    run = ok(runs["embed"])
    vectors = np.load(runs["out"] / "emb.npy")
    items = [json.loads(line) for line in (runs["out"] / "emb.jsonl").read_text().splitlines()]
    assert vectors.shape == (12, 32) and len(items) == 12
    assert all("source" not in i and len(i["sha256"]) == 64 for i in items)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert "Embedded 12 inputs" in run.stdout and "sha256:" in run.stdout and "scan.png" not in run.stdout
    named = [json.loads(line) for line in (runs["out"] / "emb_named.jsonl").read_text().splitlines()]
    assert {Path(i["source"]).suffix for i in named} == {".jpg", ".hea"}  # with --keep-names, the paths
    assert NOT_AN_IMAGE_NAMED in ok(runs["embed_named"]).stdout


@pytest.mark.slow
def test_search_by_text_and_by_file(runs, inputs):
    text = json.loads(ok(runs["search_text"]).stdout)
    assert len(text["hits"]) == 3
    assert [h["score"] for h in text["hits"]] == sorted((h["score"] for h in text["hits"]), reverse=True)
    by_file = json.loads(ok(runs["search_file"]).stdout)
    assert len(by_file["hits"]) == 8 and {h["modality"] for h in by_file["hits"]} == {"xray", "ecg"}
    assert by_file["query"] == sha_name(inputs / f"{PATIENT}.jpg")


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
def test_classify_with_default_and_given_labels(runs, inputs):
    ecg = json.loads(ok(runs["classify"]).stdout)
    assert ecg["modality"] == "ecg" and ecg["file"] == sha_name(inputs / "00003_lr.dat", inputs / "00003_lr.hea")
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
    named = runs["bad_file_named"]
    assert named.returncode == 2 and named.stderr == f"m3bind: error: {NOT_AN_IMAGE_NAMED}\n"


@pytest.mark.slow
def test_no_input_name_or_path_leaves_the_cli_unless_asked(runs, inputs):
    """Issue 18: a patient-style file name goes through index, embed, search by file and classify; without
    ``--keep-names`` neither it nor the inputs' folder is in anything printed, written or stored."""
    quiet = [name for name in runs if isinstance(runs[name], subprocess.CompletedProcess) and "named" not in name]
    printed = "".join(ok(runs[name]).stdout + runs[name].stderr for name in quiet if name != "bad_file")
    printed += runs["bad_file"].stderr
    assert ok(runs["classify_patient"]).stdout.startswith(f"{sha_name(inputs / f'{PATIENT}.jpg')} (")
    written = [p for p in runs["out"].rglob("*") if p.is_file() and "named" not in p.name and "named" not in
               p.parent.name]
    assert {p.name for p in written} >= {"emb.npy", "emb.jsonl", "index.faiss", "items.sqlite", "library.json"}
    for secret in (PATIENT, str(inputs), "lungn1", "scan.png"):
        assert secret not in printed, secret
        assert not [p for p in written if secret.encode() in p.read_bytes()], secret
    # the names the user asked for, and only then: stored, printed, but not shown to a search without the flag
    with Library.load(runs["out"] / "named") as library:
        assert f"{PATIENT}.jpg" in {library.item(int(i))["source"] for i in library.vectors()[0]}
    assert str(inputs / f"{PATIENT}.jpg") == json.loads(runs["search_named"].stdout)["query"]
    assert PATIENT in runs["search_named"].stdout and PATIENT not in ok(runs["search_named_hidden"]).stdout


@pytest.mark.parametrize("command", [[], ["embed"], ["index"], ["search"], ["classify"], ["info"]])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: m3bind") and "--model" in text and "--json" in text and "--keep-names" in text


def test_help_and_argument_errors_import_no_torch_faiss_or_gradio():
    """``python -m m3bind --help`` answers at once: the package and the parser import nothing heavy (issue 20)."""
    code = ("import runpy, sys\n"
            "for argv in (['--help'], ['index', '--help'], ['search', '-l', 'x']):\n"
            "    sys.argv = ['m3bind', *argv]\n"
            "    try:\n"
            "        runpy.run_module('m3bind', run_name='__main__')\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code in (0, 2), exit.code\n"
            "print(sorted(m for m in ('torch', 'faiss', 'gradio', 'transformers', 'open_clip') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"
    assert "usage: m3bind index" in run.stdout and "Give either a text query" in run.stderr


def test_a_refused_file_imports_no_torch_or_scipy(tmp_path):
    """Refusing a bad file is quick: the CLI's error path (the reader, then naming the input without its file
    name) imports no torch, faiss, scipy or pydicom (it imported torch through ``m3bind.batch``: 14 s and
    730 MB; now 0.7 s and 38 MB)."""
    (tmp_path / "not_an_image.png").write_text("hello\n")
    (tmp_path / "00003_lr.hea").write_bytes(b"00003_lr 1")  # a WFDB header cut short
    code = ("import runpy, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = ['m3bind', 'classify', name]\n"
            "    try:\n"
            "        runpy.run_module('m3bind', run_name='__main__')\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 2, exit.code\n"
            "print(sorted(m for m in ('torch', 'faiss', 'scipy', 'pydicom', 'gradio', 'transformers')\n"
            "             if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "not_an_image.png"),
                          str(tmp_path / "00003_lr.hea")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"
    errors = run.stderr.splitlines()
    assert len(errors) == 2 and "not a supported format" in errors[0] and "declares 1 signal" in errors[1], errors
    assert "not_an_image" not in run.stderr and "00003_lr" not in run.stderr


def test_user_errors_exit_2_before_loading_a_model(tmp_path, capsys):
    assert main(["search", "-l", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "m3bind: error: Give either a text query or --file FILE, not both.\n"
    assert main(["--device", "quantum", "info"]) == 2
    assert "Unknown device 'quantum'" in capsys.readouterr().err


def test_console_entry_point_is_the_cli_main():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["m3bind"] == "m3bind.cli:main"
