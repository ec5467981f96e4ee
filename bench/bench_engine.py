"""Benchmark of minisched's engine against the floor: spawn latency, scheduling
precision, scheduler CPU, idle memory, startup and reload cost, and output
memory.  Run from anywhere:
``python bench/bench_engine.py [--quick] [--only NAME]``.

The floor is a naive scheduler with no persistence and no logging, run as its
own Python process: a ``heapq`` of (due, job), ``threading.Event().wait``
until the next due time, one ``subprocess.Popen`` per due job and a thread
reaping the children.  Both systems run the same static C probe (compiled
here with ``cc -O2 -static``; without a compiler a ``/bin/sh`` + ``date``
stand-in, which the output says), which appends ``<CLOCK_REALTIME> <job>``
to a file with one ``O_APPEND`` write as it starts: every lateness below is
that timestamp minus the due instant, read the same way for both systems.
Scheduler CPU is utime + stime of the scheduler process from
``/proc/PID/stat`` (clock ticks, 10 ms): ``serve`` for minisched, the naive
child for the floor.  Every figure is printed for both, with their ratio per
round and the median of the rounds.

(a) burst: N = 100 and 500 jobs due at one instant (``@at``, from the jobs
    file of a fresh ``serve``; the naive loop gets the same kind of
    instant); per round the naive loop, then minisched: the last child's
    start after the due instant, and scheduler CPU per fire (read 1 s
    before the instant and again once every child is gone and every run is
    recorded finished).  Five rounds per N, judged on the median ratio.
(b) precision: 20 jobs firing every second (``* * * * * *``) in five
    rounds of 20 s per system (not one 60 s run), alternating naive and
    minisched: p99 of probe timestamp - slot second, missed and doubled
    slots (a slot is the probe's whole second: lateness must stay < 1 s),
    and CPU per fire between 0.5 s before the first slot and 0.5 s after
    the last.
(c) idle: 1000 jobs registered, none due soon: a fresh ``serve --jobs`` and
    the naive loop with the same 1000 cron schedules (croniter), five
    rounds: CPU from exec until ``serve`` logs that it listens (the naive
    loop: until it prints "ready"), the same for a restart on the filled
    database, RSS of ``serve``, of its guard and of the naive loop after
    settling, idle CPU (first round), and the CPU ``serve`` spends
    reloading its jobs file after one job's command changed (done when the
    new definition is in the database; minisched logs nothing at INFO for a
    successful reload; ``GET /api/status`` confirms ``loaded_at``).
(d) output: a real ``serve`` process while one job prints 200 MB.

``--quick``: two rounds each, 5 s precision rounds, shorter waits, 50 MB of
output (about two minutes); ``--only NAME`` runs one benchmark.  The full run
takes about seven and a half minutes.  Everything lives in a temporary directory
(minisched.py is copied there first, so an edit during the run changes
nothing); every process started here is stopped before the script exits, also
on Ctrl-C, SIGTERM or an error.  The exit code is 0: this is a report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import py_compile
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "minisched.py")
SCRIPT = SOURCE  # main() points this at the temp dir's copy
BURST_SIZES = (100, 500)
ROUNDS = 5
QUICK_ROUNDS = 2
PRECISION_JOBS = 20
PRECISION_SECONDS = 20
QUICK_PRECISION_SECONDS = 5
IDLE_JOBS = 1000
IDLE_SETTLE = 5.0
IDLE_MEASURE = 30.0
BIG_OUTPUT = 200_000_000
QUICK_BIG_OUTPUT = 50_000_000
BIG_SLEEP = 3
MB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
FINAL = ("queued", "running")  # run statuses that are not final

#: The log line ``serve`` prints once the engine runs (with or without HTTP).
STARTED_RE = re.compile(r"minisched \S+ (started|listening on)")
PORT_RE = re.compile(r"listening on http://\S+:(\d+)/")

PROBE_C = r"""
/* bench_engine.py's probe: appends "<CLOCK_REALTIME> <job>\n" to argv[1]. */
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct timespec ts;
    char line[512];
    int fd, n;

    clock_gettime(CLOCK_REALTIME, &ts);
    if (argc != 3)
        return 2;
    n = snprintf(line, sizeof line, "%lld.%09ld %s\n", (long long)ts.tv_sec,
                 (long)ts.tv_nsec, argv[2]);
    if (n < 0 || n >= (int)sizeof line)
        return 2;
    fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0 || write(fd, line, n) != n)
        return 1;
    return 0;
}
"""

#: The stand-in without a C compiler: one ``>>`` (O_APPEND) write per line.
PROBE_SH = 'printf "%s %s\\n" "$(date +%s.%N)" "$2" >> "$1"'

NAIVE_SOURCE = r'''
"""The floor (written by bench_engine.py): a naive scheduler, no persistence.

