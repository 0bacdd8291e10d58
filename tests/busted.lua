-- Runs busted inside the moelab program, so specs see the same LuaJIT, the
-- same `moe` and the same C core that users get. Usage:
--   ./moelab tests/busted.lua [busted options] [spec files or dirs]
-- Appended, not prepended: "./tests/?.lua" first would make require "busted"
-- find this file instead of the busted module.
package.path = package.path .. ";./tests/?.lua"
require "busted.runner" ({ standalone = false })
