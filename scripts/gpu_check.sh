#!/usr/bin/env bash
# The GPU check, as one script for a lent GPU machine (repo copied there, jax + CUDA + torch +
# transformers preinstalled, no internet):
#
#   scripts/gpu_check.sh           random-weight Qwen2.5-0.5B-shaped model (bfloat16), then:
#                                  nano-vllm throughput vs HF, where a decode step's device
#                                  time goes (batch 1 and 256), batch-1 latency vs HF, the
#                                  kernel tests compiled on the GPU, the kernel benchmark
#   scripts/gpu_check.sh --smoke   the same phases at CPU scale (2 layers, float32, tiny
#                                  workloads, kernels interpreted; gpu-marked tests skip)
#   PHASES=model,profile,throughput scripts/gpu_check.sh   these phases, in this order
#   COMPARE_HF=0 ATTENTION_BACKEND=pallas:triton_splitk scripts/gpu_check.sh
#   ENGINE_EXTRA="--no-wait-for-precompile" scripts/gpu_check.sh   engine flags for every phase
#   COMPARE_HF_THROUGHPUT=0 TESTS_K=decode scripts/gpu_check.sh   no HF in the throughput
#                                  phase only; only the kernel tests matching -k decode
#   PROFILE_CONTEXT=1024 scripts/gpu_check.sh   the profile phases' context (default 512)
#   PROFILE_BATCH_SIZES=1 scripts/gpu_check.sh   their batch sizes (default 1,256)
#
# Phases (PHASES, run in the order given; model first):
#   model        the random-weight model
#   throughput   nano-vllm throughput (with HF unless COMPARE_HF=0)
#   pthroughput  the same, multi-step calls not pipelined (--no-async-scheduling), no HF;
#                its programs are in the compilation cache by then (a warm start)
#   wthroughput  the same as throughput, its programs in the compilation cache, no HF
#   sthroughput  the same with single decode steps (no multi-step), no HF
#   bthroughput  the same with the precompile beside the steps (--no-wait-for-precompile)
#   athroughput  the same with asynchronous scheduling, no HF
#   eager        the same without the background precompile, no HF
#   latency      batch 1 (with HF unless COMPARE_HF=0, and the plain-XLA baseline unless
#                COMPARE_XLA=0)
#   coldstart    LLM(...) to first token in fresh processes: an empty compilation cache,
#                then warm, then warm with JAX's cache alone (no program cache)
#   profile      where a decode step's device time goes (step_profile.py)
#   scan, async, nocb, graphs, unfused   the profile's steps with the layers as a scan,
#                with asynchronous scheduling, with no command buffers, with XLA's own
#                command-buffer default, with the KV write and the attention as separate
#                kernels in multi-step calls (BACKEND+kv_scatter: no fused decode kernel)
#   mofusion     the profile's steps with XLA's multi-output Triton fusions (an unsupported
#                flag; 252 -> 241 kernels a greedy batch-1 step in benchmarks/kernel_count.py)
#   sampler      the engine's sampler against jax.random.categorical / jnp.argmax, and
#                its Pallas kernels (pallas_kernels/sampling.py) against both
#   mtests       tests/test_multi_step.py on the Pallas kernels
#   tests        tests/test_kernels.py compiled on the GPU
#   kernels, sweep   benchmarks/kernels.py
#   decode       the fused decode kernel's configurations (benchmarks/decode_kernel.py)
#   spread       the same at 256 rows whose contexts spread over 5-100% of the longest:
#                one program a row against splits by key ranges (--split-keys)
#   smallmm      the small-batch projection kernels' tilings against XLA on a layer's
#                projections (benchmarks/small_batch_matmul.py)
#   smallmmp     the same for each projection's tiling on its own, batch 1
#                (--per-projection)
#   sbtlatency   sblatency with each projection's fastest tiling in smallmmp (after it)
#   sblatency, sbprofile   the latency phase (no baselines) and the profile phase with
#                --small-batch-matmuls (those kernels in the engine's small decode steps)
#   dllatency, dlprofile   the latency phase (no baselines) and the profile phase with
#                --decode-layer-kernel (each layer of a decode step one kernel)
#   dlayer       whole layers three ways: XLA's projections, the small-batch kernels, one
#                kernel a layer at several K chunks and warps (benchmarks/decode_layer.py)
#   xlalatency   the latency phase (no baselines) with --no-small-batch-matmuls; the other
#                phases leave the choice to the engine's start-up measurement
#                (jaxvllm/engine/autotune.py; its results: "kernel_choices" in the
#                summary)
# The whole
# run ends by DEADLINE seconds (default 450): each phase gets its own limit, cut to what is
# left, and a failing phase does not stop the next.
# COMPARE_HF=0 leaves out the HF baselines (the nano-vllm one alone takes ~110 s on an H200).
#
# Writes into $OUT (default ./gpu_check_out): gpu_check.json (one summary object, also printed
# last), throughput.json, step_profile.json, sampler.json, latency.json, cold_start.json,
# kernels.json and logs.tgz.
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=full
[ "${1:-}" = "--smoke" ] && MODE=smoke
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
PHASES="${PHASES:-model,throughput,latency,dllatency,sblatency,xlalatency,dlayer,smallmm,pthroughput,coldstart,profile,sbprofile,tests,decode,spread,mtests,unfused,sthroughput,bthroughput,nocb,mofusion,sampler,athroughput,async,scan,eager,kernels}"
DEADLINE="${DEADLINE:-450}"
WORK="$(mktemp -d)"
MODEL_DIR="$WORK/model"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# run_phase NAME LIMIT CMD...: runs CMD under min(LIMIT, time left - 15 s), log in $WORK/NAME.log
declare -A RC SECS
run_phase() {
    local name=$1 limit=$2; shift 2
    local budget=$(( $(left) - 15 ))
    [ "$budget" -lt "$limit" ] && limit=$budget
    if [ "$limit" -lt 20 ]; then
        RC[$name]=no_time; SECS[$name]=0; echo "== $name: skipped (no time left)"; return
    fi
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    # SIGINT first: pytest and the benchmarks then still write what they have
    timeout -s INT -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    RC[$name]=$?; SECS[$name]=$(( $(date +%s) - t0 ))
    echo "   rc=${RC[$name]} in ${SECS[$name]}s"
}