python naive_loop.py PLAN.json, PLAN = {"jobs": [{"name", "argv", and one of
"at": epoch, "every": [first, last] (each whole second), "cron": expr}]}.
Prints "ready" once its heap is built, then runs until killed.
"""

import heapq
import json
import queue
import subprocess
import sys
import threading
import time


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)["jobs"]
    now = time.time()
    heap = []
    for seq, job in enumerate(jobs):
        if "at" in job:
            due, step = job["at"], None
        elif "every" in job:
            due, last = job["every"]
            step = lambda t, last=last: t + 1 if t + 1 <= last else None
        else:
            from croniter import croniter

            it = croniter(job["cron"], now)
            due, step = it.get_next(float), lambda _t, it=it: it.get_next(float)
        heap.append((due, seq, job["argv"], step))
    heapq.heapify(heap)
    children = queue.SimpleQueue()

    def reap():
        while True:
            children.get().wait()

    threading.Thread(target=reap, daemon=True).start()
    wake = threading.Event()
    print("ready", flush=True)
    while True:
        if not heap:
            wake.wait(3600)
            continue
        left = heap[0][0] - time.time()
        if left > 0:
            wake.wait(min(left, 3600))
            continue
        due, seq, argv, step = heapq.heappop(heap)
        children.put(subprocess.Popen(argv))
        later = step(due) if step else None
        if later is not None:
            heapq.heappush(heap, (later, seq, argv, step))


if __name__ == "__main__":
    main()
'''

summary = []  # (benchmark, measurement, value, target, verdict)
started_here = []  # every process this script started: stopped at exit


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
    utc = datetime.timezone.utc  # noqa: UP017 - Python < 3.11
    return datetime.datetime.fromtimestamp(ts, utc).isoformat()


def sleep_until(when):
    """Sleep to just before ``when`` (epoch), then spin to it."""
    while True:
        left = when - time.time()
        if left <= 0:
            return
        if left > 0.002:
            time.sleep(left - 0.001)


def wait_for(condition, timeout, poll=0.1):
    """Call ``condition`` every ``poll`` s until true; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


def ratio(a, b):
    return a / b if b else float("nan")


def median_round(rounds, key):
    """The round whose ``key`` is the median (the upper one of an even count;
    a ratio of nothing, nan, counts as the largest)."""

    def order(r):
        value = key(r)
        return math.inf if math.isnan(value) else value

    return sorted(rounds, key=order)[len(rounds) // 2]


def load():
    """The 1, 5 and 15 minute load averages: other work skews the numbers."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(ok):
    return "met" if ok else "NOT MET"


def note(benchmark, measurement, value, target, ok):
    summary.append((benchmark, measurement, value, target, verdict(ok)))


def cpu_of(pid):
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(proc):
    return psutil.Process(proc.pid).memory_info().rss / MB


def children_left(pid, but=None):
    """How many children (zombies too) process ``pid`` has, ``but`` aside."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return 0
    return sum(1 for c in children if c.pid != but)


def launch(argv, **kwargs):
    proc = subprocess.Popen(argv, **kwargs)
    started_here.append(proc)
    return proc


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def stop_everything():
    for proc in reversed(started_here):
        with contextlib.suppress(Exception):
            stop_server(proc)


def start_server(tmp, name, jobs, db=None, jobs_path=None):
    """Start ``minisched.py serve --jobs`` (a fresh database unless ``db``;
    ``jobs`` None: ``jobs_path`` as it is); returns (proc, db, log)."""
    db = db or os.path.join(tmp, f"{name}.db")
    jobs_path = jobs_path or os.path.join(tmp, f"{name}.json")
    log_path = os.path.join(tmp, f"{name}.log")
    if jobs is not None:
        with open(jobs_path, "w", encoding="utf-8") as f:
            json.dump({"jobs": jobs}, f)
    with open(log_path, "wb") as log_file:
        proc = launch(
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


def wait_started(proc, log_path, timeout=60.0, poll=0.05):
    """Wait for the server's "started" log line; returns (seconds waited,
    the server's CPU read as soon as the line is seen)."""
    t0 = time.monotonic()
    text = ""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        while time.monotonic() - t0 < timeout:
            text += f.read()
            if STARTED_RE.search(text):
                return time.monotonic() - t0, cpu_of(proc.pid)
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}: {tail(log_path)}"
                )
            time.sleep(poll)
    raise RuntimeError(f"server did not start in {timeout}s: {tail(log_path)}")


def port_of(log_path):
    match = PORT_RE.search(tail(log_path, 10**6))
    return int(match.group(1)) if match else None


