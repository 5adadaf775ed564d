"""Preprocessing throughput: ecamp's file-to-tensor path against torchxrayvision's, side by side.

    pip install --no-deps torchxrayvision && pip install pandas requests   # its import needs these
    python bench/preprocess.py [--repeats 10]

Files: the real chest radiograph RG1_UNCR (1955x1841, 15-bit MONOCHROME1 CR, from pydicom-data) as DICOM, and the
same image written as an 8-bit PNG at full size. Both pipelines go from a path to a model-ready 224x224 tensor:

- ecamp: ``ecamp.get_transform("cxr-vit-b")(path)`` (DICOM under the MIMIC-CXR-JPG policy, and under "bits";
  resize/crop/normalise with torchvision as the authors did);
- torchxrayvision: ``xrv.utils.read_xray_dcm`` (DICOM) or ``skimage.io.imread`` + ``xrv.datasets.normalize`` (PNG),
  then ``XRayCenterCrop`` and ``XRayResizer(224)`` (its documented pipeline).

One more row times the CPU half alone (``EcampTransform.decode``): what a DataLoader worker does per film under
``ecamp embed --preprocess-on gpu``, where the intensity policy, resize and normalisation run on the GPU.
``--no-opencv`` times ecamp as if OpenCV were not installed (its 8-bit table look-up is an optional fast path).

Prints CPU milliseconds per film and images per second of CPU time for each, and the ratio ecamp / torchxrayvision
(higher is faster for ecamp). Time is the process's CPU time (``time.process_time``, one thread), so that other
processes on a shared machine do not count; calls are interleaved so that what noise remains (cache and memory
contention) hits both alike.

A second table (alone: ``--only-8bit``) puts 8-bit files beside their decode floor: RG1 saved as an 8-bit grey JPEG
(quality 95), as an 8-bit grey PNG, and as a JPEG of the grey film in RGB, each through
``ecamp.get_transform("cxr-vit-b")`` (the MIMIC-CXR-JPG policy), next to Pillow's decode alone
(``Image.open(path).load()``, the least any Pillow-based reader can cost) and to the array round trip ecamp ran
before (the EXIF-upright copy, the conversion, the array, ``Image.fromarray``, the geometry, grey after resizing):
median CPU milliseconds, the ratios to the floor, and whether the two ecamp results are byte-identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _time_pair(a, b, repeats: int) -> tuple[float, float]:
    """CPU images per second of ``a`` and ``b``, calls alternating so that machine noise hits both alike."""
    a(), b()  # warm-up
    ta = tb = 0.0
    for _ in range(repeats):
        t0 = time.process_time()
        a()
        t1 = time.process_time()
        b()
        t2 = time.process_time()
        ta, tb = ta + t1 - t0, tb + t2 - t1
    return repeats / ta, repeats / tb


def _median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU milliseconds of each function, the calls interleaved (one of each per repeat)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def _eight_bit_rows(grey, tmp: Path, repeats: int) -> None:
    """The 8-bit JPEG and PNG table (module docstring)."""
    from PIL import Image, ImageOps

    import ecamp

    tf = ecamp.get_transform("cxr-vit-b")

    def array_path(path):  # what the eval transform computed before: upright copy, converted, array, image again
        im = ImageOps.exif_transpose(Image.open(path))
        arr = np.asarray(im.convert("L" if im.mode == "L" else "RGB"), dtype=np.uint8)
        img = Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")
        return tf._channels_and_normalise(tf.geometry(img).as_subclass(torch.Tensor), str(path))

    files = {"JPEG 8-bit grey": (tmp / "rg1.jpg", grey), "PNG 8-bit grey": (tmp / "rg1-8bit.png", grey),
             "JPEG 8-bit grey as RGB": (tmp / "rg1-rgb.jpg", grey.convert("RGB"))}
    print(f"\n{'8-bit file (cxr policy)':<24} {'ecamp ms':>9} {'before ms':>10} {'decode ms':>10} "
          f"{'ecamp/floor':>12} {'before/floor':>13} {'identical':>10}")
    for name, (path, im) in files.items():
        im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)
        ms = _median_ms({"ecamp": lambda p=path: tf(p), "before": lambda p=path: array_path(p),
                         "floor": lambda p=path: Image.open(p).load()}, repeats)
        same = torch.equal(tf(path), array_path(path))
        print(f"{name:<24} {ms['ecamp']:>9.1f} {ms['before']:>10.1f} {ms['floor']:>10.1f} "
              f"{ms['ecamp'] / ms['floor']:>12.2f} {ms['before'] / ms['floor']:>13.2f} {'yes' if same else 'NO':>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-opencv", action="store_true", help="time ecamp without its optional OpenCV path")
    parser.add_argument("--only-8bit", action="store_true", help="only the 8-bit JPEG/PNG table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # both pipelines are per-image CPU work; compare them on one core
    import ecamp.io

    if args.no_opencv:
        ecamp.io.tables._CV2 = False
    elif ecamp.io.tables._opencv() is not None:
        ecamp.io.tables._opencv().setNumThreads(1)  # one core, as for the others

    from pydicom.data import get_testdata_file

    import ecamp
    from ecamp.io import read_image

    dcm = get_testdata_file("RG1_UNCR.dcm")
    tmp = Path(tempfile.mkdtemp())
    png = tmp / "rg1.png"
    from PIL import Image

    grey = Image.fromarray((read_image(dcm, policy="minmax") * 255).round().astype(np.uint8))
    grey.save(png)
    if args.only_8bit:
        _eight_bit_rows(grey, tmp, args.repeats)
        return

    tf_cxr = ecamp.get_transform("cxr-vit-b")
    tf_bits = ecamp.get_transform("cxr-vit-b", image_policy="bits")
    ours = {
        "DICOM (mimic-cxr-jpg policy)": lambda: tf_cxr(dcm),
        "DICOM (bits policy)": lambda: tf_bits(dcm),
        "PNG 8-bit": lambda: tf_cxr(png),
        "DICOM (CPU half, gpu mode)": lambda: tf_cxr.decode(dcm),
    }
    try:
        import skimage.io
        import torchxrayvision as xrv
    except ImportError as e:
        print(f"torchxrayvision is not importable ({e}); printing ecamp's numbers only.")
        xrv = None
    theirs = {}
    if xrv is not None:
        crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)

        def xrv_dcm():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = xrv.utils.read_xray_dcm(dcm)
            return torch.from_numpy(resize(crop(img[None])))

        def xrv_png():
            img = xrv.datasets.normalize(skimage.io.imread(png), 255)
            return torch.from_numpy(resize(crop(img[None])))

        theirs = {"DICOM (mimic-cxr-jpg policy)": xrv_dcm, "DICOM (bits policy)": xrv_dcm, "PNG 8-bit": xrv_png,
                  "DICOM (CPU half, gpu mode)": xrv_dcm}

    print(f"OpenCV look-up: {'on' if ecamp.io.tables._opencv() is not None else 'off'}")
    print(f"{'input':<30} {'ecamp ms':>9} {'xrv ms':>8} {'ecamp img/s':>12} {'xrv img/s':>10} {'ratio':>7}")
    for name, fn in ours.items():
        if name in theirs:
            a, b = _time_pair(fn, theirs[name], args.repeats)
            print(f"{name:<30} {1e3 / a:>9.1f} {1e3 / b:>8.1f} {a:>12.2f} {b:>10.2f} {a / b:>7.2f}")
        else:
            a, _ = _time_pair(fn, lambda: None, args.repeats)
            print(f"{name:<30} {1e3 / a:>9.1f} {'-':>8} {a:>12.2f} {'-':>10} {'-':>7}")
    _eight_bit_rows(grey, tmp, args.repeats)


if __name__ == "__main__":
    main()
