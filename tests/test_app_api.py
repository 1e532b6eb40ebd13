"""The real app, served on a local port and driven through gradio_client: every endpoint, bad inputs too."""

from __future__ import annotations

import inspect
import json
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from pydicom.data import get_testdata_file

import m3bind
from m3bind.library import Library
from m3bind.workspace import Workspace

TILES = Path("pathology") / "lc25000_lung"  # under the shared data folder (the shared_data fixture)
PTBXL = Path("ecg") / "ptbxl" / "records100" / "00000"
CT = get_testdata_file("CT_small.dcm")
ECG_DCM = get_testdata_file("waveform_ecg.dcm")
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-998877"

pytestmark = pytest.mark.slow  # the served app with the default model: ~23 s to start, 70 s in all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(demo, url): the app as ``python app.py`` builds it, with the real default model, on a free port."""
    import app

    home = tmp_path_factory.mktemp("m3bind-home")
    demo = app.build_app(m3bind.load_model(), home)
    options = app.launch_options(demo.m3bind_workspace)
    assert options["server_name"] == "127.0.0.1" and options["allowed_paths"] == [str(home / "examples")]
    port = free_port()
    demo.launch(**{**options, "server_port": port, "prevent_thread_lock": True, "quiet": True})
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="session")
def client(served):
    return Client(served[1], verbose=False)


@pytest.fixture(scope="session")
def ws(served):
    return served[0].m3bind_workspace


@pytest.fixture(scope="session")
def tiles(shared_data):
    return {c: sorted((shared_data / TILES / c).glob("*.jpg"))[:4] for c in ("lung_aca", "lung_n", "lung_scc")}


@pytest.fixture(scope="session")
def dicom_with_identifiers(tmp_path_factory) -> Path:
    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    path = tmp_path_factory.mktemp("phi") / "ct_with_identifiers.dcm"
    ds.save_as(path)
    return path


def probabilities(result) -> dict[str, float]:
    probs = result[-1]
    assert abs(sum(probs.values()) - 1) < 1e-4
    return probs


def test_every_action_is_a_named_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/open_file", "/classify", "/show", "/default_findings", "/search_text", "/search_similar",
            "/add_to_library", "/reset_library", "/remove_from_library", "/library_stats", "/explore",
            "/fewshot"} <= names
    assert {f"/example_{e.key}" for e in m3bind.examples.EXAMPLES} <= names


def test_open_dicom_shows_modality_window_and_default_findings(client):
    status, preview, ecg, modality, findings, centre, width, plot, probs = client.predict(
        [handle_file(CT)], "", None, api_name="/open_file")
    assert "**CT** (from the DICOM header)" in status and "window C" in status
    assert preview["visible"] and Path(preview["value"]).suffix == ".png" and not ecg["visible"]
    assert modality == "auto"
    assert findings.splitlines() == list(m3bind.get_modality("ct").default_labels)
    assert width > 0 and centre is not None
    assert set(probabilities([probs])) == set(findings.splitlines())
    assert json.loads(plot["plot"])["data"][0]["orientation"] == "h"


def test_classify_png_with_comma_separated_findings(client):
    retina = client.predict(api_name="/example_retina")[0]
    findings = "no diabetic retinopathy, proliferative diabetic retinopathy"
    result = client.predict([handle_file(retina)], "auto", findings, None, None, None, api_name="/classify")
    assert "Retina fundus" in result[0] and "PNG" in result[0] and "1411 x 1411 px" in result[0]
    assert set(probabilities(result)) == {"no diabetic retinopathy", "proliferative diabetic retinopathy"}
    bars = json.loads(result[1]["plot"])["data"][0]
    assert bars["x"] == sorted(bars["x"])  # most probable drawn last, i.e. on top


def test_large_images_are_decoded_only_as_large_as_needed(ws):
    retina = ws.example_path("retina")
    full, sample = m3bind.load_input(retina), ws.read(str(retina))
    assert full.data.shape[:2] == (1411, 1411) and ws.decode_size <= max(sample.data.shape[:2]) < 1411
    assert sample.preview.shape == full.preview.shape  # the page shows the same preview
    assert float(ws.embed(str(retina)) @ ws.model.embed(full)) > 0.999


