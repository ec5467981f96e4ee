"""Benchmark of minisched on several hosts: three nodes on one PostgreSQL
against one node on SQLite, in the same run.

Run from anywhere: ``python bench/bench_cluster.py [--quick] [--keep]``.

(1) burst: 500 jobs due at one instant (``@at``, created with one
    ``POST /api/import``), on the SQLite node, then on the three nodes; each
    child prints its own ``$EPOCHREALTIME``.  Last start after the due
    instant, the ratio cluster / single (median of the rounds) and the share
    of the runs each node took (the runs' ``node``).
(2) lateness: 20 jobs ``* * * * * *`` (20 runs a second) for 60 s on the
    SQLite node (for reference), then on the three nodes; lateness =
    ``started_at - slot`` as the nodes record it in their database (the
    definition ``bench_engine.py`` uses).
(3) SSE: a job on node-a prints its ``time.time()`` every 50 ms; subscribers
    to ``GET /api/runs/ID/stream`` on node-b and node-c (and, for reference,
    on node-a itself); delay = receipt time - the child's timestamp.
(4) failover: a ``sleep`` running on node-c, node-c SIGKILLed; time until a
    survivor's API reports the run ``lost`` (``--node-timeout``, default 20).
    Last, since it leaves two nodes.

The nodes are real ``serve`` processes on loopback ports; PostgreSQL is a
private cluster (``initdb -A trust``, loopback, a free port) in a temporary
directory.  Everything started here is stopped and removed before the
script exits, Ctrl-C included.  Takes about four and a half minutes
(``--quick``: one burst round, 15 s of lateness, fewer SSE lines: under two
minutes).  Skipped, saying why, without PostgreSQL or psycopg.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import http.client
import json
import math
import os
import pwd
import re
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
NODES = ("node-a", "node-b", "node-c")
ECHO_TIME = ["/bin/bash", "-c", "echo $EPOCHREALTIME"]
BURST_JOBS = 500
BURST_ROUNDS = 3
BURST_LEAD = 8.0  # seconds from the import to the due instant
TICK_JOBS = 20
TICK_SECONDS = 60
SSE_LINES = 300
SSE_INTERVAL = 0.05
SSE_LEAD = 3.0  # the child waits this long before its first line
ACTIVE = ("queued", "running")

#: ``serve`` logs this once it accepts connections.
LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/")

TARGETS = {
    "burst_ratio": 1.5,  # last start, cluster / single SQLite node
    "late_p99": 50.0,  # ms
    "failover": 30.0,  # s
    "sse_p99": 250.0,  # ms
}

summary = []  # (measurement, value, target, verdict or None)
problems = []  # odd things seen on the way


# -- helpers --------------------------------------------------------------------


def pct(values, p):
    """Nearest-rank percentile of ``values`` (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def dist(values_ms) -> str:
    if not values_ms:
        return "n=0"
    return (
        f"n={len(values_ms)}  p50={pct(values_ms, 50):.2f} ms  "
        f"p90={pct(values_ms, 90):.2f} ms  p99={pct(values_ms, 99):.2f} ms  "
        f"max={max(values_ms):.2f} ms"
    )


def note(name, value, target, ok) -> None:
    summary.append((name, value, target, ok))


def heading(text) -> None:
    print(f"\n== {text} ==", flush=True)


def load() -> str:
    """The 1, 5 and 15 minute load averages: other work skews the numbers."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_sample():
    """The host's CPU counters (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_since(sample) -> str:
    """The share of CPU time the hypervisor took since ``sample`` (steal):
    on a shared virtual machine it explains much of the noise."""
    now = cpu_sample()
    if sample is None or now is None or len(now) < 8:
        return "n/a"
    delta = [b - a for a, b in zip(sample, now)]
    return f"{delta[7] / max(1, sum(delta[:8])) * 100:.1f}%"


def part(fn, *args) -> None:
    """Run one measurement, then say how much CPU the host stole meanwhile."""
    sample = cpu_sample()
    fn(*args)
    print(f"   (CPU steal during this part: {steal_since(sample)})", flush=True)


def sleep_until(when) -> None:
    while True:
        left = when - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def iso_z(ts) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(  # noqa: UP017 - Python < 3.11
        "%Y-%m-%dT%H:%M:%SZ"
    )


def epoch(text):
    """An API time (ISO 8601 UTC, ``Z``) as epoch seconds, or None."""
    if text is None:
        return None
    text = text.replace("Z", "+00:00")  # fromisoformat: Python < 3.11
    return datetime.datetime.fromisoformat(text).timestamp()


def shares(runs) -> str:
    """How many of ``runs`` each node took."""
    counts = {}
    for run in runs:
        name = run.get("node") or "(no node: SQLite)"
        counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values()) or 1
    return ", ".join(
        f"{name}: {n} ({n / total * 100:.0f}%)" for name, n in sorted(counts.items())
    )


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


