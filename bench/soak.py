"""Soak test of minisched: the real server under a mixed load, with restarts.

Run from anywhere: ``python bench/soak.py [--minutes N] [--seed S] [--keep]``.

It starts ``python minisched.py serve --port 0`` in a temporary directory and,
for ``--minutes`` (default 5), puts it under load while checking that nothing
is run twice, nothing is forgotten and nothing leaks:

- jobs from a jobs file: every-second cron jobs (``* * * * * *``) under each
  concurrency policy, ``@every 2s``/``3s`` jobs that fail and retry, time out,
  print megabytes or invalid UTF-8, fork children that detach (``setsid``) or
  stay in the group, and ``kind: http`` jobs against the server itself and a
  small loopback HTTP server the soak runs;
- every command job first appends ``$MINISCHED_JOB $MINISCHED_RUN_ID`` to
  ``effects.log``, so what really started can be joined with the database;
- two API clients creating, triggering, stopping, pausing, resuming and
  deleting their own jobs; two SSE clients on ``/api/events`` and
  ``/api/runs/ID/stream`` that drop at random;
- a jobs-file edit every 20 s, some of them invalid;
- the server SIGKILLed or SIGTERMed and restarted every 45-90 s (a third of
  the run at most, so even ``--minutes 2`` restarts it twice), on the same
  database and jobs file; at the end a clean SIGTERM.

It prints a summary and one verdict line per invariant and exits 1 if any
failed (2 if the soak itself broke).  Every process it started is stopped
before it returns, also on Ctrl-C.  ``main(argv)`` may be called from a test.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import http.client
import http.server
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "minisched.py")
HOST = "127.0.0.1"
MB = 1024 * 1024

#: ``serve`` logs this once it accepts connections.
LISTEN_RE = re.compile(r"minisched \S+ listening on http://127\.0\.0\.1:(\d+)/")
#: The ``error`` of a ``missed`` record (Scheduler._handle_due).
MISSED_RE = re.compile(r"(\d+) slots? missed between (\S+) and (\S+?):")

SHUTDOWN_GRACE = 5  # --shutdown-grace of every life
EDGE = 2.0  # seconds ignored at each edge of an up interval
EDIT_EVERY = 20.0  # seconds between jobs-file edits
EDIT_SETTLE = 8.0  # seconds an edit gets to show in /api/status
POLL_EVERY = 2.0  # database poll (skipped/missed records are pruned past 20)
SAMPLE_EVERY = 1.0  # resource samples
RESTART_MIN, RESTART_MAX = 45.0, 90.0
LIMITS = {"rss_mb": 150, "threads": 200, "fds": 400, "wal_mb": 64}
POLICIES = ("forbid", "allow", "replace", "queue")
ACTIVE = ("queued", "running")
KEEP_ALL = 1_000_000  # keep_runs: no real run may be pruned during the soak


class SoakError(Exception):
    """The soak itself cannot go on (the server did not start, ...)."""


# -- the server's lives -------------------------------------------------------------


@dataclasses.dataclass
class Life:
    """One run of the server process, from spawn to exit."""

    number: int
    proc: subprocess.Popen
    log_path: str
    spawned_at: float
    up_at: float = 0.0
    port: int = 0
    down_at: float | None = None  # when the soak sent the signal
    exited_at: float | None = None  # when the process was gone
    how: str | None = None  # kill, term, final, died
    exit_code: int | None = None
    exit_seconds: float | None = None
    guard: tuple | None = None  # (pid, create_time) of the server's guard
    rss: list = dataclasses.field(default_factory=list)
    threads: list = dataclasses.field(default_factory=list)
    fds: list = dataclasses.field(default_factory=list)
    streams: list = dataclasses.field(default_factory=list)
    leftovers: list = dataclasses.field(default_factory=list)  # after a kill


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Which life and phase a moment belongs to (phase: up, stopping, down)."""

    life: int
    phase: str
    port: int | None


class Lifecycle:
    """The current life and phase, shared by every thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.lives: list[Life] = []
        self.phase = "down"
        self.port = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(len(self.lives), self.phase, self.port)

    def current(self) -> Life | None:
        with self._lock:
            return self.lives[-1] if self.lives else None

    def set_up(self, life: Life) -> None:
        with self._lock:
            self.lives.append(life)
            self.phase, self.port = "up", life.port

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase


def stable(before: Snapshot, after: Snapshot) -> bool:
    """Both moments in the same life, and the server up at both."""
    return before.life == after.life and before.phase == after.phase == "up"


class Server:
    """Starts and stops ``minisched.py serve`` lives on one database."""

    def __init__(self, script, tmp, db, jobs_path, lifecycle: Lifecycle):
        self.script = script
        self.tmp, self.db, self.jobs_path = tmp, db, jobs_path
        self.lifecycle = lifecycle

    def start(self) -> Life:
        """Spawn a life and wait for its ``listening on`` line."""
        number = len(self.lifecycle.lives) + 1
        log_path = os.path.join(self.tmp, f"server-{number}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINISCHED_")}
        argv = [sys.executable, self.script, "serve", "--db", self.db]
        argv += ["--jobs", self.jobs_path, "--port", "0"]
        argv += ["--shutdown-grace", str(SHUTDOWN_GRACE)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the soak only
            )
        life = Life(number, proc, log_path, spawned_at=time.time())
        life.port = self._wait_listening(life)
        life.up_at = time.time()
        life.guard = find_guard(proc.pid)
        self.lifecycle.set_up(life)
        return life

    @staticmethod
    def _wait_listening(life: Life) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(life.log_path, encoding="utf-8", errors="replace") as f:
                match = LISTEN_RE.search(f.read())
            if match:
                return int(match.group(1))
            if life.proc.poll() is not None:
                break
            time.sleep(0.05)
        stop_process(life.proc, signal.SIGKILL, 10)
        raise SoakError(f"server life {life.number} did not start; see {life.log_path}")

    def stop(self, how: str) -> Life:
        """End the current life: ``kill`` (SIGKILL), ``term`` or ``final`` (SIGTERM)."""
        life = self.lifecycle.current()
        self.lifecycle.set_phase("stopping")
        life.down_at, life.how = time.time(), how
        sig = signal.SIGKILL if how == "kill" else signal.SIGTERM
        started = time.monotonic()
        life.exit_code = stop_process(life.proc, sig, SHUTDOWN_GRACE + 20)
        life.exit_seconds = time.monotonic() - started
        life.exited_at = time.time()
        self.lifecycle.set_phase("down")
        return life


def stop_process(proc, sig, timeout) -> int:
    """Send ``sig``, wait up to ``timeout`` s, then SIGKILL.  Returns the exit
    code (negative: the signal), or -1000 if it had to be SIGKILLed."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGUSR1)  # its threads' stacks to its log
            time.sleep(1)
            proc.kill()
            proc.wait()
            return -1000  # did not exit in time
    return proc.returncode