def test_classify_wfdb_pair_draws_twelve_leads(client, shared_data):
    header = sorted((shared_data / PTBXL).glob("*.hea"))[0]
    record = [handle_file(header), handle_file(header.with_suffix(".dat"))]
    status, plot, probs = client.predict(record, "auto", "normal ECG\nmyocardial infarction", None, None, None,
                                         api_name="/classify")
    assert "12-lead ECG" in status and "all 12 leads" in status
    assert set(probs) == {"normal ECG", "myocardial infarction"}
    status, preview, ecg = client.predict(record, "auto", None, None, None, api_name="/show")
    traces = json.loads(ecg["value"]["plot"])["data"]
    assert {t["name"] for t in traces} >= {"I", "aVR", "V6", "II (rhythm)"}
    assert ecg["visible"] and not preview["visible"]


def test_window_and_modality_override(client):
    windowed = client.predict([handle_file(CT)], "auto", "normal CT\ntumor", 40, 400, None, api_name="/classify")
    assert "window C 40 / W 400 (user)" in windowed[0]
    status, preview, _ = client.predict([handle_file(CT)], "auto", 40, 400, None, api_name="/show")
    default = client.predict([handle_file(CT)], "auto", None, None, None, api_name="/show")[1]
    assert "(user)" in status and Path(preview["value"]).read_bytes() != Path(default["value"]).read_bytes()
    overridden = client.predict([handle_file(CT)], "xray", "pneumonia\nnormal", None, None, None, api_name="/classify")
    assert "Chest X-ray" in overridden[0] and "chosen by you" in overridden[0]


@pytest.mark.parametrize("modality, findings, message", [
    ("ecg", "normal ECG\nmyocardial infarction", "not a 12-lead ECG recording"),
    ("auto", "only one finding", "at least two"),
])
def test_refusals_are_readable(client, modality, findings, message):
    with pytest.raises(AppError, match=message):
        client.predict([handle_file(CT)], modality, findings, None, None, None, api_name="/classify")


def test_random_bytes_are_refused_and_the_app_keeps_serving(client, tmp_path):
    junk = tmp_path / "scan.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    opened = client.predict([handle_file(junk)], "", None, api_name="/open_file")
    assert opened[0].startswith("**Cannot read this file.**") and "Traceback" not in opened[0]
    with pytest.raises(AppError, match="DICOM") as refused:
        client.predict([handle_file(junk)], "auto", "a\nb", None, None, None, api_name="/classify")
    assert "Traceback" not in str(refused.value)
    with pytest.raises(AppError, match="Upload a file first"):
        client.predict([], "auto", "a\nb", None, None, None, api_name="/classify")
    still = client.predict([handle_file(CT)], "auto", "normal CT\ntumor", None, None, None, api_name="/classify")
    assert "CT" in still[0]


def test_server_paths_and_oversized_uploads_are_refused(served, client, tmp_path):
    _, url = served
    assert httpx.get(f"{url}gradio_api/file=/etc/passwd").status_code in (403, 404)
    server_file = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    payload = {"data": [[server_file], "auto", "a\nb", None, None, None]}
    event = httpx.post(f"{url}gradio_api/call/classify", json=payload).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/classify/{event}", timeout=60).text
    assert "event: error" in stream and "root:" not in stream
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(101 * 2**20)  # just over the 100 MB upload limit
    with open(big, "rb") as fh:  # the server refuses it, whatever the client checks first
        response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", fh)}, timeout=60)
    assert response.status_code == 413


def test_ecg_array_without_a_sampling_rate_asks_for_it(client, tmp_path, shared_data):
    import wfdb

    signal, _ = wfdb.rdsamp(str(sorted((shared_data / PTBXL).glob("*.hea"))[0].with_suffix("")))
    array = tmp_path / "ecg_8s.npy"
    np.save(array, signal[:800].astype(np.float32))  # 8 s at 100 Hz: the length alone does not tell the rate
    opened = client.predict([handle_file(array)], "", None, api_name="/open_file")
    assert "sampling rate" in opened[0]
    opened = client.predict([handle_file(array)], "", 100, api_name="/open_file")
    assert "12-lead ECG" in opened[0] and opened[4].splitlines() == list(m3bind.get_modality("ecg").default_labels)


def test_default_findings_follow_the_modality_unless_typed(client):
    ct_defaults = "\n".join(m3bind.get_modality("ct").default_labels)
    retina = client.predict([handle_file(CT)], "retina", ct_defaults, None, api_name="/default_findings")
    assert retina.splitlines() == list(m3bind.get_modality("retina").default_labels)
    assert client.predict([handle_file(CT)], "retina", "my own\nfindings", None, api_name="/default_findings") == \
        "my own\nfindings"
    assert client.predict([handle_file(CT)], "auto", "", None, api_name="/default_findings") == ct_defaults


