"""Benchmark of minisched's engine: spawn latency, scheduling precision, idle
cost and output memory.  Run from anywhere: ``python bench/bench_engine.py``.

(a) burst: N jobs due in the same second, versus a bare ``subprocess.Popen``
    loop of the same command started at a due instant; five rounds each,
    judged on the median round.
(b) precision: 20 jobs firing every second for 60 s.
(c) idle: a real ``serve`` process with 1000 jobs, none due.
(d) output: a real ``serve`` process while one job prints 200 MB.

Everything lives in a temporary directory; every process started here is
stopped before the script exits.  Takes about four minutes.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import minisched

SCRIPT = os.path.join(ROOT, "minisched.py")
ECHO_TIME = ["/bin/bash", "-c", "echo $EPOCHREALTIME"]
BURST_SIZES = (100, 500)
BURST_ROUNDS = 5
PRECISION_JOBS = 20
PRECISION_SECONDS = 60
IDLE_JOBS = 1000
IDLE_SETTLE = 5.0
IDLE_MEASURE = 30.0
BIG_OUTPUT = 200_000_000
BIG_SLEEP = 3
MB = 1024 * 1024

#: The log line ``serve`` prints once the engine runs (with or without HTTP).
STARTED_RE = re.compile(r"minisched \S+ (started|listening on)")

summary = []  # (benchmark, measurement, value, target, verdict)


# -- helpers --------------------------------------------------------------------


def pct(values, p):
    """Nearest-rank percentile of ``values`` (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds):
    return f"{seconds * 1000:8.2f} ms"


def iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)  # noqa: UP017 - Python < 3.11.isoformat()


def sleep_until(when):
    """Sleep to just before ``when`` (epoch), then spin to it."""
    while True:
        left = when - time.time()
        if left <= 0:
            return
        if left > 0.002:
            time.sleep(left - 0.001)


def parse_time(text):
    return float(text.strip().split()[0].replace(",", "."))


def load():
    """The 1, 5 and 15 minute load averages: other work skews the numbers."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(ok):
    return "ok" if ok else "MISSED"


def note(benchmark, measurement, value, target, ok):
    summary.append((benchmark, measurement, value, target, verdict(ok)))


def start_server(tmp, name, jobs):
    """Start ``minisched.py serve`` on a fresh database; returns (proc, db, log)."""
    db = os.path.join(tmp, f"{name}.db")
    jobs_path = os.path.join(tmp, f"{name}.json")
    log_path = os.path.join(tmp, f"{name}.log")
    with open(jobs_path, "w", encoding="utf-8") as f:
        json.dump({"jobs": jobs}, f)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                SCRIPT,
                "serve",
                "--db",
                db,
                "--jobs",
                jobs_path,
                "--port",
                "0",
                "--shutdown-grace",
                "5",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            cwd=tmp,
        )
    return proc, db, log_path


def wait_started(proc, log_path, timeout=60.0):
    """Wait for the server's "started" log line; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: {tail(log_path)}"
            )
        with open(log_path, encoding="utf-8", errors="replace") as f:
            if STARTED_RE.search(f.read()):
                return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"server did not start in {timeout}s: {tail(log_path)}")


def tail(path, size=2000):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-size:]


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def guard_of(proc):
    """The server's guard child (``minisched-guard``), or None."""
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.Error:
        return None
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if cmd[:1] == ["minisched-guard"]:
            return child
    return None


# -- (a) burst ------------------------------------------------------------------


def bare_burst(n):
    """``n`` x ``Popen`` at a due instant; returns each child's start - due."""
    due = math.ceil(time.time() + 1.5)
    sleep_until(due)
    procs = [subprocess.Popen(ECHO_TIME, stdout=subprocess.PIPE) for _ in range(n)]
    spawned = time.time() - due
    starts = [parse_time(p.communicate()[0].decode()) for p in procs]
    return [s - due for s in starts], spawned