def find_guard(server_pid: int):
    """``(pid, create_time)`` of the server's guard process, or None."""
    try:
        for child in psutil.Process(server_pid).children():
            if child.cmdline()[:1] == ["minisched-guard"]:
                return child.pid, child.create_time()
    except psutil.Error:
        pass
    return None


# -- requests and their statuses ------------------------------------------------------


class Tally:
    """Every request's outcome, and the problems found on the way."""

    def __init__(self):
        self._lock = threading.Lock()
        self.statuses = collections.Counter()  # status or error name -> count
        self.routes = collections.Counter()  # (route, status) -> count
        self.fivexx = []  # 5xx that are violations
        self.allowed_503 = 0  # 503 while restarting or shutting down
        self.errors_up = []  # connection errors while the server was up
        self.unexpected = []  # 4xx no client expected
        self.soak_errors = []  # exceptions in the soak's own threads
        self.sse = collections.Counter()
        self.edits = collections.Counter()
        self.edit_problems = []

    def request(self, method, route, status, body, before, after, expect=()):
        """Count one request; keep what looks wrong."""
        detail = f"{method} {route} -> {status} (life {before.life} {before.phase}"
        detail += f" .. life {after.life} {after.phase}): {body[:200]!r}"
        with self._lock:
            self.statuses[status] += 1
            self.routes[(f"{method} {route}", status)] += 1
            if isinstance(status, int) and status >= 500:
                if status == 503 and not stable(before, after):
                    self.allowed_503 += 1
                else:
                    self.fivexx.append(detail)
            elif isinstance(status, int):
                if expect and status not in expect:
                    self.unexpected.append(detail)
            elif stable(before, after):
                self.errors_up.append(detail)

    def soak_error(self, where: str) -> None:
        with self._lock:
            self.soak_errors.append(f"{where}: {traceback.format_exc(limit=3)}")

    def count(self, counter: str, key, n=1) -> None:
        with self._lock:
            getattr(self, counter)[key] += n


