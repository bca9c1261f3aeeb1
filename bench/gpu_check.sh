#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (issues 16 and 17), within about 8 minutes on
# one H100/H200:
#   bench/gpu_check.sh [OUT_DIR] [WHEELS_DIR]
# 1. the `gpu` tests; 2. the kernel benchmarks (pytest-benchmark JSON + a markdown table);
# 3. the end-to-end rows: random-init Llama-3-8B steered by a random-init Llama-3.2-1B pair,
#    bf16, prompt 512, CBS(4,4,8): one request at 256 tokens and at 1024 tokens against the
#    reference baseline, 16 concurrent at 256 tokens, and 16 concurrent with a random Qwen2.5-7B
#    large model (different vocabularies); plain sampling of the same streams beside each, with
#    its step time over the weight-read floor; CBS(4,4,8) at prompt 2048 with and without the
#    shared-prefix (cascade) decode attention, 1 and 16 concurrent with async scheduling,
#    and 16 concurrent under torch.compile; 4. a profiled search (GPU busy fraction), with
#    the scorers' graphs and without, and with async scheduling;
# 5. the host's share of a step (bench/host_step.py: tiny models on this machine's CPU).
# Results go to OUT_DIR (default bench/results/): JSONL, logs and gpu-check-<device>.md.
#
# The GPU machine may have an older transformers than ours and no internet: WHEELS_DIR holds
# wheels to install first (made here with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl transformers==X huggingface_hub==Y ...`, an ignored folder
# carried with the call). The package runs from the checkout (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
wheels=${2:-}
mkdir -p "$out"
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/w2s-site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/w2s-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') \
    if torch.cuda.is_available() else 'cpu')")
log="$out/gpu-check-$device.log"
: >"$log"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -25
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step "gpu tests" 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider
step "kernel benchmarks" 240 python3 -m pytest -q bench/kernels.py --benchmark-only \
    -p no:cacheprovider --benchmark-json "$out/kernels-$device.json"
if [ -f bench/kernels_table.py ]; then
    step "kernel table" 30 python3 bench/kernels_table.py "$out/kernels-$device.json" \
        --markdown "$out/kernels-$device.md"
fi
e2e="python3 bench/e2e.py --out $out --prompt-lens 512 --searches cbs-4-4-8"
step "e2e 1 request, 256 tokens" 120 $e2e --preset gpu --max-new 256 --concurrency 1
step "e2e 16 requests, 256 tokens" 120 $e2e --preset gpu --max-new 256 --concurrency 16
step "e2e 1 request, 256 tokens, async scheduling" 120 $e2e --preset gpu --max-new 256 \
    --concurrency 1 --async-scheduling
step "e2e 16 requests, 256 tokens, async scheduling" 120 $e2e --preset gpu --max-new 256 \
    --concurrency 16 --async-scheduling
step "e2e 1 request, prompt 2048, cascade" 120 $e2e --preset gpu --max-new 256 --concurrency 1 \
    --prompt-lens 2048 --cascade
step "e2e 1 request, prompt 2048, per-beam" 120 $e2e --preset gpu --max-new 256 \
    --concurrency 1 --prompt-lens 2048
step "e2e 1 request, 1024 tokens, baseline" 300 $e2e --preset gpu --max-new 1024 \
    --concurrency 1 --baseline --baseline-budget 120
step "e2e cross vocabulary, 16 requests" 150 $e2e --preset gpu-cross --max-new 256 \
    --concurrency 16
step "profile" 120 python3 bench/profile_step.py --preset gpu --out "$out"
step "profile, scoring eager" 120 python3 bench/profile_step.py --preset gpu --eager-scoring \
    --out "$out"
step "profile, async scheduling" 120 python3 bench/profile_step.py --preset gpu \
    --async-scheduling --out "$out"
step "host step (CPU)" 90 env CUDA_VISIBLE_DEVICES= python3 bench/host_step.py --reps 2 \
    --out "$out"
step "e2e 16 requests, 256 tokens, torch.compile" 240 $e2e --preset gpu --max-new 256 \
    --concurrency 16 --compile

{
    echo "# GPU check on $device ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
    echo
    echo "## End to end"
    for preset in gpu gpu-cross; do
        [ -f "$out/e2e-$preset.jsonl" ] && python3 bench/e2e.py --out "$out" --preset "$preset" --table
    done
    echo
    echo "## Profile"
    [ -f "$out/profile_step.jsonl" ] && tail -n 3 "$out/profile_step.jsonl"
    echo
    echo "## Host step (this machine's CPU, tiny models)"
    [ -f "$out/host_step.jsonl" ] && tail -n 1 "$out/host_step.jsonl"
    echo
    echo "## Steps"
    grep '^== .*exit' "$log"
} >"$out/gpu-check-$device.md"
cat "$out/gpu-check-$device.md"
