#!/usr/bin/env bash
# The Pallas kernels' GPU check, as one script for a lent GPU machine (repo copied there,
# jax + CUDA preinstalled, no internet):
#
#   scripts/gpu_check.sh                  tests compiled on the GPU, benchmark, knob sweep
#   scripts/gpu_check.sh --smoke          the same phases at CPU scale (interpret mode):
#                                         gpu-marked tests (they skip), benchmark --smoke
#   PHASES=bench,sweep scripts/gpu_check.sh      run only some phases (tests, bench, sweep)
#
# Writes into $OUT (default ./gpu_check_out): env.json, pytest.log, pytest.xml,
# kernels.log, kernels.json (the benchmark's result, also when it was cut short),
# sweep.json, and gpu_check.json (one summary object, also printed last). Each phase has its
# own time limit (TESTS_TIMEOUT, BENCH_TIMEOUT, SWEEP_TIMEOUT seconds; defaults fit the
# whole run in about 7 minutes) and a failing phase does not stop the next.
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=full
[ "${1:-}" = "--smoke" ] && MODE=smoke
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
PHASES="${PHASES:-tests,bench,sweep}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-180}"
SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-120}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

has_phase() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
now() { date +%s; }

# the project, without dependencies, unless it already imports from outside the checkout
if ! (cd / && "$PY" -c "import jaxvllm, pallas_kernels") >/dev/null 2>&1; then
    { "$PY" -m pip install -q --no-deps -e . \
        || "$PY" -m pip install -q --no-deps --no-build-isolation -e . ; } >"$OUT/install.log" 2>&1 \
        || echo "pip install -e . failed (see $OUT/install.log); running from the checkout"
fi

"$PY" - >"$OUT/env.json" 2>>"$OUT/install.log" <<'EOF'
import json, subprocess, jax
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    smi = None
print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": smi}))
EOF
echo "environment: $(cat "$OUT/env.json")"

tests_rc=skipped; bench_rc=skipped; sweep_rc=skipped
tests_s=0; bench_s=0; sweep_s=0

if has_phase tests; then
    t0=$(now)
    if [ "$MODE" = smoke ]; then
        sel=(tests/test_kernels.py -m gpu)  # on CPU they skip: the selection itself is checked
    else
        sel=(tests/test_kernels.py)  # on a GPU every kernel test runs compiled, not interpreted
    fi
    timeout "$TESTS_TIMEOUT" "$PY" -m pytest "${sel[@]}" -q -rs -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
    tests_rc=$?
    tests_s=$(( $(now) - t0 ))
    tail -n 5 "$OUT/pytest.log"
fi

if has_phase bench; then
    t0=$(now)
    args=(--json-out "$OUT/kernels.json")
    [ "$MODE" = smoke ] && args+=(--smoke)
    timeout "$BENCH_TIMEOUT" "$PY" benchmarks/kernels.py "${args[@]}" >"$OUT/kernels.log" 2>&1
    bench_rc=$?
    bench_s=$(( $(now) - t0 ))
    grep -v '^{' "$OUT/kernels.log" | tail -n 40
fi

if has_phase sweep && [ "$MODE" = full ]; then
    t0=$(now)
    timeout "$SWEEP_TIMEOUT" "$PY" benchmarks/kernels.py --sweep --variants triton \
        --no-baselines --skip kv_write,scan --iters 10 --json-out "$OUT/sweep.json" \
        >"$OUT/sweep.log" 2>&1
    sweep_rc=$?
    sweep_s=$(( $(now) - t0 ))
fi

"$PY" - "$OUT" "$MODE" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" "$sweep_rc" "$sweep_s" <<'EOF' | tee "$OUT/gpu_check.json"
import json, os, sys
import xml.etree.ElementTree as ET

out, mode, t_rc, t_s, b_rc, b_s, s_rc, s_s = sys.argv[1:]
summary = {"check": "gpu_check", "mode": mode,
           "env": json.load(open(os.path.join(out, "env.json"))),
           "phases": {"tests": {"rc": t_rc, "seconds": int(t_s)},
                      "bench": {"rc": b_rc, "seconds": int(b_s)},
                      "sweep": {"rc": s_rc, "seconds": int(s_s)}}}
xml_path = os.path.join(out, "pytest.xml")
if os.path.exists(xml_path):
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["tests"]["failed"] = failed[:50]
for name in ("kernels", "sweep"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        r = json.load(open(path))
        summary[name] = {s: {k: v.get(k) for k in ("best_kernel", "speedup_vs", "target_met")}
                         | {"best": v["results"].get(v.get("best_kernel"), {})}
                         for s, v in r.get("shapes", {}).items()}
        summary[name + "_complete"] = r.get("complete", False)
print(json.dumps(summary))
EOF
