-- Runs busted inside the moelab program, so specs see the same LuaJIT, the
-- same `moe` and the same C core that users get. Usage:
--   ./moelab tests/busted.lua [busted options] [spec files or dirs]
package.path = "./tests/?.lua;" .. package.path
require "busted.runner" ({ standalone = false })