def api(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)


def tail(path, size=2000):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-size:]


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


def query(db, sql, *args):
    """Rows of ``sql`` on a read-only connection to ``db`` ([] on a locked or
    not yet created database)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()


# -- the probe and the naive loop -----------------------------------------------


def build_probe(tmp):
    """Compile the probe; returns its argv prefix (then FILE JOB)."""
    src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
    with open(src, "w", encoding="ascii") as f:
        f.write(PROBE_C)
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    problems = []
    for flags in (["-O2", "-static"], ["-O2"]) if compiler else ():
        done = subprocess.run(
            [compiler, *flags, "-o", exe, src],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 and probe_works([exe], tmp):
            print(f"probe: C, {compiler} {' '.join(flags)} ({exe})")
            return [exe]
        problems.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-300:]}")
    sh = ["/bin/sh", "-c", PROBE_SH, "probe"]
    print(
        "NOTE: the probe is /bin/sh with date +%s.%N, not C"
        f" ({'; '.join(problems) or 'no C compiler found'}): every start below"
        " includes a shell and a date process"
    )
    if not probe_works(sh, tmp):
        raise RuntimeError("the /bin/sh probe does not work either")
    return sh


def probe_works(prefix, tmp):
    path = os.path.join(tmp, "probe-check.txt")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    t0 = time.time()
    try:
        subprocess.run([*prefix, path, "check"], check=True, timeout=10)
        lines = read_probe(path)
    except (OSError, subprocess.SubprocessError):
        return False
    return len(lines) == 1 and lines[0][1] == "check" and abs(lines[0][0] - t0) < 5


def read_probe(path):
    """The probe's lines: [(timestamp, job)]."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                stamp, _sep, job = line.rstrip("\n").partition(" ")
                with contextlib.suppress(ValueError):
                    out.append((float(stamp), job))
    except FileNotFoundError:
        pass
    return out


def start_naive(tmp, name, jobs):
    """Start the naive loop on ``jobs``; returns (proc, the epoch it started)."""
    plan = os.path.join(tmp, f"{name}-naive.json")
    with open(plan, "w", encoding="utf-8") as f:
        json.dump({"jobs": jobs}, f)
    with open(os.path.join(tmp, f"{name}-naive.log"), "wb") as err:
        at = time.monotonic()
        proc = launch(
            [sys.executable, os.path.join(tmp, "naive_loop.py"), plan],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=tmp,
        )
    return proc, at


def wait_ready(proc, since, timeout=60.0):
    """Wait for the naive loop's "ready"; returns (seconds since ``since``,
    its CPU read as soon as the line arrives)."""
    readable, _w, _x = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if readable else b""
    cpu = cpu_of(proc.pid)
    if line.strip() != b"ready":
        raise RuntimeError(f"naive loop not ready (exit {proc.poll()}): {line!r}")
    return time.monotonic() - since, cpu


# -- (a) burst ------------------------------------------------------------------


def naive_burst(tmp, probe, n, label):
    """``n`` naive-loop jobs due at one instant; returns (starts - due, info)."""
    path = os.path.join(tmp, f"burst-{label}-naive.txt")
    due = math.ceil(time.time() + 2.0)
    jobs = [
        {"name": f"b{i:04d}", "argv": [*probe, path, f"b{i:04d}"], "at": due}
        for i in range(n)
    ]
    proc, since = start_naive(tmp, f"burst-{label}", jobs)
    try:
        wait_ready(proc, since)
        if due - time.time() < 0.4:
            raise RuntimeError("the naive loop took too long to start")
        sleep_until(due - 0.3)
        cpu0 = cpu_of(proc.pid)
        sleep_until(due + max(0.5, 0.002 * n))
        finished = wait_for(
            lambda: len(read_probe(path)) >= n and not children_left(proc.pid), 60
        )
        cpu1 = cpu_of(proc.pid)
    finally:
        stop_server(proc)
    starts = [ts - due for ts, _job in read_probe(path)]
    return starts, {"cpu": cpu1 - cpu0, "finished": finished}


