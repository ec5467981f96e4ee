"""Benchmark of minisched's HTTP API against a real ``serve`` process.

Run from anywhere: ``python bench/bench_api.py``.

(1) ``GET /api/jobs`` latency with 1000 jobs (created through ``POST /api/jobs``).
(2) ``GET /api/runs?limit=50`` latency with 100 000 runs in history (seeded with
    plain sqlite3 while the server is stopped).
(3) requests/s of 4 concurrent clients doing a mix of ``GET /api/jobs/{name}``,
    ``GET /api/runs?limit=50`` and ``GET /api/health`` for 10 s.
(4) SSE end-to-end delay: 100 subscribers on one run whose command prints its
    own ``time.time()`` every 100 ms; delay = receipt time - child write time.
(5) server RSS with those 100 subscribers connected (and idle, for reference).
(6) reference: 100 connections opened at once, to ``/api/health`` and to the
    stream of the ended run (the subscribers of (4) connect 4 at a time).

The server speaks HTTP/1.0 and closes every connection, so every request here
opens a new connection; latencies include connect time.  Everything lives in a
temporary directory and the server is stopped before the script exits.  Takes
about two minutes.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import minisched

SCRIPT = os.path.join(ROOT, "minisched.py")
HOST = "127.0.0.1"
N_JOBS = 1000
N_RUNS = 100_000
NEVER = "0 0 1 1 *"  # fires once a year, at New Year: never during the bench
MAX_STREAMS = 200
JOBS_SAMPLES = 200
RUNS_SAMPLES = 1000
STATS_SAMPLES = 200
MIX_CLIENTS = 4
MIX_SECONDS = 10.0
SSE_CLIENTS = 100
SSE_LINES = 100
SSE_INTERVAL = 0.1
SSE_LEAD = 3.0  # the child waits this long before its first line
SSE_CONNECT_PENDING = 4  # subscribers waiting for headers at once
BURST_TIMEOUT = 20.0  # a burst's connections still open after this count as failed
TICKER = "sse-ticker"
MB = 1024 * 1024

#: ``serve`` logs this once it accepts connections.
LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/")

TARGETS = {
    "jobs_p99": 30.0,
    "runs_p99": 20.0,
    "stats_p99": 20.0,
    "sse_p99": 50.0,
    "sse_rss": 60.0,
}

summary = []  # (measurement, value, target, verdict)
problems = []  # odd things seen on the way (5xx, errors...)


# -- helpers --------------------------------------------------------------------


def pct(values, p):
    """Nearest-rank percentile of ``values`` (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def dist(values_ms) -> str:
    return (
        f"n={len(values_ms)}  p50={pct(values_ms, 50):.2f} ms  "
        f"p90={pct(values_ms, 90):.2f} ms  p99={pct(values_ms, 99):.2f} ms  "
        f"max={max(values_ms):.2f} ms"
    )


def verdict(name, value, target, unit) -> None:
    ok = value < target
    summary.append((name, f"{value:.2f} {unit}", f"< {target:g} {unit}", ok))


def heading(text) -> None:
    print(f"\n== {text} ==", flush=True)


def request(port, method, path, body=None, timeout=30.0):
    """One request on a fresh connection: ``(status, body bytes)``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers, data = {}, None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def timed_get(port, path, count, check=None):
    """``count`` sequential GETs of ``path``: latencies in ms, last body."""
    latencies, body = [], b""
    for _ in range(count):
        start = time.perf_counter()
        status, body = request(port, "GET", path)
        latencies.append((time.perf_counter() - start) * 1000)
        if status != 200:
            problems.append(f"GET {path} -> {status}: {body[:200]!r}")
    if check is not None:
        check(json.loads(body))
    return latencies, body


class Server:
    """A real ``python minisched.py serve`` process on a free port."""

    def __init__(self, tmp, db):
        self.db = db
        self.log_path = os.path.join(tmp, "server.log")
        self.proc = None
        self.port = None

    def start(self) -> float:
        """Start and wait for the ``listening on`` line; returns seconds taken."""
        with open(self.log_path, "a") as log:
            offset = log.tell()
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    SCRIPT,
                    "serve",
                    "--db",
                    self.db,
                    "--port",
                    "0",
                    "--max-streams",
                    str(MAX_STREAMS),
                    "--shutdown-grace",
                    "5",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=os.path.dirname(self.db),
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(self.log_path) as log:
                log.seek(offset)
                match = LISTEN_RE.search(log.read())
            if match:
                self.port = int(match.group(1))
                return time.perf_counter() - started
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the server did not start; see {self.log_path}")

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / MB

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            problems.append("the server ignored SIGTERM for 20 s: killed")
            self.proc.kill()
            self.proc.wait()


# -- 1. GET /api/jobs -------------------------------------------------------------


def create_jobs(port) -> None:
    def create(i):
        job = {
            "name": f"job-{i:04d}",
            "command": f"echo job {i}",
            "schedule": NEVER,
            "description": f"benchmark job number {i}",
            "tags": ["bench", f"group-{i % 10}"],
        }
        status, body = request(port, "POST", "/api/jobs", job)
        if status != 201:
            problems.append(f"POST /api/jobs {job['name']} -> {status}: {body[:200]!r}")

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(create, range(N_JOBS)))
    took = time.perf_counter() - start
    print(
        f"created {N_JOBS} jobs with POST /api/jobs (4 clients) in {took:.2f} s "
        f"({N_JOBS / took:.0f} jobs/s)"
    )


def check_jobs(doc) -> None:
    if doc["total"] != N_JOBS or len(doc["jobs"]) != N_JOBS:
        problems.append(f"GET /api/jobs: total {doc['total']}, expected {N_JOBS}")


def bench_jobs(server, label, samples) -> list:
    timed_get(server.port, "/api/jobs", 5)  # warm up
    cpu = server.cpu_seconds()
    latencies, body = timed_get(server.port, "/api/jobs", samples, check_jobs)
    cpu = server.cpu_seconds() - cpu
    print(f"GET /api/jobs ({label}; response {len(body) / 1024:.0f} KiB)")
    print(f"  {dist(latencies)}")
    print(f"  server CPU per request: {cpu / samples * 1000:.2f} ms")
    return latencies


# -- 2. seeding runs, GET /api/runs -------------------------------------------------


def seed_runs(db) -> None:
    """100 000 finished runs spread over the jobs and the last 7 days (one every
    6 s), ids and times increasing; one in ten failed."""
    minisched.SQLiteStore(
        db
    ).open().close()  # schema up to date; fails if the server runs
    now = time.time()
    first = now - N_RUNS * 6 - 600
    rows = []
    for i in range(N_RUNS):
        slot = first + i * 6
        values = {
            "id": i + 1,
            "job": f"job-{i % N_JOBS:04d}",
            "status": "failed" if i % 10 == 3 else "succeeded",
            "trigger": "schedule",
            "attempt": 1,
            "slot": slot,
            "scheduled_at": slot,
            "started_at": slot + 0.01,
            "finished_at": slot + 0.51,
            "duration": 0.5 + (i % 97) / 10,
            "exit_code": 3 if i % 10 == 3 else 0,
            "signal": None,
            "error": None,
            "pid": 1000 + i % 30000,
            "pid_create_time": slot + 0.005,
            "cpu_time": 0.004,
            "peak_rss": 3_500_000,
            "output_bytes": 12,
            "output_truncated": 0,
            "leftovers_stopped": None,
            "node": None,  # a single server's runs
            "triggered_by": None,
        }
        rows.append(tuple(values[c] for c in minisched.RUN_COLUMNS))
    start = time.perf_counter()
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO runs ({}) VALUES ({})".format(
                ", ".join(minisched.RUN_COLUMNS),
                ", ".join("?" * len(minisched.RUN_COLUMNS)),
            ),
            rows,
        )
        # Each job's newest run is its last run, as the server would record it.
        conn.execute(
            "UPDATE jobs SET last_run_id = "
            "(SELECT max(id) FROM runs WHERE runs.job = jobs.name)"
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(
        f"seeded {N_RUNS} runs with sqlite3 executemany in "
        f"{time.perf_counter() - start:.2f} s "
        f"(database {os.path.getsize(db) / MB:.1f} MB)"
    )


def check_runs(doc) -> None:
    if len(doc["runs"]) != 50 or doc["total"] < N_RUNS:
        problems.append(
            f"GET /api/runs?limit=50: {len(doc['runs'])} runs, total {doc['total']}"
        )


def measure(server, path, samples, check, warm_up, what="") -> list:
    """``samples`` timed GETs of ``path`` after ``warm_up`` untimed ones;
    prints the distribution and the server's CPU per request."""
    timed_get(server.port, path, warm_up)
    cpu = server.cpu_seconds()
    latencies, body = timed_get(server.port, path, samples, check)
    cpu = server.cpu_seconds() - cpu
    print(f"GET {path} ({what}response {len(body) / 1024:.0f} KiB)")
    print(f"  {dist(latencies)}")
    print(f"  server CPU per request: {cpu / samples * 1000:.2f} ms")
    return latencies


def bench_runs(server) -> list:
    path = "/api/runs?limit=50"
    latencies = measure(server, path, RUNS_SAMPLES, check_runs, 20, f"{N_RUNS} runs; ")
    for extra in ("/api/runs?limit=50&job=job-0042", "/api/runs?limit=50&offset=50000"):
        lat, _body = timed_get(server.port, extra, 100)
        print(f"GET {extra} (reference)\n  {dist(lat)}")
    return latencies


def check_stats(doc) -> None:
    if doc["runs"] <= 0 or doc["duration"]["p95"] is None:
        problems.append(f"stats: {doc['runs']} runs, duration {doc['duration']}")


def bench_stats(server) -> tuple:
    """GET /api/stats (the dashboard's: 7 days, all 100 000 runs) and one job's."""
    return tuple(
        measure(server, path, STATS_SAMPLES, check_stats, 10)
        for path in (
            "/api/stats?days=7",
            "/api/jobs/job-0042/stats?days=7",
            "/api/stats?days=7&by_job=1",
        )
    )


# -- 3. mixed load ----------------------------------------------------------------


def bench_mix(server) -> float:
    routes = ("job", "runs", "health")
    latencies = {r: [] for r in routes}
    statuses = {}
    errors = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + MIX_SECONDS

    def client(index):
        rng = random.Random(index)
        mine = {r: [] for r in routes}
        seen = {}
        i = index
        while time.perf_counter() < stop_at:
            route = routes[i % len(routes)]
            i += 1
            path = {
                "job": f"/api/jobs/job-{rng.randrange(N_JOBS):04d}",
                "runs": "/api/runs?limit=50",
                "health": "/api/health",
            }[route]
            start = time.perf_counter()
            try:
                status, _body = request(server.port, "GET", path)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{path}: {exc!r}")
                continue
            mine[route].append((time.perf_counter() - start) * 1000)
            seen[status] = seen.get(status, 0) + 1
        with lock:
            for route in routes:
                latencies[route].extend(mine[route])
            for status, count in seen.items():
                statuses[status] = statuses.get(status, 0) + count

    cpu = server.cpu_seconds()
    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(n,), name=f"mix-{n}")
        for n in range(MIX_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu
    total = sum(len(v) for v in latencies.values())
    rate = total / elapsed
    print(
        f"{MIX_CLIENTS} clients, {elapsed:.1f} s: {total} requests, "
        f"{rate:.0f} requests/s; statuses {dict(sorted(statuses.items()))}; "
        f"{len(errors)} connection errors"
    )
    print(f"  server CPU: {cpu / elapsed * 100:.0f}% of one core")
    for route in routes:
        print(f"  {route:7s} {dist(latencies[route])}")
    bad = {s: c for s, c in statuses.items() if s != 200}
    if bad:
        problems.append(f"mixed load: non-200 statuses {bad}")
    if errors:
        problems.append(
            f"mixed load: {len(errors)} connection errors, e.g. {errors[0]}"
        )
    return rate


# -- 4, 5. SSE fan-out ---------------------------------------------------------------


TICKER_CODE = f"""\
import time
time.sleep({SSE_LEAD})
for i in range({SSE_LINES}):
    print(f"{{time.time():.6f}}", flush=True)
    time.sleep({SSE_INTERVAL})
"""


class RawClient:
    """One non-blocking HTTP request on its own connection, driven by :func:`pump`.

    ``subscribed_at`` is when the response headers arrived: the server has run
    the handler by then (for a stream: subscribed to the bus)."""

    def __init__(self, port, path):
        self.port = port
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n"
        ).encode()
        self.sock = None
        self.buffer = b""
        self.status = None
        self.began_at = None
        self.subscribed_at = None
        self.closed_at = None
        self.error = None
        self.received = 0  # bytes, headers included

    def start(self, sel) -> None:
        self.began_at = time.time()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex((HOST, self.port))
        sel.register(self.sock, selectors.EVENT_WRITE, self)

    def writable(self, sel) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(sel, OSError(err, os.strerror(err)))
            return
        self.sock.sendall(self.request)  # small: fits the send buffer
        sel.modify(self.sock, selectors.EVENT_READ, self)

    def fail(self, sel, exc) -> None:
        self.error = exc
        self.close(sel)

    def close(self, sel) -> None:
        if self.closed_at is None:
            self.closed_at = time.time()
            sel.unregister(self.sock)
            self.sock.close()

    def feed(self, data, received_at) -> None:
        self.received += len(data)
        self.buffer += data
        if self.status is None:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(b" ", 2)[1])
            self.subscribed_at = received_at
            self.buffer = rest
        self.body(received_at)

    def body(self, received_at) -> None:
        """Parse what is buffered; the base class only keeps it."""