"$PY" - >"$WORK/env.json" 2>"$WORK/env.log" <<'EOF'
import json, subprocess, jax
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    smi = None
print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": smi}))
EOF
echo "environment: $(cat "$WORK/env.json")"

if [ "$MODE" = smoke ]; then
    MODEL_ARGS=(--num-layers 2 --dtype float32); DTYPE=float32
    LAT_ARGS=(--input-len 16 --output-len 8 --num-iters-warmup 1 --num-iters 2 --hf-num-iters 1)
    THR_ARGS=(--num-prompts 8 --min-len 16 --max-len 48)
    PROF_ARGS=(--batch-sizes 1,4 --context 32 --steps 2)
else
    MODEL_ARGS=(--dtype bfloat16); DTYPE=bfloat16
    LAT_ARGS=(--input-len 128 --output-len 128 --num-iters-warmup 3 --num-iters 10 --hf-num-iters 2)
    THR_ARGS=()  # the nano-vllm workload as published: 256 requests, lengths in [100, 1024]
    PROF_ARGS=(--batch-sizes "${PROFILE_BATCH_SIZES:-1,256}" --context "${PROFILE_CONTEXT:-512}"
               --steps 5)
fi
COMMON=(--model "$MODEL_DIR" --dtype "$DTYPE" --max-model-len 2048)
# ENGINE_EXTRA="--no-wait-for-precompile": more flags for every engine the phases build
read -r -a EXTRA <<< "${ENGINE_EXTRA:-}"
COMMON+=("${EXTRA[@]}")

HF=(); [ "${COMPARE_HF:-1}" = 1 ] && HF=(--compare-hf)
# COMPARE_XLA=0: no plain-XLA baseline (contiguous cache, no paging) in the latency phase
XLA=(); [ "${COMPARE_XLA:-1}" = 1 ] && XLA=(--compare-xla)
# COMPARE_HF_THROUGHPUT=0: no HF baseline in the throughput phase alone (latency keeps its own)
THR_HF=("${HF[@]}"); [ "${COMPARE_HF_THROUGHPUT:-1}" = 0 ] && THR_HF=()
BACKEND="${ATTENTION_BACKEND:-pallas}"
# jaxvllm records the layer loop and the sampler's conditionals into CUDA graphs too
# (jaxvllm/xla_flags.py); the graphs phase times the same decode steps as the profile phase
# with XLA's own command-buffer default instead, to keep that choice measured.
XLA_OWN_DEFAULT="--xla_gpu_enable_command_buffer=-WHILE,-CONDITIONAL"
MULTI_OUTPUT_FUSION="--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"

