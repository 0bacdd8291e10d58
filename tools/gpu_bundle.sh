#!/usr/bin/env bash
# Moves a CUDA build to the GPU machine within the 64 MiB a device call may
# carry. Here: `bash tools/gpu_bundle.sh pack` (after make CUDA=1
# build/cuda/moelab gpu-tests bundle) writes build/gpu_bundle.tar.xz: the
# program with its debug sections stripped, the stripped GPU test programs
# and build/cuda/lib, about 16 MB (the programs share most of their bytes).
# There: `bash tools/gpu_bundle.sh unpack` puts them back under build/cuda.
set -eu
cd "$(dirname "$0")/.."
case "${1:-}" in
pack)
    rm -rf build/gpuC && mkdir -p build/gpuC
    strip --strip-debug -o build/gpuC/moelab build/cuda/moelab
    for t in build/cuda/tests/gpu/check_*; do
        case $t in *.d) continue ;; esac
        strip --strip-all -o "build/gpuC/$(basename "$t")" "$t"
    done
    tar -C build -cf - gpuC cuda/lib | xz -T0 -6 >build/gpu_bundle.tar.xz
    rm -rf build/gpuC
    ls -la build/gpu_bundle.tar.xz ;;
unpack)
    tar -C build -xJf build/gpu_bundle.tar.xz
    mkdir -p build/cuda/tests/gpu
    mv build/gpuC/moelab build/cuda/moelab
    mv build/gpuC/check_* build/cuda/tests/gpu/
    rmdir build/gpuC ;;
*)
    echo "usage: bash tools/gpu_bundle.sh pack|unpack" >&2; exit 2 ;;
esac