def api(port, method, path, body=None, expect=200):
    """A request whose answer must be ``expect``: the decoded JSON."""
    status, data = request(port, method, path, body)
    if status != expect:
        raise RuntimeError(f"{method} {path} -> {status}: {data[:300]!r}")
    return json.loads(data)


# -- PostgreSQL -----------------------------------------------------------------


def pg_bin():
    """The directory of Debian's PostgreSQL programs (the newest), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return os.path.dirname(found[-1]) if found else None


def pg_missing():
    """Why this benchmark cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg is not installed (pip install "psycopg[binary]")'
    if pg_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and not any(_user(n) for n in ("postgres", "nobody")):
        return "running as root and there is no postgres or nobody user for initdb"
    return None


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster in ``base``, on loopback only.  initdb
    refuses root: as root, it runs as the ``postgres`` user (or ``nobody``)."""

    def __init__(self, base):
        self.base = base
        self.data = os.path.join(base, "data")
        self.bin = pg_bin()
        self.port = free_port()
        self.user = None
        self.started = False
        if os.geteuid() == 0:
            self.user = _user("postgres") or _user("nobody")
            os.chown(base, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *argv, check=True):
        argv = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.user is not None:
            argv = ["runuser", "-u", self.user.pw_name, "--", *argv]
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.base, check=False
        )
        if check and done.returncode:
            raise RuntimeError(f"{argv} -> {done.returncode}: {done.stderr[-1000:]}")
        return done

    def start(self) -> float:
        """initdb, then start; returns seconds taken."""
        began = time.perf_counter()
        self._run(
            "initdb", "-D", self.data, "-A", "trust", "-U", "minisched", "-E", "UTF8"
        )
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses={HOST} "
            "-c fsync=off -c synchronous_commit=off -c max_connections=300"
        )
        log = os.path.join(self.base, "log")
        self.started = True
        self._run(
            "pg_ctl", "-D", self.data, "-l", log, "-o", options, "-w", "-t", "60",
            "start",
        )  # fmt: skip
        return time.perf_counter() - began

    def stop(self) -> None:
        if self.started:
            self._run(
                "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False
            )
            self.started = False

    def url(self, db="postgres") -> str:
        return f"postgresql://minisched@{HOST}:{self.port}/{db}"

    def create_database(self, name) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def version(self) -> str:
        return self._run("postgres", "--version").stdout.strip()


# -- servers --------------------------------------------------------------------


class Node:
    """A real ``python minisched.py serve`` process on a free port: a node of
    the cluster (``db`` a PostgreSQL URL) or the single SQLite server."""

    def __init__(self, tmp, name, db, node_timeout=None):
        self.name = name
        self.db = db
        self.node_timeout = node_timeout
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.cwd = tmp
        self.proc = None
        self.port = None
        self.descendants = {}  # pid -> psutil.Process, as last seen

    def spawn(self) -> None:
        argv = [
            sys.executable, SCRIPT, "serve", "--db", self.db, "--port", "0",
            "--timezone", "UTC", "--shutdown-grace", "5",
        ]  # fmt: skip
        if self.db.startswith("postgresql://"):
            argv += ["--node-name", self.name, "--node-timeout", str(self.node_timeout)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINISCHED_")}
        with open(self.log_path, "ab") as log:
            # A session of its own: Ctrl-C reaches the bench, which stops the
            # servers in order.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )

    def wait_listening(self, timeout=60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                match = LISTEN_RE.search(log.read())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start; see {self.log_path}")

    def remember_descendants(self) -> None:
        """Note the server's children (the guard, jobs) to check on them later."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.descendants[child.pid] = child
        except psutil.Error:
            pass

    def survivors(self) -> list:
        """Remembered descendants still alive (the same processes, not reused pids)."""
        return [p for p in self.descendants.values() if p.is_running()]

    def kill(self) -> None:
        self.remember_descendants()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.remember_descendants()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name} ignored SIGTERM for 20 s: killed")
                self.proc.kill()
                self.proc.wait()
        # Whatever this server started and left behind: found, said, stopped.
        deadline = time.monotonic() + 5
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in self.survivors():
            with_name = f"{child.pid} {' '.join(child.cmdline())[:80]}"
            problems.append(f"{self.name} left process {with_name} behind: killed")
            child.kill()


