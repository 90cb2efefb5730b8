#!/usr/bin/env bash
# GPU comparison: our Train LoRA vs ComfyUI's built-in TrainLoraNode (issue 6), one prepared run, < 10 minutes.
#
# Assumptions (all overridable through the environment):
#   COMFYUI_ROOT  a ComfyUI checkout (folder holding comfy/ and main.py).      default: /opt/comfy
#   PYTHON        a python whose torch has CUDA and that has ComfyUI's requirements installed.
#                 default: $COMFYUI_ROOT/venv/bin/python if it exists, else the venv below.
#   VENV          where to create that venv when PYTHON does not exist.          default: /tmp/lora_bench_venv
#   WHEELS        a folder of wheels (CUDA torch, ComfyUI requirements) used, offline (--no-index), to create
#                 VENV when no PYTHON exists. The machine is assumed to have no network.
#   BENCH_ARGS    extra arguments for bench/vs_builtin.py (e.g. "--repeats 3").
#   BENCH_TIMEOUT seconds before the comparison is killed.                       default: 540
# What it runs: full SD1.5 UNet (random weights, ComfyUI's own classes) at 512 px (64x64 latents), bf16, cases
#   b1 (batch 1, each trainer's defaults), b4 (batch 4, one caption per image), fastest (built-in with bypass on
#   and checkpointing off vs ours default) and fp8 (UNet stored as float8_e4m3fn, bypass_mode on,
#   training_dtype none; compared with b1 = bf16); fresh processes alternating built-in / ours, two pairs for b1
#   and one for the others, 1 + 2 warmup + 38 timed steps each (41, as in the CPU table).
# Output: the same table as the CPU run, with peak VRAM (torch.cuda.max_memory_allocated) and PASS/FAIL per target.
# Run from anywhere: bash bench/gpu_check.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
COMFYUI_ROOT="${COMFYUI_ROOT:-/opt/comfy}"
VENV="${VENV:-/tmp/lora_bench_venv}"
WHEELS="${WHEELS:-}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-540}"
BENCH_ARGS="${BENCH_ARGS:-}"

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
run() { echo "+ $*" >&2; "$@"; }

[[ -f "$COMFYUI_ROOT/comfy/cli_args.py" ]] || fail "COMFYUI_ROOT=$COMFYUI_ROOT is not a ComfyUI checkout"
export COMFYUI_ROOT

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$COMFYUI_ROOT/venv/bin/python" ]]; then
        PYTHON="$COMFYUI_ROOT/venv/bin/python"
    elif [[ -x "$VENV/bin/python" ]]; then
        PYTHON="$VENV/bin/python"
    else
        [[ -n "$WHEELS" && -d "$WHEELS" ]] || fail "no python with ComfyUI found: set PYTHON, or WHEELS to a folder of wheels"
        run python3 -m venv "$VENV"
        run "$VENV/bin/pip" install --no-index --find-links "$WHEELS" torch
        run "$VENV/bin/pip" install --no-index --find-links "$WHEELS" -r "$COMFYUI_ROOT/requirements.txt" psutil
        PYTHON="$VENV/bin/python"
    fi
fi
[[ -x "$PYTHON" ]] || fail "PYTHON=$PYTHON is not executable"

echo "== environment"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi failed: no GPU?"
run "$PYTHON" - <<'EOF' || fail "this python has no working CUDA torch, or psutil / safetensors are missing"
import sys, torch, psutil, safetensors
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0))
x = torch.zeros(4, device="cuda", dtype=torch.float8_e4m3fn)  # the fp8 case needs this dtype
print("float8_e4m3fn ok")
EOF
if [[ -d "$COMFYUI_ROOT/.git" ]]; then
    echo "ComfyUI commit: $(git -C "$COMFYUI_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
fi
echo "pack commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo uncommitted)"

OUT="$(mktemp -d /tmp/lora_gpu_check.XXXXXX)"
echo "== comparison (results in $OUT)"
# Budget on an H200: ~20-25 s per process (imports + seeded 860M-parameter build on the CPU; the built-in's
# clone(force_deepcopy=True) builds a second copy), 10 train + 4 eval processes of 41 steps: about 6-8 minutes.
# shellcheck disable=SC2086
status=0
run timeout --signal=TERM --kill-after=20 "$BENCH_TIMEOUT" "$PYTHON" "$HERE/vs_builtin.py" \
    --device cuda --unet full --resolution 512 --images 8 --steps 38 --warmup 2 \
    --cases b1:2,fastest:1,b4:1,fp8:1 --out-dir "$OUT" $BENCH_ARGS || status=$?
if [[ $status -ne 0 ]]; then
    if [[ -f "$OUT/table.txt" ]]; then
        echo "== partial table (finished cases only)"
        cat "$OUT/table.txt"
    fi
    fail "vs_builtin.py exited with $status (124 = ran past ${BENCH_TIMEOUT}s); partial results in $OUT"
fi
echo "== done: table above, raw numbers in $OUT/summary.json"