def http_call(ctx, method, path, body=None, *, route=None, expect=(), timeout=15.0):
    """One request on a fresh connection to the current life: ``(status, bytes)``;
    status is an int, or ``refused``/``timeout``/``conn-error``/``no-server``."""
    before = ctx.lifecycle.snapshot()
    if before.port is None:
        return "no-server", b""
    data, headers = None, {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(HOST, before.port, timeout=timeout)
    try:
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        status, raw = response.status, response.read()
    except ConnectionRefusedError:
        status, raw = "refused", b""
    except TimeoutError:
        status, raw = "timeout", b""
    except (OSError, http.client.HTTPException) as exc:
        status, raw = "conn-error", repr(exc).encode()
    finally:
        conn.close()
    after = ctx.lifecycle.snapshot()
    ctx.tally.request(method, route or path, status, raw, before, after, expect)
    return status, raw


def json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


# -- the jobs -----------------------------------------------------------------------


def effect(ctx) -> str:
    """The first words of every command job: note that this run really started."""
    return f'echo "$MINISCHED_JOB $MINISCHED_RUN_ID" >> {shlex.quote(ctx.effects)}; '


def every_second(name, concurrency, command, **fields) -> dict:
    return dict(
        name=name,
        schedule="* * * * * *",
        concurrency=concurrency,
        command=command,
        **fields,
    )


def command_jobs(ctx, variant: int) -> list:
    """The jobs file's command jobs; ``variant`` changes what a valid edit may
    change (never a schedule of a job whose slots are checked)."""
    e = effect(ctx)
    detach = {"kill_grace": 1}
    if ctx.leftovers_supported:
        detach["leftovers"] = "kill"  # the default, spelt out on one job
    return [
        every_second("sec-forbid", "forbid", e + "sleep 0.2"),
        every_second("sec-allow", "allow", e + f"sleep {(1.5, 0.6)[variant % 2]}"),
        every_second("sec-replace", "replace", e + "sleep 1.5", kill_grace=1),
        every_second("sec-queue", "queue", e + "sleep 1.2", queue_max=2),
        every_second(
            "sec-flaky",
            "forbid",
            e + "test $((MINISCHED_RUN_ID % 3)) -ne 0",
            retries=2,
            retry_delay=1,
            retry_backoff=1,
        ),
        {
            "name": "every2-timeout",
            "schedule": "@every 2s",
            "command": e + "sleep 5",
            "timeout": (1, 1.5)[variant % 2],
            "kill_grace": 1,
            "retries": 1,
            "retry_delay": 1,
        },
        {
            "name": "every3-timeout-trap",
            "schedule": "@every 3s",
            "command": e + "trap '' TERM; sleep 4",
            "concurrency": "allow",
            "timeout": 1,
            "kill_grace": 1,
        },
        {
            "name": "every3-big",
            "schedule": "@every 3s",
            "command": e + "head -c 3000000 /dev/urandom | base64",
            "concurrency": "queue",
        },
        {
            "name": "every2-badutf8",
            "schedule": "@every 2s",
            # dash's printf knows octal escapes only; the euro sign is split
            # across two writes.
            "command": e + r"printf '\377\376 bad\n'; printf '\342\202'; sleep 0.1;"
            r" printf '\254 split euro\n'; printf '\300 stderr\n' >&2",
        },
        {
            "name": "every2-detach",
            "schedule": "@every 2s",
            "concurrency": "allow",
            "command": e + "setsid sleep 5 </dev/null >/dev/null 2>&1 & "
            "sleep 5 >/dev/null 2>&1 & echo detached",
            **detach,
        },
        {
            "name": "every3-detach-holding",
            "schedule": "@every 3s",
            "concurrency": "replace",
            "kill_grace": 1,
            "command": e + "setsid sleep 4 & echo holding the output",
        },
        {
            "name": "every3-detach-timeout",
            "schedule": "@every 3s",
            "timeout": 1,
            "kill_grace": 1,
            "command": e + "setsid sleep 6 </dev/null >/dev/null 2>&1 & sleep 6",
        },
    ]


def http_jobs(ctx) -> list:
    """The jobs file's ``kind: http`` jobs."""
    fixture = f"http://{HOST}:{ctx.fixture_port}"
    port = ctx.lifecycle.snapshot().port
    self_url = f"http://{HOST}:{port}/api/health" if port else fixture + "/ok"
    return [
        {"name": "http-self", "kind": "http", "schedule": "@every 3s", "url": self_url},
        {
            "name": "http-ok",
            "kind": "http",
            "schedule": "@every 2s",
            "url": fixture + "/ok",
            "method": "POST",
            "body": {"hello": "soak"},
        },
        {
            "name": "http-slow-replace",
            "kind": "http",
            "schedule": "@every 2s",
            "url": fixture + "/slow?3",
            "concurrency": "replace",
        },
        {
            "name": "http-timeout",
            "kind": "http",
            "schedule": "@every 3s",
            "url": fixture + "/slow?5",
            "timeout": 1,
            "retries": 1,
            "retry_delay": 1,
        },
        {
            "name": "http-fail",
            "kind": "http",
            "schedule": "@every 3s",
            "url": fixture + "/status/500",
            "expect_status": [200],
        },
        {
            "name": "http-big",
            "kind": "http",
            "schedule": "@every 3s",
            "url": fixture + "/big",
        },
    ]


def jobs_document(ctx, variant: int) -> dict:
    """A valid jobs file; ``variant`` numbers the edit."""
    jobs = command_jobs(ctx, variant) + http_jobs(ctx)
    if variant % 3 == 1:
        jobs.append(
            {"name": "extra", "schedule": "@every 2s", "command": effect(ctx) + "true"}
        )
    for job in jobs:
        job["description"] = f"edit {variant}"
    defaults = {"keep_runs": KEEP_ALL, "cwd": ctx.tmp}
    return {"defaults": defaults, "jobs": jobs}


def invalid_jobs_text(ctx, variant: int, rng) -> tuple:
    """``(kind, text)`` of an invalid jobs file."""
    doc = jobs_document(ctx, variant)
    kind = rng.choice(
        ("truncated", "unknown-field", "bad-schedule", "duplicate", "range", "owned")
    )
    if kind == "truncated":
        text = json.dumps(doc, indent=1)
        return kind, text[: len(text) // 2]
    job = rng.choice(doc["jobs"])
    if kind == "unknown-field":
        job["colour"] = "red"
    elif kind == "bad-schedule":
        job["schedule"] = "* * * *"
    elif kind == "duplicate":
        doc["jobs"].append(dict(job))
    elif kind == "range":
        job["retries"] = 1000
    else:  # a file job may not take the name of an API job
        doc["jobs"].append({"name": "api-owned", "command": "true"})
    return kind, json.dumps(doc, indent=1)


def api_job(ctx, name, rng) -> dict:
    """A job an API client creates."""
    command = rng.choice(
        (
            "sleep 1",
            "sleep 3",
            "exit 1",
            "setsid sleep 4 </dev/null >/dev/null 2>&1 & sleep 0.5",
        )
    )
    return {
        "name": name,
        "command": effect(ctx) + command,
        "schedule": rng.choice((None, "@every 2s", "* * * * * *")),
        "concurrency": rng.choice(POLICIES),
        "queue_max": 2,
        "retries": rng.choice((0, 1)),
        "retry_delay": 1,
        "kill_grace": 1,
        "keep_runs": KEEP_ALL,
        "cwd": ctx.tmp,
    }


def write_file(path: str, text: str, atomic: bool) -> None:
    """Write as an editor would: rename a temp file, or rewrite in place."""
    if not atomic:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the loopback HTTP server for http jobs ---------------------------------------------


class FixtureHandler(http.server.BaseHTTPRequestHandler):
    """``/ok``, ``/slow?SECONDS``, ``/status/CODE``, ``/big`` (2 MB)."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self):
        path, _, query = self.path.partition("?")
        code, body = 200, b"ok\n"
        if path == "/slow":
            time.sleep(float(query or 3))
        elif path.startswith("/status/"):
            code, body = int(path[8:]), b"as asked\n"
        elif path == "/big":
            body = b"0123456789abcdef" * (2 * MB // 16)
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the job was stopped

    def log_message(self, format, *args):
        pass


def start_fixture():
    """The loopback server on its own thread; returns it (``server_address``)."""
    server = http.server.ThreadingHTTPServer((HOST, 0), FixtureHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fixture", daemon=True).start()
    return server


# -- the load -----------------------------------------------------------------------


class Worker(threading.Thread):
    """A daemon thread calling ``step()`` until the soak stops; an exception in
    the soak's own code is kept (and fails the soak), never silent."""

    every = 0.0

    def __init__(self, ctx, name, seed):
        super().__init__(name=name, daemon=True)
        self.ctx = ctx
        self.rng = random.Random(seed)

    def run(self):
        while not self.ctx.stopping.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - kept and reported
                self.ctx.tally.soak_error(self.name)
                self.ctx.stopping.wait(1)
            if self.every:
                self.ctx.stopping.wait(self.every)

    def step(self):
        raise NotImplementedError


class ApiClient(Worker):
    """Creates, triggers, stops, pauses, resumes and deletes its own jobs."""

    ACTIONS = ("create", "run", "run", "stop", "pause", "resume", "delete", "read")

    def __init__(self, ctx, index, seed):
        super().__init__(ctx, f"api-client-{index}", seed)
        self.index = index
        self.jobs = []
        self.created = 0

    def step(self):
        action = self.rng.choice(self.ACTIONS)
        if action == "create" or not self.jobs:
            if len(self.jobs) < 4:
                self.create()
        elif action == "read":
            path = self.rng.choice(("/api/jobs", "/api/runs?limit=50", "/metrics"))
            http_call(self.ctx, "GET", path, expect=(200,))
        else:
            self.act(action, self.rng.choice(self.jobs))
        self.ctx.stopping.wait(self.rng.uniform(0.05, 0.4))

    def create(self):
        self.created += 1
        name = f"api{self.index}-{self.created}"
        status, _ = http_call(
            self.ctx,
            "POST",
            "/api/jobs",
            api_job(self.ctx, name, self.rng),
            expect=(201,),
        )
        if status == 201 or not isinstance(status, int):
            self.jobs.append(name)  # a lost answer may still have created it

    def act(self, action, name):
        path = f"/api/jobs/{name}"
        if action == "delete":
            http_call(
                self.ctx, "DELETE", path, route="/api/jobs/NAME", expect=(200, 204, 404)
            )
            self.jobs.remove(name)
            return
        force = action == "run" and self.rng.random() < 0.3
        query = "?force=1" if force else ""
        expect = (202, 409, 404) if action == "run" else (200, 404)
        http_call(
            self.ctx,
            "POST",
            f"{path}/{action}{query}",
            route=f"/api/jobs/NAME/{action}{query}",
            expect=expect,
        )


class SseClient(Worker):
    """Opens ``/api/events`` or a run's stream and drops it at a random moment."""

    def step(self):
        snap = self.ctx.lifecycle.snapshot()
        if snap.port is None:
            self.ctx.stopping.wait(0.5)
            return
        run_id = self.ctx.poller.pick_run(self.rng)
        if run_id is None or self.rng.random() < 0.4:
            path, route = "/api/events", "/api/events"
        else:
            path, route = f"/api/runs/{run_id}/stream", "/api/runs/ID/stream"
        self.session(snap, path, route)
        self.ctx.stopping.wait(self.rng.uniform(0, 0.5))

    def session(self, before, path, route):
        rng, tally = self.rng, self.ctx.tally
        keep = rng.choice((0.0, rng.uniform(0.1, 1), rng.uniform(1, 6)))
        status, got = None, 0
        try:
            sock = socket.create_connection((HOST, before.port), timeout=5)
        except OSError:
            tally.count("sse", "connect-failed")
            return
        try:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{before.port}\r\n"
                "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode()
            )
            if keep == 0.0 and rng.random() < 0.5:
                tally.count("sse", "dropped-before-headers")
                return
            status, got = self.read_for(sock, keep)
        except OSError:
            tally.count("sse", "broken")
        finally:
            if rng.random() < 0.5:  # a reset rather than a clean close
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            sock.close()
        if status is not None:
            after = self.ctx.lifecycle.snapshot()
            tally.request("GET", route, status, b"", before, after, (200, 404))
            tally.count("sse", "sessions")
            tally.count("sse", "bytes", got)

    @staticmethod
    def read_for(sock, seconds):
        """Read the status line, then whatever comes for ``seconds``."""
        deadline = time.monotonic() + seconds
        buf, status = b"", None
        sock.settimeout(5)
        while status is None:
            data = sock.recv(65536)
            if not data:
                return None, len(buf)
            buf += data
            if b"\r\n" in buf:
                status = int(buf.split(b" ", 2)[1])
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            buf += data
        return status, len(buf)


class Poller(Worker):
    """Reads the database read-only every 2 s and keeps every run row it saw:
    ``skipped``/``missed`` records beyond 20 per job are pruned by the server."""

    every = POLL_EVERY

    def __init__(self, ctx):
        super().__init__(ctx, "db-poller", 0)
        self._lock = threading.Lock()
        self.rows = {}  # run id -> the newest version of its row seen
        self.server_id = None
        self.watermark = 0
        self.polls = 0
        self.failures = 0

    def step(self):
        if os.path.exists(self.ctx.db):
            self.poll()

    def poll(self, everything=False) -> None:
        try:
            conn = connect_ro(self.ctx.db)
        except sqlite3.Error:
            self.failures += 1
            return
        try:
            self.read(conn, 0 if everything else self.watermark)
        except sqlite3.Error:
            self.failures += 1
        finally:
            conn.close()

    def read(self, conn, since) -> None:
        if self.server_id is None:
            row = conn.execute(
                "SELECT value FROM settings WHERE key = 'server_id'"
            ).fetchone()
            self.server_id = json.loads(row[0]) if row else None
        rows = conn.execute("SELECT * FROM runs WHERE id >= ?", (since,)).fetchall()
        with self._lock:
            for row in rows:
                self.rows[row["id"]] = dict(row)
            active = [i for i, r in self.rows.items() if r["status"] in ACTIVE]
            newest = max(self.rows, default=0)
        # Ids are allocated before their insert is committed: look back a little.
        self.watermark = min(active + [max(0, newest - 200)])
        self.polls += 1

    def pick_run(self, rng):
        """A run to stream: an active one mostly, else any recent one."""
        with self._lock:
            if not self.rows:
                return None
            recent = list(self.rows.values())[-300:]
        active = [r["id"] for r in recent if r["status"] in ACTIVE]
        if active and rng.random() < 0.7:
            return rng.choice(active)
        return rng.choice(recent)["id"]

    def all_rows(self) -> dict:
        with self._lock:
            return dict(self.rows)


def connect_ro(db: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


class Sampler(Worker):
    """The server's RSS, threads and descriptors each second, the WAL's size,
    and ``/api/status`` every 5 s (live stream count)."""

    every = SAMPLE_EVERY

    def __init__(self, ctx):
        super().__init__(ctx, "sampler", 0)
        self.wal = []
        self.ticks = 0
        self.marked_max = 0  # most job processes seen carrying the marker at once

    def step(self):
        snap = self.ctx.lifecycle.snapshot()
        life = self.ctx.lifecycle.current()
        wal = self.ctx.db + "-wal"
        if os.path.exists(wal):
            self.wal.append(os.path.getsize(wal))
        if life is None or snap.phase != "up":
            return
        try:
            proc = psutil.Process(life.proc.pid)
            rss, threads, fds = (
                proc.memory_info().rss,
                proc.num_threads(),
                proc.num_fds(),
            )
        except psutil.Error:
            return
        if self.ctx.lifecycle.snapshot() == snap:  # not a dying server's numbers
            life.rss.append(rss)
            life.threads.append(threads)
            life.fds.append(fds)
        self.ticks += 1
        if self.ticks % 5 == 0:
            status, raw = http_call(self.ctx, "GET", "/api/status", expect=(200,))
            doc = json_or_none(raw) if status == 200 else None
            if doc and "streams" in doc:
                life.streams.append(doc["streams"])
            if self.ctx.poller.server_id:
                seen = len(marked_processes(self.ctx.poller.server_id))
                self.marked_max = max(self.marked_max, seen)


class Editor(Worker):
    """Edits the jobs file every 20 s, some edits invalid, and checks that
    ``/api/status`` reports each (and that an invalid one keeps the previous
    definitions)."""

    def __init__(self, ctx, seed):
        super().__init__(ctx, "jobs-editor", seed)
        self.variant = 0  # of the last valid file written
        self.valid = True
        self._lock = threading.Lock()

    def write_valid(self, atomic=True) -> None:
        """Write the next valid version (also after a restart: the port changed)."""
        with self._lock:
            self.variant += 1
            self.valid = True
            doc = jobs_document(self.ctx, self.variant)
            write_file(self.ctx.jobs_path, json.dumps(doc, indent=1), atomic)

    def after_restart(self) -> None:
        """Point ``http-self`` at the new port (unless an invalid edit is pending)."""
        if self.valid:
            self.write_valid()
            self.ctx.tally.count("edits", "valid (new port)")

    def step(self):
        if self.ctx.stopping.wait(EDIT_EVERY):
            return
        edits = sum(self.ctx.tally.edits.values())
        invalid = edits % 4 == 1 or self.rng.random() < 0.25
        atomic = self.rng.random() < 0.8
        if invalid:
            with self._lock:
                kind, text = invalid_jobs_text(self.ctx, self.variant, self.rng)
                write_file(self.ctx.jobs_path, text, atomic)
                self.valid = False
            self.ctx.tally.count("edits", f"invalid ({kind})")
        else:
            self.write_valid(atomic)
            self.ctx.tally.count("edits", "valid")
        self.verify(invalid)

    def verify(self, invalid: bool) -> None:
        """Within EDIT_SETTLE s, /api/status shows the edit: an error for an
        invalid file (and the last valid definitions still in place)."""
        before = self.ctx.lifecycle.snapshot()
        deadline = time.monotonic() + EDIT_SETTLE
        wanted = f"edit {self.variant}"
        seen = None
        while time.monotonic() < deadline and not self.ctx.stopping.is_set():
            self.ctx.stopping.wait(1)
            _, raw = http_call(self.ctx, "GET", "/api/status", expect=(200,))
            _, job_raw = http_call(
                self.ctx,
                "GET",
                "/api/jobs/sec-forbid",
                route="/api/jobs/NAME",
                expect=(200,),
            )
            doc, job = json_or_none(raw), json_or_none(job_raw)
            if not stable(before, self.ctx.lifecycle.snapshot()):
                self.ctx.tally.count("edits", "unverified (restart)")
                return
            if not doc or not job:
                continue
            error = (doc.get("jobs_file") or {}).get("error")
            seen = (error, job.get("description"))
            if bool(error) == invalid and job.get("description") == wanted:
                return
        if not self.ctx.stopping.is_set():
            self.ctx.tally.edit_problems.append(
                f"{'invalid' if invalid else 'valid'} edit (variant {self.variant}) "
                f"not reflected after {EDIT_SETTLE:.0f} s: jobs_file.error, "
                f"sec-forbid description = {seen!r}, expected description {wanted!r}"
            )


# -- processes carrying the server's marker ------------------------------------------


def marked_processes(server_id: str) -> list:
    """``(pid, run id, cmdline)`` of every process with MINISCHED_SERVER=server_id."""
    needle = f"MINISCHED_SERVER={server_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in env:
            run_id = next(
                (v[17:].decode() for v in env if v.startswith(b"MINISCHED_RUN_ID=")),
                "?",
            )
            found.append((int(name), run_id, cmdline.strip()))
    return found


def kill_marked(server_id: str | None) -> int:
    """SIGKILL whatever still carries the marker (cleanup, after the checks)."""
    if not server_id:
        return 0
    killed = 0
    for pid, _run, _cmd in marked_processes(server_id):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def classify_leftovers(found, rows, moment, allowed) -> tuple:
    """Split processes found after a kill or the final shutdown into those
    that may outlive it and violations.  Without a ``leftovers`` field
    (``allowed``), what a run detached with its output closed survives the
    run's normal end, as under cron: tolerated if the run ended normally
    before ``moment`` (the server's exit; a run may end during the shutdown
    grace).  Anything of a run that was still active is a violation."""
    ok, bad = [], []
    for pid, run_id, cmdline in found:
        row = rows.get(int(run_id)) if run_id.isdigit() else None
        ended = (
            row is not None
            and row["status"] in ("succeeded", "failed")
            and row["finished_at"] is not None
            and row["finished_at"] < moment
        )
        note = f"pid {pid} run {run_id} ({row['job'] + ' ' + row['status'] if row else 'no row'}): {cmdline}"
        (ok if ended and allowed else bad).append(note)
    return ok, bad


def probe_leftovers(script: str, tmp: str) -> bool:
    """Does this minisched accept the ``leftovers`` job field yet?"""
    path = os.path.join(tmp, "probe.json")
    with open(path, "w") as f:
        json.dump([{"name": "probe", "command": "true", "leftovers": "kill"}], f)
    result = subprocess.run(
        [sys.executable, script, "validate", path],
        capture_output=True,
        timeout=60,
        check=False,
    )
    os.unlink(path)
    return result.returncode == 0


# -- the soak -------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    number: str
    ok: bool
    text: str
    details: list = dataclasses.field(default_factory=list)

    def lines(self) -> list:
        out = [f"{'PASS' if self.ok else 'FAIL'} {self.number}. {self.text}"]
        out += [f"     {d}" for d in self.details[:12]]
        if len(self.details) > 12:
            out.append(f"     ... and {len(self.details) - 12} more")
        return out


class Soak:
    """Holds what every part shares; ``run()`` does the soak, ``check()`` judges."""

    def __init__(self, opts):
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.tmp = tempfile.mkdtemp(prefix="minisched-soak-")
        self.db = os.path.join(self.tmp, "soak.db")
        self.jobs_path = os.path.join(self.tmp, "jobs.json")
        self.effects = os.path.join(self.tmp, "effects.log")
        self.stopping = threading.Event()
        self.lifecycle = Lifecycle()
        self.tally = Tally()
        self.server = Server(
            opts.minisched, self.tmp, self.db, self.jobs_path, self.lifecycle
        )
        self.fixture = None
        self.fixture_port = None
        self.leftovers_supported = False
        self.poller = Poller(self)
        self.sampler = Sampler(self)
        self.editor = Editor(self, opts.seed + 1)
        self.workers = [self.poller, self.sampler, self.editor]
        self.workers += [ApiClient(self, i, opts.seed + 10 + i) for i in range(2)]
        self.workers += [
            SseClient(self, f"sse-{i}", opts.seed + 20 + i) for i in range(2)
        ]
        self.began = time.monotonic()
        self.died = []  # lives that ended without being asked

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {text}", flush=True)

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """The whole soak: start, load, restart until the time is up, stop."""
        self.say(f"{self.opts.minisched}; temp dir {self.tmp}, seed {self.opts.seed}")
        self.leftovers_supported = probe_leftovers(self.opts.minisched, self.tmp)
        self.say(f"job field 'leftovers' supported: {self.leftovers_supported}")
        self.fixture = start_fixture()
        self.fixture_port = self.fixture.server_address[1]
        self.editor.write_valid()
        self.start_life()
        http_call(  # the API job an invalid jobs file tries to take over
            self,
            "POST",
            "/api/jobs",
            {"name": "api-owned", "command": "true"},
            expect=(201,),
        )
        for worker in self.workers:
            worker.start()
        self.restart_loop()
        self.stopping.set()
        for worker in self.workers:
            worker.join(timeout=20)
        life = self.server.stop("final")
        self.say(
            f"final SIGTERM: exit {life.exit_code} after {life.exit_seconds:.1f} s"
        )
        self.poller.poll(everything=True)

    def restart_loop(self) -> None:
        """Kill or terminate the server every 45-90 s (at most a third of the
        run), the first two restarts one of each, until the time is up."""
        total = self.opts.minutes * 60
        deadline = self.began + total
        hi = min(RESTART_MAX, total / 3)
        lo = min(RESTART_MIN, hi * 0.6)
        first = self.rng.choice(("kill", "term"))
        kinds = [first, "term" if first == "kill" else "kill"]
        while True:
            end = time.monotonic() + self.rng.uniform(lo, hi)
            if deadline - end < lo / 2:  # no life much shorter than the others
                end = deadline
            self.watch_until(end)
            if end >= deadline:
                return
            self.restart(kinds.pop(0) if kinds else self.rng.choice(("kill", "term")))

    def start_life(self) -> Life:
        life = self.server.start()
        self.say(
            f"life {life.number} listening on port {life.port} (pid {life.proc.pid})"
        )
        return life

    def watch_until(self, end: float) -> None:
        """Sleep until ``end``; a server that exits by itself is restarted."""
        while time.monotonic() < end:
            time.sleep(0.2)
            life = self.lifecycle.current()
            if life.proc.poll() is not None:
                self.say(f"life {life.number} EXITED BY ITSELF: {life.proc.returncode}")
                self.died.append(life)
                self.server.stop("died")
                self.start_life()

    def restart(self, how: str) -> None:
        life = self.server.stop(how)
        self.say(
            f"life {life.number} {'SIGKILL' if how == 'kill' else 'SIGTERM'}: "
            f"exit {life.exit_code} after {life.exit_seconds:.1f} s"
        )
        time.sleep(self.rng.uniform(1, 3))
        if how == "kill" and self.poller.server_id:
            life.leftovers = marked_processes(self.poller.server_id)
        self.start_life()
        self.editor.after_restart()

    def cleanup(self) -> None:
        """Stop everything this soak started, whatever happened."""
        self.stopping.set()
        life = self.lifecycle.current()
        if life is not None and life.proc.poll() is None:
            stop_process(life.proc, signal.SIGTERM, SHUTDOWN_GRACE + 10)
        kill_marked(self.poller.server_id)
        if self.fixture is not None:
            self.fixture.shutdown()
            self.fixture.server_close()
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
                child.wait(5)
            except psutil.Error:
                pass
        if self.opts.keep:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- judging ---------------------------------------------------------------

    def check(self) -> list:
        rows = self.poller.all_rows()
        final = self.final_db()
        for row in final["runs"]:
            rows[row["id"]] = row
        return [
            self.check_once(rows),
            self.check_slots(rows, final["jobs"]),
            self.check_final_runs(final["runs"]),
            self.check_processes(rows),
            Verdict(
                "5",
                final["integrity"] == "ok",
                f"PRAGMA integrity_check: {final['integrity']}",
            ),
            self.check_resources(),
            self.check_wal(),
            self.check_http(),
            self.check_logs(),
            self.check_edits(),
            self.check_lives(),
            Verdict(
                "S",
                not self.tally.soak_errors,
                f"the soak's own threads raised {len(self.tally.soak_errors)} errors",
                self.tally.soak_errors,
            ),
        ]

    def final_db(self) -> dict:
        conn = connect_ro(self.db)
        try:
            return {
                "runs": [dict(r) for r in conn.execute("SELECT * FROM runs")],
                "jobs": {
                    r["name"]: dict(r) for r in conn.execute("SELECT * FROM jobs")
                },
                "integrity": "; ".join(
                    r[0] for r in conn.execute("PRAGMA integrity_check")
                ),
            }
        finally:
            conn.close()

    def read_effects(self) -> list:
        if not os.path.exists(self.effects):
            return []
        with open(self.effects, encoding="utf-8", errors="replace") as f:
            return [line.split() for line in f if line.strip()]

    def check_once(self, rows) -> Verdict:
        """1. No (job, slot) twice; each effect line's run id once, with a row
        of the same job."""
        effects = self.read_effects()
        details = []
        by_id = collections.defaultdict(list)
        for parts in effects:
            if len(parts) != 2 or not parts[1].isdigit():
                details.append(f"malformed effects line {parts!r}")
                continue
            by_id[int(parts[1])].append(parts[0])
        for run_id, jobs in sorted(by_id.items()):
            row = rows.get(run_id)
            if len(jobs) > 1:
                details.append(
                    f"run id {run_id} started {len(jobs)} times: {jobs} / row {brief(row)}"
                )
            if row is None:
                details.append(
                    f"run id {run_id} of {jobs[0]} started but has no run row"
                )
            elif row["status"] in ("skipped", "missed"):
                details.append(f"run id {run_id} ran but is recorded {brief(row)}")
            elif row["job"] != jobs[0]:
                details.append(
                    f"run id {run_id} started as {jobs[0]} but its row is {brief(row)}"
                )
        slots = collections.defaultdict(list)
        for row in rows.values():
            if row["slot"] is not None:
                slots[(row["job"], round(row["slot"], 3))].append(row)
        for (job, slot), same in sorted(slots.items()):
            if len(same) > 1:
                details.append(
                    f"slot {iso(slot)} of {job} has {len(same)} runs: "
                    + ", ".join(brief(r) for r in same)
                )
        return Verdict(
            "1",
            not details,
            f"no slot started twice, no run id twice in effects.log ({len(rows)} runs, "
            f"{len(effects)} effect lines, {len(slots)} slots checked)",
            details,
        )

    def up_windows(self) -> list:
        windows = []
        for life in self.lifecycle.lives:
            end = life.down_at if life.down_at is not None else time.time()
            if end - life.up_at > 2 * EDGE:
                windows.append((life.up_at + EDGE, end - EDGE))
        return windows

    def check_slots(self, rows, jobs) -> Verdict:
        """2. Every slot of every every-second/@every file job while the server
        was up ran or was recorded skipped/missed."""
        checked = {
            name: json.loads(job["definition"])
            for name, job in jobs.items()
            if job["source"] == "file" and name != "extra"
        }
        covered = collections.defaultdict(set)
        missed = collections.defaultdict(list)
        for row in rows.values():
            if row["slot"] is not None:
                covered[row["job"]].add(round(row["slot"], 3))
            if row["status"] == "missed":
                match = MISSED_RE.match(row["error"] or "")
                if match:
                    missed[row["job"]].append(
                        (parse_iso(match[2]), parse_iso(match[3]))
                    )
        total, details = 0, []
        for name, definition in sorted(checked.items()):
            for slot in job_slots(
                definition, jobs[name]["created_at"], self.up_windows()
            ):
                total += 1
                if round(slot, 3) in covered[name]:
                    continue
                if any(a - 0.002 <= slot <= b + 0.002 for a, b in missed[name]):
                    continue
                details.append(
                    f"{name} slot {iso(slot)}: no run, no skipped/missed record"
                )
        return Verdict(
            "2",
            not details and total > 0,
            f"every slot while up ran or was recorded skipped/missed ({total} slots of "
            f"{len(checked)} jobs in {len(self.up_windows())} up intervals, "
            f"{len(details)} unaccounted)",
            details,
        )

    def check_final_runs(self, runs) -> Verdict:
        """3. No run left queued/running after the final clean shutdown, which
        (like every SIGTERM) exits 0."""
        left = [brief(r) for r in runs if r["status"] in ACTIVE]
        lives = self.lifecycle.lives
        terms = [life for life in lives if life.how in ("term", "final")]
        bad_exit = []
        for life in terms:
            if life.exit_code != 0:
                bad_exit.append(
                    f"life {life.number} ({life.how}): exit {life.exit_code}"
                )
                if life.exit_code == -1000:  # hung: its log ends with the stacks
                    bad_exit += [
                        "  " + line for line in log_lines(life.log_path)[-120:]
                    ]
        lost = []  # a clean shutdown leaves nothing for the next start to repair
        for previous, life in itertools.pairwise(lives):
            if previous.how == "term":
                lost += [
                    f"after the SIGTERM of life {previous.number}: {line}"
                    for line in log_lines(life.log_path)
                    if "marked lost" in line
                ]
        return Verdict(
            "3",
            not left and not bad_exit and not lost,
            f"no run left queued/running after the final shutdown ({len(left)} left); "
            f"{len(terms)} SIGTERMs exited 0 ({len(bad_exit)} did not); no run marked "
            f"lost after a SIGTERM ({len(lost)})",
            bad_exit + left + lost,
        )

    def check_processes(self, rows) -> Verdict:
        """4. No marked process after the final shutdown (nor, of an active run,
        after a SIGKILL); the guards are gone; no zombie children."""
        sid = self.poller.server_id
        allowed = not self.leftovers_supported
        details, tolerated = [], []
        found = marked_processes(sid) if sid else []
        final = self.lifecycle.current()
        exited = final.exited_at if final and final.exited_at else time.time()
        ok, bad = classify_leftovers(found, rows, exited, allowed)
        details += [f"after the final shutdown: {b}" for b in bad]
        tolerated += ok
        for life in self.lifecycle.lives:
            ok, bad = classify_leftovers(
                life.leftovers, rows, life.exited_at or 0, allowed
            )
            details += [f"after SIGKILL of life {life.number}: {b}" for b in bad]
            tolerated += ok
        for life in self.lifecycle.lives:
            if life.guard and pid_alive(*life.guard):
                details.append(
                    f"guard pid {life.guard[0]} of life {life.number} still alive"
                )
        zombies = [
            c.pid
            for c in psutil.Process().children(recursive=True)
            if c.status() == psutil.STATUS_ZOMBIE
        ]
        details += [f"zombie child pid {pid}" for pid in zombies]
        note = ""
        if tolerated:
            note = (
                f"; tolerated {len(tolerated)} detached leftovers of runs that had ended "
                "normally (no 'leftovers' field yet)"
            )
        return Verdict(
            "4",
            bool(sid) and not details,
            f"no process with MINISCHED_SERVER={sid} left after the final shutdown, "
            f"no guard left, no zombies{note}",
            details or ([] if sid else ["server_id not found in settings"]),
        )

    def check_resources(self) -> Verdict:
        """6. RSS, threads and descriptors per life within LIMITS."""
        details, parts = [], []
        for life in self.lifecycle.lives:
            if not life.rss:
                continue
            rss = (min(life.rss) / MB, max(life.rss) / MB)
            th = (min(life.threads), max(life.threads))
            fd = (min(life.fds), max(life.fds))
            streams = max(life.streams, default=0)
            parts.append(
                f"life {life.number}: RSS {rss[0]:.0f}-{rss[1]:.0f} MB, threads "
                f"{th[0]}-{th[1]}, fds {fd[0]}-{fd[1]}, streams max {streams}"
            )
            if rss[1] >= LIMITS["rss_mb"]:
                details.append(
                    f"life {life.number}: RSS {rss[1]:.0f} MB >= {LIMITS['rss_mb']}"
                )
            if th[1] >= LIMITS["threads"]:
                details.append(
                    f"life {life.number}: {th[1]} threads >= {LIMITS['threads']}"
                )
            if fd[1] >= LIMITS["fds"]:
                details.append(f"life {life.number}: {fd[1]} fds >= {LIMITS['fds']}")
            if streams > 8:  # 2 SSE clients here: more is a leaked stream count
                details.append(
                    f"life {life.number}: /api/status streams reached {streams}"
                )
        return Verdict(
            "6",
            bool(parts) and not details,
            f"server resources bounded (RSS < {LIMITS['rss_mb']} MB, threads < "
            f"{LIMITS['threads']}, fds < {LIMITS['fds']})",
            details + parts,
        )

    def check_wal(self) -> Verdict:
        """7. The WAL stays small."""
        wal = self.sampler.wal
        top = max(wal, default=0) / MB
        return Verdict(
            "7",
            top < LIMITS["wal_mb"],
            f"WAL size bounded: max {top:.1f} MB (< {LIMITS['wal_mb']} MB) over "
            f"{len(wal)} samples",
        )

    def check_http(self) -> Verdict:
        """8. No 5xx (a 503 only while restarting or shutting down)."""
        t = self.tally
        total = sum(t.statuses.values())
        details = list(t.fivexx)
        details += [f"(note) unexpected: {u}" for u in t.unexpected]
        details += [f"(note) connection error while up: {e}" for e in t.errors_up]
        return Verdict(
            "8",
            not t.fivexx,
            f"no 5xx from {total} requests ({len(t.fivexx)} 5xx; 503 while restarting: "
            f"{t.allowed_503}; unexpected 4xx: {len(t.unexpected)}; connection errors "
            f"while up: {len(t.errors_up)})",
            details,
        )

    def check_logs(self) -> Verdict:
        """9. No ``Traceback`` in any life's log."""
        details, lines = [], 0
        for life in self.lifecycle.lives:
            text = log_lines(life.log_path)
            lines += len(text)
            for i, line in enumerate(text):
                if "Traceback" in line:
                    context = " | ".join(text[max(0, i - 1) : i + 12])
                    details.append(f"server-{life.number}.log:{i + 1}: {context}")
        return Verdict(
            "9",
            not details,
            f"no Traceback in the server logs ({len(self.lifecycle.lives)} lives, {lines} lines)",
            details,
        )

    def check_edits(self) -> Verdict:
        """J. Each jobs-file edit shows in /api/status; an invalid one keeps the
        previous definitions."""
        edits = self.tally.edits
        problems = self.tally.edit_problems
        summary = ", ".join(f"{k} {v}" for k, v in sorted(edits.items()))
        return Verdict(
            "J",
            not problems,
            f"jobs-file edits applied or rejected as they should ({summary})",
            problems,
        )

    def check_lives(self) -> Verdict:
        """L. The server never exited unasked, and restarted at least twice."""
        restarts = sum(1 for l in self.lifecycle.lives if l.how in ("kill", "term"))
        details = [
            f"life {l.number} exited by itself: {l.exit_code}" for l in self.died
        ]
        if restarts < 2:
            details.append(f"only {restarts} restarts")
        return Verdict(
            "L",
            not details,
            f"server never exited unasked; {restarts} restarts",
            details,
        )

    def route_lines(self) -> list:
        """One line per route: its statuses."""
        by_route = collections.defaultdict(list)
        for (route, status), n in sorted(self.tally.routes.items(), key=str):
            by_route[route].append(f"{status} {n}")
        return [f"  {route}: {', '.join(v)}" for route, v in sorted(by_route.items())]

    def summary(self, rows) -> list:
        """The counts printed before the verdicts."""
        lives = self.lifecycle.lives
        hows = collections.Counter(life.how for life in lives)
        statuses = collections.Counter(r["status"] for r in rows.values())
        t = self.tally
        req = ", ".join(f"{k} {v}" for k, v in sorted(t.statuses.items(), key=str))
        warn = sum(
            1
            for life in lives
            for line in log_lines(life.log_path)
            if " ERROR " in line or " WARNING " in line
        )
        after_kills = sum(len(life.leftovers) for life in lives)
        return [
            "== summary ==",
            (
                f"duration {time.monotonic() - self.began:.0f} s, seed {self.opts.seed}, "
                f"--minutes {self.opts.minutes:g}, job field 'leftovers' supported: "
                f"{self.leftovers_supported}, temp dir {self.tmp}"
            ),
            (
                f"lives {len(lives)}: kills {hows['kill']}, terms {hows['term']}, final "
                f"term {hows['final']}, died by themselves {hows['died']}"
            ),
            f"runs {len(rows)}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
            f"effect lines {len(self.read_effects())}",
            f"requests {sum(t.statuses.values())}: {req}",
            *self.route_lines(),
            "SSE: " + ", ".join(f"{k} {v}" for k, v in sorted(t.sse.items())),
            (
                f"marked job processes: up to {self.sampler.marked_max} at once while up, "
                f"{after_kills} found 1-3 s after the SIGKILLs"
            ),
            (
                f"db polls {self.poller.polls} ({self.poller.failures} failed), "
                f"server log warnings/errors {warn}"
            ),
        ]


# -- helpers for the checks --------------------------------------------------------------


def job_slots(definition, created_at, windows) -> list:
    """The slots of an every-second cron or ``@every`` job inside ``windows``."""
    schedule = (definition.get("schedule") or "").strip()
    if schedule == "* * * * * *":
        start, step = 0.0, 1.0
    elif (
        schedule.startswith("@every ")
        and schedule[7:-1].isdigit()
        and schedule.endswith("s")
    ):
        start, step = created_at, float(schedule[7:-1])
    else:
        return []
    slots = []
    for lo, hi in windows:
        k = math.ceil((max(lo, created_at) - start) / step)
        while start + k * step <= hi:
            slots.append(start + k * step)
            k += 1
    return slots


def parse_iso(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def iso(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)  # noqa: UP017 - Python < 3.11
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def brief(row) -> str:
    if row is None:
        return "none"
    slot = iso(row["slot"]) if row["slot"] is not None else "-"
    return f"#{row['id']} {row['job']} {row['status']} {row['trigger']} slot {slot}" + (
        f" error {row['error']!r}" if row.get("error") else ""
    )


def log_lines(path: str) -> list:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def pid_alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 0.01 and (
            proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


# -- command line -----------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Soak minisched: the real server under load, with restarts."
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="default 5")
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--minisched",
        default=SCRIPT,
        metavar="PATH",
        help="the minisched.py to soak (default: the one next to bench/)",
    )
    opts = parser.parse_args(argv)
    if opts.seed is None:
        opts.seed = random.randrange(1_000_000)
    if opts.minutes <= 0:
        parser.error("--minutes must be positive")
    return opts


class _Terminated(BaseException):
    """SIGTERM to the soak: unwind like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    """Run the soak; 0 if every invariant held, 1 if not, 2 if the soak broke."""
    opts = parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    soak = Soak(opts)
    code = 2
    try:
        soak.run()
        verdicts = soak.check()
        rows = soak.poller.all_rows()
        print("\n".join(soak.summary(rows)))
        print("== verdicts ==")
        for verdict in verdicts:
            print("\n".join(verdict.lines()))
        code = 0 if all(v.ok for v in verdicts) else 1
    except (KeyboardInterrupt, _Terminated):
        print("\ninterrupted: stopping everything", file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001 - the soak broke: say where
        traceback.print_exc()
        code = 2
    finally:
        soak.cleanup()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
