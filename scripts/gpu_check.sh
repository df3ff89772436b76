#!/usr/bin/env bash
# The one-shot GPU check: everything a lent GPU should show, in one command of at most 9 minutes, writing at most
# 8 files into $OUT (the device tool's return folder) or --out DIR:
#   env.json        machine, driver, versions
#   cuda_tests.txt  the CUDA-only tests (`pytest -m cuda`), which skip on a CPU
#   bench_model.json / bench_serve.json   `sowa bench model` (ViT-L-14-336, bf16 and fp32, eager and compiled)
#                   and a short `sowa bench serve`
#   probes.jsonl    host syncs in one served batch, nvJPEG throughput and error against PIL, and a short
#                   Lightning training run (bf16-mixed, eager and torch.compile'd: scripts/gpu_train_step.py)
#   gpu_util.csv    GPU utilisation and memory sampled during the serve bench
#   summary.md      the tables;  log.txt  everything printed
#
#   scripts/gpu_wheels.sh                                     # here, first: wheels the GPU image lacks -> .whl/
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)    # on the lent machine
#   scripts/gpu_check.sh --cpu --out DIR                      # the same plan on a CPU with the tiny config
#
# Each step has its own time limit, so one that overruns costs its own figures only; the exit status is 0 when
# every step finished, else the number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
out=${OUT:-}
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) cpu=1 ;;
        --out) out=$2; shift ;;
        *) echo "usage: $0 [--cpu] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$out" ] || { echo "$0: set OUT or pass --out DIR" >&2; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! python3 -c "import open_clip, fastapi" 2>/dev/null; then  # the lent machine: no network
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ $cpu = 1 ]; then
    arch=sowa-tiny device=cpu dtypes=fp32 model_batches=1,4 compile_batches=1 iters=1
    serve="--concurrency 2 --workers 1,2 --duration 1 --registrations 1 --max-batch-size 8 --dtype fp32"
    probe_batch=4 nvjpeg="--size 112 --source-size 256 --count 32"
    train="--arch sowa-tiny --device cpu --precision 32-true --steps 4 --warmup 1 --batch 4"
    limits=(60 90 120 150 60 60 90)
else
    arch=ViT-L-14-336 device=cuda dtypes=bf16,fp32 model_batches=1,16,64 compile_batches=64 iters=10
    serve="--concurrency 32,128 --workers 1,4 --duration 8 --registrations 3 --max-batch-size 64 --max-wait-ms 5
           --dtype bf16"
    probe_batch=32 nvjpeg="--size 336 --source-size 1024 --count 256"
    train="--arch ViT-B-16 --device cuda --precision bf16-mixed --compile --steps 12 --warmup 3 --batch 16"
    limits=(90 60 120 210 45 25 120)
fi
sowa=(python3 -m sowa)
failed=0
step() {  # step NAME LIMIT_S COMMAND...: one timed step, its output into log.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/log.txt"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$out/log.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/log.txt"
    [ $rc = 0 ] || failed=$((failed + 1))
}
: > "$out/log.txt"
python3 scripts/gpu_probe.py env > "$out/env.json" 2>> "$out/log.txt" || failed=$((failed + 1))
cat "$out/env.json"
# only the files that hold CUDA tests: the others import what the GPU image lacks (psycopg, playwright, ...)
cuda_files=$(grep -rl "needs a CUDA device" tests --include="test_*.py" | tr '\n' ' ')
step "CUDA tests" "${limits[0]}" bash -c "python3 -m pytest -m cuda -q -rA -p no:cacheprovider $cuda_files \
    > '$out/cuda_tests.txt' 2>&1; rc=\$?; tail -3 '$out/cuda_tests.txt'; [ \$rc = 0 ] || [ \$rc = 5 ]"
step "bench model, eager" "${limits[1]}" "${sowa[@]}" bench model --arch "$arch" --device "$device" \
    --dtype "$dtypes" --batch-sizes "$model_batches" --iters "$iters" --json "$out/bench_model_eager.json"
step "bench model, compiled" "${limits[2]}" "${sowa[@]}" bench model --arch "$arch" --device "$device" \
    --dtype "${dtypes%%,*}" --batch-sizes "$compile_batches" --iters "$iters" --compile default \
    --no-peak --json "$out/bench_model_compiled.json"
sampler=""
if [ $cpu = 0 ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,clocks.sm --format=csv -lms 250 \
        > "$out/gpu_util.csv" 2>> "$out/log.txt" &
    sampler=$!
else
    echo "no GPU: nothing sampled" > "$out/gpu_util.csv"
fi
# shellcheck disable=SC2086
step "bench serve" "${limits[3]}" "${sowa[@]}" bench serve --arch "$arch" --device "$device" $serve \
    --json "$out/bench_serve.json" --markdown "$out/bench_serve.md"
[ -n "$sampler" ] && kill "$sampler" 2>/dev/null
: > "$out/probes.jsonl"
# the count of host syncs does not depend on the model's size: the tiny config keeps this step short
step "host syncs" "${limits[4]}" bash -c "python3 scripts/gpu_probe.py syncs --arch sowa-tiny --device $device \
    --dtype ${dtypes%%,*} --batch $probe_batch >> '$out/probes.jsonl'"
# shellcheck disable=SC2086
step "nvJPEG" "${limits[5]}" bash -c "python3 scripts/gpu_probe.py nvjpeg --device $device $nvjpeg \
    >> '$out/probes.jsonl'"
# shellcheck disable=SC2086
step "training step" "${limits[6]}" bash -c "python3 scripts/gpu_train_step.py $train >> '$out/probes.jsonl'"
python3 scripts/gpu_summary.py "$out" > "$out/summary.md" 2>> "$out/log.txt" || failed=$((failed + 1))
# the two model benches go back as one file, the serve table lives in summary.md: 8 files at most
python3 - "$out" <<'PY' 2>> "$out/log.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = [json.loads(p.read_text()) for p in sorted(out.glob("bench_model_*.json"))]
(out / "bench_model.json").write_text(json.dumps(parts, indent=1))
for p in out.glob("bench_model_*.json"):
    p.unlink()
(out / "bench_serve.md").unlink(missing_ok=True)
PY
cat "$out/summary.md"
echo "gpu_check: $failed step(s) failed; files in $out: $(ls "$out" | tr '\n' ' ')"
exit $failed
