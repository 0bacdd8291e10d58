# The CUDA check program (CUDA builds only): `make CUDA=1 check-cuda` builds
# and runs it; it lands in $(BUILD)/tests/ and is a prerequisite of `test`, so
# `make CUDA=1 test` runs it too. Without a GPU it prints
# "1..0 # SKIP no CUDA device". Include this file at the end of the Makefile
# (it needs $(BUILD), $(LIB), $(CC), $(CFLAGS) and $(LIBS)).
ifeq ($(CUDA),1)
CUDA_TEST_BIN := $(BUILD)/tests/check_cuda

$(BUILD)/tests/check_cuda: tests/cuda/check_cuda.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(LIBS)

test: $(CUDA_TEST_BIN)

.PHONY: check-cuda
check-cuda: $(BUILD)/tests/check_cuda
	$<
endif
