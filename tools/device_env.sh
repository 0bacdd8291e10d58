# Sourced on the GPU machine before running the CUDA build: puts the bundled
# libraries and the machine's cuBLAS (from the CUDA toolkit or the Python
# wheels) and NCCL on the library path; NVLink multicast stays off.
here=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)
libs="$here/build/cuda/lib"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublas.so.13" ] && libs="$libs:$d"
done
py=$(python3 -c 'import os, nvidia.cublas as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$py" ] && libs="$libs:$py"
# NCCL (dlopened by the nccl communicator): the system's, else the Python
# wheel's (nvidia-nccl-cu*, installed with PyTorch; its layout differs between
# CUDA 12 and 13 wheels, so search the nvidia namespace package)
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2'; then
    nccl=$(python3 -c '
import glob, os, nvidia
for p in nvidia.__path__:
    for f in sorted(glob.glob(os.path.join(p, "**", "libnccl.so.2"), recursive=True)):
        print(os.path.dirname(f)); raise SystemExit' 2>/dev/null)
    [ -n "$nccl" ] && libs="$libs:$nccl"
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0
