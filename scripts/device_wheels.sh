#!/usr/bin/env bash
# Wheels for the GPU machine of docs/gpu.md (Python 3.12, CUDA 13 image with torch, no internet): what
# radstream needs that its image lacks. Small ones go to .whl/ (carried by the last call); DALI's set is tarred
# and cut into pieces .dali/p1 ... .dali/pN of at most PIECE_MB MiB, one carried by each call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIECE_MB=${PIECE_MB:-56}
DL=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
SMALL=(omegaconf==2.4.0 pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0 pylibjpeg-libjpeg==2.4.0
       webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
       google-crc32c==1.9.0)
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
      nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
      astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0 libcst==1.9.0)
rm -rf .whl .dali && mkdir -p .whl .dali/wheels
"${DL[@]}" -d .whl "${SMALL[@]}"
"${DL[@]}" -d .dali/wheels "${DALI[@]}"
tar -cf .dali/dali.tar -C .dali wheels
split -b "${PIECE_MB}M" -d -a 1 .dali/dali.tar .dali/dali.tar.part
n=0
for part in .dali/dali.tar.part*; do
    n=$((n + 1)); mkdir -p ".dali/p$n"; mv "$part" ".dali/p$n/"
done
(cd .dali && sha256sum dali.tar) > .whl/dali.tar.sha256
rm -rf .dali/wheels .dali/dali.tar
echo "device-wheels: .whl/ ($(du -sh .whl | cut -f1)) and $n DALI pieces: $(ls -d .dali/p* | tr '\n' ' ')"
