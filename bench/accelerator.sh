#!/usr/bin/env bash
# The one accelerator check: ofq_jax on the accelerator image's own stack (Python 3.12,
# jax 0.11 + CUDA, flax, optax, orbax; no ml_collections, no TensorFlow).
#
#   bash bench/accelerator.sh --prepare   # here: wheels the image lacks -> .whl/, fixtures -> .device_fixtures/
#   bash bench/accelerator.sh             # there (device tool, carry .whl and .device_fixtures)
#
# On the accelerator machine it
#   1. installs the carried wheels and ofq_jax with --no-deps over the image's jax,
#   2. records versions and devices,
#   3. runs the test suite minus what needs TensorFlow or a notebook kernel (on the CPU
#      backend with 8 fake devices, as CI does; pytest-xdist spreads it over the cores),
#   4. times the jitted QAT step of DeiT-S W2A2 with its KD teacher at batch 64 on the GPU in
#      three modes: fake-quant at precision 'highest', integer forward, integer forward with
#      a bf16 backward (bench/train_step.py --matmul / --backward),
#   5. times inference (float vs fake-quant vs packed integer, DeiT-T / DeiT-S, batch 64),
# and writes $OUT/accelerator.json (+ pytest.log, junit.xml, train_step_*.json,
# inference.json). Budget: about 8 minutes.
# ACCEL_QUICK=1 runs a small subset, for trying the script on a CPU box first.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(ml-collections==1.1.0 tensorboardX==2.6.5)
if [[ "${1:-}" == "--prepare" ]]; then
  grep -qxF "/.device_fixtures/" .git/info/exclude || echo "/.device_fixtures/" >> .git/info/exclude
  rm -rf .whl .device_fixtures && mkdir -p .whl .device_fixtures
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp -d .whl "${WHEELS[@]}"
  cp ../shared/fixtures/deit_*.{npz,json} ../shared/fixtures/quantizers_*.{npz,json} .device_fixtures/
  du -sh .whl .device_fixtures
  exit 0
fi

OUT="${OUT:-/tmp/ofq_accelerator}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -z "${ACCEL_SKIP_INSTALL:-}" ]]; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi
[[ -d .device_fixtures ]] && export OFQ_FIXTURES="$PWD/.device_fixtures"

$PY - <<'EOF' > "$OUT/versions.json"
import importlib.metadata as m, json, platform
import jax
out = {"python": platform.python_version(),
       "devices": [str(d) for d in jax.devices()],
       "default_backend": jax.default_backend()}
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy",
             "torch", "pytest", "pytest-xdist"):
  try:
    out[name] = m.version(name)
  except m.PackageNotFoundError:
    out[name] = None
print(json.dumps(out))
EOF
cat "$OUT/versions.json"

# 3. The suite on the image's jax (CPU backend, 8 fake devices, as conftest sets up).
IGNORE=(--ignore=tests/integration/test_imagenet.py --ignore=tests/unit/data
        --ignore=tests/integration/test_notebooks.py)
if [[ -n "${ACCEL_QUICK:-}" ]]; then
  SELECT=(tests/unit/test_compat.py tests/unit/quant)
  XDIST=()
else
  SELECT=(tests)
  XDIST=(-n "${ACCEL_WORKERS:-8}" --dist load)
  $PY -c "import xdist" 2>/dev/null || XDIST=()
fi
start=$(date +%s)
timeout "${ACCEL_TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
    "${IGNORE[@]}" --junitxml="$OUT/junit.xml" "${SELECT[@]}" > "$OUT/pytest.log" 2>&1
test_rc=$?
test_seconds=$(( $(date +%s) - start ))
tail -n 25 "$OUT/pytest.log"

# 4. The QAT step on the default backend (the GPU there).
bench() {  # name, args...
  local name=$1; shift
  timeout "${ACCEL_BENCH_TIMEOUT:-75}" env JAX_PLATFORMS= $PY bench/train_step.py "$@" --json \
      > "$OUT/train_step_$name.json" 2> "$OUT/train_step_$name.log" || echo "{}" > "$OUT/train_step_$name.json"
  tail -n 1 "$OUT/train_step_$name.json"
}
if [[ -n "${ACCEL_QUICK:-}" ]]; then
  bench tiny_b8_fake --model tiny --bits 2 --batch 8 --steps 2 --tracking off
  bench tiny_b8_integer --model tiny --bits 2 --batch 8 --steps 2 --tracking off --matmul integer
  INFER=(--models tiny --batch 8 --steps 1)
else
  bench small_b64_fake --model small --bits 2 --batch 64 --steps 10
  bench small_b64_integer --model small --bits 2 --batch 64 --steps 10 --matmul integer
  bench small_b64_integer_bf16 --model small --bits 2 --batch 64 --steps 10 --matmul integer \
      --backward bf16
  INFER=(--models tiny small --batch 64 --steps 5)
fi
# 5. Inference: float vs fake-quant vs packed integer.
timeout "${ACCEL_INFER_TIMEOUT:-90}" env JAX_PLATFORMS= $PY bench/inference.py "${INFER[@]}" \
    --json > "$OUT/inference.json" 2> "$OUT/inference.log" || echo "[]" > "$OUT/inference.json"
tail -c 600 "$OUT/inference.json"; echo

$PY - "$OUT" "$test_rc" "$test_seconds" <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET
out, rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {"versions": json.load(open(os.path.join(out, "versions.json"))),
           "pytest_exit": rc, "pytest_seconds": seconds}
try:
  root = ET.parse(os.path.join(out, "junit.xml")).getroot()
  suites = [root] if root.tag == "testsuite" else list(root)
  for key in ("tests", "failures", "errors", "skipped"):
    summary[key] = sum(int(s.get(key, 0)) for s in suites)
  summary["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites
                             for c in s.iter("testcase")
                             if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as e:
  summary["junit_error"] = str(e)
for path in sorted(glob.glob(os.path.join(out, "train_step_*.json"))):
  name = os.path.basename(path)[len("train_step_"):-len(".json")]
  try:
    summary["train_step_" + name] = json.loads(open(path).read().strip().splitlines()[-1])
  except (IndexError, ValueError):
    summary["train_step_" + name] = None
try:
  summary["inference"] = json.loads(open(os.path.join(out, "inference.json")).read() or "[]")
except ValueError:
  summary["inference"] = None
json.dump(summary, open(os.path.join(out, "accelerator.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "versions"}))
EOF
exit "$test_rc"
