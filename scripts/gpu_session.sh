#!/usr/bin/env bash
# On the GPU machine (docs/gpu.md), from the repository root:
#   bash scripts/gpu_session.sh stash .dali/pK     keep one carried DALI piece in /tmp across warm calls
#   bash scripts/gpu_session.sh run [--quick]      stash the last piece, install all wheels, run gpu-check to $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=/tmp/radstream-dali
mkdir -p "$STASH"
stash() { for d in "$@"; do [ -d "$d" ] && cp "$d"/* "$STASH"/; done; ls -l "$STASH"; }
case "${1:-}" in
stash)
    shift; stash "$@" ;;
run)
    shift; stash .dali/p*
    if (cd "$STASH" && cat dali.tar.part* > dali.tar && sha256sum -c "$OLDPWD/.whl/dali.tar.sha256"); then
        tar -xf "$STASH/dali.tar" -C "$STASH" && wheels=("$STASH"/wheels/*.whl)
    else
        echo "gpu_session: DALI pieces missing or broken (the machine went back between calls?); running without DALI"
        wheels=()
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl "${wheels[@]}" \
        || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
             .whl/*.whl "${wheels[@]}" && export PYTHONPATH=/tmp/site; }
    python3 -c "import nvidia.dali as d, torch; print('dali', d.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    timeout 560 python3 -m radstream.cli gpu-check --out "${OUT:-gpu_check}" "$@" ;;
*)
    echo "usage: $0 stash DIR... | run [--quick]" >&2; exit 2 ;;
esac
