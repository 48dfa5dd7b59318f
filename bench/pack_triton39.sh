#!/usr/bin/env bash
# Build the Triton 3.9 package that bench/gpu_env.sh unpacks on a lent GPU machine (TRITON39=1):
# the cp312 wheel's `triton/` trimmed to what CUDA sm90 runs (no AMD backend, no CUPTI, no proton, no
# nvdisasm, and of the two ptxas only `ptxas-blackwell`, the one Triton 3.9 runs for sm90+), as
# triton39.tar.xz split in two parts under .tri1/ and .tri2/ (each beside the SHA256), carried in two calls.
#
#   bash bench/pack_triton39.sh        (about 4 minutes on two cores: xz)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$work" triton==3.9.0
(cd "$work" && unzip -q triton-3.9.0-*.whl 'triton/*')
rm -rf "$work"/triton/backends/amd "$work"/triton/backends/nvidia/lib/cupti* "$work"/triton/_C/libproton.so \
    "$work"/triton/backends/nvidia/bin/ptxas "$work"/triton/backends/nvidia/bin/nvdisasm
tar cJf "$work/triton39.tar.xz" -C "$work" triton
(cd "$work" && sha256sum triton39.tar.xz > SHA256 && split -n 2 -d triton39.tar.xz triton39.part.)
mkdir -p .tri1 .tri2
cp "$work/triton39.part.00" "$work/SHA256" .tri1/
cp "$work/triton39.part.01" "$work/SHA256" .tri2/
du -sh .tri1 .tri2
