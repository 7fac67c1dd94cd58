#!/usr/bin/env bash
# The wheels bench/gpu_suite.sh carries to a GPU machine that has only torch, triton and numpy (and torch's
# own requirements) and no network: everything else the suite imports (deepspeed built with DS_BUILD_OPS=0,
# megatron-core, torchao, flash-linear-attention, transformers, sentencepiece, ...), at constraints.txt's
# versions, for this Python and platform. Run here, with the network:
#
#   bash bench/gpu_wheels.sh [DEST]          # DEST: default .whl (git-ignored); replaced only on success
#   bash bench/gpu_wheels.sh --check [DEST]  # GPU_PYTHON = this Python: install DEST into a fresh environment
#                                            # that has only the torch stack (--no-index), run the suite at toy
#                                            # size; another GPU_PYTHON: pip resolves DEST for that Python offline
#
# The wheels are for the GPU machine's Python, GPU_PYTHON (default 3.12: the lent H200's python3, see the
# device library's KINDS.md), x86-64 manylinux: binary wheels built for this machine's Python would not
# install there (found on the H200 in session 5: cp311 pydantic-core/zstandard/megatron-core).
#
# What to carry is what pip would install on top of torch + triton + numpy: an environment that sees only
# those (a venv whose .pth points at links to them) resolves bench/gpu_requirements.txt with pip's
# --dry-run --report; the list goes to DEST/requirements.txt (exact versions), installed on the GPU with
# `pip install --no-index --no-deps --target`. PYTHON: the interpreter with torch (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
dest=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
gpu_py=${GPU_PYTHON:-3.12}
local_py=$($py -c 'import sys; print("%d.%d" % sys.version_info[:2])')
gpu_tags=(--python-version "$gpu_py" --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
base_py=$($py -c 'import sys; print(sys._base_executable)')
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# A venv that sees torch, triton, numpy and torch's requirements only (links in $tmp/stack).
$py - "$tmp/stack" <<'EOF'
import importlib.metadata as md, os, re, sys
dest = sys.argv[1]
os.makedirs(dest)
todo, seen = ["torch", "triton", "numpy"], set()
while todo:
    name = todo.pop()
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    if dist.metadata["Name"].lower() in seen:
        continue
    seen.add(dist.metadata["Name"].lower())
    # with their requirements (torch's come with every torch install)
    todo += [re.split(r"[ ;<>=!~\[(]", r)[0] for r in dist.requires or [] if "extra ==" not in r]
    site = str(dist.locate_file(""))
    for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].startswith("..")}:
        src, link = os.path.join(site, top), os.path.join(dest, top)
        if os.path.exists(src) and not os.path.exists(link):
            os.symlink(src, link)
print("torch stack:", ", ".join(sorted(seen)))
EOF
"$base_py" -m venv --without-pip "$tmp/venv"
echo "$tmp/stack" > "$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/stack.pth"
pip_=("$py" -m pip --python "$tmp/venv/bin/python")

if [ "$check" = 1 ]; then
  [ -f "$dest/requirements.txt" ] || { echo "error: $dest/requirements.txt missing: run bash bench/gpu_wheels.sh first" >&2; exit 2; }
  if [ "$gpu_py" != "$local_py" ]; then  # wheels for another Python: pip resolves them offline for it
    "$py" -m pip install -q --dry-run --no-index --no-deps --find-links "$dest" "${gpu_tags[@]}" \
      --target "$tmp/site" -r "$dest/requirements.txt"
    echo "check passed: every wheel of $dest installs offline for Python $gpu_py (the toy suite needs GPU_PYTHON=$local_py)"
    exit 0
  fi
  "$py" -m pip install -q --no-index --no-deps --find-links "$dest" --target "$tmp/site" -r "$dest/requirements.txt"
  echo "installed $(wc -l < "$dest/requirements.txt") wheels with --no-index into $tmp/site"
  PYTHON="$tmp/venv/bin/python" SITE="$tmp/site" GPU_SUITE_TOY=1 bash bench/gpu_suite.sh "$tmp/out"
  cat "$tmp"/out/*.jsonl
  grep -E '^(median over|config:)' "$tmp/out/gpu_suite.log" || true
  if grep -E '^### (exit [^0]|skipped)| failed: ' "$tmp/out/gpu_suite.log"; then
    echo "error: a step failed or was skipped (above; the log: $tmp/out/gpu_suite.log, kept)" >&2
    trap - EXIT
    exit 1
  fi
  echo "check passed: every step of the toy suite ran and exited 0"
  exit 0
fi

# What pip would install there (network), at constraints.txt's versions except the torch stack's own.
grep -viE '^(torch|triton|numpy)==' constraints.txt > "$tmp/constraints.txt"
"${pip_[@]}" install -q --dry-run --report "$tmp/report.json" -c "$tmp/constraints.txt" -r bench/gpu_requirements.txt
$py -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print("{name}=={version}".format(**item["metadata"]))' "$tmp/report.json" | sort > "$tmp/requirements.txt"
mkdir "$tmp/whl"
while read -r req; do  # a wheel for the GPU's Python, else the sdist (built below)
  "$py" -m pip download -q --no-deps "${gpu_tags[@]}" -d "$tmp/whl" "$req" 2> /dev/null \
    || "$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/whl" "$req"
done < "$tmp/requirements.txt"
for sdist in "$tmp"/whl/*.tar.gz "$tmp"/whl/*.zip; do  # deepspeed and other source-only packages
  [ -e "$sdist" ] || continue
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/whl" "$sdist"
  rm "$sdist"
done
cp "$tmp/requirements.txt" "$tmp/whl/requirements.txt"
rm -rf "$dest.old"
[ -e "$dest" ] && mv "$dest" "$dest.old"
mv "$tmp/whl" "$dest"
rm -rf "$dest.old"
du -b "$dest"/*.whl | sort -n | awk '{printf "%9.2f MiB  %s\n", $1 / 2^20, $2}'
echo "total: $(du -sb "$dest" | awk '{printf "%.1f MiB", $1 / 2^20}') in $(ls "$dest"/*.whl | wc -l) wheels ($dest)"