def minisched_burst(tmp, probe, n, label, lead):
    """``n`` minisched jobs due at one instant ``lead`` s after ``serve`` is
    started; returns (starts - due, info), or (None, info) when the server
    started too late for it (try again with a longer lead)."""
    path = os.path.join(tmp, f"burst-{label}-minisched.txt")
    due = math.ceil(time.time() + lead)
    jobs = [
        {
            "name": f"burst-{i:04d}",
            "command": [*probe, path, f"burst-{i:04d}"],
            "schedule": f"@at {iso(due)}",
            "concurrency": "allow",
        }
        for i in range(n)
    ]
    proc, db, log_path = start_server(tmp, f"burst-{label}", jobs)
    sql = "SELECT status, started_at FROM runs WHERE job LIKE 'burst-%'"
    info = {}
    try:
        info["startup_s"], _cpu = wait_started(proc, log_path)
        info["margin_s"] = due - time.time()
        if info["margin_s"] < 1.5:
            return None, info
        guard = guard_of(proc)
        sleep_until(due - 1.5)
        before = cpu_of(proc.pid)
        sleep_until(due - 1.0)  # the slot is handled 0.25 s ahead (LOOKAHEAD)
        cpu0 = cpu_of(proc.pid)
        info["cpu_before_s"] = cpu0 - before
        # Stay off the CPU during the burst: first look well after it.
        sleep_until(due + max(1.0, 0.004 * n))

        def done():
            rows = query(db, sql)
            return (
                len(rows) >= n
                and all(status not in FINAL for status, _s in rows)
                and len(read_probe(path)) >= n
                and not children_left(proc.pid, guard.pid if guard else None)
            )

        info["finished"] = wait_for(done, 60)
        cpu1 = cpu_of(proc.pid)
        time.sleep(1.0)
        info["cpu_next_s"] = cpu_of(proc.pid) - cpu1
        rows = query(db, sql)
    finally:
        stop_server(proc)
    info["cpu"] = cpu1 - cpu0
    info["runs"] = len(rows)
    info["succeeded"] = sum(status == "succeeded" for status, _s in rows)
    info["statuses"] = sorted({status for status, _s in rows})
    info["recorded"] = [s - due for _st, s in rows if s is not None]
    return [ts - due for ts, _job in read_probe(path)], info


def latencies(label, values):
    return (
        f"{label}: first {ms(min(values))}  p50 {ms(pct(values, 50))}"
        f"  p99 {ms(pct(values, 99))}  last {ms(max(values))}"
    )


def bench_burst(tmp, probe, rounds):
    print("== (a) burst: N jobs due at one instant ==", flush=True)
    print(
        "   latency = probe's start timestamp - due instant; CPU = scheduler"
        " process utime+stime over the burst / N"
    )
    print(
        f"   {rounds} rounds per N, each the naive loop then minisched (a fresh"
        " serve, jobs file of @at jobs); judged on the median round's ratio"
    )
    lead = 6.0
    for n in BURST_SIZES:
        print(f"-- N = {n}")
        results, complete = [], True
        for round_no in range(1, rounds + 1):
            naive, ninfo = naive_burst(tmp, probe, n, f"{n}-{round_no}")
            for _attempt in range(3):
                mini, info = minisched_burst(tmp, probe, n, f"{n}-{round_no}", lead)
                lead = max(4.0, 1.5 * info["startup_s"] + 2.5)
                if mini is not None:
                    break
                print(
                    f"     (serve started {info['startup_s']:.2f} s after launch,"
                    f" {info['margin_s']:.2f} s before due: again with {lead:.1f} s)"
                )
            else:
                raise RuntimeError("serve kept starting too late for the burst")
            if not naive or not mini:
                raise RuntimeError(
                    f"no probe lines: naive {naive!r}, minisched {mini!r}"
                )
            last = ratio(max(mini), max(naive))
            per_fire = ratio(info["cpu"], ninfo["cpu"])
            results.append((last, max(mini), max(naive), per_fire, info, ninfo))
            print(f"   round {round_no}")
            print(
                f"     {latencies('naive loop', naive)}   CPU {ninfo['cpu'] * 1000:4.0f}"
                f" ms = {ninfo['cpu'] / n * 1000:.3f} ms/fire"
            )
            print(
                f"     {latencies('minisched ', mini)}   CPU {info['cpu'] * 1000:4.0f}"
                f" ms = {info['cpu'] / n * 1000:.3f} ms/fire"
            )
            rec = info["recorded"]
            if rec:
                print(
                    f"     minisched runs.started_at - due: p50 {ms(pct(rec, 50))}"
                    f"  p99 {ms(pct(rec, 99))}  last {ms(max(rec))}"
                )
            print(
                f"     ratio last {last:.2f}, CPU per fire {per_fire:.2f}"
                f"   [{info['runs']} runs stored, {info['succeeded']} succeeded,"
                f" statuses {info['statuses']}; {len(naive)}/{len(mini)} probe lines;"
                f" serve started in {info['startup_s']:.2f} s,"
                f" {info['margin_s']:.2f} s before due; serve CPU in the 0.5 s before"
                f" {info['cpu_before_s'] * 1000:.0f} ms, in the second after"
                f" {info['cpu_next_s'] * 1000:.0f} ms]",
                flush=True,
            )
            complete = complete and (
                len(naive) == n
                and len(mini) == n
                and info["runs"] == n
                and info["succeeded"] == n
                and info["finished"]
                and ninfo["finished"]
            )
        best = median_round(results, key=lambda r: r[0])
        cpu = median_round(results, key=lambda r: r[3])
        pooled = ratio(
            sum(r[4]["cpu"] for r in results), sum(r[5]["cpu"] for r in results)
        )
        print(
            f"   N = {n}: last-start ratios {', '.join(f'{r[0]:.2f}' for r in results)};"
            f" median {best[0]:.2f}; CPU-per-fire ratios"
            f" {', '.join(f'{r[3]:.2f}' for r in results)}; median {cpu[3]:.2f}"
            f" (all rounds' CPU summed: {pooled:.2f})"
            + ("" if complete else "; SOME RUNS MISSING"),
            flush=True,
        )
        note(
            "a",
            f"N={n} last start minisched/naive (median of {len(results)})",
            f"{best[0]:.2f} ({best[1] * 1000:.0f}/{best[2] * 1000:.0f} ms)",
            "<= 1.05" if n == 500 else "-",
            (best[0] <= 1.05 or n != 500) and complete,
        )
        note(
            "a",
            f"N={n} CPU per fire minisched/naive",
            f"{cpu[3]:.2f} ({cpu[4]['cpu'] / n * 1000:.2f}/"
            f"{cpu[5]['cpu'] / n * 1000:.2f} ms)",
            "<= 2" if n == 500 else "-",
            cpu[3] <= 2 or n != 500,
        )