def start_nodes(nodes) -> float:
    """Start ``nodes`` together; returns seconds until all listen."""
    began = time.perf_counter()
    for node in nodes:
        node.spawn()
    for node in nodes:
        node.wait_listening()
    return time.perf_counter() - began


def wait_jobs_seen(nodes, prefix, count, timeout=60.0) -> float:
    """Wait until every node's scheduler has ``count`` jobs named ``prefix...``;
    returns when that was (epoch)."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            doc = api(node.port, "GET", f"/api/jobs?q={prefix}&limit=1")
            if doc["total"] >= count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{node.name} sees {doc['total']} of {count} {prefix} jobs"
                    f" after {timeout:g} s"
                )
            time.sleep(0.05)
    return time.time()


def delete_jobs(node, names) -> None:
    doc = api(node.port, "POST", "/api/batch", {"action": "delete", "jobs": names})
    failed = [r for r in doc["results"] if not r["ok"]]
    if failed:
        problems.append(
            f"batch delete on {node.name}: {len(failed)} failed: {failed[0]}"
        )


def scan_log(node) -> None:
    with open(node.log_path, encoding="utf-8", errors="replace") as log:
        lines = log.read().splitlines()
    bad = [
        line
        for line in lines
        if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
    ]
    warned = [line for line in lines if " WARNING " in line]
    print(
        f"{node.name}: {len(lines)} lines, {len(warned)} warnings,"
        f" {len(bad)} errors/tracebacks"
    )
    kinds = {}
    for line in warned:
        text = re.sub(r"\d+(\.\d+)?", "N", line.split(" WARNING ", 1)[-1])[:90]
        kinds[text] = kinds.get(text, 0) + 1
    for text, count in sorted(kinds.items(), key=lambda item: -item[1])[:6]:
        print(f"  {count:5d} x WARNING {text}")
    for line in bad[:10]:
        print(f"  {line}")
    if bad:
        problems.append(f"{node.name}: {len(bad)} error/traceback lines in its log")


# -- 1. burst -------------------------------------------------------------------


def run_log(port, run_id) -> str:
    status, data = request(port, "GET", f"/api/runs/{run_id}/log")
    if status != 200:
        raise RuntimeError(f"GET /api/runs/{run_id}/log -> {status}")
    return data.decode("utf-8", "replace")


def burst(nodes, prefix, lead) -> dict:
    """500 jobs due at one instant on ``nodes`` (created through the first),
    ``lead`` seconds from now or more; returns the latencies (the children's
    own clock) and what was recorded."""
    first = nodes[0]
    due = math.ceil(time.time() + lead)
    names = [f"{prefix}-{i:03d}" for i in range(BURST_JOBS)]
    jobs = [
        {
            "name": name,
            "command": ECHO_TIME,
            "schedule": f"@at {iso_z(due)}",
            "concurrency": "allow",
        }
        for name in names
    ]
    began = time.time()
    doc = api(first.port, "POST", "/api/import", {"jobs": jobs})
    imported = time.time() - began
    if len(doc["created"]) != BURST_JOBS:
        raise RuntimeError(f"import created {len(doc['created'])} of {BURST_JOBS}")
    seen = wait_jobs_seen(nodes, prefix + "-", BURST_JOBS)
    info = {"import_s": imported, "margin_s": due - seen, "ready_s": seen - began}
    # Stay off the CPU during the burst: first look well after it.
    sleep_until(due + 2.0)
    deadline = time.monotonic() + 60
    runs = []
    while time.monotonic() < deadline:
        doc = api(first.port, "GET", "/api/runs?limit=1000")
        runs = [r for r in doc["runs"] if r["job"].startswith(prefix + "-")]
        if len(runs) >= BURST_JOBS and not any(r["status"] in ACTIVE for r in runs):
            break
        time.sleep(0.25)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda r: run_log(first.port, r["id"]), runs))
    latencies, unread = [], 0
    for text in texts:
        try:
            latencies.append(float(text.split()[0].replace(",", ".")) - due)
        except (ValueError, IndexError):
            unread += 1
    info.update(
        due=due,
        runs=runs,
        latencies=latencies,
        unread=unread,
        recorded=[epoch(r["started_at"]) - due for r in runs if r["started_at"]],
        statuses=sorted({r["status"] for r in runs}),
        succeeded=sum(r["status"] == "succeeded" for r in runs),
    )
    delete_jobs(first, names)
    return info


def show_burst(label, info) -> None:
    lat = [x * 1000 for x in info["latencies"]]
    rec = [x * 1000 for x in info["recorded"]]
    if lat:
        print(
            f"     {label:10s} child's clock - due: first {min(lat):7.1f} ms"
            f"  p50 {pct(lat, 50):7.1f} ms  p99 {pct(lat, 99):7.1f} ms"
            f"  last {max(lat):7.1f} ms"
        )
    if rec:
        print(
            f"     {'':10s} runs' started_at - due: p50 {pct(rec, 50):7.1f} ms"
            f"  last {max(rec):7.1f} ms"
        )
    print(
        f"     {'':10s} {len(info['runs'])} runs, {info['succeeded']} succeeded,"
        f" statuses {info['statuses']}, {info['unread']} without output;"
        f" import {info['import_s']:.2f} s, every node had the jobs"
        f" {info['margin_s']:.2f} s before due; by node: {shares(info['runs'])}",
        flush=True,
    )


def bench_burst(single, cluster, rounds) -> None:
    heading(f"1. burst: {BURST_JOBS} jobs due at one instant, 1 SQLite node vs 3 nodes")
    print(
        f"   command {ECHO_TIME}; latency = the child's $EPOCHREALTIME - due;"
        f" {rounds} round(s), each the SQLite node then the cluster;"
        " judged on the median round's ratio"
    )
    ratios, complete = [], True
    cluster_runs = []
    lead = {"SQLite": BURST_LEAD, "3 nodes": BURST_LEAD}
    for round_no in range(1, rounds + 1):
        print(f"   round {round_no}", flush=True)
        one = burst([single], f"solo{round_no}", lead["SQLite"])
        show_burst("SQLite", one)
        three = burst(cluster, f"burst{round_no}", lead["3 nodes"])
        show_burst("3 nodes", three)
        cluster_runs += three["runs"]
        if one["latencies"] and three["latencies"]:
            ratio = max(three["latencies"]) / max(one["latencies"])
        else:
            ratio = float("nan")
        ratios.append((ratio, max(three["latencies"] or [math.nan]),
                       max(one["latencies"] or [math.nan])))  # fmt: skip
        print(f"     ratio last(3 nodes) / last(SQLite) = {ratio:.2f}", flush=True)
        for label, info in (("SQLite", one), ("3 nodes", three)):
            # The next round leaves room for a slower import.
            lead[label] = max(BURST_LEAD, 2 * info["ready_s"] + 2)
            ok = (
                len(info["runs"]) == BURST_JOBS
                and info["succeeded"] == BURST_JOBS
                and not info["unread"]
            )
            if not ok:
                complete = False
                problems.append(
                    f"burst round {round_no} ({label}): {len(info['runs'])} runs,"
                    f" {info['succeeded']} succeeded, {info['unread']} without output"
                )
            if info["margin_s"] < 1.0:
                problems.append(
                    f"burst round {round_no} ({label}): the jobs reached every node"
                    f" only {info['margin_s']:.2f} s before due"
                )
    ratio, last3, last1 = sorted(ratios)[len(ratios) // 2]
    print(
        f"   ratios {', '.join(f'{r:.2f}' for r, _a, _b in ratios)};"
        f" median {ratio:.2f}",
        flush=True,
    )
    note(
        f"burst {BURST_JOBS}: last start 3 nodes / SQLite (median of {len(ratios)})",
        f"{ratio:.2f} ({last3 * 1000:.0f}/{last1 * 1000:.0f} ms)",
        f"<= {TARGETS['burst_ratio']:g}",
        ratio <= TARGETS["burst_ratio"] and complete,
    )
    note(f"burst {BURST_JOBS}: share of each node (all rounds)",
         shares(cluster_runs), "~1/3 each", None)  # fmt: skip


# -- 2. lateness ----------------------------------------------------------------


TICK_COLUMNS = ("job", "node", "status", "slot", "started_at", "scheduled_at", "error")


def tick_rows(node) -> list:
    """The ``tick-`` runs as ``node`` stored them: read from its database
    directly, for the exact times (the API shows milliseconds)."""
    sql = f"SELECT {', '.join(TICK_COLUMNS)} FROM runs WHERE job LIKE 'tick-%'"
    if node.db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(node.db) as conn:
            rows = conn.execute(sql).fetchall()
    else:
        conn = sqlite3.connect(f"file:{node.db}?mode=ro", uri=True)
        try:
            rows = conn.execute(sql).fetchall()
        finally:
            conn.close()
    return [dict(zip(TICK_COLUMNS, row)) for row in rows]


def lateness(nodes, label, seconds) -> tuple:
    """20 jobs every second for ``seconds`` on ``nodes``; prints what was
    recorded, returns (p99 ms, missed, doubled)."""
    names = [f"tick-{i:02d}" for i in range(TICK_JOBS)]
    jobs = [
        {
            "name": name,
            "command": ["true"],
            "schedule": "* * * * * *",
            "concurrency": "allow",
            "keep_runs": 1000,
        }
        for name in names
    ]
    api(nodes[0].port, "POST", "/api/import", {"jobs": jobs})
    seen = wait_jobs_seen(nodes, "tick-", TICK_JOBS)
    first = math.ceil(seen) + 1  # the first whole slot every node surely has
    last = first + seconds - 1
    sleep_until(last + 2.0)
    delete_jobs(nodes[0], names)
    time.sleep(1.0)  # the last runs' records reach the database
    runs = tick_rows(nodes[0])
    window = [r for r in runs if r["slot"] is not None and first <= r["slot"] <= last]
    started = [r for r in window if r["started_at"] is not None]
    late = [(r["started_at"] - r["slot"]) * 1000 for r in started]
    seen_slots = {}
    for r in window:
        key = (r["job"], r["slot"])
        seen_slots[key] = seen_slots.get(key, 0) + 1
    doubled = sum(c - 1 for c in seen_slots.values() if c > 1)
    missed_records = [
        r
        for r in runs
        if r["status"] == "missed"
        and r["scheduled_at"] is not None
        and first <= r["scheduled_at"] <= last
    ]
    missed_in_records = 0
    for r in missed_records:
        words = (r["error"] or "").split()
        missed_in_records += int(words[0]) if words and words[0].isdigit() else 1
    expected = TICK_JOBS * seconds
    missed = expected - len(seen_slots) + missed_in_records
    statuses = {}
    for r in window:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    print(
        f"   {label}: slots {iso_z(first)} .. {iso_z(last)}: expected {expected},"
        f" runs {len(window)}; statuses {dict(sorted(statuses.items()))}"
    )
    print(f"     lateness (started_at - slot): {dist(late)}")
    if len(nodes) > 1:
        for node in nodes:
            mine = [(r["started_at"] - r["slot"]) * 1000 for r in started
                    if r["node"] == node.name]  # fmt: skip
            print(f"       on {node.name}: {dist(mine)}")
    per_slot = {}
    for r in started:
        per_slot.setdefault(r["slot"], []).append((r["started_at"] - r["slot"]) * 1000)
    firsts = [min(v) for v in per_slot.values()]
    lasts = [max(v) for v in per_slot.values()]
    print(
        f"     per slot, the first of its {TICK_JOBS} runs: {dist(firsts)}\n"
        f"     per slot, the last of its {TICK_JOBS} runs: {dist(lasts)}\n"
        f"     by node: {shares(window)}\n"
        f"     missed slots {missed} ({len(missed_records)} 'missed' records"
        f" covering {missed_in_records}), doubled slots {doubled}; over 1 s late:"
        f" {sum(x > 1000 for x in late)} (a fallback claim is 2 s late)",
        flush=True,
    )
    return pct(late, 99), missed, doubled


def bench_lateness(single, cluster, seconds) -> None:
    heading(
        f"2. lateness: {TICK_JOBS} jobs '* * * * * *' ({TICK_JOBS} runs/s) for"
        f" {seconds} s, on the SQLite node (reference), then on 3 nodes"
    )
    ref, ref_missed, ref_doubled = lateness([single], "SQLite node", seconds)
    if ref_missed or ref_doubled:
        problems.append(
            f"lateness reference on the SQLite node: {ref_missed} missed,"
            f" {ref_doubled} doubled slots (see its log's WARNING lines)"
        )
    p99, missed, doubled = lateness(cluster, "3 nodes", seconds)
    note(
        f"lateness p99, {TICK_JOBS} runs/s on 3 nodes",
        f"{p99:.2f} ms",
        f"< {TARGETS['late_p99']:g} ms",
        p99 < TARGETS["late_p99"],
    )
    note("lateness p99, the same on the SQLite node (ref.)", f"{ref:.2f} ms", "-", None)
    note(
        "lateness on 3 nodes: missed / doubled slots",
        f"{missed} / {doubled}",
        "0 / 0",
        missed == 0 and doubled == 0,
    )


# -- 3. SSE across nodes --------------------------------------------------------


def ticker_code(lines) -> str:
    return f"""\
