--- moe.io: checkpoints and their sidecar files.
--
--   moe.io.safetensors.save(path, {{"w", w}, {"b", b}}, {step = "100"})
--   local tensors, meta = moe.io.safetensors.load(path)          -- zero-copy views
--   local f32 = moe.io.safetensors.load(path, {dtype = "f32", names = {"w"}})
--   for _, e in ipairs(moe.io.safetensors.info(path)) do print(e.name, e.dtype) end
--   moe.io.write_file_atomic("run/config.json", moe.io.json.encode(cfg, {indent = true}))
--
-- load/info also take a sharded checkpoint's model.safetensors.index.json
-- (any path ending in .json); each shard is opened once. Saving is atomic:
-- the file is written to <path>.tmp.<pid>, fsynced and renamed, so an error
-- or a crash never leaves a truncated checkpoint under the real name.
local core = require "moelab.core"
local cio = core.io

local M = {}

M.safetensors = {
  --- load(path, {dtype=, names=}) -> {name = tensor}, metadata.
  -- Without dtype the tensors are zero-copy views of the mapped file (writes
  -- to them stay private to the process); with dtype they are converted
  -- copies (zero-copy still when a tensor already has that dtype). names
  -- loads only those tensors. metadata is the file's __metadata__ table of
  -- strings (for an index: its "metadata" object).
  load = cio.safetensors_load,
  --- save(path, tensors, metadata). tensors: a list of {name, tensor} pairs
  -- (header order kept) or a map name -> tensor (written in sorted name
  -- order). Any dtype and device. metadata: string keys, string (or number)
  -- values.
  save = cio.safetensors_save,
  --- info(path) -> list of {name=, dtype=, file_dtype=, shape=, nbytes=, file=}
  -- in header order, and the metadata, without reading tensor data. dtype is
  -- moelab's name ("bf16"), or the file's ("F8_E4M3") for types moelab
  -- cannot load.
  info = cio.safetensors_info,
}

M.json = {
  --- encode(value, {indent=true}) -> string. Tables with keys 1..n become
  -- arrays, others objects with sorted string keys; {} encodes as {}.
  encode = cio.json_encode,
  --- decode(string) -> value; null becomes nil (a key with a null value is
  -- absent), but json.null inside arrays, so elements keep their positions.
  decode = cio.json_decode,
  --- Encodes as null; decode returns it for nulls inside arrays.
  null = cio.json_null,
}

--- write_file_atomic(path, string): temp file, fsync, rename.
M.write_file_atomic = cio.write_file_atomic
--- read_file(path) -> string
M.read_file = cio.read_file
--- mkdir_p(path): creates the directory and its parents; existing is fine.
M.mkdir_p = cio.mkdir_p

return M
