-- The moelab program itself: options, scripts, stdin and the piped REPL.
-- Runs the real binary (./moelab from the repo root, or $MOELAB_BIN).

local BIN = os.getenv("MOELAB_BIN") or "./moelab"

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command line with stderr folded into stdout; returns the
-- output and the exit status.
local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"@@rc=$?\""))
  local out = p:read("*a")
  p:close()
  local body, rc = out:match("^(.-)@@rc=(%d+)%s*$")
  return body, tonumber(rc)
end

local function moelab(args)
  return sh(BIN .. " " .. args)
end

-- Feeds `input` to the program on stdin.
local function moelab_stdin(args, input)
  local f = os.tmpname()
  local h = assert(io.open(f, "w"))
  h:write(input)
  h:close()
  local out, rc = sh(BIN .. " " .. args .. " < " .. q(f))
  os.remove(f)
  return out, rc
end

local function with_script(src, fn)
  local f = os.tmpname()
  local h = assert(io.open(f, "w"))
  h:write(src)
  h:close()
  local ok, err = pcall(fn, f)
  os.remove(f)
  if not ok then error(err, 0) end
end

describe("moelab program", function()
  it("prints its version", function()
    local out, rc = moelab("--version")
    assert.are.equal(0, rc)
    assert.truthy(out:match("^moelab %d+%.%d+%.%d+ %(LuaJIT %d+%.%d+%.%d+[^,]*, CUDA (%a+)%)\n$"), out)
  end)

  it("prints usage listing the options and REPL features", function()
    local out, rc = moelab("--help")
    assert.are.equal(0, rc)
    for _, opt in ipairs{"-e", "-i", "--threads", "--device", "--version", "--help", "TAB", "history", "Ctrl-C"} do
      assert.truthy(out:find(opt, 1, true), "usage lacks " .. opt)
    end
  end)

  it("runs -e code in order, with moe preloaded", function()
    local out, rc = moelab("-e 'x = 20' -e 'print(x + 1, type(moe))'")
    assert.are.equal(0, rc)
    assert.are.equal("21\ttable\n", out)
  end)

  it("reports -e errors on stderr with a traceback and exits 1", function()
    local out, rc = moelab("-e 'error(\"boom\")' 2>/dev/null")
    assert.are.equal(1, rc)
    assert.are.equal("", out) -- nothing on stdout
    out, rc = moelab("-e 'error(\"boom\")'")
    assert.are.equal(1, rc)
    assert.truthy(out:find("moelab: (command line):1: boom", 1, true), out)
    assert.truthy(out:find("stack traceback:", 1, true), out)
  end)

  it("runs a script with arg and ... set as the standalone interpreter does", function()
    with_script([[
      print(arg[0] == SCRIPT, arg[-1], #arg, ...)
      print(select("#", ...))
    ]], function(f)
      local out, rc = moelab("-e " .. q("SCRIPT = " .. string.format("%q", f)) .. " " .. q(f) .. " a 'b c' d")
      assert.are.equal(0, rc)
      -- with -e before the script, arg[-1] is that option's argument
      assert.truthy(out:find("^true\tSCRIPT = .-\t3\ta\tb c\td\n3\n$"), out)
      out, rc = moelab(q(f) .. " x")
      assert.are.equal(0, rc)
      assert.truthy(out:find("\t" .. BIN:gsub("%p", "%%%0") .. "\t1\tx\n1\n$"), out)
    end)
  end)

  it("exits 1 with the message when a script fails or is missing", function()
    with_script("local function f() error('deep') end\nf()\n", function(f)
      local out, rc = moelab(q(f))
      assert.are.equal(1, rc)
      assert.truthy(out:find("^moelab: .-:1: deep\nstack traceback:"), out)
      assert.truthy(out:find("in function 'f'", 1, true), out)
    end)
    local out, rc = moelab("/nonexistent/recipe.lua")
    assert.are.equal(1, rc)
    assert.truthy(out:find("^moelab: cannot open /nonexistent/recipe.lua"), out)
  end)

  it("passes os.exit statuses through", function()
    local _, rc = moelab("-e 'os.exit(7)'")
    assert.are.equal(7, rc)
  end)

  it("reads the script from stdin with -", function()
    local out, rc = moelab_stdin("- p q", "print('stdin', arg[0], ...)\n")
    assert.are.equal(0, rc)
    assert.are.equal("stdin\t-\tp\tq\n", out)
  end)

  it("sets MOELAB_NUM_THREADS and MOELAB_DEVICE from --threads and --device", function()
    local out, rc = moelab("--threads 3 --device cuda -e 'print(os.getenv(\"MOELAB_NUM_THREADS\"), os.getenv(\"MOELAB_DEVICE\"))'")
    assert.are.equal(0, rc)
    assert.are.equal("3\tcuda\n", out)
  end)

  it("rejects unknown or incomplete options with exit status 2", function()
    for _, args in ipairs{"--bogus", "-x", "-e", "--threads", "--threads zero", "--device tpu"} do
      local out, rc = moelab(args)
      assert.are.equal(2, rc, args)
      assert.truthy(out:find("usage:", 1, true), args .. ": " .. out)
      assert.truthy(out:find("--help", 1, true), args .. ": " .. out)
    end
  end)

  describe("piped REPL", function()
    it("prints values of =expr and expressions, tab-separated", function()
      local out, rc = moelab_stdin("", "=1+1\n1, 'two', nil -- trailing comment\nlocal x = 5\nprint('p')\n")
      assert.are.equal(0, rc)
      assert.are.equal("2\n1\ttwo\tnil\np\n", out)
    end)

    it("prints values through tostring (__tostring)", function()
      local out = moelab_stdin("", "setmetatable({}, {__tostring = function() return 'T<2x3>' end})\n")
      assert.are.equal("T<2x3>\n", out)
    end)

    it("prints tensors as tostring does", function()
      local want = moelab("-e 'print(tostring(moe.zeros({2, 2})))'")
      local out, rc = moelab_stdin("", "=moe.zeros({2, 2})\n")
      assert.are.equal(0, rc)
      assert.truthy(want:find("tensor", 1, true), want)
      assert.are.equal(want, out)
    end)

    it("continues incomplete input over several lines", function()
      local out, rc = moelab_stdin("", "function sq(x)\n  return x * x\nend\n=sq(7)\nfor i = 1, 2 do\n  print(i)\nend\n")
      assert.are.equal(0, rc)
      assert.are.equal("49\n1\n2\n", out)
    end)

    it("reports errors and goes on", function()
      local out, rc = moelab_stdin("", "error('bad')\n=1 +\n)\nprint('after')\n")
      assert.are.equal(0, rc)
      assert.truthy(out:find("error: stdin:1: bad\n", 1, true), out)
      assert.truthy(out:find("error: stdin:", 1, true), out)
      assert.truthy(out:find("after\n$"), out)
    end)

    it("reports a chunk left incomplete at end of input", function()
      local out, rc = moelab_stdin("", "x = \n")
      assert.are.equal(0, rc)
      assert.truthy(out:find("error: stdin:1: .*<eof>"), out)
    end)

    it("has the moe global and leaves with exit()", function()
      local out, rc = moelab_stdin("", "=type(moe)\nexit(3)\nprint('not reached')\n")
      assert.are.equal(3, rc)
      assert.are.equal("table\n", out)
    end)

    it("enters the REPL after a script with -i", function()
      with_script("y = 41\n", function(f)
        local out, rc = moelab_stdin("-i " .. q(f), "=y + 1\n")
        assert.are.equal(0, rc)
        assert.are.equal("42\n", out)
      end)
    end)
  end)
end)

describe("moelab REPL printing", function()
  it("prints tables as constructors and tensors with their own tostring", function()
    local p = assert(io.popen("printf '=moe.randn({2,3}):shape()\\n={a=1, b={1,2,\"x\"}}\\nx = {}; x.self = x\\n=x\\n' | ./moelab 2>&1"))
    local out = p:read("*a")
    p:close()
    assert.is_truthy(out:find("{2, 3}", 1, true), out)
    assert.is_truthy(out:find('{a = 1, b = {1, 2, "x"}}', 1, true), out)
    assert.is_truthy(out:find("{self = <cycle>}", 1, true), out)
  end)
end)
