"""m3bind.kinds: each input kind is declared once, and what differs between kinds is asked of its table."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

import m3bind
from m3bind.errors import ConfigError, WrongModalityError
from m3bind.kinds import THUMBNAIL_PX, input_kind, kind_names, thumbnail_png
from m3bind.modalities import Modality, register


def _xray_and_ecg(shared_data):
    rows = list(csv.DictReader(open(shared_data / "covid_cxr" / "metadata.csv", newline="")))
    xray = m3bind.load_input(shared_data / "covid_cxr" / next(r for r in rows if r["modality"] == "X-ray")["filename"])
    header = sorted((shared_data / "ecg" / "ptbxl" / "records100").rglob("*.hea"))[0]
    return xray, m3bind.load_input([header, header.with_suffix(".dat")])


def test_every_modality_has_a_declared_kind_and_an_unknown_kind_is_a_developer_error():
    assert set(kind_names()) == {"image", "ecg"}
    assert {m3bind.get_modality(m).kind for m in m3bind.modality_names()} <= set(kind_names())
    with pytest.raises(ConfigError, match="unknown input kind 'sonar'"):
        register(Modality(name="sonar-test", title="Sonar", kind="sonar"))
    assert "sonar-test" not in m3bind.modality_names()


def test_kinds_name_describe_and_draw_their_samples(shared_data):
    xray, ecg = _xray_and_ecg(shared_data)
    image_facts, ecg_facts = input_kind(xray.kind).facts(xray), input_kind(ecg.kind).facts(ecg)
    assert image_facts[0] == f"{xray.meta['width']} x {xray.meta['height']} px"
    assert ecg_facts == ["10 s, recorded at 100 Hz", "all 12 leads"]

    thumb = Image.open(io.BytesIO(thumbnail_png(xray)))
    assert thumb.format == "PNG" and max(thumb.size) == THUMBNAIL_PX
    trace = np.asarray(Image.open(io.BytesIO(thumbnail_png(ecg))))
    assert trace.shape[:2] == (48, THUMBNAIL_PX) and trace.std() > 0

    # the reader's message for a modality of the other kind is worded by both kinds' tables
    header = sorted((shared_data / "ecg" / "ptbxl" / "records100").rglob("*.hea"))[0]
    with pytest.raises(WrongModalityError, match="This file is an ECG recording, not a Chest X-ray image"):
        m3bind.load_input([header, header.with_suffix(".dat")], "xray")