class SseClient(RawClient):
    """A subscriber to one run's stream: delay of every line written after it
    subscribed = receipt time - the child's own timestamp in the line."""

    def __init__(self, port, path):
        super().__init__(port, path)
        self.delays = []  # (write time, delay ms)
        self.lines = 0  # every stdout line received, replayed ones too
        self.events = {}
        self.ended = False

    def body(self, received_at) -> None:
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            self.event(block.decode(), received_at)

    def event(self, block, received_at) -> None:
        kind, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if not data:
            return  # a comment or a retry line
        self.events[kind] = self.events.get(kind, 0) + 1
        if kind == "end":
            self.ended = True
        if kind != "log":
            return
        chunk = json.loads("\n".join(data))
        if chunk["stream"] != "stdout":
            return
        for text in chunk["text"].splitlines():
            if not text.strip():
                continue
            self.lines += 1
            written = float(text)
            if written >= self.subscribed_at:
                self.delays.append((written, (received_at - written) * 1000))


def pump(clients, max_pending, timeout) -> None:
    """Drive ``clients`` until all are closed (or ``timeout``), starting a new
    connection whenever fewer than ``max_pending`` wait for their headers."""
    sel = selectors.DefaultSelector()
    waiting = list(clients)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            pending = sum(
                1 for c in clients if c.sock and c.status is None and not c.closed_at
            )
            while waiting and pending < max_pending:
                waiting.pop(0).start(sel)
                pending += 1
            if not waiting and all(c.closed_at for c in clients):
                return
            # Read every ready socket first (each with its own receipt time),
            # then parse, so parsing one client does not delay the next one's
            # timestamp.
            batch = []
            for key, mask in sel.select(timeout=0.5):
                client = key.data
                if mask & selectors.EVENT_WRITE:
                    try:
                        client.writable(sel)
                    except OSError as exc:
                        client.fail(sel, exc)
                    continue
                try:
                    data = client.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    client.error = exc
                    data = b""
                batch.append((client, data, time.time()))
            for client, data, received_at in batch:
                if data:
                    client.feed(data, received_at)
                else:
                    client.close(sel)
    finally:
        for client in clients:
            if client.sock is not None and client.closed_at is None:
                client.error = client.error or TimeoutError("still open at the end")
                client.close(sel)
        sel.close()