import sys, time
time.sleep({SSE_LEAD})
for i in range({lines}):
    sys.stdout.write(f"{{time.time():.6f}}\\n")
    sys.stdout.flush()
    time.sleep({SSE_INTERVAL})
"""


class Follower(threading.Thread):
    """A subscriber to one run's stream on one node: delay of every line
    written after its headers arrived = receipt time - the line's timestamp."""

    def __init__(self, node, run_id):
        super().__init__(name=f"follow-{node.name}", daemon=True)
        self.node = node
        self.run_id = run_id
        self.status = None
        self.subscribed_at = None
        self.delays = []  # ms
        self.lines = 0
        self.ended = False
        self.error = None

    def run(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # noqa: BLE001 - reported with the results
            self.error = exc

    def _follow(self) -> None:
        sock = socket.create_connection((HOST, self.node.port), timeout=60)
        try:
            sock.sendall(
                f"GET /api/runs/{self.run_id}/stream HTTP/1.1\r\n"
                f"Host: {HOST}:{self.node.port}\r\nAccept: text/event-stream\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            buffer = b""
            while not self.ended:
                data = sock.recv(65536)
                received = time.time()
                if not data:
                    return
                buffer += data
                if self.status is None:
                    head, sep, rest = buffer.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    self.status = int(head.split(b" ", 2)[1])
                    self.subscribed_at = received
                    buffer = rest
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._event(block.decode(), received)
        finally:
            sock.close()

    def _event(self, block, received) -> None:
        kind, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if kind == "end":
            self.ended = True
        if kind != "log" or not data:
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
                self.delays.append((received - written) * 1000)


def bench_sse(cluster, lines) -> None:
    heading(
        f"3. SSE across nodes: a run on node-a prints its time every"
        f" {SSE_INTERVAL * 1000:.0f} ms, {lines} lines"
    )
    a = cluster[0]
    api(
        a.port,
        "POST",
        "/api/jobs",
        {
            "name": "sse-ticker",
            "command": [sys.executable, "-u", "-c", ticker_code(lines)],
            "nodes": [a.name],
            "description": "prints its own time.time() every 50 ms",
        },
        expect=201,
    )
    wait_jobs_seen(cluster, "sse-ticker", 1)
    run = api(a.port, "POST", "/api/jobs/sse-ticker/run", expect=202)
    triggered = time.time()
    followers = []
    for node in cluster:  # the run is committed after the 202: wait for it
        while request(node.port, "GET", f"/api/runs/{run['id']}")[0] != 200:
            if time.time() - triggered > 10:
                raise RuntimeError(f"{node.name} never saw run {run['id']}")
            time.sleep(0.01)
        followers.append(Follower(node, run["id"]))
        followers[-1].start()
    for follower in followers:
        follower.join(SSE_LEAD + lines * SSE_INTERVAL + 30)
    print(f"   run {run['id']} on {run.get('node')}")
    cross = []
    for follower in followers:
        where = "local (reference)" if follower.node is a else "cross-node"
        print(
            f"   subscriber on {follower.node.name} ({where}): HTTP {follower.status},"
            f" subscribed {(follower.subscribed_at or math.nan) - triggered:.2f} s"
            f" after the trigger, {follower.lines} lines, end"
            f" {'yes' if follower.ended else 'NO'}\n     delay {dist(follower.delays)}"
        )
        if follower.node is not a:
            cross += follower.delays
        if follower.error is not None or not follower.ended:
            problems.append(
                f"SSE subscriber on {follower.node.name}: error {follower.error!r},"
                f" ended {follower.ended}"
            )
        if follower.lines < lines:
            problems.append(
                f"SSE subscriber on {follower.node.name} got {follower.lines}"
                f" of {lines} lines"
            )
    local = followers[0].delays
    p99 = pct(cross, 99)
    note(
        "SSE delay p99, subscriber on another node",
        f"{p99:.2f} ms",
        f"< {TARGETS['sse_p99']:g} ms",
        bool(cross) and p99 < TARGETS["sse_p99"],
    )
    note("SSE delay p99, same node (ref.)", f"{pct(local, 99):.2f} ms", "-", None)
    delete_jobs(a, ["sse-ticker"])


# -- 4. failover ----------------------------------------------------------------


def bench_failover(cluster, node_timeout) -> None:
    victim, survivor = cluster[-1], cluster[0]
    heading(
        f"4. failover: SIGKILL {victim.name} while it runs a job"
        f" (--node-timeout {node_timeout:g})"
    )
    api(
        victim.port,
        "POST",
        "/api/jobs",
        {"name": "failover-sleeper", "command": ["sleep", "600"]},
        expect=201,
    )
    run = api(victim.port, "POST", "/api/jobs/failover-sleeper/run", expect=202)
    deadline = time.monotonic() + 20
    row = None
    while time.monotonic() < deadline:
        status, data = request(survivor.port, "GET", f"/api/runs/{run['id']}")
        row = json.loads(data) if status == 200 else None
        if row and row["status"] == "running":
            break
        time.sleep(0.05)
    if not row or row["status"] != "running":
        raise RuntimeError(f"run {run['id']} did not start: {row}")
    print(
        f"   run {row['id']} running on {row['node']} (pid {row['pid']}),"
        f" as {survivor.name} sees it"
    )
    victim.remember_descendants()
    nodes = api(survivor.port, "GET", "/api/nodes")["nodes"]
    age = next(n["heartbeat_age"] for n in nodes if n["name"] == victim.name)
    killed = time.time()
    victim.kill()
    print(
        f"   SIGKILL sent to {victim.name} (pid {victim.proc.pid}) when its last"
        f" heartbeat was {age:.2f} s old"
    )
    dead_at = lost_at = None
    final = None
    limit = killed + 2 * node_timeout + 30
    while time.time() < limit and lost_at is None:
        now = time.time()
        status, data = request(survivor.port, "GET", f"/api/runs/{run['id']}")
        if status == 200:
            final = json.loads(data)
            if final["status"] == "lost":
                lost_at = now
        if dead_at is None:
            doc = api(survivor.port, "GET", "/api/nodes")
            if not any(n["alive"] for n in doc["nodes"] if n["name"] == victim.name):
                dead_at = now
        time.sleep(0.1)
    job_proc = victim.descendants.get(row["pid"])
    gone = job_proc is None or not job_proc.is_running()
    print(
        f"   {victim.name} shown dead (alive false) after "
        f"{(dead_at or math.nan) - killed:.2f} s; run {final and final['status']}"
        f" after {(lost_at or math.nan) - killed:.2f} s"
        f" (its finished_at: {epoch(final and final['finished_at']) or math.nan:.3f}"
        f" = kill + {(epoch(final and final['finished_at']) or math.nan) - killed:.2f} s);"
        f" error {final and final['error']!r}"
    )
    print(
        f"   the job's process (pid {row['pid']}) "
        f"{'is gone (the guard killed it)' if gone else 'is STILL RUNNING'}",
        flush=True,
    )
    if not gone:
        problems.append(f"the killed node's job (pid {row['pid']}) outlived it")
    took = (lost_at - killed) if lost_at else math.inf
    note(
        "failover: SIGKILL -> run 'lost' on a survivor",
        f"{took:.2f} s",
        f"< {TARGETS['failover']:g} s",
        took < TARGETS["failover"],
    )


# -- main -----------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one burst round, 15 s of lateness, 100 SSE lines",
    )
    parser.add_argument(
        "--rounds", type=int, help=f"burst rounds (default {BURST_ROUNDS})"
    )
    parser.add_argument(
        "--node-timeout",
        type=float,
        default=20.0,
        help="the nodes' --node-timeout (default 20, serve's own default)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ns = parser.parse_args(argv)
    rounds = ns.rounds or (1 if ns.quick else BURST_ROUNDS)
    seconds = 15 if ns.quick else TICK_SECONDS
    lines = 100 if ns.quick else SSE_LINES

    missing = pg_missing()
    if missing:
        print(f"bench_cluster: skipped: {missing}")
        return 0
    began, cpu_at_start = time.perf_counter(), cpu_sample()
    tmp = tempfile.mkdtemp(prefix="minisched-bench-cluster-")
    pg_base = tempfile.mkdtemp(prefix="minisched-bench-pg-")  # postgres must reach it
    pg = PgCluster(pg_base)
    single = Node(tmp, "sqlite", os.path.join(tmp, "single.db"))
    cluster = []
    interrupted = False
    print(
        f"minisched {minisched.__version__}, Python {sys.version.split()[0]},"
        f" {os.cpu_count()} CPUs, load average {load()}; temp dirs {tmp}, {pg_base}"
    )
    try:
        took = pg.start()
        url = pg.create_database("bench")
        print(f"{pg.version()} started on {HOST}:{pg.port} in {took:.2f} s")
        cluster = [Node(tmp, name, url, ns.node_timeout) for name in NODES]
        took = start_nodes([single, *cluster])
        nodes = api(cluster[0].port, "GET", "/api/nodes")["nodes"]
        print(
            f"SQLite node on port {single.port}; cluster nodes on ports"
            f" {', '.join(str(n.port) for n in cluster)}"
            f" (--node-timeout {ns.node_timeout:g}); all listening after {took:.2f} s;"
            f" alive: {', '.join(n['name'] for n in nodes if n['alive'])}",
            flush=True,
        )
        part(bench_burst, single, cluster, rounds)
        part(bench_lateness, single, cluster, seconds)
        single.stop()  # idle from here on: out of the way
        part(bench_sse, cluster, lines)
        part(bench_failover, cluster, ns.node_timeout)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every server and PostgreSQL", flush=True)
        interrupted = True
    finally:
        for node in (single, *cluster):
            node.stop()
        pg.stop()
        heading("server logs")
        for node in (single, *cluster):
            if os.path.exists(node.log_path):
                scan_log(node)
        if ns.keep:
            print(f"kept {tmp} and {pg_base}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(pg_base, ignore_errors=True)
    if interrupted:
        return 130

    heading(
        f"summary (load average now {load()};"
        f" CPU steal over the run {steal_since(cpu_at_start)})"
    )
    width = max(len(name) for name, *_rest in summary)
    for name, value, target, ok in summary:
        mark = "" if ok is None else ("PASS" if ok else "MISS")
        print(f"{name:<{width}}  {value:>14}  {target:>10}  {mark}")
    if problems:
        print("\nproblems seen:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
