#!/usr/bin/env bash
# Fetch, HERE (a machine with internet to PyPI), the wheels that the lent GPU machine lacks, into .whl/
# at the repository root; benchmarks/gpu/session.sh installs them THERE (docs/benchmarks.md, "When a
# GPU is lent"). The machine's own packages (torch 2.11.0+cu130, numpy, pandas, scipy, scikit-learn,
# transformers, peft, safetensors, huggingface-hub, pyyaml, attrs, typing-extensions, zipp, tqdm,
# einops, opt-einsum, linear-operator, torchvision, setuptools, ninja, pytest ...) are NOT fetched:
# a second version in /tmp/site would shadow theirs. Versions are those of the project's CPU venv.
#
#     bash benchmarks/gpu/fetch.sh            # from the repository root; PYTHON=... to pick pip's python
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

# name==version  # why (who requires it)
WHEELS=(
  diffusers==0.42.1                 # diffattr.models, train, generate, latent
  importlib_metadata==10.2.0        # diffusers' Requires-Dist (python 3.12 uses the stdlib's)
  lazy-importer==0.1.0              # importlib_metadata's Requires-Dist (python < 3.15)
  zarr==3.1.6                       # diffattr.storage, featurize, ground_truth
  numcodecs==0.16.6                 # zarr
  donfig==0.8.1.post1               # zarr
  google-crc32c==1.9.0              # zarr
  jsonschema==4.26.0                # diffattr.settings.experiment (benchmarks/presets.py) validates presets
  jsonschema-specifications==2025.9.1  # jsonschema
  referencing==0.37.0               # jsonschema
  rpds-py==2026.9.1                 # jsonschema, referencing
  curvlinops-for-pytorch==3.0.1     # tests/test_kfac.py only (importorskip): not run by session.sh
  backpack-for-pytorch==1.7.1       # curvlinops
  einconv==0.1.0                    # curvlinops
  unfoldNd==0.2.3                   # backpack
)
# Not fetched: snakemake and its plugins (only validate_config, the workflow's config check, imports
# them; presets.py -> settings.experiment needs jsonschema only), playwright (tests/test_report.py).

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
mkdir -p .whl
names=()
for spec in "${WHEELS[@]}"; do names+=("$spec"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${names[@]}"
# traker is only on PyPI as an sdist: a pure-Python wheel is built here (py3-none-any, any machine)
"$PYTHON" -m pip wheel -q --no-deps --no-binary traker -w .whl traker==0.3.2  # diffattr.project (trak.projectors)
ls .whl/traker-0.3.2-py3-none-any.whl >/dev/null
# fast_jl: an sdist, built THERE with nvcc against the machine's torch (session.sh). Not through
# `pip download`: pip prepares the sdist's metadata, whose setup.py needs a CUDA build of torch
# (CUDA_HOME). Fetched from the package index's simple API instead, its sha256 checked.
"$PYTHON" - <<'PY'
import hashlib, json, urllib.request
NAME, SHA256 = "fast_jl-0.1.3.tar.gz", "216100e9778da38b906a3c2a18b7c9e93bc395576e6943c7f920c98cce179775"
request = urllib.request.Request("https://pypi.org/simple/fast-jl/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
entry = next(f for f in json.load(urllib.request.urlopen(request, timeout=60))["files"] if f["filename"] == NAME)
data = urllib.request.urlopen(entry["url"], timeout=60).read()
if hashlib.sha256(data).hexdigest() != SHA256 or entry["hashes"].get("sha256") != SHA256:
    raise SystemExit(f"{NAME}: sha256 differs from the pinned one")
open(f".whl/{NAME}", "wb").write(data)
PY

# One version of each: two stop the whole install there.
dupes=$(find .whl -maxdepth 1 -type f -printf '%f\n' | sed -E 's/^([A-Za-z0-9_.]+)-[0-9].*/\1/' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "fetch.sh: more than one version of: $dupes (remove the older from .whl/)" >&2; exit 1; }

echo "Requires-Dist of the wheels (check each against the machine's packages or this list):"
for w in .whl/*.whl; do
  { unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true; } \
    | sed "s|^Requires-Dist: |  $(basename "$w" | cut -d- -f1): |"
done
find .whl -maxdepth 1 -type f -printf '%10s  %f\n' | sort -k2
du -sh .whl
echo "tracked: $(git ls-files -z | du -ch --files0-from=- | tail -1)   (the working tree that travels: at most 64 MiB)"