phase_model() {
    run_phase model 120 "$PY" benchmarks/random_model.py qwen2.5-0.5b "$MODEL_DIR" \
        "${MODEL_ARGS[@]}"
    tail -n 1 "$WORK/model.log"
}

phase_profile() {
    run_phase profile 120 "$PY" benchmarks/step_profile.py "${COMMON[@]}" \
        --attention-backend "$BACKEND" "${PROF_ARGS[@]}" --output-json "$OUT/step_profile.json"
    grep -v '^{' "$WORK/profile.log" | tail -n 70
}

phase_sampler() {
    local args=(--rows 1,16,64,256 --vocab-size 151936 --iters 20)
    [ "$MODE" = smoke ] && args=(--rows 1,8 --vocab-size 1000 --iters 2 --kernels)
    run_phase sampler 60 "$PY" benchmarks/sampler.py "${args[@]}" --output-json "$OUT/sampler.json"
    grep -v '^{' "$WORK/sampler.log" | tail -n 14
}

phase_graphs() {
    run_phase graphs 90 env XLA_FLAGS="${XLA_FLAGS:-} $XLA_OWN_DEFAULT" "$PY" \
        benchmarks/step_profile.py "${COMMON[@]}" --attention-backend "$BACKEND" \
        "${PROF_ARGS[@]}" --no-profile --output-json "$WORK/step_profile_graphs.json"
    grep -i "wall\|runner\|batch" "$WORK/graphs.log" | grep -v '^{' | head -n 20
}

phase_nocb() {  # the profile phase's steps timed with no command buffers (CUDA graphs) at all
    run_phase nocb 90 "$PY" benchmarks/step_profile.py "${COMMON[@]}" --attention-backend \
        "$BACKEND" "${PROF_ARGS[@]}" --disable-command-buffers --no-profile \
        --output-json "$WORK/step_profile_nocb.json"
    grep -v '^{' "$WORK/nocb.log" | tail -n 8
}

phase_scan() {  # the profile phase's steps timed with the layers as a scan (the CPU's way)
    run_phase scan 90 "$PY" benchmarks/step_profile.py "${COMMON[@]}" --attention-backend \
        "$BACKEND" "${PROF_ARGS[@]}" --no-unroll-layers --no-profile \
        --output-json "$WORK/step_profile_scan.json"
    grep -v '^{' "$WORK/scan.log" | tail -n 8
}

phase_unfused() {  # the profile phase's steps without the fused decode kernel
    run_phase unfused 90 "$PY" benchmarks/step_profile.py "${COMMON[@]}" --attention-backend \
        "$BACKEND+kv_scatter" "${PROF_ARGS[@]}" --no-profile \
        --output-json "$WORK/step_profile_unfused.json"
    grep -v '^{' "$WORK/unfused.log" | tail -n 8
}

phase_mofusion() {  # the profile phase's steps with multi-output Triton fusions
    run_phase mofusion 90 env XLA_FLAGS="${XLA_FLAGS:-} $MULTI_OUTPUT_FUSION" "$PY" \
        benchmarks/step_profile.py "${COMMON[@]}" --attention-backend "$BACKEND" \
        "${PROF_ARGS[@]}" --no-profile --output-json "$WORK/step_profile_mofusion.json"
    grep -v '^{' "$WORK/mofusion.log" | tail -n 8
}

phase_sbprofile() {  # the profile phase's steps with the small-batch projection kernels
    run_phase sbprofile 120 "$PY" benchmarks/step_profile.py "${COMMON[@]}" --attention-backend \
        "$BACKEND" "${PROF_ARGS[@]}" --small-batch-matmuls \
        --output-json "$WORK/step_profile_small_batch.json"
    grep -v '^{' "$WORK/sbprofile.log" | tail -n 40
}

phase_async() {  # the profile phase's steps timed with each step scheduled ahead of the last
    run_phase async 90 "$PY" benchmarks/step_profile.py "${COMMON[@]}" --attention-backend \
        "$BACKEND" "${PROF_ARGS[@]}" --async-scheduling --no-profile \
        --output-json "$WORK/step_profile_async.json"
    grep -v '^{' "$WORK/async.log" | tail -n 8
}

