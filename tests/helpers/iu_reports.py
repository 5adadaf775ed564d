"""The Indiana University chest X-ray reports shipped inside the torchxrayvision wheel, read in place.

Their licence (CC BY-NC-ND 4.0) forbids copying them into this repository, so they are only ever read from the
installed package (``pip install torchxrayvision``, a test dependency).
"""

from __future__ import annotations

import importlib.metadata
import tarfile
import xml.etree.ElementTree as ET
from functools import lru_cache


@lru_cache(maxsize=1)
def iu_reports() -> tuple[str, ...]:
    """FINDINGS followed by IMPRESSION of every report that has either, in file order."""
    path = importlib.metadata.distribution("torchxrayvision").locate_file("torchxrayvision/data/NLMCXR_reports.tgz")
    reports = []
    with tarfile.open(str(path)) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                         key=lambda m: int(m.name.rsplit("/", 1)[-1].split(".")[0]))
        for m in members:
            root = ET.fromstring(tar.extractfile(m).read())
            parts = {el.get("Label"): (el.text or "").strip() for el in root.iter("AbstractText")}
            text = " ".join(p for p in (parts.get("FINDINGS"), parts.get("IMPRESSION")) if p)
            if text:
                reports.append(text)
    return tuple(reports)
