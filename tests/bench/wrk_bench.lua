-- wrk script of the benchmark's HTTP/1.1 cases (tests/bench/harness.py).
--
-- done() prints one line "BENCH-JSON {...}" with the totals and latency percentiles (us),
-- parsed by tests/bench/httpload.py.  With WRK_RATE=N (> 0) in the environment, requests
-- are paced to N per second in total (wrk2 is not packaged): delay() hands every request the
-- next slot of a fixed schedule, so with enough connections the rate does not depend on the
-- latency (open loop).  Use one wrk thread (-t 1): the schedule is per thread.
local rate = tonumber(os.getenv("WRK_RATE") or "0") or 0

if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  local CLOCK_MONOTONIC = 1
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval = 1000 / rate
  local next_slot = nil
  -- A stall (every connection busy) must not turn into a catch-up burst afterwards.
  local max_debt_ms = 50

  function delay()
    local now = now_ms()
    if next_slot == nil or next_slot < now - max_debt_ms then
      next_slot = now
    end
    local wait = next_slot - now
    next_slot = next_slot + interval
    if wait <= 0 then
      return 0
    end
    return math.floor(wait + 0.5)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, '
    .. '"rate_target": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, rate))
end