# -- (b) precision --------------------------------------------------------------


def ticks(lines, first, last):
    """Lateness of each probe line whose second lies in first..last, and the
    missed and doubled (job, slot) pairs."""
    seen = {}
    for ts, job in lines:
        slot = math.floor(ts)
        if first <= slot <= last:
            seen.setdefault((job, slot), []).append(ts - slot)
    late = [x for values in seen.values() for x in values]
    missed = PRECISION_JOBS * (last - first + 1) - len(seen)
    doubled = sum(len(v) - 1 for v in seen.values())
    per_slot = {}
    for (_job, slot), values in seen.items():
        per_slot.setdefault(slot, []).extend(values)
    spread = (
        pct([min(v) for v in per_slot.values()], 50),
        pct([max(v) for v in per_slot.values()], 50),
    )
    return late, missed, doubled, spread


def naive_ticks(tmp, probe, seconds, label):
    path = os.path.join(tmp, f"ticks-{label}-naive.txt")
    first = math.ceil(time.time()) + 2
    last = first + seconds - 1
    jobs = [
        {
            "name": f"t{i:02d}",
            "argv": [*probe, path, f"t{i:02d}"],
            "every": [first, last],
        }
        for i in range(PRECISION_JOBS)
    ]
    proc, since = start_naive(tmp, f"ticks-{label}", jobs)
    try:
        wait_ready(proc, since)
        sleep_until(first - 0.5)
        cpu0 = cpu_of(proc.pid)
        sleep_until(last + 0.5)
        wait_for(lambda: not children_left(proc.pid), 10, poll=0.02)
        cpu1 = cpu_of(proc.pid)
    finally:
        stop_server(proc)
    return ticks(read_probe(path), first, last), cpu1 - cpu0


def minisched_ticks(tmp, probe, seconds, label):
    path = os.path.join(tmp, f"ticks-{label}-minisched.txt")
    jobs = [
        {
            "name": f"tick-{i:02d}",
            "command": [*probe, path, f"tick-{i:02d}"],
            "schedule": "* * * * * *",
            "concurrency": "allow",
        }
        for i in range(PRECISION_JOBS)
    ]
    proc, _db, log_path = start_server(tmp, f"ticks-{label}", jobs)
    try:
        wait_started(proc, log_path)
        first = math.ceil(time.time()) + 2
        last = first + seconds - 1
        sleep_until(first - 0.5)  # each slot is handled 0.25 s ahead
        cpu0 = cpu_of(proc.pid)
        sleep_until(last + 0.5)
        cpu1 = cpu_of(proc.pid)
    finally:
        stop_server(proc)
    return ticks(read_probe(path), first, last), cpu1 - cpu0


