#!/usr/bin/env bash
# On the GPU machine (docs/gpu.md), from the repository root:
#   bash scripts/gpu_session.sh stash .dali/pK     keep one carried DALI piece across warm calls (private stash)
#   bash scripts/gpu_session.sh run [--quick]      stash the last piece, install all wheels, run gpu-check to $OUT
# PYTHON=... picks the interpreter (default python3). Without CUDA it stops after the imports, in one line.
set -uo pipefail
cd "$(dirname "$0")/.."
# Nothing under a fixed /tmp name: on a shared host another user could create it first and plant files (or
# modules on PYTHONPATH). The stash must outlive one call, so it lives in our own cache folder, mode 700.
STASH=${RADSTREAM_DALI_STASH:-${XDG_CACHE_HOME:-$HOME/.cache}/radstream/dali-stash}
(umask 077 && mkdir -p "$STASH")
if [ -L "$STASH" ] || [ ! -O "$STASH" ]; then
    echo "gpu_session: $STASH is a link or not owned by $(id -un); refusing to use it" >&2; exit 2
fi
chmod 700 "$STASH"
stash() { for d in "$@"; do [ -d "$d" ] && cp "$d"/* "$STASH"/; done; ls -l "$STASH"; }
case "${1:-}" in
stash)
    shift; stash "$@" ;;
run)
    # Everything issue 24 prepared, end to end: gpu-check's parts (pytest -m gpu incl. the compiled bf16 MAE
    # over bins on CUDA; the compiled MAE ViT-B/16 at 224 and on smart bins with graph and break counts;
    # DALI "mixed" decoding; 200 steps of pretraining on the DALI loader with its data wait).
    shift; PY=${PYTHON:-python3}
    if [ -d .whl ]; then
        stash .dali/p*
        if (cd "$STASH" && cat dali.tar.part* > dali.tar && sha256sum -c "$OLDPWD/.whl/dali.tar.sha256"); then
            tar -xf "$STASH/dali.tar" -C "$STASH" && wheels=("$STASH"/wheels/*.whl)
        else
            echo "gpu_session: DALI pieces missing or broken (the machine went back between calls?); running without DALI"
            wheels=()
        fi
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl "${wheels[@]}" \
            || { site=$(mktemp -d) && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                 --upgrade --target "$site" .whl/*.whl "${wheels[@]}" && export PYTHONPATH=$site; }
    else
        echo "gpu_session: no .whl/ here (make device-wheels); using the Python environment as it is"
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    "$PY" -c "import torch; import radstream.gpu.bench" || { echo "gpu_session: torch or the project does not import with $PY"; exit 1; }
    if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_session: stops here, the rest needs CUDA (torch.cuda.is_available() is False with $PY); nothing measured"
        exit 0
    fi
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    "$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo "gpu_session: no DALI: its parts are skipped"
    timeout 560 "$PY" -m radstream.cli gpu-check --out "${OUT:-gpu_check}" "$@" ;;
*)
    echo "usage: $0 stash DIR... | run [--quick]" >&2; exit 2 ;;
esac
