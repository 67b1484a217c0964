#!/usr/bin/env bash
# `make compat-check`: the committed HEAD built and tested here, on the CPU, against the
# PyTorch / torchvision / Triton the GPU machine runs (device tool's KINDS.md: torch 2.11,
# Triton 3.6), so that a lent GPU's few minutes are not spent finding that the extension
# no longer compiles against its torch. Everything else (timm, pytest, the CUDA wheels'
# libraries) comes from this project's .venv through a .pth file; the check's own venv,
# wheels and clone live under build/compat-torch$TORCH. ~12 min on 2 cores (build ~5).
# Result: benchmarks/results/compat-torch$TORCH.md (versions, build, the suite's summary).
# COMPAT_PYTHON=python3.12: the same on another Python (…-py3.12.md).
set -euo pipefail

TORCH=${COMPAT_TORCH:-2.11.0}
VISION=${COMPAT_VISION:-0.26.0}
TRITON=${COMPAT_TRITON:-3.6.0}
# Triton 3.6's interpreter calls int() on a 1-element array, an error from NumPy 2.4 on
# (a 5-line kernel with range(program_id, n, num_programs) fails the same way)
NUMPY=${COMPAT_NUMPY:-2.3.5}

ROOT=$(pwd)
MAIN_PY=$ROOT/.venv/bin/python
test -x "$MAIN_PY" || { echo "compat-check: run 'make build' first (no .venv)" >&2; exit 2; }
# COMPAT_PYTHON=python3.12: another interpreter (the GPU machine's is 3.12); its venv then
# installs requirements*.txt itself (the CUDA wheels with them, ~3 GB)
BASE_PY=${COMPAT_PYTHON:-$("$MAIN_PY" -c 'import sys; print(sys._base_executable)')}
minor() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }
PYVER=$(minor "$BASE_PY")
TAG=torch$TORCH$([ "$PYVER" = "$(minor "$MAIN_PY")" ] || echo "-py$PYVER")
DIR=$ROOT/build/compat-$TAG
OUT=$ROOT/benchmarks/results/compat-$TAG.md
rm -f "$DIR/build.log" "$DIR/tests.log"  # a second run reports only itself

wheel() { compgen -G "$DIR/whl/$1-$2[-+]*.whl" | head -n 1 || true; }
mkdir -p "$DIR/whl"
if [ -z "$(wheel torch "$TORCH")" ] || [ -z "$(wheel torchvision "$VISION")" ]; then
    "$MAIN_PY" -m pip download -q --no-deps --python-version "$PYVER" --only-binary=:all: \
        -d "$DIR/whl" "torch==$TORCH" "torchvision==$VISION"
fi
test -x "$DIR/venv/bin/python" || "$BASE_PY" -m venv "$DIR/venv"
PIP=("$DIR/venv/bin/python" -m pip install -q)
"${PIP[@]}" --no-deps "$(wheel torch "$TORCH")" "$(wheel torchvision "$VISION")" \
    "triton==$TRITON" "numpy==$NUMPY"
SITE=$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$TAG" = "torch$TORCH" ]; then
    "$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/zz_main_venv.pth"
    REST="the other packages (the CUDA wheels' libraries too) from this project's .venv"
else  # the requirements resolve against the installed torch; NumPy stays the pinned one
    grep -v -E "^(torch|torchvision|numpy)\b" "$ROOT/requirements.txt" > "$DIR/requirements.txt"
    "${PIP[@]}" -r "$DIR/requirements.txt" "numpy==$NUMPY"
    "${PIP[@]}" --no-deps -r "$ROOT/requirements-nodeps.txt"
    REST="requirements*.txt (and torch's own CUDA wheels) installed for it"
fi

rm -rf "$DIR/repo"
git clone -q "$ROOT" "$DIR/repo"
REV=$(git -C "$DIR/repo" rev-parse --short HEAD)
cd "$DIR/repo"
VERSIONS=$("$DIR/venv/bin/python" -c 'import platform, numpy, torch, triton
print(f"Python {platform.python_version()}, torch {torch.__version__}, Triton {triton.__version__}, NumPy {numpy.__version__}")')

start=$(date +%s)
build_ok=yes
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2} \
    "$DIR/venv/bin/python" setup.py -q build_ext --inplace > "$DIR/build.log" 2>&1 || build_ok=no
build_s=$(( $(date +%s) - start ))
built=""
for so in dtl_kernels/*.so; do
    [ -e "$so" ] && built+="$(basename "${so%%.*}") "
done

tests_ok=no
summary="not run (the build failed: $DIR/build.log)"
if [ "$build_ok" = yes ]; then
    start=$(date +%s)
    # test_wheel_check builds fresh venvs, which do not see the .pth above
    PYTHONPATH=$DIR/repo "$DIR/venv/bin/python" -m pytest -q -n 2 --dist loadfile \
        -p no:cacheprovider tests --deselect tests/test_wheel_check.py > "$DIR/tests.log" 2>&1 \
        && tests_ok=yes
    summary="$(tail -n 1 "$DIR/tests.log") ($(( $(date +%s) - start )) s; pytest's status: $tests_ok)"
fi

cat > "$OUT.tmp" <<EOF
# The GPU machine's PyTorch, built and tested on the CPU (\`make compat-check\`)

$(date -u +%Y-%m-%d), rev $REV, $(uname -m), $(nproc) cores: $VERSIONS; $REST
(\`benchmarks/compat_check.sh\`).

- build (\`setup.py build_ext --inplace\`, CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}): **$build_ok**
  in $build_s s; extensions: $built
- test suite (\`tests/\` but \`test_wheel_check.py\`, CPU; skipped: the GPU-only tests and
  those whose tools are missing): $summary
EOF
if [ -f "$DIR/tests.log" ] && [ "$tests_ok" = no ]; then
    { echo; echo "Failed (the first 30; all in \`build/compat-$TAG/tests.log\`):"; echo
      awk '/^(FAILED|ERROR)/ && n++ < 30 { print "    " $0 }' "$DIR/tests.log"; } >> "$OUT.tmp"
fi
mv "$OUT.tmp" "$OUT"
cat "$OUT"
[ "$tests_ok" = yes ]