def minisched_burst(n, tmp, label):
    """``n`` minisched jobs due at one instant; returns (latencies, info)."""
    db = os.path.join(tmp, f"burst-{label}.db")
    engine = minisched.Engine(minisched.Config(db=db, timezone="UTC")).start()
    info = {}
    try:
        put = engine.scheduler.put_job
        # Calibrate job creation so the due instant lies after creation ends.
        t0 = time.time()
        for i in range(10):
            put(minisched.validate_job({"name": f"calib-{i}", "command": ["true"]}))
        per_job = (time.time() - t0) / 10
        due = math.ceil(time.time() + 3 * per_job * n + 3.0)
        schedule = f"@at {iso(due)}"
        t0 = time.time()
        for i in range(n):
            put(
                minisched.validate_job(
                    {
                        "name": f"burst-{i:04d}",
                        "command": ECHO_TIME,
                        "schedule": schedule,
                        "concurrency": "allow",
                    }
                )
            )
        info["create_s"] = time.time() - t0
        info["margin_s"] = due - time.time()
        # Stay off the GIL during the burst: first look well after it.
        sleep_until(due + max(1.0, 0.004 * n))
        deadline = time.time() + 60
        runs = []
        while time.time() < deadline:
            runs, _total = engine.store.list_runs(limit=100000)
            runs = [r for r in runs if r["job"].startswith("burst-")]
            if len(runs) >= n and all(r["status"] == "succeeded" for r in runs):
                break
            time.sleep(0.25)
        engine.store.flush()
        runs, _total = engine.store.list_runs(limit=100000)
        runs = [r for r in runs if r["job"].startswith("burst-")]
        latencies, recorded, unread = [], [], 0
        for run in runs:
            text = "".join(
                c["text"]
                for c in engine.store.get_chunks(run["id"])
                if c["stream"] == "stdout"
            )
            if run["started_at"] is not None:
                recorded.append(run["started_at"] - due)
            try:
                latencies.append(parse_time(text) - due)
            except (ValueError, IndexError):
                unread += 1
        info["runs"] = len(runs)
        info["succeeded"] = sum(r["status"] == "succeeded" for r in runs)
        info["unread"] = unread
        info["recorded"] = recorded
        info["statuses"] = sorted({r["status"] for r in runs})
    finally:
        engine.shutdown(grace=5)
    return latencies, info