phase_throughput() {
    run_phase throughput 330 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        "${THR_HF[@]}" --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$OUT/throughput.json"
    grep -v '^{' "$WORK/throughput.log" | tail -n 40
}

phase_eager() {  # throughput again without the background precompile, no HF baseline
    run_phase eager 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        --no-precompile --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$WORK/throughput_eager.json"
    grep -E "Elapsed|Output tokens|Compile|first token" "$WORK/eager.log"
}

phase_wthroughput() {  # throughput again, its programs now in the compilation cache, no HF
    run_phase wthroughput 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$OUT/throughput_warm.json"
    grep -E "Elapsed|Output tokens|Compile|first token" "$WORK/wthroughput.log"
}

phase_pthroughput() {  # throughput again, multi-step calls collected before the next, no HF
    run_phase pthroughput 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        --no-async-scheduling --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$OUT/throughput_not_pipelined.json"
    grep -E "Elapsed|Output tokens|Compile|first token" "$WORK/pthroughput.log"
}

phase_bthroughput() {  # throughput again, the precompile running beside the steps, no HF
    run_phase bthroughput 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        --no-wait-for-precompile --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$OUT/throughput_background.json"
    grep -E "Elapsed|Output tokens|Compile|first token" "$WORK/bthroughput.log"
}

phase_sthroughput() {  # throughput again with single decode steps (no multi-step), no HF
    run_phase sthroughput 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        --num-scheduler-steps 1 --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$OUT/throughput_single.json"
    grep -E "Elapsed|Output tokens|Compile|first token" "$WORK/sthroughput.log"
}

phase_athroughput() {  # throughput again with asynchronous scheduling, no HF baseline
    run_phase athroughput 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" --dataset nano-vllm \
        --async-scheduling --disable-tqdm --attention-backend "$BACKEND" "${THR_ARGS[@]}" \
        --output-json "$WORK/throughput_async.json"
    grep -E "Elapsed|Output tokens|Compile|first token" "$WORK/athroughput.log"
}

phase_latency() {
    run_phase latency 180 "$PY" benchmarks/latency.py "${COMMON[@]}" --batch-size 1 \
        --temperature 0 "${HF[@]}" "${XLA[@]}" --attention-backend "$BACKEND" "${LAT_ARGS[@]}" \
        --output-json "$OUT/latency.json"
    grep -v '^{' "$WORK/latency.log" | tail -n 30
}

phase_sblatency() {  # batch 1 with the small-batch projection kernels, no baselines
    run_phase sblatency 120 "$PY" benchmarks/latency.py "${COMMON[@]}" --batch-size 1 \
        --temperature 0 --attention-backend "$BACKEND" "${LAT_ARGS[@]}" --small-batch-matmuls \
        --output-json "$OUT/latency_small_batch.json"
    grep -v '^{' "$WORK/sblatency.log" | tail -n 20
}

phase_sbtlatency() {  # sblatency with each projection's fastest tiling in smallmmp
    local tilings
    tilings="$("$PY" - "$OUT/small_batch_matmul_projections.json" <<'EOF'
import json, sys
try:
    shapes = json.load(open(sys.argv[1]))["shapes"]
except (OSError, ValueError, KeyError):
    sys.exit(0)
best = {}  # {"KxN": [block_n, splits]}, as JAXVLLM_SMALL_BATCH_TILINGS takes it
for projection in shapes[0]["projections"].values():
    tiling = projection["results"].get(projection.get("best"), {}).get("tiling")
    if tiling:
        best[projection["shape"]] = tiling
print(json.dumps(best) if best else "")
EOF
)"
    if [ -z "$tilings" ]; then
        echo "   no tilings from smallmmp: skipped"
        return
    fi
    echo "   JAXVLLM_SMALL_BATCH_TILINGS=$tilings"
    echo "$tilings" > "$OUT/small_batch_tilings.json"
    run_phase sbtlatency 120 env JAXVLLM_SMALL_BATCH_TILINGS="$tilings" "$PY" \
        benchmarks/latency.py "${COMMON[@]}" --batch-size 1 --temperature 0 \
        --attention-backend "$BACKEND" "${LAT_ARGS[@]}" --small-batch-matmuls \
        --output-json "$OUT/latency_small_batch_tuned.json"
    grep -v '^{' "$WORK/sbtlatency.log" | tail -n 20
}

