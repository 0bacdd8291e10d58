-- bench/gpu_ab.sh (two builds against each other, runs alternating) with
-- stand-in programs that print what the benchmarks print, so its parsing,
-- order, summary and refusals run without a GPU.
local files = require "helpers.files"
teardown(files.cleanup)

local dir = files.tmpdir()
local function stub(name, body)
  local p = dir .. "/" .. name
  local f = assert(io.open(p, "w"))
  f:write("#!/bin/sh\n", body, "\n")
  f:close()
  os.execute("chmod +x '" .. p .. "'")
  return p
end
-- each call appends its build's name to `calls`, so the order can be read back;
-- the layer's figure comes from $V (480 unless set)
local calls = dir .. "/calls"
local a = stub("a", [[
echo "${WHO:-a}" >> ']] .. calls .. [['
case "$1" in
bench/gpu_moe_layer.lua)
  echo "ROW|OLMoE|moelab nn.MoE, accumulating gradients|bf16||||1|"
  echo "ROW|OLMoE|moelab nn.MoE|bf16|3.5|470.0|10.2|${V:-480}|" ;;
bench/gpu_step.lua)
  echo "# loss 10.9 -> 9.1"
  echo "mode            tokens/s   step ms   peak GB (in use)   peak reserved GB   MFU"
  echo "moelab-bf16        ${V:-345000}     23.70               8.79               8.82   31.9%" ;;
bench/gpu_grouped.lua)
  echo "shape              rows    G      K      N        ms   TFLOP/s"
  echo "$4    131072   64   2048   2048     1.905     ${V:-577.2}" ;;
esac]])
local b = stub("b", "WHO=b V=${BV:-490} exec '" .. a .. "' \"$@\"")
local silent = stub("silent", "echo 'no figure here'")

local function ab(args)
  os.remove(calls)
  return files.sh("bash bench/gpu_ab.sh " .. args)
end

describe("bench/gpu_ab.sh", function()
  it("alternates the builds and reports each one's runs and the ratio of the means", function()
    local out, rc = ab("-n 3 '" .. a .. "' '" .. b .. "'")
    assert.are.equal(0, rc, out)
    assert.are.equal("a\nb\na\nb\na\nb\n", files.read(calls))
    assert.truthy(out:find("round 2 B 490", 1, true), out)
    assert.truthy(out:find("mean 480.0  min 480.0  max 480.0  (3 runs)", 1, true), out)
    assert.truthy(out:find("layer: B / A = 1.021", 1, true), out)
  end)

  it("reads the step's tokens/s and a grouped GEMM's TFLOP/s", function()
    local out, rc = ab("-w step -n 1 '" .. a .. "' '" .. a .. "'")
    assert.are.equal(0, rc, out)
    assert.truthy(out:find("round 1 A 345000", 1, true), out)
    out, rc = files.sh("BV=600 bash bench/gpu_ab.sh -w 'grouped:olmoe gate/up' -n 1 '" .. a .. "' '" .. b .. "'")
    assert.are.equal(0, rc, out)
    assert.truthy(out:find("round 1 A 577.2", 1, true), out)
    assert.truthy(out:find("B / A = 1.040", 1, true), out)
  end)

  it("stops with the run's output when a build prints no figure", function()
    local out, rc = ab("'" .. a .. "' '" .. silent .. "'")
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("(B, round 1) printed no figure", 1, true), out)
    assert.truthy(out:find("no figure here", 1, true), out)
  end)

  it("refuses bad arguments", function()
    local out, rc = ab("-w foo '" .. a .. "' '" .. b .. "'")
    assert.are.equal(2, rc)
    assert.truthy(out:find("expected layer, step or grouped:SHAPE", 1, true), out)
    out, rc = ab("-n 0 '" .. a .. "' '" .. b .. "'")
    assert.are.equal(2, rc)
    assert.truthy(out:find("expected a count of runs", 1, true), out)
    out, rc = ab("'" .. a .. "' '" .. dir .. "/missing'")
    assert.are.equal(2, rc)
    assert.truthy(out:find("is not an executable program", 1, true), out)
    out, rc = ab("'" .. a .. "'")
    assert.are.equal(2, rc)
    assert.truthy(out:find("usage:", 1, true), out)
  end)
end)
