"""Single-item load with ``wrk`` (Debian package ``wrk``): a C load generator, so the client's own CPU does not
count in the server's latency the way a Python client's does on a 2-core machine.

Each request posts one item of a pool (cycled) with a fresh id; ``wrk -t1 -c<users> -d<duration>s --latency``
keeps ``users`` connections busy (closed loop, like the Python users of :mod:`bench.serve_load`), optionally with
an exponentially distributed think time between a reply and the next request (moderate load). A Lua ``done``
hook prints the latency percentiles and the non-2xx count as one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ID_MARK = "__RISKSCORE_ID__"

LUA = r"""
local bodies = {}
for line in io.lines("%(bodies)s") do bodies[#bodies + 1] = line end
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
request = function()
  n = n + 1
  local body = bodies[(n %% #bodies) + 1]:gsub("%(mark)s", string.format("%(prefix)s-%%d", n), 1)
  return wrk.format(nil, "%(path)s", nil, body)
end
%(delay)s
done = function(summary, latency, requests)
  local bad = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  io.write(string.format(
    '{"n": %%d, "errors": %%d, "seconds": %%f, "p50_ms": %%f, "p90_ms": %%f, "p99_ms": %%f, "max_ms": %%f}\n',
    summary.requests, bad, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


# Think times are exponential with the given mean (Poisson-like arrivals): fixed think times let the connections
# fall into lockstep after one queued burst, so every cycle they arrive together and the last one waits for the others.
DELAY = """math.randomseed(os.time())
delay = function() return math.floor(-%g * math.log(1 - math.random())) end"""


def available() -> bool:
    return shutil.which("wrk") is not None


def run(url: str, path: str, key: str, items: list[dict], id_col: str, users: int, duration: float,
        think_ms: float = 0.0) -> dict:
    """Latency percentiles (ms), requests/s and errors of ``users`` connections posting single items, each
    connection waiting a random think time of mean ``think_ms`` between a reply and its next request (wrk's
    ``delay`` hook)."""
    with tempfile.TemporaryDirectory(prefix="riskscore-wrk-") as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"items": [{**item, id_col: ID_MARK}]}) + "\n" for item in items))
        script = Path(tmp) / "single.lua"
        script.write_text(LUA % {"bodies": bodies, "key": key, "mark": ID_MARK, "path": path,
                                    "prefix": f"W{time.time_ns()}",
                                    "delay": DELAY % think_ms if think_ms > 0 else ""})
        cmd = ["wrk", "-t1", f"-c{users}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"users": users, "think_ms": think_ms, "client": "wrk", **summary,
            "requests_per_s": summary["n"] / summary["seconds"]}
