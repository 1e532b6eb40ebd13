"""Peak memory of the image readers for images at the decoded-size limit (issue 18).

``python bench/bench_reader_memory.py`` builds, from a real chest X-ray of ../shared/data scaled up, images
whose decoded pixels just fit ``Limits.max_decoded_bytes`` (8-bit grey, 16-bit grey, 8-bit RGB PNGs and
16-bit uncompressed DICOMs, without a window (the default window, from percentiles) and with one in the
header), then reads each in a fresh process with ``m3bind.load_input``, whole and at a tower's size
(``decode_size=256``, as the app and batch embedding read), after reading a small file of the same format. Reported per case: the peak of
Python/numpy allocations (tracemalloc) and the growth of the process's peak resident memory (ru_maxrss)
over what it held before reading, both in MiB, and the Sample's own size for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
MEASURE = """
import json, resource, sys, tracemalloc
from m3bind.readers import load_input
path, size, small = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3]
load_input(small, decode_size=size)  # imports and first-use caches settle on a small image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
sample = load_input(path, decode_size=size)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"traced": traced / 2**20, "rss_growth": growth / 2**10,
                  "sample": (sample.data.nbytes + sample.preview.nbytes) / 2**20}))
"""


def inputs(folder: Path, xray: Path) -> dict[str, Path]:
    """Images just under the decoded-size limit, made from a real X-ray scaled up (smooth, so small files)."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    from m3bind.readers import DEFAULT_LIMITS

    limit = DEFAULT_LIMITS.max_decoded_bytes
    grey = Image.open(xray).convert("L")
    side8, side16, side_rgb = (int((limit / b) ** 0.5) for b in (1, 2, 3))
    out = {"small": folder / "small.png", "PNG 8-bit grey": folder / "grey8.png", "PNG 16-bit grey": folder / "grey16.png",
           "PNG 8-bit RGB": folder / "rgb8.png", "DICOM 16-bit grey": folder / "grey16.dcm",
           "DICOM 16-bit, window": folder / "windowed16.dcm"}
    grey.resize((64, 64)).save(out["small"])
    grey.resize((side8, side8)).save(out["PNG 8-bit grey"])
    deep = np.asarray(grey.resize((side16, side16)), dtype=np.uint16) * 16  # 12 bits stored
    Image.fromarray(deep).save(out["PNG 16-bit grey"])
    grey.resize((side_rgb, side_rgb)).convert("RGB").save(out["PNG 8-bit RGB"])
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.PixelRepresentation = side16, side16, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = deep.tobytes()
    ds.save_as(out["DICOM 16-bit grey"])
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the header's window: no percentiles to compute
    ds.save_as(out["DICOM 16-bit, window"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    from pydicom.data import get_testdata_file

    xray = sorted((args.data / "cxr_nih").glob("**/*.jpg"))[0]
    print(f"{'input':<22} {'decode_size':>11} {'Sample MiB':>10} {'traced peak MiB':>15} {'RSS growth MiB':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        files = inputs(Path(tmp), xray)
        small = {"PNG": files.pop("small"), "DICOM": get_testdata_file("CT_small.dcm")}
        for name, path in files.items():
            for size in (0, 256):
                command = [sys.executable, "-c", MEASURE, str(path), str(size), str(small[name.split()[0]])]
                run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
                r = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"{name:<22} {size or 'none':>11} {r['sample']:>10.0f} {r['traced']:>15.0f} "
                      f"{r['rss_growth']:>14.0f}", flush=True)


if __name__ == "__main__":
    main()