def test_examples_are_one_click_away(client):
    for example in m3bind.examples.EXAMPLES:
        (path,) = client.predict(api_name=f"/example_{example.key}")
        assert Path(path).name == example.filename
        assert m3bind.load_input(path).modality == example.modality


def test_text_search_spans_every_modality_and_filters(client):
    gallery, note = client.predict("pleural effusion", [], 12, True, api_name="/search_text")
    titles = {item["caption"].split(" · ")[0] for item in gallery}
    assert len(titles) == 6 and "12-lead ECG" in titles and "results" in note
    assert all(Path(item["image"]).is_file() for item in gallery)
    ct_only, _ = client.predict("hemorrhage", ["ct"], 3, False, api_name="/search_text")
    assert [item["caption"].split(" · ")[0] for item in ct_only] == ["CT"]
    with pytest.raises(AppError, match="Type a finding"):
        client.predict("  ", [], 12, True, api_name="/search_text")


def test_similar_items_come_from_other_modalities(client):
    gallery, note = client.predict([handle_file(ECG_DCM)], "auto", None, None, None, 10, True,
                                   api_name="/search_similar")
    captions = [item["caption"] for item in gallery]
    assert captions and not any(c.startswith("12-lead ECG") for c in captions)
    scores = [float(c.split(" · ")[1]) for c in captions]
    assert scores == sorted(scores, reverse=True) and "other modalities than 12-lead ECG" in note
    same, _ = client.predict([handle_file(ECG_DCM)], "auto", None, None, None, 1, False, api_name="/search_similar")
    assert same[0]["caption"].startswith("12-lead ECG") and float(same[0]["caption"].split(" · ")[1]) > 0.99


