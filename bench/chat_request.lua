-- wrk script: POST one fixed chat request, then print a JSON summary line.
-- The bearer key comes from BENCH_API_KEY (any key works against a dev-mode gateway).
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_API_KEY") or "sk-bench")
wrk.body = '{"model":"gpt-4o-mini","messages":[' ..
  '{"role":"system","content":"Classify the banking query into one intent. Answer JSON."},' ..
  '{"role":"user","content":"I am still waiting on my card?"}]}'

-- wrk keeps latencies in microseconds; print exact percentiles, not --latency's rounded text.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"latency_us":{"min":%d,"mean":%.1f,"p50":%d,"p90":%d,' ..
    '"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