def bench_burst(tmp):
    print("== (a) burst: N jobs due in the same second ==", flush=True)
    print(f"   command {ECHO_TIME}; latency = child's $EPOCHREALTIME - due instant")
    print(
        f"   {BURST_ROUNDS} rounds per N, each a bare loop then minisched;"
        " judged on the median round's ratio"
    )
    for n in BURST_SIZES:
        print(f"-- N = {n}")
        ratios, persisted = [], True
        for round_no in range(1, BURST_ROUNDS + 1):
            bare, spawned = bare_burst(n)
            mini, info = minisched_burst(n, tmp, f"{n}-{round_no}")
            ratio = max(mini) / max(bare) if bare and mini else float("nan")
            ratios.append((ratio, max(mini), max(bare)))
            print(f"   round {round_no}")
            print(
                f"     bare Popen loop : first {ms(min(bare))}  p50 {ms(pct(bare, 50))}"
                f"  p99 {ms(pct(bare, 99))}  last {ms(max(bare))}"
                f"   (loop done at +{spawned * 1000:.1f} ms)"
            )
            print(
                f"     minisched       : first {ms(min(mini))}  p50 {ms(pct(mini, 50))}"
                f"  p99 {ms(pct(mini, 99))}  last {ms(max(mini))}"
            )
            rec = info["recorded"]
            if rec:
                print(
                    f"     minisched runs.started_at - due: p50 {ms(pct(rec, 50))}"
                    f"  p99 {ms(pct(rec, 99))}  last {ms(max(rec))}"
                )
            print(
                f"     ratio last(minisched)/last(bare) = {ratio:.2f}"
                f"   [{info['runs']} runs stored, {info['succeeded']} succeeded,"
                f" statuses {info['statuses']}, {info['unread']} without output;"
                f" {n} jobs created in {info['create_s']:.2f} s,"
                f" {info['margin_s']:.2f} s before due]",
                flush=True,
            )
            persisted = persisted and (
                info["runs"] == n and info["succeeded"] == n and not info["unread"]
            )
        ratio, mini_last, bare_last = sorted(ratios)[len(ratios) // 2]
        print(
            f"   N = {n}: ratios {', '.join(f'{r:.2f}' for r, _m, _b in ratios)};"
            f" median {ratio:.2f}",
            flush=True,
        )
        note(
            "a",
            f"N={n} last minisched/bare (median of {len(ratios)})",
            f"{ratio:.2f} ({mini_last * 1000:.0f}/{bare_last * 1000:.0f} ms)",
            "<= 1.2" if n == 500 else "-",
            (ratio <= 1.2 or n != 500) and persisted,
        )


# -- (b) precision --------------------------------------------------------------


def bench_precision(tmp):
    print(
        f"\n== (b) precision: {PRECISION_JOBS} jobs '* * * * * *' for "
        f"{PRECISION_SECONDS} s ==",
        flush=True,
    )
    db = os.path.join(tmp, "precision.db")
    engine = minisched.Engine(minisched.Config(db=db, timezone="UTC")).start()
    try:
        for i in range(PRECISION_JOBS):
            engine.scheduler.put_job(
                minisched.validate_job(
                    {
                        "name": f"tick-{i:02d}",
                        "command": ["true"],
                        "schedule": "* * * * * *",
                        "concurrency": "allow",
                        "keep_runs": 1000,
                    }
                )
            )
        first = math.ceil(time.time()) + 1  # first whole slot all jobs surely see
        last = first + PRECISION_SECONDS - 1
        sleep_until(last + 1.5)
        engine.store.flush()
        rows = []
        for i in range(PRECISION_JOBS):
            runs, _total = engine.store.list_runs(job=f"tick-{i:02d}", limit=100000)
            rows += runs
    finally:
        engine.shutdown(grace=5)
    window = [r for r in rows if r["slot"] is not None and first <= r["slot"] <= last]
    started = [r for r in window if r["started_at"] is not None]
    late = [r["started_at"] - r["slot"] for r in started]
    seen = {}
    for r in window:
        seen[(r["job"], r["slot"])] = seen.get((r["job"], r["slot"]), 0) + 1
    doubled = sum(c - 1 for c in seen.values() if c > 1)
    missed_records = [
        r
        for r in rows
        if r["status"] == "missed"
        and r["scheduled_at"] is not None
        and first <= r["scheduled_at"] <= last
    ]
    missed_in_records = 0
    for r in missed_records:
        words = (r["error"] or "").split()
        missed_in_records += int(words[0]) if words and words[0].isdigit() else 1
    expected = PRECISION_JOBS * PRECISION_SECONDS
    missed = expected - len(seen) + missed_in_records
    statuses = {}
    for r in window:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    p99 = pct(late, 99)
    per_slot = {}
    for r in started:
        per_slot.setdefault(r["slot"], []).append(r["started_at"] - r["slot"])
    firsts = [min(v) for v in per_slot.values()]
    lasts = [max(v) for v in per_slot.values()]
    print(
        f"   slots {iso(first)} .. {iso(last)}: expected {expected}, runs {len(window)}"
    )
    print(f"   statuses {dict(sorted(statuses.items()))}")
    print(
        f"   lateness (started_at - slot): p50 {ms(pct(late, 50))}  p99 {ms(p99)}"
        f"  max {ms(max(late) if late else float('nan'))}"
    )
    print(
        f"   per slot: first run p50 {ms(pct(firsts, 50))}, last run p50"
        f" {ms(pct(lasts, 50))} (spread = sequential launches of one slot)"
    )
    print(
        f"   missed slots {missed} ({len(missed_records)} 'missed' records covering "
        f"{missed_in_records}), doubled slots {doubled}",
        flush=True,
    )
    note("b", "p99 lateness", f"{p99 * 1000:.2f} ms", "< 15 ms", p99 < 0.015)
    note(
        "b",
        "missed / doubled",
        f"{missed} / {doubled}",
        "0 / 0",
        missed == 0 and doubled == 0,
    )


# -- (c) idle -------------------------------------------------------------------


def bench_idle(tmp):
    print(f"\n== (c) idle: serve with {IDLE_JOBS} jobs, none due ==", flush=True)
    jobs = [
        {"name": f"idle-{i:04d}", "command": ["true"], "schedule": "0 0 1 1 *"}
        for i in range(IDLE_JOBS)
    ]
    proc, db, log_path = start_server(tmp, "idle", jobs)
    try:
        took = wait_started(proc, log_path)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            count = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        conn.close()
        print(f"   server pid {proc.pid} started in {took:.2f} s with {count} jobs")
        time.sleep(IDLE_SETTLE)
        server = psutil.Process(proc.pid)
        guard = guard_of(proc)

        def cpu(p):
            t = p.cpu_times()
            return t.user + t.system

        c0, g0, w0 = cpu(server), cpu(guard) if guard else 0.0, time.monotonic()
        time.sleep(IDLE_MEASURE)
        c1, g1, w1 = cpu(server), cpu(guard) if guard else 0.0, time.monotonic()
        share = (c1 - c0) / (w1 - w0) * 100
        guard_share = (g1 - g0) / (w1 - w0) * 100
        rss = server.memory_info().rss / MB
        threads = server.num_threads()
        guard_rss = guard.memory_info().rss / MB if guard else float("nan")
        print(
            f"   server CPU over {w1 - w0:.1f} s: {c1 - c0:.3f} s = {share:.3f}% of "
            f"one core; RSS {rss:.1f} MB; {threads} threads"
        )
        if guard:
            print(
                f"   guard (pid {guard.pid}) CPU {guard_share:.3f}% of one core; "
                f"RSS {guard_rss:.1f} MB",
                flush=True,
            )
        else:
            print("   guard process not found", flush=True)
    finally:
        stop_server(proc)
    note("c", "idle CPU", f"{share:.3f}%", "< 0.1%", share < 0.1)
    note("c", "server RSS", f"{rss:.1f} MB", "< 35 MB", rss < 35)
    note("c", "guard RSS", f"{guard_rss:.1f} MB", "-", True)


# -- (d) output -----------------------------------------------------------------


def bench_output(tmp):
    command = f"sleep {BIG_SLEEP}; yes 0123456789abcdef | head -c {BIG_OUTPUT}"
    print(
        f"\n== (d) output: serve while one @reboot job prints {BIG_OUTPUT // 10**6} MB =="
    )
    print(f"   command: {command}", flush=True)
    jobs = [{"name": "big", "command": command, "schedule": "@reboot"}]
    proc, db, log_path = start_server(tmp, "output", jobs)
    samples = []  # (time, rss, status)
    row = None
    try:
        wait_started(proc, log_path)
        server = psutil.Process(proc.pid)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            now = time.time()
            rss = server.memory_info().rss
            try:
                row = conn.execute(
                    "SELECT status, started_at, finished_at, duration, output_bytes, "
                    "peak_rss FROM runs WHERE job = 'big' ORDER BY id DESC LIMIT 1"
                ).fetchone()
            except sqlite3.Error:
                row = None
            samples.append((now, rss, row[0] if row else None))
            if row and row[0] not in ("queued", "running"):
                break
            time.sleep(0.05)
        conn.close()
    finally:
        stop_server(proc)
    if not row or row[0] in ("queued", "running"):
        print("   the run did not finish in time", flush=True)
        note("d", "RSS growth", "n/a", "< 10 MB", False)
        return
    status, started_at, finished_at, duration, output_bytes, _peak = row
    output_from = started_at + BIG_SLEEP
    before = [rss for t, rss, _s in samples if t < output_from - 0.3]
    during = [rss for t, rss, _s in samples if t >= output_from - 0.3]
    baseline = max(before) / MB if before else samples[0][1] / MB
    peak = max(rss for _t, rss, _s in samples) / MB
    growth = peak - baseline
    print(
        f"   run {status}: duration {duration:.2f} s ({duration - BIG_SLEEP:.2f} s of output"
        f" after the {BIG_SLEEP} s sleep), output_bytes {output_bytes}"
    )
    print(
        f"   server RSS: baseline {baseline:.1f} MB ({len(before)} samples before output),"
        f" peak {peak:.1f} MB ({len(during)} samples during/after), growth {growth:.1f} MB",
        flush=True,
    )
    note("d", "RSS growth (200 MB out)", f"{growth:.1f} MB", "< 10 MB", growth < 10)
    note("d", "output phase", f"{finished_at - output_from:.2f} s", "-", True)


# -- main -----------------------------------------------------------------------


def main():
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="minisched-bench-") as tmp:
        # Log like ``serve`` does (INFO, every run start and end) but to a file.
        logging.basicConfig(
            filename=os.path.join(tmp, "engine.log"),
            format="%(asctime)s %(levelname)s %(message)s",
            level=logging.INFO,
        )
        print(
            f"minisched {minisched.__version__}, Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} CPUs, load average {load()}, temp dir {tmp}\n",
            flush=True,
        )
        bench_burst(tmp)
        bench_precision(tmp)
        bench_idle(tmp)
        bench_output(tmp)
        logging.shutdown()
    print(
        f"\n== summary (total {time.monotonic() - started:.0f} s, "
        f"load average now {load()}) =="
    )
    widths = [max(len(str(row[i])) for row in summary) for i in range(5)]
    header = ("bench", "measurement", "value", "target", "verdict")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in (header, *summary):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