def test_library_add_explore_fewshot_reset(client, ws, tiles, dicom_with_identifiers, tmp_path, monkeypatch,
                                           shared_data):
    assert client.predict(api_name="/library_stats").startswith("**Library:** 6 items")
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    aca = [handle_file(p) for p in tiles["lung_aca"]]
    status, summary = client.predict([*aca, handle_file(junk), handle_file(dicom_with_identifiers)], "lung_aca",
                                     "auto", api_name="/add_to_library")
    assert "Added **5**" in status and "refused 1" in status and "notes.txt" in status
    # each added input's modality, and whether it was given or guessed (by its place: names are patient data)
    assert "Modalities: Pathology (H&E) 4, CT 1." in status
    assert "- input 6: **CT**, given by the DICOM header" in status
    assert all(f"- input {i}: **Pathology (H&E)**, guessed by the modality detector" in status for i in range(1, 5))
    assert PATIENT_ID not in status and "ct_with_identifiers" not in status
    header = sorted((shared_data / PTBXL).glob("*.hea"))[0]  # a WFDB record: two files, one item
    status, summary = client.predict([handle_file(p) for p in tiles["lung_n"] + tiles["lung_scc"]] +
                                     [handle_file(header), handle_file(header.with_suffix(".dat"))], "lung_n", "auto",
                                     api_name="/add_to_library")
    assert "Added **9**" in status and "**Library:** 20 items" in summary and "12-lead ECG 2" in summary
    again, _ = client.predict(aca, "lung_aca", "auto", api_name="/add_to_library")
    assert "Added **0**, already in the library 4" in again

    # persisted, without identifiers
    saved = Library.load(ws.library_dir, ws.model.fingerprint)
    assert len(saved) == 20
    saved.close()
    for file in ws.library_dir.iterdir():
        data = file.read_bytes()
        assert PATIENT_ID.encode() not in data and b"Doe" not in data and str(tmp_path).encode() not in data

    # explore: 20 items, so UMAP; the query and prompts are placed, the map is not refitted
    started = time.perf_counter()
    plot, note = client.predict("label", "adenocarcinoma\nnormal ECG", True, [handle_file(tiles["lung_aca"][0])],
                                "auto", None, None, None, api_name="/explore")
    figure = json.loads(plot["plot"])
    traces = {t["name"]: t for t in figure["data"]}
    assert figure["layout"]["title"]["text"].startswith("UMAP of 20 items") and note.startswith("UMAP map")
    assert "lung_aca (5)" in traces and "text prompts" in traces and "your upload (Pathology (H&E))" in traces
    first_map = ws.library_map()
    plot2, _ = client.predict("modality", "", False, None, "auto", None, None, None, api_name="/explore")
    assert ws.library_map() is first_map and "text prompts" not in plot2["plot"]
    print(f"explore with UMAP took {time.perf_counter() - started:.1f} s")

    # few-shot from uploads, and from library labels
    query = [handle_file(tiles["lung_scc"][-1])]
    plot, probs, note = client.predict(query, "auto", None, None, None, "prototype", False,
                                 "adenocarcinoma", [handle_file(p) for p in tiles["lung_aca"][:2]],
                                 "benign", [handle_file(p) for p in tiles["lung_n"][:2]], "", [],
                                 api_name="/fewshot")
    assert set(probs) == {"adenocarcinoma", "benign"} and abs(sum(probs.values()) - 1) < 2e-3
    assert "the file of the Classify tab (Pathology (H&E))" in note and tiles["lung_scc"][-1].name not in note
    assert "Examples per class: adenocarcinoma 2, benign 2." in note
    assert json.loads(plot["plot"])["data"][0]["y"][-1].endswith("(2 examples)")
    assert all(0.001 <= p <= 0.999 for p in probs.values())
    # more than three classes; the API may leave the last ones out
    _, probs, note = client.predict(query, "auto", None, None, None, "prototype", False,
                                    "adenocarcinoma", [handle_file(tiles["lung_aca"][0])],
                                    "benign", [handle_file(tiles["lung_n"][0])], "", [],
                                    "squamous", [handle_file(tiles["lung_scc"][0])], api_name="/fewshot")
    assert set(probs) == {"adenocarcinoma", "benign", "squamous"} and "squamous 1" in note
    _, probs, _ = client.predict(query, "auto", None, None, None, "probe", True, "lung_aca", [], "lung_n", [], "", [],
                              api_name="/fewshot")
    assert set(probs) == {"lung_aca", "lung_n"}
    with pytest.raises(AppError, match="at least two classes"):
        client.predict(query, "auto", None, None, None, "prototype", False, "only", [handle_file(tiles["lung_n"][0])],
                       "", [], "", [], api_name="/fewshot")

    # one item taken out again: gone from the saved library and from search results
    added_by_mistake = next(h.id for h in ws.search_text("benign lung tissue", 48, ["pathology"]) if h.label == "lung_n")
    with pytest.raises(AppError, match="Tick"):  # not without the confirmation
        client.predict(added_by_mistake, False, api_name="/remove_from_library")
    selected, confirmed, note, summary = client.predict(added_by_mistake, True, api_name="/remove_from_library")
    assert selected is None and confirmed is False
    assert f"Item {added_by_mistake} was removed" in note and "**Library:** 19 items" in summary
    assert added_by_mistake not in {h.id for h in ws.search_text("lung tissue", 48, None, per_modality=False)}
    saved = Library.load(ws.library_dir, ws.model.fingerprint)
    assert len(saved) == 19
    saved.close()
    with pytest.raises(AppError, match="holds no item"):
        client.predict(added_by_mistake, True, api_name="/remove_from_library")
    with pytest.raises(AppError, match="Click a search result first"):
        client.predict(None, True, api_name="/remove_from_library")

    # the shared library is reset only where the operator allows it, and only with the confirmation
    with pytest.raises(AppError, match="M3BIND_ALLOW_RESET"):
        client.predict(True, api_name="/reset_library")
    assert len(ws.library) == 19
    monkeypatch.setenv("M3BIND_ALLOW_RESET", "1")
    with pytest.raises(AppError, match="Tick"):
        client.predict(False, api_name="/reset_library")
    status, confirmed, summary = client.predict(True, api_name="/reset_library")
    assert "**Library:** 6 items" in summary and len(ws.library) == 6 and confirmed is False


def test_an_add_with_a_given_modality_says_so(client, ws, tiles):
    status, _ = client.predict([handle_file(tiles["lung_scc"][0])], "", "pathology", api_name="/add_to_library")
    assert "Added **1**" in status and "- input 1: **Pathology (H&E)**, given by you" in status
    wrong, _ = client.predict([handle_file(tiles["lung_scc"][1])], "", "xray", api_name="/add_to_library")
    assert "Modalities: Chest X-ray 1." in wrong and "given by you" in wrong  # a wrong routing is visible