def bench_precision(tmp, probe, rounds, seconds):
    print(
        f"\n== (b) precision: {PRECISION_JOBS} jobs every second, {rounds} rounds"
        f" of {seconds} s per system ==",
        flush=True,
    )
    print(
        "   lateness = probe timestamp - slot second; CPU per fire between 0.5 s"
        " before the first slot and 0.5 s after the last"
    )
    results, zero = [], True
    for round_no in range(1, rounds + 1):
        label = str(round_no)
        runs = {}
        # Alternate which system goes first.
        order = ("naive", "minisched") if round_no % 2 else ("minisched", "naive")
        for who in order:
            run = naive_ticks if who == "naive" else minisched_ticks
            runs[who] = run(tmp, probe, seconds, label)
        print(f"   round {round_no} ({order[0]} first)")
        for who in ("naive", "minisched"):
            (late, missed, doubled, spread), cpu = runs[who]
            fires = len(late)
            print(
                f"     {who:<10}: p50 {ms(pct(late, 50))}  p99 {ms(pct(late, 99))}"
                f"  max {ms(max(late) if late else float('nan'))};"
                f" per slot first p50 {ms(spread[0])}, last p50 {ms(spread[1])};"
                f" {fires} fires, missed {missed}, doubled {doubled};"
                f" CPU {cpu * 1000:.0f} ms = {ratio(cpu, fires) * 1000:.3f} ms/fire"
            )
        (n_late, _m, _d, _s), n_cpu = runs["naive"]
        (m_late, missed, doubled, _s), m_cpu = runs["minisched"]
        zero = zero and missed == 0 and doubled == 0
        late_ratio = ratio(pct(m_late, 99), pct(n_late, 99))
        cpu_ratio = ratio(ratio(m_cpu, len(m_late)), ratio(n_cpu, len(n_late)))
        results.append(
            (
                late_ratio,
                pct(m_late, 99),
                pct(n_late, 99),
                cpu_ratio,
                ratio(m_cpu, len(m_late)),
                ratio(n_cpu, len(n_late)),
                missed,
                doubled,
            )
        )
        print(
            f"     ratio p99 {late_ratio:.2f}, CPU per fire {cpu_ratio:.2f}",
            flush=True,
        )
    best = median_round(results, key=lambda r: r[0])
    cpu = median_round(results, key=lambda r: r[3])
    pooled = ratio(sum(r[4] for r in results), sum(r[5] for r in results))
    print(
        f"   p99 ratios {', '.join(f'{r[0]:.2f}' for r in results)}; median"
        f" {best[0]:.2f}; CPU-per-fire ratios {', '.join(f'{r[3]:.2f}' for r in results)};"
        f" median {cpu[3]:.2f} (all rounds' CPU summed: {pooled:.2f})",
        flush=True,
    )
    note(
        "b",
        f"p99 lateness minisched/naive (median of {len(results)})",
        f"{best[0]:.2f} ({best[1] * 1000:.2f}/{best[2] * 1000:.2f} ms)",
        "<= 1.05",
        best[0] <= 1.05,
    )
    p99 = sorted(r[1] for r in results)[len(results) // 2]
    note(
        "b",
        "p99 lateness minisched (median)",
        f"{p99 * 1000:.2f} ms",
        "< 15 ms",
        p99 < 0.015,
    )
    note(
        "b",
        "CPU per fire minisched/naive",
        f"{cpu[3]:.2f} ({cpu[4] * 1000:.2f}/{cpu[5] * 1000:.2f} ms)",
        "<= 2",
        cpu[3] <= 2,
    )
    missed = sum(r[6] for r in results)
    doubled = sum(r[7] for r in results)
    note("b", "minisched missed / doubled", f"{missed} / {doubled}", "0 / 0", zero)


# -- (c) idle -------------------------------------------------------------------


def idle_jobs():
    """1000 jobs, none due soon (January 1st), with different minutes/hours."""
    return [
        {
            "name": f"idle-{i:04d}",
            "command": ["true"],
            "schedule": f"{i % 60} {i // 60 % 24} 1 1 *",
        }
        for i in range(IDLE_JOBS)
    ]


def reload_jobs_file(proc, db, jobs_path, jobs):
    """Rewrite the jobs file with the last job's command changed; returns
    (serve's CPU until the new definition is stored, seconds it took)."""
    jobs = [dict(job) for job in jobs]
    name = jobs[-1]["name"]
    jobs[-1]["command"] = ["/bin/true"]
    sql = "SELECT definition FROM jobs WHERE name = ?"
    scratch = jobs_path + ".new"
    with open(scratch, "w", encoding="utf-8") as f:
        json.dump({"jobs": jobs}, f)
    cpu0, t0 = cpu_of(proc.pid), time.monotonic()
    os.replace(scratch, jobs_path)

    def stored():
        rows = query(db, sql, name)
        return bool(rows) and "/bin/true" in rows[0][0]

    if not wait_for(stored, 30, poll=0.02):
        raise RuntimeError("the jobs file was not reloaded within 30 s")
    return cpu_of(proc.pid) - cpu0, time.monotonic() - t0


def bench_idle(tmp, rounds, settle, measure):
    print(
        f"\n== (c) idle: {IDLE_JOBS} jobs registered, none due; {rounds} rounds ==",
        flush=True,
    )
    print(
        "   startup CPU = utime+stime when serve logs 'listening' (the naive loop:"
        " prints 'ready'); RSS after"
        f" {settle:g} s; reload = jobs file rewritten with one command changed"
    )
    jobs = idle_jobs()
    naive_jobs = [
        {"name": j["name"], "argv": j["command"], "cron": j["schedule"]} for j in jobs
    ]
    results = []
    for round_no in range(1, rounds + 1):
        name = f"idle-{round_no}"
        naive, since = start_naive(tmp, name, naive_jobs)
        try:
            n_took, n_cpu = wait_ready(naive, since)
            proc, db, log_path = start_server(tmp, name, jobs)
            try:
                m_took, m_cpu = wait_started(proc, log_path, poll=0.005)
                count = query(db, "SELECT count(*) FROM jobs")[0][0]
                time.sleep(settle)
                guard = guard_of(proc)
                rss = {
                    "serve": rss_mb(proc),
                    "guard": guard.memory_info().rss / MB if guard else float("nan"),
                    "naive": rss_mb(naive),
                }
                threads = psutil.Process(proc.pid).num_threads()
                if round_no == 1:
                    idle = idle_cpu(
                        measure, {"serve": proc.pid, "naive": naive.pid, "guard": guard}
                    )
                reload_cpu, reload_s = reload_jobs_file(
                    proc, db, os.path.join(tmp, f"{name}.json"), jobs
                )
                port = port_of(log_path)
                status = api(port, "/api/status").get("jobs_file") if port else None
            finally:
                stop_server(proc)
        finally:
            stop_server(naive)
        again, _db, again_log = start_server(
            tmp,
            f"{name}-again",
            None,
            db=db,
            jobs_path=os.path.join(tmp, f"{name}.json"),
        )
        try:
            w_took, w_cpu = wait_started(again, again_log, poll=0.005)
        finally:
            stop_server(again)
        results.append(
            {
                "m_cpu": m_cpu,
                "n_cpu": n_cpu,
                "w_cpu": w_cpu,
                "rss": rss,
                "reload": reload_cpu,
            }
        )
        print(f"   round {round_no}")
        print(
            f"     startup CPU: serve {m_cpu:.2f} s (listening after {m_took:.2f} s,"
            f" {count} jobs), restart on the filled database {w_cpu:.2f} s (after"
            f" {w_took:.2f} s); naive {n_cpu:.2f} s (ready after {n_took:.2f} s);"
            f" ratio {ratio(m_cpu, n_cpu):.1f}"
        )
        print(
            f"     RSS: serve {rss['serve']:.1f} MB ({threads} threads) + guard"
            f" {rss['guard']:.1f} MB = {rss['serve'] + rss['guard']:.1f} MB; naive"
            f" {rss['naive']:.1f} MB; ratio"
            f" {ratio(rss['serve'] + rss['guard'], rss['naive']):.1f}"
        )
        print(
            f"     reload: serve CPU {reload_cpu:.2f} s until the new definition was"
            f" stored, {reload_s:.2f} s after the rewrite (the file is polled every"
            " 2 s); /api/status jobs_file: loaded_at"
            f" {status and status.get('loaded_at')}, error"
            f" {status and status.get('error')}",
            flush=True,
        )
    print(
        f"   idle CPU over {idle['wall']:.1f} s (round 1): serve {idle['serve']:.3f}%,"
        f" guard {idle['guard']:.3f}%, naive {idle['naive']:.3f}% of one core",
        flush=True,
    )
    med = {}
    for key in ("m_cpu", "n_cpu", "w_cpu", "reload"):
        med[key] = sorted(r[key] for r in results)[len(results) // 2]
    for key in ("serve", "guard", "naive"):
        med[key] = sorted(r["rss"][key] for r in results)[len(results) // 2]
    total = sorted(r["rss"]["serve"] + r["rss"]["guard"] for r in results)
    total = total[len(results) // 2]
    print(
        f"   medians: startup CPU serve {med['m_cpu']:.2f} s / naive"
        f" {med['n_cpu']:.2f} s; restart {med['w_cpu']:.2f} s; RSS serve+guard"
        f" {total:.1f} MB / naive {med['naive']:.1f} MB; reload {med['reload']:.2f} s",
        flush=True,
    )
    note(
        "c",
        f"idle RSS serve + guard (median of {len(results)})",
        f"{total:.1f} MB ({med['serve']:.1f} + {med['guard']:.1f};"
        f" naive {med['naive']:.1f})",
        "< 30 MB",
        total < 30,
    )
    note(
        "c",
        "startup CPU, 1000 jobs, fresh database",
        f"{med['m_cpu']:.2f} s (naive {med['n_cpu']:.2f} s)",
        "< 0.3 s",
        med["m_cpu"] < 0.3,
    )
    note(
        "c",
        "startup CPU, restart (filled database)",
        f"{med['w_cpu']:.2f} s",
        "-",
        True,
    )
    note(
        "c",
        "jobs-file reload CPU",
        f"{med['reload']:.2f} s",
        "< 0.3 s",
        med["reload"] < 0.3,
    )
    note(
        "c",
        "idle CPU serve",
        f"{idle['serve']:.3f}% (naive {idle['naive']:.3f}%)",
        "< 0.1%",
        idle["serve"] < 0.1,
    )


def idle_cpu(seconds, who):
    """CPU share (% of one core) of each process over ``seconds``."""

    def sample():
        out = {}
        for key, pid in who.items():
            if isinstance(pid, psutil.Process):
                pid = pid.pid
            out[key] = cpu_of(pid) if pid else 0.0
        return out

    c0, w0 = sample(), time.monotonic()
    time.sleep(seconds)
    c1, w1 = sample(), time.monotonic()
    share = {key: (c1[key] - c0[key]) / (w1 - w0) * 100 for key in who}
    share["wall"] = w1 - w0
    return share


# -- (d) output -----------------------------------------------------------------


def bench_output(tmp, big_output):
    command = f"sleep {BIG_SLEEP}; yes 0123456789abcdef | head -c {big_output}"
    print(
        f"\n== (d) output: serve while one @reboot job prints {big_output // 10**6} MB =="
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
            if row and row[0] not in FINAL:
                break
            time.sleep(0.05)
        conn.close()
    finally:
        stop_server(proc)
    if not row or row[0] in FINAL:
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
    size = f"{big_output // 10**6} MB"
    note("d", f"RSS growth ({size} out)", f"{growth:.1f} MB", "< 10 MB", growth < 10)
    note("d", "output phase", f"{finished_at - output_from:.2f} s", "-", True)


# -- main -----------------------------------------------------------------------

BENCHMARKS = ("burst", "precision", "idle", "output")


def on_sigterm(_signum, _frame):
    raise SystemExit(143)


def main(argv=None):
    global SCRIPT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROUNDS} rounds, {QUICK_PRECISION_SECONDS} s precision rounds,"
        " shorter waits",
    )
    parser.add_argument(
        "--only", choices=BENCHMARKS, action="append", help="run this benchmark only"
    )
    ns = parser.parse_args(argv)
    rounds = QUICK_ROUNDS if ns.quick else ROUNDS
    which = ns.only or BENCHMARKS
    started = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="minisched-bench-") as tmp:
        try:
            SCRIPT = os.path.join(tmp, "minisched.py")
            shutil.copyfile(SOURCE, SCRIPT)
            # Servers run with Python's defaults, as on a host: the re-executed
            # serve loads the copy's cached bytecode, written here once (what
            # a host's first start does) so that every round is alike.
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            py_compile.compile(SCRIPT, doraise=True)
            with open(os.path.join(tmp, "naive_loop.py"), "w", encoding="utf-8") as f:
                f.write(NAIVE_SOURCE)
            version = subprocess.run(
                [sys.executable, SCRIPT, "--version"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            print(
                f"{version} (copied to the temp dir, bytecode cached), Python {sys.version.split()[0]},"
                f" {os.cpu_count()} CPUs, load average {load()}, temp dir {tmp}",
                flush=True,
            )
            probe = build_probe(tmp)
            print(flush=True)
            if "burst" in which:
                bench_burst(tmp, probe, rounds)
            if "precision" in which:
                seconds = QUICK_PRECISION_SECONDS if ns.quick else PRECISION_SECONDS
                bench_precision(tmp, probe, rounds, seconds)
            if "idle" in which:
                bench_idle(
                    tmp,
                    rounds,
                    2.0 if ns.quick else IDLE_SETTLE,
                    5.0 if ns.quick else IDLE_MEASURE,
                )
            if "output" in which:
                bench_output(tmp, QUICK_BIG_OUTPUT if ns.quick else BIG_OUTPUT)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every process started here", flush=True)
        finally:
            stop_everything()
    print(
        f"\n== summary (total {time.monotonic() - started:.0f} s, "
        f"load average now {load()}) =="
    )
    if not summary:
        return
    widths = [max(len(str(row[i])) for row in summary) for i in range(5)]
    header = ("bench", "measurement", "value", "target", "verdict")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in (header, *summary):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
