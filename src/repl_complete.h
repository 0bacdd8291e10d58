/* Tab completion of Lua names for the REPL (libedit). */
#ifndef MOE_REPL_COMPLETE_H
#define MOE_REPL_COMPLETE_H

#include <lua.h>

/* Points libedit's completion at L (globals, dotted and colon paths, methods
 * from __index tables); NULL switches it off again. */
void moe_repl_completion_install(lua_State *L);

#endif