def test_findings_reset_for_a_new_file_unless_kept(client):
    """Findings typed for one file no longer score the next one (issue 20): a new file starts from its
    modality's defaults unless "keep my findings" is ticked, and the result says whose findings were scored."""
    ct_defaults = list(m3bind.get_modality("ct").default_labels)
    typed = "lung cancer\nmelanoma"
    opened = client.predict([handle_file(CT)], typed, None, False, api_name="/open_file")
    assert opened[4].splitlines() == ct_defaults and set(opened[-1]) == set(ct_defaults)
    assert f"Findings scored: {len(ct_defaults)} defaults for CT." in opened[0]
    kept = client.predict([handle_file(CT)], typed, None, True, api_name="/open_file")
    assert kept[4] == typed and set(kept[-1]) == {"lung cancer", "melanoma"}
    assert "Findings scored: 2 typed by you (lung cancer, melanoma)." in kept[0]
    mixed = client.predict([handle_file(CT)], "auto", "lung cancer\npulmonary nodule", None, None, None,
                           api_name="/classify")
    assert "Findings scored: 1 typed by you (lung cancer) and 1 default for CT." in mixed[0]


def test_file_names_are_not_stored_or_shown(client, ws, served, tmp_path):
    """A patient-style file name is neither stored in the library nor shown in captions, the map's hover text
    or the few-shot note (issue 18, point 2)."""
    ds = pydicom.dcmread(CT)
    ds.PatientID, ds.Rows = "NAME-TEST", ds.Rows  # another hash than the other tests' files
    ds.PixelData = bytes(reversed(ds.PixelData))
    named = tmp_path / "Doe_John_19700101.dcm"
    ds.save_as(named)
    status, _ = client.predict([handle_file(named)], "", "auto", api_name="/add_to_library")
    assert "Added **1**" in status
    item = max(int(i) for i in ws.library.vectors()[0])
    assert ws.library.item(item)["source"] is None and ws.library.item(item)["sha256"]
    for file in ws.library_dir.iterdir():
        assert b"Doe_John" not in file.read_bytes()
    gallery, _ = client.predict("tumor", ["ct"], 48, False, api_name="/search_text")
    captions = [g["caption"] for g in gallery]
    assert f"item {item}" in " ".join(captions) and not any("Doe_John" in c for c in captions)
    assert any(c.endswith(".dcm") for c in captions)  # the examples' public names stay
    plot, _ = client.predict("modality", "", False, None, "auto", None, None, None, api_name="/explore")
    assert "Doe_John" not in plot["plot"]
    _, _, note = client.predict([handle_file(named)], "auto", None, None, None, "prototype", False,
                                "a", [handle_file(CT)], "b", [handle_file(ECG_DCM)], "", [], api_name="/fewshot")
    assert "Doe_John" not in note
    assert ws.keep_names is False and inspect.signature(Workspace).parameters["keep_names"].default is False


def test_removal_needs_a_whole_id_a_selection_and_a_confirmation(client, ws, served):
    """Nothing selected no longer removes item 0, 1.5 no longer removes item 2, 1e30 gets a readable message,
    the shared library's example items stay (issue 18, point 7)."""
    demo = served[0]
    (box,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "selected-item"]
    assert box.value is None  # the page's box starts empty, not at item 0
    before = len(ws.library)
    for bad in (1.5, 1e30, -1):
        with pytest.raises(AppError, match="not an item id"):
            client.predict(bad, True, api_name="/remove_from_library")
    with pytest.raises(AppError, match="Click a search result first"):
        client.predict(None, True, api_name="/remove_from_library")
    example = next(int(i) for i in ws.library.vectors()[0] if ws.is_example(int(i)))
    with pytest.raises(AppError, match="example files"):
        client.predict(example, True, api_name="/remove_from_library")
    assert len(ws.library) == before


def test_file_content_and_queries_never_become_markup(client, tmp_path):
    """A CSV cell or a query with HTML is shown as text: escaped in messages and Markdown (issue 18, point 6)."""
    from ui.common import markdown_text, plain

    evil = "<img src=http://127.0.0.1:7999/x>"
    csv = tmp_path / "ecg.csv"
    csv.write_text(f"I,II,III\n1,{evil},3\n")
    status = client.predict([handle_file(csv)], "", None, api_name="/open_file")[0]
    assert "Cannot read this file" in status and "\\<img" in status and not re.search(r"(?<!\\)<", status)
    with pytest.raises(AppError) as refused:
        client.predict([handle_file(csv)], "auto", "a\nb", None, None, None, api_name="/classify")
    assert "&lt;img src=http://127.0.0.1:7999/x&gt;" in str(refused.value) and "<img" not in str(refused.value)
    _, note = client.predict(f"{evil} [link](http://example.com) ![x](http://example.com/i.png)", [], 2, True,
                             api_name="/search_text")
    assert not re.search(r"(?<!\\)[<\[\]]", note) and "\\[link\\]" in note
    assert plain("<b>&") == "&lt;b&gt;&amp;" and markdown_text("*a* _b_") == "\\*a\\* \\_b\\_"