phase_dllatency() {  # batch 1 with each layer of a decode step one kernel, no baselines
    run_phase dllatency 150 "$PY" benchmarks/latency.py "${COMMON[@]}" --batch-size 1 \
        --temperature 0 --attention-backend "$BACKEND" "${LAT_ARGS[@]}" --decode-layer-kernel \
        --output-json "$OUT/latency_decode_layer.json"
    grep -v '^{' "$WORK/dllatency.log" | tail -n 20
}

phase_dlprofile() {  # the profile phase's steps with each layer of a decode step one kernel
    run_phase dlprofile 120 "$PY" benchmarks/step_profile.py "${COMMON[@]}" --attention-backend \
        "$BACKEND" "${PROF_ARGS[@]}" --decode-layer-kernel \
        --output-json "$WORK/step_profile_decode_layer.json"
    grep -v '^{' "$WORK/dlprofile.log" | tail -n 40
}

phase_dlayer() {  # whole layers: XLA's projections, the small-batch kernels, one kernel
    local args=(--rows 1,8 --k-split 64,128 --num-warps 4,8)
    [ "$MODE" = smoke ] && args=(--smoke)
    run_phase dlayer 150 "$PY" benchmarks/decode_layer.py "${args[@]}" \
        --output-json "$OUT/decode_layer.json"
    grep -v '^{' "$WORK/dlayer.log" | tail -n 40
}

phase_xlalatency() {  # batch 1 with the projections left to XLA, no baselines
    run_phase xlalatency 120 "$PY" benchmarks/latency.py "${COMMON[@]}" --batch-size 1 \
        --temperature 0 --attention-backend "$BACKEND" "${LAT_ARGS[@]}" \
        --no-small-batch-matmuls --output-json "$OUT/latency_xla_matmuls.json"
    grep -v '^{' "$WORK/xlalatency.log" | tail -n 20
}

phase_coldstart() {  # LLM(...) to first token in fresh processes: cold, warm, JAX's cache alone
    local args=(--input-len 32 --output-len 8 --num-iters-warmup 1 --num-iters 2)
    run_phase coldstart 240 "$PY" benchmarks/latency.py "${COMMON[@]}" --batch-size 1 \
        --temperature 0 --attention-backend "$BACKEND" "${args[@]}" --cold-start \
        --output-json "$OUT/cold_start.json"
    grep -A6 "fresh processes" "$WORK/coldstart.log"
}

phase_mtests() {  # multi-step decoding against single steps, on the Pallas kernels
    run_phase mtests 150 "$PY" -m pytest tests/test_multi_step.py -q -rfs -p no:cacheprovider
    grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$WORK/mtests.log" | tail -n 12
}

phase_tests() {
    # on a GPU every kernel test runs compiled
    local sel=(tests/test_kernels.py tests/test_small_batch_matmul.py
               tests/test_sampling_kernel.py tests/test_decode_layer.py)
    [ "$MODE" = smoke ] && sel+=(-m gpu)  # on CPU they skip: the selection itself is checked
    [ -n "${TESTS_K:-}" ] && sel+=(-k "$TESTS_K")  # e.g. TESTS_K=decode: only those tests
    # Compiling dominates the kernel tests: with pytest-xdist (on the GPU image) 4 processes
    # share the GPU, each allocating only what it uses.
    local par=()
    "$PY" -c "import xdist" 2>/dev/null && par=(-n 4)
    run_phase tests 240 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest "${sel[@]}" \
        "${par[@]}" -q -rfs -p no:cacheprovider --junitxml="$WORK/pytest.xml"
    grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$WORK/tests.log" | tail -n 25
}

phase_kernels() {
    local args=(--json-out "$OUT/kernels.json")
    [ "$MODE" = smoke ] && args+=(--smoke)
    run_phase kernels 120 "$PY" benchmarks/kernels.py "${args[@]}"
    grep -v '^{' "$WORK/kernels.log" | tail -n 40
}

