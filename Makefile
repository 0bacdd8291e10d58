# moelab build. `make` builds ./moelab (CPU); `make CUDA=1` adds the CUDA backend;
# `make test` runs the suite; `make asan` runs it under ASan+UBSan; `make deps`
# installs the Debian packages; `make quickstart` does everything for a new user.

CUDA ?= 0
SAN  ?= 0
CC   ?= gcc
NVCC ?= nvcc
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))

ifeq ($(SAN),1)
  BUILD := build/asan
  OPT   := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  LDSAN := -fsanitize=address,undefined
else ifeq ($(CUDA),1)
  BUILD := build/cuda
  OPT   := -O3 -g -march=x86-64-v3
else
  BUILD := build/cpu
  OPT   := -O3 -g -march=x86-64-v3
endif

VERSION := 0.1.0
LUAJIT_CFLAGS := $(shell pkg-config --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1)
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fPIC $(OPT) -MMD -MP \
           -DMOELAB_VERSION='"$(VERSION)"'
LIBS    := -lopenblas -lcjson -lpcre2-8 -lutf8proc -lm -lpthread

CORE_SRC := $(wildcard src/core/*.c) $(wildcard src/ops/*.c) $(wildcard src/ops/cpu/*.c) $(wildcard src/nn/*.c) $(wildcard src/train/*.c) $(wildcard src/io/*.c) $(wildcard src/dist/*.c)
PROG_SRC := $(wildcard src/lua/*.c) src/main.c src/repl_complete.c

ifeq ($(CUDA),1)
  CORE_SRC := $(filter-out src/ops/cuda_none.c,$(CORE_SRC))
  CU_SRC   := $(wildcard src/ops/cuda/*.cu)
  CFLAGS   += -DMOELAB_CUDA=1
  NVARCH   := -gencode arch=compute_90,code=sm_90
  NVFLAGS   = -O3 -std=c++17 -Xcompiler -fPIC $(NVARCH) -MMD -MP
  # The GPU machine has the driver and cuBLAS but no OpenBLAS, LuaJIT, libedit or cJSON:
  # cudart is linked statically, and `make CUDA=1 bundle` copies the other
  # shared libraries into build/cuda/lib (found via rpath), one OpenBLAS for
  # the program and the test binaries alike.
  LIBS     := -lopenblas -lcjson -lpcre2-8 -lutf8proc -lm -lpthread \
              -L$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart_static -lstdc++ -ldl -lrt \
              -Wl,-rpath,'$$ORIGIN/build/cuda/lib:$$ORIGIN/../lib:$(CUDA_HOME)/lib64'
  # The GPU machine has no LuaJIT: link it statically into the CUDA variant.
  LUAJIT_LIB := -Wl,-Bstatic -lluajit-5.1 -Wl,-Bdynamic
else
  CU_SRC   :=
  LUAJIT_LIB := -lluajit-5.1
endif

# src/dist: the MPI communicator is compiled in when mpicc is found (MPI=0 turns
# it off). Not by default in the CUDA variant, whose GPU machine has no
# OpenMPI: `make CUDA=1 MPI=1` adds it there. NCCL (CUDA variant only) is
# opened at run time (dlopen of libnccl.so.2), so only its header is needed.
ifeq ($(CUDA),1)
  MPI ?= 0
else
  MPI ?= $(shell command -v mpicc >/dev/null 2>&1 && echo 1 || echo 0)
endif
ifeq ($(MPI),1)
  MPI_CFLAGS := -DMOELAB_MPI=1 $(shell mpicc --showme:compile 2>/dev/null || pkg-config --cflags ompi-c)
  MPI_LIBS   := $(shell mpicc --showme:link 2>/dev/null || pkg-config --libs ompi-c)
  LIBS       += $(MPI_LIBS)
endif
DIST_CFLAGS := $(MPI_CFLAGS)
ifeq ($(CUDA),1)
  DIST_CFLAGS += -I$(CUDA_HOME)/include
endif
$(BUILD)/src/dist/%.o: CFLAGS += $(DIST_CFLAGS)

CORE_OBJ := $(CORE_SRC:%.c=$(BUILD)/%.o) $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
PROG_OBJ := $(PROG_SRC:%.c=$(BUILD)/%.o)
LIB      := $(BUILD)/libmoelab.a

.PHONY: all deps test asan quickstart clean bench moelab bundle viz viz-missing
all: moelab

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/src/lua/%.o: src/lua/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LUAJIT_CFLAGS) -c $< -o $@

$(BUILD)/src/main.o $(BUILD)/src/repl_complete.o: $(BUILD)/src/%.o: src/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LUAJIT_CFLAGS) -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

# wgmma needs the architecture-specific Hopper target (runs on H100/H200 only).
# ptxas says so ("wgmma.mma_async instructions are serialized", C7518 and its
# kin) when it serialises a kernel's wgmmas, which a branch inside the
# multiplying loop made it do (the TMA kernel lost 10% of its rate): the build
# fails on it rather than ship the slow code.
WGMMA_OBJ := $(BUILD)/src/ops/cuda/cuda_grouped_mma.cu.o $(BUILD)/src/ops/cuda/cuda_grouped_tma.cu.o
$(WGMMA_OBJ): NVARCH := -gencode arch=compute_90a,code=sm_90a
$(WGMMA_OBJ): $(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -Xptxas -v -c $< -o $@ 2>$@.ptxas || { cat $@.ptxas >&2; rm -f $@; exit 1; }
	@grep -v '^ptxas info' $@.ptxas | grep -v '^ *[0-9]* bytes stack frame' >&2 || true
	@if grep 'instructions are serialized' $@.ptxas >&2; then rm -f $@; echo "$<: ptxas serialised the wgmmas" >&2; exit 1; fi

$(LIB): $(CORE_OBJ)
	@rm -f $@
	ar rcs $@ $^

# -Wl,-E exports the Lua C API so C modules (lfs, busted's helpers) load into moelab.
$(BUILD)/moelab: $(PROG_OBJ) $(LIB)
	$(CC) $(OPT) $(LDSAN) -Wl,-E -o $@ $(PROG_OBJ) $(LIB) $(LUAJIT_LIB) -ledit $(LIBS) -ldl

# moelab.viz (viz/*.c): the cairo + pango renderers as a Lua C module,
# lib/moelab/viz.so, built when pkg-config finds cairo and pangocairo (a GPU
# machine without them builds and runs the engine all the same). It links
# against cairo and pango only: the Lua C API comes from ./moelab (-Wl,-E),
# and the engine (libmoelab) is not in it. One build serves every variant,
# without sanitizers (an uninstrumented module loads into the ASan program).
VIZ_PKGS  := cairo pangocairo
HAVE_VIZ  := $(shell pkg-config --exists $(VIZ_PKGS) 2>/dev/null && echo 1)
VIZ_SRC   := $(wildcard viz/*.c)
VIZ_OBJ   := $(VIZ_SRC:%.c=build/viz/%.o)
VIZ_SO    := lib/moelab/viz.so
ifeq ($(HAVE_VIZ),1)
  VIZ_TARGET := $(VIZ_SO)
  VIZ_CFLAGS := $(shell pkg-config --cflags $(VIZ_PKGS))
  VIZ_LIBS   := $(shell pkg-config --libs $(VIZ_PKGS)) -lm
else
  VIZ_TARGET := viz-missing
endif

# copy then rename, so a ./moelab that is running (a REPL, a long recipe) is not in the way
moelab: $(BUILD)/moelab $(VIZ_TARGET)
	cp $< $@.tmp && mv -f $@.tmp $@

build/viz/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fPIC -O2 -g -MMD -MP \
	  $(VIZ_CFLAGS) $(LUAJIT_CFLAGS) -c $< -o $@

# linked then renamed, so a running ./moelab that has the module mapped is not in the way;
# -z nodelete: lua_close dlcloses C modules, and unloading pango under the font
# thread glib started would crash the program at exit
$(VIZ_SO): $(VIZ_OBJ) Makefile
	@mkdir -p $(dir $@)
	$(CC) -shared -Wl,-z,nodelete -o $@.tmp $(VIZ_OBJ) $(VIZ_LIBS) && mv -f $@.tmp $@

viz: $(VIZ_TARGET)

viz-missing:
	@echo "viz: pkg-config finds no cairo/pangocairo; lib/moelab/viz.so (moelab.viz) not built" \
	      "(install libcairo2-dev libpango1.0-dev to render reports)"

deps:
	@sh tools/deps.sh

TEST_C_SRC := $(wildcard tests/c/*.c)
TEST_C_BIN := $(TEST_C_SRC:tests/c/%.c=$(BUILD)/tests/%)

$(BUILD)/tests/%: tests/c/%.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(LDSAN) $(LIBS)

test: moelab $(TEST_C_BIN)
	@sh tests/run.sh $(BUILD)

asan:
	$(MAKE) SAN=1 moelab
	@ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 $(MAKE) SAN=1 test

quickstart: deps moelab
	./moelab recipes/quickstart.lua

$(BUILD)/bench/cpu_ops: bench/cpu_ops.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(LIB) $(LIBS)

bench: $(BUILD)/bench/cpu_ops
	$(BUILD)/bench/cpu_ops

# Shared libraries the CUDA variant needs on a machine that lacks them (not cuBLAS:
# the GPU machine has it; tools/device_env.sh finds it there).
BUNDLE_LIBS := libopenblas.so.0 libcjson.so.1 libpcre2-8.so.0 libutf8proc.so.2 libgfortran.so.5 libquadmath.so.0 libedit.so.2 libbsd.so.0 libmd.so.0 libtinfo.so.6
bundle: $(BUILD)/moelab
	@mkdir -p $(BUILD)/lib
	@for l in $(BUNDLE_LIBS); do p=$$(ldconfig -p | awk -v l=$$l '$$1 == l {print $$NF; exit}'); \
	  [ -n "$$p" ] && cp -L "$$p" $(BUILD)/lib/; done; ls $(BUILD)/lib

clean:
	rm -rf build moelab $(VIZ_SO)

-include $(CORE_OBJ:.o=.d) $(PROG_OBJ:.o=.d) $(VIZ_OBJ:.o=.d)
include mk/cuda_tests.mk
