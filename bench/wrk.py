"""
wrk for the benchmarks, bounded in time, with a script that counts which
worker answered each request.  (The tests drive load with
L{txcluster.testing.Load}, which needs nothing but Python.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Sequence


# wrk ------------------------------------------------------------------------

# One Lua state per wrk thread: each counts the workers named in its
# responses; done() (run once, in the main state) sums the threads' tables,
# which setup() kept, and prints two machine-readable lines.
WORKER_COUNTING_LUA = r"""
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counts = {}
   unnamed = 0
end

function response(status, headers, body)
   local w = body and string.match(body, '"worker":%s*(%d+)')
   if w then
      counts[w] = (counts[w] or 0) + 1
   else
      unnamed = unnamed + 1
   end
end

function done(summary, latency, requests)
   local total, other = {}, 0
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      if c then
         for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
      end
      other = other + (thread:get("unnamed") or 0)
   end
   io.write("TXC-WORKERS")
   for k, v in pairs(total) do io.write(string.format(" %s=%d", k, v)) end
   io.write(string.format(" unnamed=%d\n", other))
   local e = summary.errors
   io.write(string.format(
      "TXC-SUMMARY duration_us=%d requests=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d\n",
      summary.duration, summary.requests, e.connect, e.read, e.write, e.status,
      e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    non2xx: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    workers: Dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @staticmethod
    def combine(results: Sequence["WrkResult"]) -> "WrkResult":
        """Concurrent runs on different ports: requests/s add up."""
        total = WrkResult()
        total.requests = sum(r.requests for r in results)
        total.errors = sum(r.errors for r in results)
        total.non2xx = sum(r.non2xx for r in results)
        total.p50_ms = max(r.p50_ms for r in results)
        total.p99_ms = max(r.p99_ms for r in results)
        # sum of rates == total requests / this duration
        rate = sum(r.rps for r in results)
        total.seconds = total.requests / rate if rate else 0.0
        return total


def wrk_available(binary: str = "wrk") -> bool:
    return shutil.which(binary) is not None


def run_wrk(
    urls: Sequence[str], connections: int = 32, threads: int = 2, seconds: int = 3,
    close: bool = False, binary: str = "wrk", path: str = "/",
) -> WrkResult:
    """
    Run wrk against each URL at once (the connections and threads split
    between them), counting the worker named in each JSON answer
    (C{"worker": N}).  Bounded: each wrk is killed C{seconds + 30} s in.
    """
    n = len(urls)
    per_connections = max(1, connections // n)
    per_threads = max(1, min(per_connections, threads // n or 1))
    with tempfile.TemporaryDirectory(prefix="txcluster-wrk-") as directory:
        script = os.path.join(directory, "workers.lua")
        with open(script, "w") as f:
            f.write(WORKER_COUNTING_LUA)
        command = [binary, f"-t{per_threads}", f"-c{per_connections}", f"-d{seconds}s",
                   "-s", script]
        if close:
            command += ["-H", "Connection: close"]
        processes = [subprocess.Popen([*command, url + path], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for url in urls]
        outputs = []
        try:
            for process in processes:
                output, _ = process.communicate(timeout=seconds + 30)
                if process.returncode:
                    raise RuntimeError(f"wrk failed ({process.returncode}):\n{output}")
                outputs.append(output)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    results = [_parse_wrk(output) for output in outputs]
    return results[0] if n == 1 else WrkResult.combine(results)


def _parse_wrk(output: str) -> WrkResult:
    summary = re.search(r"^TXC-SUMMARY (.*)$", output, re.M)
    workers = re.search(r"^TXC-WORKERS(.*)$", output, re.M)
    if not summary or not workers:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    s = {k: int(v) for k, v in (kv.split("=") for kv in summary[1].split())}
    result = WrkResult(
        requests=s["requests"], seconds=s["duration_us"] / 1e6,
        errors=s["connect"] + s["read"] + s["write"] + s["timeout"],
        non2xx=s["status"], p50_ms=s["p50_us"] / 1000, p99_ms=s["p99_us"] / 1000)
    for kv in workers[1].split():
        key, value = kv.split("=")
        if key.isdigit():
            result.workers[int(key)] = int(value)
    return result