def wait_for_run(port, run_id) -> None:
    """The run row is committed after the 202: wait until the API sees it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, _body = request(port, "GET", f"/api/runs/{run_id}")
        if status == 200:
            return
        time.sleep(0.005)
    raise RuntimeError(f"run {run_id} never appeared")


def count_statuses(clients) -> dict:
    out = {}
    for client in clients:
        if client.error is None:
            key = client.status
        elif isinstance(client.error, TimeoutError):
            key = "unfinished"
        else:
            key = type(client.error).__name__
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=str))


def bench_sse(server) -> tuple:
    """Returns (delays in ms, RSS samples in MB while lines flowed, run id)."""
    status, body = request(
        server.port,
        "POST",
        "/api/jobs",
        {
            "name": TICKER,
            "command": [sys.executable, "-c", TICKER_CODE],
            "description": "prints its own time.time() every 100 ms",
        },
    )
    if status != 201:
        raise RuntimeError(f"cannot create {TICKER}: {status} {body[:300]!r}")
    status, body = request(server.port, "POST", f"/api/jobs/{TICKER}/run")
    if status != 202:
        raise RuntimeError(f"cannot trigger {TICKER}: {status} {body[:300]!r}")
    run_id = json.loads(body)["id"]
    triggered = time.time()
    wait_for_run(server.port, run_id)
    print(
        f"run {run_id} triggered (202); visible to GET /api/runs/{run_id} after "
        f"{(time.time() - triggered) * 1000:.1f} ms; the child prints its first "
        f"line {SSE_LEAD:g} s after it starts"
    )

    rss_samples = []
    rss_stop = threading.Event()

    def sample_rss():
        while not rss_stop.wait(0.2):
            try:
                rss_samples.append((time.time(), server.rss_mb()))
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample_rss, name="rss-sampler", daemon=True)
    sampler.start()
    path = f"/api/runs/{run_id}/stream"
    clients = [SseClient(server.port, path) for _ in range(SSE_CLIENTS)]
    try:
        pump(
            clients,
            SSE_CONNECT_PENDING,
            SSE_LEAD + SSE_LINES * SSE_INTERVAL + 30,
        )
    finally:
        rss_stop.set()
        sampler.join()

    subscribed = [c.subscribed_at for c in clients if c.subscribed_at]
    if not subscribed:
        raise RuntimeError(f"no subscriber got headers: {count_statuses(clients)}")
    waits = [(c.subscribed_at - c.began_at) * 1000 for c in clients if c.subscribed_at]
    print(
        f"{len(subscribed)} subscribers opened at most {SSE_CONNECT_PENDING} at a "
        f"time; the last one subscribed {max(subscribed) - triggered:.2f} s after "
        f"the trigger; connect-to-headers {dist(waits)}"
    )
    delays = [d for c in clients for _w, d in c.delays]
    received = [c.lines for c in clients]
    ended = sum(c.ended for c in clients)
    statuses = count_statuses(clients)
    print(
        f"HTTP statuses {statuses}; {ended}/{SSE_CLIENTS} streams got 'end'; "
        f"stdout lines per subscriber min {min(received)} max {max(received)} "
        f"(expected {SSE_LINES})"
    )
    kinds = {}
    for client in clients:
        for kind, count in client.events.items():
            kinds[kind] = kinds.get(kind, 0) + count
    print(f"events received (all subscribers): {dict(sorted(kinds.items()))}")
    if not delays:
        raise RuntimeError("no log line was received live")
    print(
        f"end-to-end delay (receipt - child's time.time()) over {len(delays)} "
        "(subscriber, line) pairs written after the subscriber's headers:"
    )
    print(f"  {dist(delays)}")
    by_line = {}
    for client in clients:
        for written, d in client.delays:
            by_line.setdefault(written, []).append(d)
    first_sub = [min(v) for v in by_line.values()]
    spread = [max(v) - min(v) for v in by_line.values()]
    print(
        f"  first subscriber per line: p50={pct(first_sub, 50):.2f} ms  "
        f"p99={pct(first_sub, 99):.2f} ms; spread first->last subscriber: "
        f"p50={pct(spread, 50):.2f} ms  max={max(spread):.2f} ms"
    )
    if set(statuses) != {200}:
        problems.append(f"SSE subscribers: statuses {statuses}")
    if min(received) < SSE_LINES:
        problems.append(f"an SSE subscriber got only {min(received)} lines")
    if ended < SSE_CLIENTS:
        problems.append(f"only {ended} SSE streams got their 'end' event")
    written = list(by_line)
    streaming = [mb for t, mb in rss_samples if min(written) <= t <= max(written)] or [
        mb for _t, mb in rss_samples
    ]
    return delays, streaming, run_id


def bench_burst(server, path, label) -> None:
    """``SSE_CLIENTS`` connections opened at once (no pacing)."""
    clients = [RawClient(server.port, path) for _ in range(SSE_CLIENTS)]
    start = time.time()
    pump(clients, SSE_CLIENTS, BURST_TIMEOUT)
    done = [(c.closed_at - start) * 1000 for c in clients if c.error is None]
    if not done:
        problems.append(f"burst of {SSE_CLIENTS} x GET {label}: none finished")
        done = [float("nan")]
    statuses = count_statuses(clients)
    headers = [
        (c.subscribed_at - start) * 1000 for c in clients if c.subscribed_at is not None
    ] or [float("nan")]
    size = sum(c.received for c in clients) / len(clients) / 1024
    print(
        f"{SSE_CLIENTS} x GET {label} opened at once: statuses {statuses}; "
        f"finished ones done after {max(done) / 1000:.2f} s "
        f"(unfinished ones abandoned after {BURST_TIMEOUT:g} s); "
        f"{size:.0f} KiB each; headers received {dist(headers)}; "
        f"whole request {dist(done)}"
    )
    # A connection the listen backlog dropped gets its headers only after the
    # client's SYN retransmit (1 s); a long body just takes time to send.
    slow = sum(1 for h in headers if h > 900)
    if slow:
        problems.append(
            f"burst of {SSE_CLIENTS} x GET {label}: {slow} waited > 0.9 s for "
            "headers (SYN retransmits: the listen backlog overflowed?)"
        )
    if set(statuses) != {200}:
        problems.append(f"burst of {SSE_CLIENTS} x GET {label}: statuses {statuses}")


# -- main -----------------------------------------------------------------------------


def scan_log(path) -> None:
    with open(path) as log:
        lines = log.read().splitlines()
    bad = [
        line
        for line in lines
        if " ERROR " in line
        or " WARNING " in line
        or " CRITICAL " in line
        or "Traceback" in line
    ]
    print(f"server log: {len(lines)} lines, {len(bad)} warnings/errors")
    for line in bad[:15]:
        print(f"  {line}")
    if bad:
        problems.append(f"{len(bad)} warning/error lines in the server log")


def main() -> int:
    began = time.perf_counter()
    keep = "--keep" in sys.argv[1:]
    tmp = tempfile.mkdtemp(prefix="minisched-bench-api-")
    db = os.path.join(tmp, "bench.db")
    server = Server(tmp, db)
    print(
        f"minisched {minisched.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; temp dir {tmp}"
    )
    try:
        heading("1. GET /api/jobs with 1000 jobs")
        took = server.start()
        print(f"server started on port {server.port} in {took:.2f} s (empty database)")
        create_jobs(server.port)
        time.sleep(3)
        idle_rss = server.rss_mb()
        print(f"server RSS idle with {N_JOBS} jobs: {idle_rss:.1f} MB")
        jobs = bench_jobs(server, f"{N_JOBS} jobs, no runs yet", JOBS_SAMPLES)
        verdict(
            "GET /api/jobs p99 (1000 jobs)", pct(jobs, 99), TARGETS["jobs_p99"], "ms"
        )
        server.stop()

        heading("2. GET /api/runs?limit=50 with 100 000 runs")
        seed_runs(db)
        took = server.start()
        print(f"server restarted on port {server.port} in {took:.2f} s")
        time.sleep(2)
        rss = server.rss_mb()
        print(f"server RSS idle with {N_JOBS} jobs and {N_RUNS} runs: {rss:.1f} MB")
        runs = bench_runs(server)
        print(f"server RSS after these requests: {server.rss_mb():.1f} MB")
        verdict(
            "GET /api/runs?limit=50 p99 (100k runs)",
            pct(runs, 99),
            TARGETS["runs_p99"],
            "ms",
        )
        jobs2 = bench_jobs(server, "reference: every job has a last run", 50)
        summary.append(
            (
                "GET /api/jobs p99 (with last runs, ref.)",
                f"{pct(jobs2, 99):.2f} ms",
                "-",
                None,
            )
        )

        heading("2b. stats: GET /api/stats and /api/jobs/NAME/stats, 100 000 runs")
        every, one, by_job = bench_stats(server)
        verdict(
            "GET /api/stats p99 (100k runs)", pct(every, 99), TARGETS["stats_p99"], "ms"
        )
        verdict(
            "GET /api/jobs/NAME/stats p99", pct(one, 99), TARGETS["stats_p99"], "ms"
        )
        verdict(
            "GET /api/stats?by_job=1 p99", pct(by_job, 99), TARGETS["stats_p99"], "ms"
        )

        heading("3. mixed load, 4 concurrent clients")
        rate = bench_mix(server)
        print(f"server RSS after the mixed load: {server.rss_mb():.1f} MB")
        summary.append(("mixed load throughput", f"{rate:.0f} req/s", "-", None))

        heading("4/5. SSE: 100 subscribers on one run")
        rss_before = server.rss_mb()
        delays, rss, run_id = bench_sse(server)
        if rss:
            print(
                f"server RSS with {SSE_CLIENTS} subscribers: "
                f"mean {sum(rss) / len(rss):.1f} MB, max {max(rss):.1f} MB "
                f"({len(rss)} samples; {rss_before:.1f} MB just before)"
            )
            verdict(
                "server RSS, 100 subscribers (max)", max(rss), TARGETS["sse_rss"], "MB"
            )
        else:
            problems.append("no RSS sample while the subscribers were connected")
        verdict(
            "SSE delay p99 (100 subscribers)", pct(delays, 99), TARGETS["sse_p99"], "ms"
        )
        summary.append(("SSE delay max", f"{max(delays):.2f} ms", "-", None))
        summary.append(
            ("server RSS idle, 1000 jobs (ref.)", f"{idle_rss:.1f} MB", "-", None)
        )

        heading("6. bursts: 100 connections opened at once (reference)")
        bench_burst(server, "/api/health", "/api/health")
        bench_burst(
            server, f"/api/runs/{run_id}/stream", f"/api/runs/{run_id}/stream (ended)"
        )
    finally:
        server.stop()
        heading("server log")
        if os.path.exists(server.log_path):
            scan_log(server.log_path)
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    heading("summary")
    width = max(len(name) for name, *_rest in summary)
    for name, value, target, ok in summary:
        mark = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{name:<{width}}  {value:>12}  {target:>9}  {mark}")
    if problems:
        print("\nproblems seen:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