phase_decode() {  # the fused decode kernel's configurations (benchmarks/decode_kernel.py)
    local args=(--rows 1,256 --contexts 512,1024,2048 --block-k 64,128)
    [ "$MODE" = smoke ] && args=(--smoke)
    run_phase decode 150 "$PY" benchmarks/decode_kernel.py "${args[@]}" \
        --output-json "$OUT/decode_kernel.json"
    grep -v '^{' "$WORK/decode.log" | tail -n 60
}

phase_spread() {  # the decode kernel at 256 rows of 5-100% of the longest context
    local args=(--rows 256 --contexts 1024,2048 --spread 0.95 --block-k 128 --splits auto,1,2
                --split-keys 512,1024)
    [ "$MODE" = smoke ] && args=(--smoke --spread 0.5)
    run_phase spread 150 "$PY" benchmarks/decode_kernel.py "${args[@]}" \
        --output-json "$OUT/decode_kernel_spread.json"
    grep -v '^{' "$WORK/spread.log" | tail -n 30
}

phase_smallmm() {  # the small-batch projection kernels against XLA's
    local args=(--rows 1,64)
    [ "$MODE" = smoke ] && args=(--smoke)
    run_phase smallmm 150 "$PY" benchmarks/small_batch_matmul.py "${args[@]}" \
        --output-json "$OUT/small_batch_matmul.json"
    grep -v '^{' "$WORK/smallmm.log" | tail -n 40
}

phase_smallmmp() {  # each projection's tilings on its own, batch 1
    local args=(--rows 1 --layers 8 --per-projection --block-n 32,64 --block-k 64,256
                --splits auto,1,2,3,4,7,12,18)
    [ "$MODE" = smoke ] && args=(--smoke --per-projection)
    run_phase smallmmp 180 "$PY" benchmarks/small_batch_matmul.py "${args[@]}" \
        --output-json "$OUT/small_batch_matmul_projections.json"
    grep -v '^{' "$WORK/smallmmp.log" | tail -n 100
}

phase_sweep() {
    run_phase sweep 120 "$PY" benchmarks/kernels.py --sweep --variants triton \
        --no-baselines --skip kv_write,scan --iters 10 --json-out "$WORK/sweep.json"
}