@pytest.mark.parametrize("doc", ["README.md", "docs/app.md"])
def test_documented_gradio_client_example_runs(served, doc):
    """The gradio_client example of README.md (and of docs/app.md) runs as written against the real app
    (issue 18, point 12: README's unpacked five values of an endpoint that returns three)."""
    import re

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "gradio_client" in block]
    code = code.replace("http://127.0.0.1:7860/", served[1]).replace('"chest.dcm"', repr(CT))
    namespace: dict = {}
    exec(compile(code, doc, "exec"), namespace)
    assert len(namespace["probabilities"]) >= 2 and abs(sum(namespace["probabilities"].values()) - 1) < 1e-4
    assert "CT" in namespace["status"]


def test_spaces_and_env_choose_the_interface(ws, monkeypatch):
    import app

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/m3bind")
    assert app.launch_options(ws)["server_name"] == "0.0.0.0"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.1.2.3")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    assert (app.launch_options(ws)["server_name"], app.launch_options(ws)["server_port"]) == ("10.1.2.3", 8123)


def test_parse_findings():
    from ui.common import parse_findings

    assert parse_findings("pneumonia, effusion ,pneumonia") == ["pneumonia", "effusion"]
    assert parse_findings("- consolidation, left lower lobe\n- Effusion\n\neffusion") == \
        ["consolidation, left lower lobe", "Effusion"]
    assert parse_findings(None) == []


def test_one_app_wide_concurrency_limit(served, monkeypatch):
    """M3BIND_CONCURRENCY (default 2) is the one limit of how many actions run at once (README's app section)."""
    import app
    from m3bind.errors import ConfigError

    assert served[0]._queue.default_concurrency_limit == 2
    monkeypatch.setenv("M3BIND_CONCURRENCY", "5")
    assert app.concurrency() == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("M3BIND_CONCURRENCY", bad)
        with pytest.raises(ConfigError, match="M3BIND_CONCURRENCY"):
            app.concurrency()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "M3BIND_CONCURRENCY" in readme.split("## The app", 1)[1].split("\n## ", 1)[0]


def test_calls_without_a_session_do_not_pile_up_in_memory(served):
    """Each API call without a session hash opens a session, and the server keeps a copy of the page's
    settings per session: at most ``app.SESSIONS`` of them stay, the least recently used going first."""
    import app

    demo, url = served
    with httpx.Client(timeout=60) as http:
        for _ in range(app.SESSIONS + 8):
            event = http.post(f"{url}gradio_api/call/library_stats", json={"data": []}).json()["event_id"]
            assert "event: complete" in http.get(f"{url}gradio_api/call/library_stats/{event}").text
    assert len(demo.state_holder.session_data) == app.SESSIONS


def test_explain_shows_the_words_and_the_regions_behind_the_top_finding(client):
    from PIL import Image

    note, words, heatmap, ecg = client.predict([handle_file(CT)], "auto", "normal lungs\nconsolidation", None, None,
                                               None, api_name="/explain")
    top = re.search(r"Top finding \*\*(.+?)\*\*", note).group(1)
    assert top in ("normal lungs", "consolidation")
    tokens = [(w["token"].strip(), w["class_or_confidence"]) for w in words]
    assert [t for t, _ in tokens] == top.split() and max(abs(c) for _, c in tokens) == pytest.approx(1.0)
    assert heatmap["visible"] and not ecg["visible"]
    assert Image.open(heatmap["value"]).size == (384, 384)  # the 128-px preview as shown, enlarged x3
    note, _, heatmap, ecg = client.predict([handle_file(ECG_DCM)], "auto", "normal ECG\natrial fibrillation", None,
                                           None, None, api_name="/explain")
    figure = json.loads(ecg["value"]["plot"])
    assert ecg["visible"] and not heatmap["visible"] and "second of the ECG" in note
    assert all(0 <= shape["x0"] < shape["x1"] <= 10 for shape in figure["layout"]["shapes"])
