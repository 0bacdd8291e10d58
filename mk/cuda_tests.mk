# GPU tests (tests/gpu). Each tests/gpu/check_*.c is a C program that checks
# CUDA kernels against the CPU backend and prints TAP; each tests/gpu/*_gpu.lua
# is a Lua check run by the CUDA build of moelab. tests/gpu/run.sh runs them
# all and prints "N passed, N failed". Without a GPU every program prints
# "1..0 # SKIP no CUDA device".
#   make test-gpu          builds the CUDA variant and runs tests/gpu here
#   make CUDA=1 gpu-tests  only builds them (CI does this: they must compile)
# On the GPU machine, with build/cuda carried: bash tests/gpu/run.sh build/cuda
# Include this file at the end of the Makefile (it needs $(BUILD), $(LIB),
# $(CC), $(CFLAGS) and $(LIBS)).
.PHONY: test-gpu gpu-tests check-cuda
test-gpu:
	$(MAKE) CUDA=1 build/cuda/moelab gpu-tests
	bash tests/gpu/run.sh build/cuda

ifeq ($(CUDA),1)
GPU_TEST_SRC := $(wildcard tests/gpu/check_*.c)
GPU_TEST_BIN := $(GPU_TEST_SRC:tests/gpu/%.c=$(BUILD)/tests/gpu/%)

$(BUILD)/tests/gpu/%: tests/gpu/%.c tests/gpu/gpucheck.h $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(LIBS)

gpu-tests: $(GPU_TEST_BIN)
test: $(GPU_TEST_BIN)

check-cuda: $(BUILD)/tests/gpu/check_cuda
	$<
else
gpu-tests:
	@echo "gpu-tests: build with CUDA=1"; exit 1
endif