for phase in ${PHASES//,/ }; do
    if ! declare -F "phase_$phase" >/dev/null; then
        echo "unknown phase '$phase'"; continue
    fi
    "phase_$phase"
done

(cd "$WORK" && tar czf "$OUT/logs.tgz" --exclude=model ./*) 2>/dev/null

phases=""
for name in ${PHASES//,/ }; do
    [ -n "${RC[$name]+x}" ] && phases+="\"$name\": {\"rc\": \"${RC[$name]}\", \"seconds\": ${SECS[$name]}}, "
done
"$PY" - "$OUT" "$WORK" "$MODE" "$BACKEND" "{${phases%, }}" <<'EOF' | tee "$OUT/gpu_check.json"
import json, os, sys
import xml.etree.ElementTree as ET

out, work, mode, backend, phases = sys.argv[1:]
summary = {"check": "gpu_check", "mode": mode, "attention_backend": backend,
           "env": json.load(open(os.path.join(work, "env.json"))), "phases": json.loads(phases)}
xml_path = os.path.join(work, "pytest.xml")
if os.path.exists(xml_path):
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["tests"]["failed"] = failed[:40]


def load(name):
    path = os.path.join(out, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


if (t := load("throughput")) is not None:
    keep = ("output_tokens_per_second", "output_tokens_per_second_excl_compile",
            "tokens_per_second", "requests_per_second", "elapsed_time", "first_token_s",
            "ratio_output_tokens_per_second_vs_hf", "ratio_excl_compile_vs_hf")
    summary["throughput"] = {k: t.get(k) for k in keep} | {
        "hf_output_tokens_per_second": (t.get("hf") or {}).get("output_tokens_per_s"),
        "engine": t.get("engine")}
if (l := load("latency")) is not None:
    summary["latency"] = {k: v for k, v in l.items() if not isinstance(v, (list, dict))
                          or k in ("hf", "xla")}
if (c := load("cold_start")) is not None:
    summary["cold_start"] = c.get("cold_start")
if (p := load("step_profile")) is not None:
    summary["step_profile"] = {b: {k: v for k, v in r.items() if k != "top_by_hlo_op"}
                               | {"top": r.get("top", [])[:12]}
                               for b, r in p.get("per_batch", {}).items()}
for name in ("decode_kernel", "decode_kernel_spread"):
    if (d := load(name)) is not None:
        summary[name] = {
            f"{s['rows']}x{s['context']}": {"best": s.get("best"), "mean_context":
                                            s.get("mean_context"), "default_tiling":
                                            s.get("default_tiling")}
            | {k: r.get("ms", r.get("error")) for k, r in s["results"].items()}
            for s in d["shapes"]}
if (m := load("small_batch_matmul")) is not None:
    summary["small_batch_matmul"] = {
        str(s["rows"]): {"best": s.get("best")}
        | {k: r.get("us_per_layer", r.get("error")) for k, r in s["results"].items()}
        for s in m["shapes"]}
if (m := load("small_batch_matmul_projections")) is not None:
    summary["small_batch_matmul_projections"] = {
        f'{s["rows"]} {name}': {"best": p.get("best")}
        | {k: r.get("us_per_layer", r.get("error")) for k, r in p["results"].items()}
        for s in m["shapes"] for name, p in s["projections"].items()}
if (m := load("decode_layer")) is not None:
    summary["decode_layer"] = {
        str(s["rows"]): {"best": s.get("best")}
        | {k: r.get("us_per_layer", r.get("error")) for k, r in s["results"].items()}
        for s in m["shapes"]}
for label in ("latency_small_batch", "latency_small_batch_tuned", "latency_xla_matmuls",
              "latency_decode_layer"):
    if (l := load(label)) is not None:
        summary[label] = {k: v for k, v in l.items() if not isinstance(v, (list, dict))}
# the engine's start-up choices of its kernels (jaxvllm/engine/autotune.py), from the first
# run that made them
for name in ("latency", "throughput"):
    engine = (load(name) or {}).get("engine") or {}
    probes = {k: v for k, v in engine.items() if k.endswith("_probe")}
    if probes:
        summary["kernel_choices"] = {"from": name, **probes,
                                     "small_batch_matmul_rows":
                                         engine.get("small_batch_matmul_rows"),
                                     "sampling_kernel_rows": engine.get("sampling_kernel_rows")}
        break
if (s := load("sampler")) is not None:
    summary["sampler"] = s.get("rows")
for label, name in (("throughput_warm_cache", "throughput_warm"),
                    ("throughput_not_pipelined", "throughput_not_pipelined"),
                    ("throughput_background_precompile", "throughput_background"),
                    ("throughput_single_steps", "throughput_single"),
                    ("throughput_no_precompile", "throughput_eager"),
                    ("throughput_async_scheduling", "throughput_async")):
    t = load(name)
    if t is None and os.path.exists(path := os.path.join(work, f"{name}.json")):
        t = json.load(open(path))
    if t is None:
        continue
    summary[label] = {k: t.get(k) for k in (
        "output_tokens_per_second", "output_tokens_per_second_excl_compile", "elapsed_time",
        "first_token_s")} | {"steps": t.get("steps"), "engine": t.get("engine")}
for label, name in (("step_profile_xla_default_command_buffers", "step_profile_graphs"),
                    ("step_profile_scan", "step_profile_scan"),
                    ("step_profile_no_command_buffers", "step_profile_nocb"),
                    ("step_profile_async_scheduling", "step_profile_async"),
                    ("step_profile_unfused_decode", "step_profile_unfused"),
                    ("step_profile_multi_output_fusion", "step_profile_mofusion"),
                    ("step_profile_small_batch_matmuls", "step_profile_small_batch"),
                    ("step_profile_decode_layer", "step_profile_decode_layer")):
    if os.path.exists(path := os.path.join(work, f"{name}.json")):
        summary[label] = {
            b: {k: r.get(k) for k in ("wall_ms_per_step", "runner_host_ms_per_step",
                                      "runner_device_ms_per_step", "error")}
            for b, r in json.load(open(path)).get("per_batch", {}).items()}
if (k := load("kernels")) is not None:
    summary["kernels"] = {s: {x: v.get(x) for x in ("best_kernel", "speedup_vs", "target_met")}
                          | {"best": v["results"].get(v.get("best_kernel"), {})}
                          for s, v in k.get("shapes", {}).items()}
    summary["kernels_complete"] = k.get("complete", False)
print(json.dumps(summary))
EOF
rm -rf "$WORK"
