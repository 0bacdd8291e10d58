--- moe.analytics: router analytics over the existing model APIs.
--   RouterMonitor(model)    router health accumulated over forwards (monitor.lua)
--   RouterAnalyzer(model)   per-token routing, specialization, co-activation,
--                           consecutive rate, saturation, affinity, traces (analyzer.lua)
--   baselines               random-routing expectations of every metric (baselines.lua)
--   read_traces(path)       loads a routing trace file (traces.lua documents the format)
local monitor = require "moelab.analytics.monitor"
local analyzer = require "moelab.analytics.analyzer"
local traces = require "moelab.analytics.traces"

return {
  RouterMonitor = monitor.RouterMonitor,
  RouterAnalyzer = analyzer.RouterAnalyzer,
  baselines = require "moelab.analytics.baselines",
  read_traces = function(path) return traces.read(path, "analytics.read_traces") end,
}
