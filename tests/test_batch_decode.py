"""Batch embedding reads images only as large as the towers need (``load_input(decode_size=...)``):
as good as a full decode for the embedded default model, on real files read in place from ../shared/data;
and it encodes in lanes beside the decoding, giving the caller's torch threads back afterwards."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import m3bind
from m3bind.batch import decode_size, default_workers, embed_files, encoder_lanes


@pytest.fixture(scope="module")
def default_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-default warning, should assets/ lack the model
        return m3bind.load_model(device="cpu")


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    """A 1411-px colour fundus photograph (scikit-image's real sample) as PNG and as JPEG."""
    from skimage import data

    folder = tmp_path_factory.mktemp("fundus")
    image = Image.fromarray(data.retina())
    image.save(folder / "fundus.png")
    image.save(folder / "fundus.jpg", quality=95)
    return [folder / "fundus.png", folder / "fundus.jpg"]


@pytest.mark.parametrize("thumbnails", [False, True])
def test_reduced_decode_embeds_like_the_full_decode(default_model, shared_data, fundus, thumbnails):
    size = decode_size(default_model, thumbnails)
    assert size == (256 if thumbnails else 224)  # the largest tower input (X-ray); twice the 128-px thumbnails
    files = fundus + sorted((shared_data / "covid_cxr" / "images").iterdir())
    full = [m3bind.load_input(p) for p in files]
    reduced = [m3bind.load_input(p, decode_size=size) for p in files]
    assert all(r.data.shape[:2] == r.preview.shape[:2] and max(r.data.shape[:2]) == min(size, max(f.data.shape[:2]))
               for f, r in zip(full, reduced))
    assert [r.modality for r in reduced] == [f.modality for f in full] and reduced[0].modality == "retina"
    cosines = (default_model.embed(full) * default_model.embed(reduced)).sum(axis=1)
    # the 224-px X-ray tower sees the resampling's own rounding more than the 128-px one did: its worst file here
    # is at 0.987 from the full decode (the same tower, the same findings), most above 0.999
    assert cosines.min() > 0.985 and np.median(cosines) > 0.999, cosines.round(4)


def test_decode_size_keeps_the_file_facts(shared_data, tmp_path):
    source = sorted((shared_data / "covid_cxr" / "images").iterdir())[0]
    whole = m3bind.load_input(source)
    assert whole.data.shape[:2] == (whole.meta["height"], whole.meta["width"])  # no hint: full resolution
    small = m3bind.load_input(source, decode_size=100)
    assert small.meta == whole.meta and max(small.data.shape[:2]) == 100

    # EXIF orientation 6 (turned by 90 degrees), in a JPEG and a TIFF: turned alike with or without the hint
    image = Image.open(source)
    exif = image.getexif()
    exif[0x0112] = 6
    for name in ("turned.jpg", "turned.tif"):
        image.save(tmp_path / name, exif=exif)
        turned, turned_small = m3bind.load_input(tmp_path / name), m3bind.load_input(tmp_path / name, decode_size=100)
        assert (turned.meta["width"], turned.meta["height"]) == (whole.meta["height"], whole.meta["width"])
        assert turned_small.meta == turned.meta and turned_small.data.shape[:2] == (100, 74)
        assert turned.data.shape[:2] == (512, 381)

    # 16-bit images are shrunk too, scaled by the bit depth of the whole image: one bright pixel makes it
    # 13 bits, which the shrunk image (its maximum averaged away) would not show
    import pydicom
    from pydicom.data import get_testdata_file

    ct = np.clip(pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array, 0, None).astype(np.uint16)
    ct[0, 0] = 4096
    Image.fromarray(ct).save(tmp_path / "ct16.png")
    deep, whole = m3bind.load_input(tmp_path / "ct16.png", decode_size=32), m3bind.load_input(tmp_path / "ct16.png")
    assert deep.data.shape == (32, 32, 3) and deep.meta == whole.meta and deep.preview.shape == (32, 32, 3)
    resized = Image.fromarray(whole.data[..., 0], "F").resize((32, 32), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(deep.data[..., 0], np.asarray(resized), atol=1 / 8191)  # integer rounding
    assert (deep.data[..., 0] == deep.data[..., 2]).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_lanes_encode_beside_decoding_and_give_the_threads_back(shared_data, tiny_model, tmp_path, workers):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_workers(64, 64) == 0  # a single batch: decoded in the main process
    assert default_workers(1000, 64, "cpu") == cores // 4 and default_workers(1000, 64, "cuda") == min(16, cores)
    threads = torch.get_num_threads()
    lanes, per_lane = encoder_lanes(torch.device("cpu"), workers)
    assert 1 <= lanes <= max(1, threads - workers) and lanes * per_lane <= max(1, threads - workers)
    assert encoder_lanes(torch.device("cuda"), workers) == (1, threads)

    tiles = sorted((shared_data / "pathology" / "lc25000_lung" / "lung_n").iterdir())[:13]
    for tile in tiles:
        os.symlink(tile, tmp_path / tile.name)
    result = embed_files(tiny_model, tmp_path, modality="retina", batch_size=3, num_workers=workers, progress=False,
                         keep_names=True)
    assert torch.get_num_threads() == threads  # given back after the run
    assert [os.path.basename(i["source"]) for i in result.items] == [t.name for t in tiles] and result.refused == []
    expected = tiny_model.embed([m3bind.load_input(t, "retina", decode_size=decode_size(tiny_model, False))
                                 for t in tiles])
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)
