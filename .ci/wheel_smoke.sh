#!/usr/bin/env bash
# The wheel smoke stage of .ci/run: build a wheel of SRC, install it (non-editable, no extras) into a second fresh
# virtual environment and run tests/helpers/smoke_wheel.py there, from a folder outside SRC.
#
#   bash .ci/wheel_smoke.sh SRC WORK      (with the first stage's venv active: `pip install -e ".[dev]"`)
#
# The second environment does not download torch & co. again: it sees, through a .pth file, a folder of links to
# exactly the distributions that the wheel's core requirements need (their closure, read from the active venv's
# metadata), so the train extra's packages (transformers, tokenizers, scikit-learn, ...) are absent as after a plain
# `pip install ecamp`. pip installs the wheel WITH dependency resolution: a core requirement that the closure
# lacks would come from the index, and a core requirement on transformers would install it and fail the smoke test.
set -euo pipefail
src="$(cd "$1" && pwd)"
work="$2"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
start=$SECONDS

# Built from a copy of the tracked and unignored files only (configs/ symlink included), so that build outputs
# (build/, an editable install's ecamp.egg-info/SOURCES.txt) can never put files into the wheel.
mkdir -p "$work/wheel-src"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$src" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp -a --parents -t "$work/wheel-src")
else
    cp -a "$src/." "$work/wheel-src"
    rm -rf "$work/wheel-src/build" "$work/wheel-src"/*.egg-info
fi
python -m pip wheel --quiet --no-deps -w "$work/dist" "$work/wheel-src"
wheel="$(ls "$work"/dist/ecamp-*.whl)"
n_presets="$(find "$src/ecamp/train/presets" -name '*.yaml' -path '*/presets/*/*' | wc -l)"

# The wheel carries the package data and nothing of the checkout's top level (configs/ is a symlink to the presets).
python - "$wheel" "$n_presets" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
yamls = [n for n in names if n.startswith("ecamp/train/presets/") and n.endswith(".yaml")]
assert len(yamls) == int(sys.argv[2]), f"the wheel has {len(yamls)} preset files, the checkout {sys.argv[2]}"
for kind in ("pretrain", "finetune"):
    assert any(n.startswith(f"ecamp/train/presets/{kind}/") for n in yamls), f"no {kind} presets in the wheel"
for required in ("ecamp/weights_manifest.json", "ecamp/py.typed", "ecamp/train/presets/__init__.py"):
    assert required in names, f"{required} is not in the wheel"
stray = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} - {"ecamp"})
assert not stray, f"the wheel has top-level entries besides ecamp/: {stray}"
print(f"wheel {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, {len(yamls)} presets, weights_manifest.json")
EOF

# The closure of the wheel's core requirements in the active venv -> a folder of links to their files.
core="$work/core-site"
python - "$wheel" "$core" <<'EOF'
import email
import os
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

wheel, core = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
todo = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
todo = [r for r in todo if r.marker is None or r.marker.evaluate({"extra": ""})]  # not the extras' requirements
site = Path(sysconfig.get_paths()["purelib"]).resolve()
seen: dict[str, metadata.Distribution] = {}
visited: set[tuple[str, str]] = set()
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        continue  # pip will fetch it from the index
    if not req.specifier.contains(dist.version, prereleases=True):
        continue  # the wrong version: pip will fetch the right one
    seen[name] = dist
    for extra in ("", *sorted(req.extras)):  # torch needs cuda-toolkit[cublas,cudart,...]
        if (name, extra) in visited:
            continue
        visited.add((name, extra))
        for r in dist.requires or []:
            dep = Requirement(r)
            if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                todo.append(dep)
core.mkdir(parents=True)
entries: set[str] = set()
for dist in seen.values():
    base = Path(dist.locate_file("")).resolve()
    assert base == site, f"{dist.metadata['Name']} lives in {base}, not {site}"
    for f in dist.files or []:
        top = f.parts[0]
        if top != ".." and not top.endswith(".pth") and top != "__pycache__":
            entries.add(top)
for top in sorted(entries):
    if (site / top).exists():
        os.symlink(site / top, core / top)
print(f"core closure from the first venv: {len(seen)} distributions ({', '.join(sorted(seen))})")
EOF

python -m venv "$work/wheel-venv"
wpy="$work/wheel-venv/bin/python"
"$wpy" -c 'import sysconfig, sys; open(sysconfig.get_paths()["purelib"] + "/zz-ecamp-core-deps.pth", "w").write(sys.argv[1] + "\n")' "$core"
"$wpy" -m pip install --quiet "$wheel"
"$wpy" -m pip check

mkdir -p "$work/run"
cd "$work/run"
HF_HUB_OFFLINE=1 ECAMP_HOME="$work/run/ecamp-home" HF_HOME="$work/run/hf-home" \
    "$wpy" -I "$src/tests/helpers/smoke_wheel.py" --checkout "$src" --presets "$n_presets" --no-train-deps
echo "wheel smoke stage: $((SECONDS - start)) s"
