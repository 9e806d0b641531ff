#!/usr/bin/env bash
# Check that the project works with one torch/triton pair (e.g. the oldest that pyproject.toml allows):
#
#     scripts/check_versions.sh TORCH_VERSION TRITON_VERSION        # e.g. scripts/check_versions.sh 2.11.0 3.6.0
#
# Makes a throwaway virtual environment, installs exactly that torch and triton from PyPI together with the
# project's other dependencies (read from pyproject.toml) and pytest, installs the project with
# `pip install --no-deps -e .` (so nothing can move the pinned pair), then runs:
#   1. the kernel tests (tests/kernels: Triton's interpreter on a machine without CUDA, the GPU where there is one)
#   2. the static compile report, `python -m kernels.report --quick` (without TRITON_INTERPRET; no GPU needed)
#   3. the model tests (tests/gpt, tests/test_layers.py)
#   4. the training tests (tests/train)
# and ends with one line: `check_versions: PASS|FAIL torch X triton Y ...`. Exit status 0 on PASS.
#
# Environment: PYTHON (the interpreter to make the venv with, default python3), KEEP_VENV=1 (keep the venv and the
# logs, in a new directory under ${TMPDIR:-/tmp} whose path is printed; by default it is removed at the end).
# The torch wheel for Linux on PyPI is a CUDA build that pulls ~3 GB of nvidia-* wheels; it runs on CPU too.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 TORCH_VERSION TRITON_VERSION   (e.g. $0 2.11.0 3.6.0)" >&2
    exit 2
fi
torch_version=$1
triton_version=$2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/tritongpt-check.XXXXXX")
venv=$work/venv
start=$SECONDS

cleanup() {
    if [[ ${KEEP_VENV:-0} == 1 ]]; then
        echo "check_versions: kept $work (venv and logs)"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

log() { echo "check_versions: $*"; }

log "torch $torch_version, triton $triton_version, $("$python" --version 2>&1), venv $venv"
"$python" -m venv "$venv"
py=$venv/bin/python

# The project's dependencies other than torch and triton, plus its dev extra, from pyproject.toml.
mapfile -t others < <("$py" - "$root/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = project["dependencies"] + project.get("optional-dependencies", {}).get("dev", [])
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
    if name not in ("torch", "triton"):
        print(dep)
EOF
)
log "installing torch==$torch_version triton==$triton_version ${others[*]}"
# One resolve, so no other package can move the pinned pair; pip's output goes to $work/install.log.
if ! { "$py" -m pip install --disable-pip-version-check "torch==$torch_version" "triton==$triton_version" "${others[@]}" &&
       "$py" -m pip install --disable-pip-version-check --no-deps -e "$root"; } >"$work/install.log" 2>&1; then
    tail -n 25 "$work/install.log" | sed 's/^/    | /'
    echo "check_versions: FAIL torch $torch_version triton $triton_version (install failed; $((SECONDS - start)) s)"
    exit 1
fi
installed=$("$py" -c "import numpy, torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')")
log "installed: $installed"

cd "$root"
results=()
failed=0
step() {  # step NAME COMMAND...: run it, keep its output in $work/NAME.log, echo its last line
    local name=$1
    shift
    local t0=$SECONDS status=0
    log "running $name: $*"
    "$@" >"$work/$name.log" 2>&1 || status=$?
    local last
    last=$(grep -v '^\s*$' "$work/$name.log" | tail -n 1 || true)
    echo "    $last"
    if [[ $status -eq 0 ]]; then
        results+=("$name ok")
    else
        results+=("$name FAILED")
        failed=1
        echo "    ($name exited $status; last lines of $work/$name.log:)"
        tail -n 25 "$work/$name.log" | sed 's/^/    | /'
    fi
    log "$name took $((SECONDS - t0)) s"
}

pytest_args=(-q -p no:cacheprovider)
step kernels "$py" -m pytest "${pytest_args[@]}" --basetemp "$work/pytest-kernels" tests/kernels
step report env -u TRITON_INTERPRET "$py" -m kernels.report --quick
step model "$py" -m pytest "${pytest_args[@]}" --basetemp "$work/pytest-model" tests/gpt tests/test_layers.py
step train "$py" -m pytest "${pytest_args[@]}" --basetemp "$work/pytest-train" tests/train

verdict=PASS
[[ $failed -eq 0 ]] || verdict=FAIL
echo "check_versions: $verdict torch $torch_version triton $triton_version ($installed; $(IFS=,; echo "${results[*]}" | sed 's/,/, /g'); $((SECONDS - start)) s)"
exit $failed
