# Sourced on the GPU machine before running the CUDA build: puts the bundled
# libraries and the machine's cuBLAS (from the CUDA toolkit or the Python
# wheels) on the library path.
here=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)
libs="$here/build/cuda/lib"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublas.so.13" ] && libs="$libs:$d"
done
py=$(python3 -c 'import os, nvidia.cublas as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$py" ] && libs="$libs:$py"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0
