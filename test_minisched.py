"""Tests of minisched, grouped by behaviour.

Run with ``python -m pytest -q test_minisched.py``.  Live tests bind port 0 and
wait on conditions with deadlines; the scheduler is driven by a fake clock.
"""

import collections
import contextlib
import ctypes
import datetime
import email
import errno
import glob
import http.client
import http.server
import io
import itertools
import json
import logging
import math
import os
import platform
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import wsgiref.util
import zoneinfo

import psutil
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import minisched
from minisched import (
    API_ROUTES,
    MAX_BODY,
    Config,
    ConflictError,
    Engine,
    EventBus,
    HttpServer,
    InvalidError,
    Runner,
    Scheduler,
    SQLiteStore,
    Store,
    make_app,
    make_server,
    next_fire_times,
    validate_job,
)

HERE = os.path.dirname(os.path.abspath(__file__))
UTC = datetime.timezone.utc  # noqa: UP017 - datetime.UTC needs Python 3.11


def ts(text):
    # Python < 3.11 does not read "Z".
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()  # noqa: FURB162


def wait_for(cond, timeout=15.0, interval=0.01):
    """Poll ``cond`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class FakeClock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


class Harness:
    """Store + Runner + Scheduler on a temporary database, no scheduler thread:
    tests call ``tick()`` themselves."""

    def __init__(
        self, path, clock=time.time, max_concurrent=0, tz=UTC, monotonic=time.monotonic
    ):
        self.clock = clock
        self.store = SQLiteStore(str(path)).open()
        self.bus = EventBus()
        self.runner = Runner(
            self.store,
            self.bus,
            max_concurrent,
            clock=clock,
            job_lookup=lambda name: self.sched.get_job(name),
            on_finished=lambda run, job: self.sched.run_finished(run, job),
            monotonic=monotonic,
        )
        self.runner.start()
        self.sched = Scheduler(self.store, self.runner, self.bus, tz, clock=clock)
        self.sched.load()

    def add(self, **definition):
        definition.setdefault("command", "true")
        return self.sched.put_job(validate_job(definition))

    def runs(self, job=None, **filters):
        self.store.flush()
        rows, _total = self.store.list_runs(job=job, limit=100000, **filters)
        return rows[::-1]

    def wait_idle(self, timeout=20):
        wait_for(lambda: not self.runner.active_runs(), timeout)
        self.store.flush()

    def api_run(self, run_id):
        """A run as the API shows it."""
        return minisched.run_public(self.store.get_run(run_id))

    def close(self):
        self.runner.shutdown(5)
        self.store.close()


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**kwargs):
        h = Harness(tmp_path / "m.db", **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        with contextlib.suppress(Exception):
            h.close()


# -- schedules and DST tables --------------------------------------------------

DST_CASES = [
    # zone, expression, after (UTC), expected fire times (UTC)
    # New York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT
    (
        "America/New_York",
        "30 2 * * *",
        "2026-03-07T00:00:00Z",
        ["2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"],
    ),
    (
        "America/New_York",
        "*/30 * * * *",
        "2026-03-08T06:15:00Z",
        ["2026-03-08T06:30:00Z", "2026-03-08T07:00:00Z", "2026-03-08T07:30:00Z"],
    ),
    # New York, fall back 2026-11-01 02:00 EDT -> 01:00 EST
    (
        "America/New_York",
        "30 1 * * *",
        "2026-10-31T12:00:00Z",
        ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"],
    ),
    (
        "America/New_York",
        "0,30 1 * * *",  # a list of minutes is not a fixed time: both passes fire
        "2026-11-01T04:00:00Z",
        [
            "2026-11-01T05:00:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-02T06:00:00Z",
        ],
    ),
    (
        "America/New_York",
        "*/30 * * * *",
        "2026-11-01T04:45:00Z",
        [
            "2026-11-01T05:00:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-01T07:00:00Z",
        ],
    ),
    (
        "America/New_York",
        "0 * * * *",
        "2026-11-01T04:30:00Z",
        ["2026-11-01T05:00:00Z", "2026-11-01T06:00:00Z", "2026-11-01T07:00:00Z"],
    ),
    # Berlin, spring forward 2026-03-29 02:00 CET -> 03:00 CEST
    (
        "Europe/Berlin",
        "15 2 * * *",
        "2026-03-28T12:00:00Z",
        ["2026-03-29T01:00:00Z", "2026-03-30T00:15:00Z"],
    ),
    (
        "Europe/Berlin",
        "0 * * * *",
        "2026-03-29T00:30:00Z",
        ["2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"],
    ),
    # Berlin, fall back 2026-10-25 03:00 CEST -> 02:00 CET
    (
        "Europe/Berlin",
        "30 2 * * *",
        "2026-10-24T12:00:00Z",
        ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
    ),
    (
        "Europe/Berlin",
        "*/20 2 * * *",
        "2026-10-24T23:50:00Z",
        [
            "2026-10-25T00:00:00Z",
            "2026-10-25T00:20:00Z",
            "2026-10-25T00:40:00Z",
            "2026-10-25T01:00:00Z",
            "2026-10-25T01:20:00Z",
            "2026-10-25T01:40:00Z",
            "2026-10-26T01:00:00Z",
        ],
    ),
    # Sydney, fall back 2026-04-05 03:00 AEDT -> 02:00 AEST
    (
        "Australia/Sydney",
        "30 2 * * *",
        "2026-04-04T00:00:00Z",
        ["2026-04-04T15:30:00Z", "2026-04-05T16:30:00Z"],
    ),
    (
        "Australia/Sydney",
        "0 * * * *",
        "2026-04-04T14:30:00Z",
        ["2026-04-04T15:00:00Z", "2026-04-04T16:00:00Z", "2026-04-04T17:00:00Z"],
    ),
    # Sydney, spring forward 2026-10-04 02:00 AEST -> 03:00 AEDT
    (
        "Australia/Sydney",
        "30 2 * * *",
        "2026-10-03T00:00:00Z",
        ["2026-10-03T16:00:00Z", "2026-10-04T15:30:00Z"],
    ),
    (
        "Australia/Sydney",
        "*/30 * * * *",
        "2026-10-03T15:15:00Z",
        ["2026-10-03T15:30:00Z", "2026-10-03T16:00:00Z", "2026-10-03T16:30:00Z"],
    ),
]


@pytest.mark.parametrize("zone,expr,after,expected", DST_CASES)
def test_dst_table(zone, expr, after, expected):
    times = next_fire_times(expr, len(expected), zoneinfo.ZoneInfo(zone), ts(after))
    assert [minisched.iso_utc(t) for t in times] == [
        e.replace("Z", ".000Z") for e in expected
    ]


def test_six_fields_put_seconds_first():
    times = next_fire_times("*/20 * * * * *", 4, UTC, ts("2026-01-01T00:00:00Z"))
    assert [t - ts("2026-01-01T00:00:00Z") for t in times] == [20, 40, 60, 80]


def test_macros_and_fixed_time_detection():
    assert minisched.Schedule("@daily", UTC).fixed
    assert not minisched.Schedule("@hourly", UTC).fixed
    assert minisched.Schedule("0 30 2 * * *", UTC).fixed
    assert not minisched.Schedule("*/5 * * * *", UTC).fixed
    times = next_fire_times("@weekly", 2, UTC, ts("2026-11-23T10:00:00Z"))
    assert [minisched.iso_utc(t) for t in times] == [
        "2026-11-29T00:00:00.000Z",
        "2026-12-06T00:00:00.000Z",
    ]


def test_every_is_anchored_and_never_drifts():
    sched = minisched.Schedule("@every 1h30m", UTC)
    anchor = ts("2026-01-01T00:00:07Z")
    assert sched.next_after(anchor, anchor) == anchor + 5400
    # However late the previous fire was handled, the next slot stays on the grid.
    assert sched.next_after(anchor + 5400 + 100, anchor) == anchor + 10800
    assert minisched.parse_duration("2d") == 172800
    with pytest.raises(InvalidError):
        minisched.Schedule("@every 500ms", UTC)


def test_at_is_one_shot_in_the_job_zone():
    ny = zoneinfo.ZoneInfo("America/New_York")
    sched = minisched.Schedule("@at 2026-12-01T09:00:00", ny)
    assert sched.next_after(ts("2026-11-01T00:00:00Z")) == ts("2026-12-01T14:00:00Z")
    assert sched.next_after(ts("2026-12-02T00:00:00Z")) is None
    gap = minisched.Schedule("@at 2026-03-08T02:30:00", ny)
    assert gap.at == ts("2026-03-08T07:00:00Z")


def test_impossible_and_malformed_schedules_are_rejected():
    for expr in (
        "0 0 31 2 *",
        "61 * * * *",
        "* * *",
        "@sometimes",
        "@every",
        "@at soon",
    ):
        with pytest.raises(InvalidError) as info:
            minisched.Schedule(expr, UTC)
        assert info.value.field == "schedule"


def test_next_command_prints_local_and_utc(capsys):
    code = minisched.main(
        [
            "next",
            "30 2 * * *",
            "-n",
            "2",
            "--timezone",
            "America/New_York",
            "--after",
            "2026-03-07T12:00:00Z",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "2026-03-08T03:00:00-04:00  2026-03-08T07:00:00.000Z",
        "2026-03-09T02:30:00-04:00  2026-03-09T06:30:00.000Z",
    ]
    minisched.main(
        [
            "next",
            "@every 90s",
            "-n",
            "1",
            "--after",
            "2026-01-01T00:00:00Z",
            "--timezone",
            "UTC",
            "--json",
        ]
    )
    assert json.loads(capsys.readouterr().out) == {
        "times": [
            {"local": "2026-01-01T00:01:30+00:00", "utc": "2026-01-01T00:01:30.000Z"}
        ],
        "description": "every 90 seconds",
    }
    assert minisched.main(["next", "bogus"]) == 2


# -- job validation and the jobs file -----------------------------------------

INVALID_FIELDS = [
    ("name", "-bad"),
    ("name", "x" * 65),
    ("command", ""),
    ("command", [1, 2]),
    ("kind", "ftp"),
    ("schedule", "99 * * * *"),
    ("schedule", 5),
    ("timezone", "Mars/Olympus"),
    ("timezone", "Europe/" + "x" * 300),  # the file system refuses the name
    ("enabled", "yes"),
    ("description", 3),
    ("tags", "a,b"),
    ("cwd", 7),
    ("env", {"A": 1}),
    ("env", {"MINISCHED_RUN_ID": "1"}),
    ("env", {"1BAD": "x"}),
    ("user", 0),
    ("timeout", -1),
    ("timeout", float("nan")),
    ("kill_grace", "10"),
    ("retries", 1.5),
    ("retries", True),
    ("retry_delay", -1),
    ("retry_backoff", 0.5),
    ("retry_max_delay", -3),
    ("concurrency", "sometimes"),
    ("queue_max", 0),
    ("catch_up", "some"),
    ("starting_deadline", 0),
    ("jitter", -1),
    ("max_runs", -1),
    ("keep_runs", 0),
    ("max_output", 10),
    ("on_success", [{"url": "ftp://x"}]),
    ("on_failure", [{"command": "x", "url": "http://x"}]),
    ("on_start", "notify"),
    ("after", ["bad name!"]),
    ("url", "http://x"),
    ("expect_status", [200]),
    ("bogus_field", 1),
]


@pytest.mark.parametrize("field,value", INVALID_FIELDS)
def test_every_invalid_field_is_rejected_with_its_name(field, value):
    definition = {"name": "job1", "command": "true", field: value}
    with pytest.raises(InvalidError) as info:
        validate_job(definition)
    assert info.value.field == field
    assert info.value.message.startswith(field + ":")


def test_http_fields_are_checked_for_http_jobs():
    ok = validate_job(
        {
            "name": "h",
            "kind": "http",
            "url": "http://127.0.0.1/x",
            "expect_status": [200, 204],
            "method": "POST",
            "body": {"a": 1},
        }
    )
    assert ok["kind"] == "http"
    for field, value in (
        ("url", "nope"),
        ("method", "FETCH"),
        ("expect_status", [99]),
        ("headers", {"A": 1}),
        ("command", "true"),
    ):
        with pytest.raises(InvalidError) as info:
            validate_job({"name": "h", "kind": "http", "url": "http://x", field: value})
        assert info.value.field == field


def test_jobs_file_errors_name_their_place(tmp_path):
    path = tmp_path / "jobs.json"
    path.write_text(
        json.dumps(
            {
                "defaults": {"timezone": "UTC", "env": {"A": "1", "B": "2"}},
                "jobs": [
                    {"name": "a", "command": "true", "env": {"B": "3"}},
                    {"name": "b", "command": "true"},
                    {"name": "c", "command": "true", "schedule": "every day"},
                ],
            }
        )
    )
    with pytest.raises(InvalidError) as info:
        minisched.load_jobs_file(str(path), UTC)
    assert "jobs[2].schedule: " in info.value.message
    assert info.value.field == "jobs[2].schedule"
    doc = json.loads(path.read_text())
    doc["jobs"].pop()
    path.write_text(json.dumps(doc))
    jobs = minisched.load_jobs_file(str(path), UTC)
    assert jobs[0]["env"] == {"A": "1", "B": "3"}
    assert jobs[1]["timezone"] == "UTC"
    path.write_text('{"jobs": [{"name": "x", "command": "true", "timeout": NaN}]}')
    with pytest.raises(InvalidError, match="NaN"):
        minisched.load_jobs_file(str(path), UTC)


def test_validate_command_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps([{"name": "a", "command": "true", "schedule": "@daily"}])
    )
    assert minisched.main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "a", "command": "true", "timeout": "x"}]))
    assert minisched.main(["validate", str(bad)]) == 1
    assert "jobs[0].timeout" in capsys.readouterr().err


def test_example_jobs_file_is_valid():
    assert minisched.main(["validate", os.path.join(HERE, "jobs.example.json")]) == 0


def test_jobs_file_reload_keeps_old_definitions_on_error(harness, tmp_path):
    h = harness()
    path = tmp_path / "jobs.json"
    path.write_text(
        json.dumps(
            [
                {"name": "a", "command": "true", "schedule": "@hourly"},
                {"name": "b", "command": "true"},
            ]
        )
    )
    jf = minisched.JobsFile(str(path), h.sched, h.bus)
    assert jf.load()
    assert [j.name for j in h.sched.jobs()] == ["a", "b"]
    path.write_text(
        json.dumps([{"name": "a", "command": "true", "schedule": "@every x"}])
    )
    assert not jf.load()
    assert jf.status()["error"].endswith(
        "jobs[0].schedule: invalid duration 'x' (use a number "
        "with units s, m, h, d, e.g. 30s, 5m, 1h30m)"
    )
    assert [j.name for j in h.sched.jobs()] == ["a", "b"]
    path.write_text(
        json.dumps([{"name": "a", "command": "echo", "schedule": "@daily"}])
    )
    assert jf.load() and jf.status()["error"] is None
    assert [(j.name, j.schedule, j.source) for j in h.sched.jobs()] == [
        ("a", "@daily", "file")
    ]
    h.sched.put_job(validate_job({"name": "api-job", "command": "true"}))
    path.write_text(json.dumps([{"name": "api-job", "command": "true"}]))
    assert not jf.load()
    assert "created through the API" in jf.error


def test_jobs_file_failing_midway_commits_and_audits_what_it_applied(
    harness, tmp_path, monkeypatch
):
    """Definitions go to the store in batches; one that cannot be applied
    stops the rest, and the ones before it are committed, announced and
    audited, the failing one and those after it are not."""
    h = harness()
    path = tmp_path / "jobs.json"
    names = [f"j{i:02d}" for i in range(minisched.FILE_BATCH + 10)]
    path.write_text(json.dumps([{"name": n, "command": "true"} for n in names]))
    audited = []
    jf = minisched.JobsFile(
        str(path), h.sched, h.bus, audit=lambda _a, _act, job, **_: audited.append(job)
    )
    stage = h.sched._stage_job
    bad = names[minisched.FILE_BATCH + 3]

    def failing(definition, *args):
        if definition["name"] == bad:
            raise InvalidError("after: no job named 'gone'", "after")
        return stage(definition, *args)

    monkeypatch.setattr(h.sched, "_stage_job", failing)
    with pytest.raises(InvalidError, match="gone"):
        jf.load()
    applied = names[: minisched.FILE_BATCH + 3]
    assert [j.name for j in h.sched.jobs()] == applied
    assert audited == applied
    assert sorted(r["name"] for r in h.store.load_jobs()) == applied


# -- storage --------------------------------------------------------------------


def test_store_refuses_newer_schema_and_second_server(tmp_path):
    path = str(tmp_path / "m.db")
    store = SQLiteStore(path).open()
    with pytest.raises(minisched.DatabaseError, match="in use by another"):
        SQLiteStore(path).open()
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(minisched.DatabaseError, match="schema version 99"):
        SQLiteStore(path).open()


# -- a private PostgreSQL, started by the tests ----------------------------------


def _pg_bin():
    """The directory of Debian's PostgreSQL programs (the newest), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return os.path.dirname(found[-1]) if found else None


def _pg_missing():
    """Why the PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg is not installed (pip install "psycopg[binary]")'
    if _pg_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on loopback.
    initdb refuses root: as root, it runs as the ``postgres`` user (or
    ``nobody``)."""

    def __init__(self, base):
        self.base = base
        self.data = os.path.join(base, "data")
        self.bin = _pg_bin()
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(base, self.user.pw_uid, self.user.pw_gid)
        self._dbs = itertools.count(1)

    def _run(self, *argv, check=True):
        argv = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.user is not None:
            argv = ["runuser", "-u", self.user.pw_name, "--", *argv]
        return subprocess.run(
            argv, capture_output=True, text=True, check=check, cwd=self.base
        )

    def init(self):
        self._run(
            "initdb", "-D", self.data, "-A", "trust", "-U", "minisched", "-E", "UTF8"
        )
        return self.start()

    def start(self):
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c max_connections=300"
        )
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            os.path.join(self.base, "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def url(self, db="postgres"):
        return f"postgresql://minisched@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A new empty database: its URL."""
        import psycopg

        name = f"t{next(self._dbs)}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL for the whole run, in a directory of its own
    under /tmp (which its unprivileged user can reach), removed at the end;
    skipped, with the reason, where it cannot start (CI requires it)."""
    missing = _pg_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires the PostgreSQL tests: {missing}")
        pytest.skip(missing)
    base = tempfile.mkdtemp(prefix="minisched-pg-")
    cluster = PgCluster(base).init()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster):
    """A new, empty PostgreSQL database."""
    return pg_cluster.new_database()


# -- the store contract: every Store implementation passes these --------------

#: The implementations the contract suite runs on.
STORE_KINDS = ["sqlite", "postgresql"]


@pytest.fixture(params=STORE_KINDS)
def new_store(request, tmp_path):
    """Factory of opened stores of one implementation; ``make(name)`` opens
    the database ``name`` (again, after a close: it persists)."""
    made = []
    urls = {}

    def make(name="m"):
        if request.param == "sqlite":
            store = SQLiteStore(str(tmp_path / f"{name}.db")).open()
        else:
            if name not in urls:
                urls[name] = request.getfixturevalue("pg_cluster").new_database()
            store = minisched.PostgresStore(urls[name]).open()
            store.register("test-node", [], None)
        made.append(store)
        return store

    yield make
    for store in made:
        with contextlib.suppress(Exception):
            store.close()


def new_run(store, job="a", status="queued", **fields):
    row = {"id": store.allocate_run_id(), "job": job, "status": status}
    row.update(trigger="schedule", **fields)
    return row


def test_a_write_resolves_once_for_every_waiter_and_callback():
    """The writer's :class:`Write`: ``result`` waits (``TimeoutError`` when
    not done in time), every waiter and callback sees the one outcome,
    whether registered before or after it, and a failing callback is logged,
    not raised into the writer."""
    write = minisched.Write()
    with pytest.raises(TimeoutError):
        write.result(0.01)
    seen = []
    write.add_done_callback(lambda w: seen.append(("before", w.result())))
    write.add_done_callback(lambda w: 1 / 0)
    waiters = [
        threading.Thread(target=lambda: seen.append(("waiter", write.result(5))))
        for _ in range(3)
    ]
    for t in waiters:
        t.start()
    write.set_result(42)
    for t in waiters:
        t.join(5)
    write.add_done_callback(lambda w: seen.append(("after", w.result())))
    assert sorted(seen) == [("after", 42), ("before", 42)] + [("waiter", 42)] * 3
    assert write.exception(0) is None
    failed = minisched.Write()
    failed.set_exception(ValueError("disk"))
    assert isinstance(failed.exception(0), ValueError)
    with pytest.raises(ValueError, match="disk"):
        failed.result(0)


def test_store_implements_the_whole_interface(new_store):
    store = new_store()
    assert isinstance(store, Store) and not type(store).__abstractmethods__
    assert store.healthy and store.outage is None and store.server_id
    assert store.writer_alive()


def test_store_a_slot_is_recorded_once(new_store):
    store = new_store()
    row = new_run(store, slot=1000.0)
    assert store.insert_run(row).result() is True
    again = dict(row, id=store.allocate_run_id())
    assert store.insert_run(again).result() is False
    assert store.insert_run(new_run(store, slot=1001.0)).result() is True
    assert store.insert_run(new_run(store, job="b", slot=1000.0)).result() is True
    assert store.list_runs(job="a")[1] == 2


def test_store_runs_start_end_and_list_with_filters(new_store):
    store = new_store()
    store.save_job(
        "a", {"definition": {"name": "a"}, "created_at": 1.0, "updated_at": 1.0}
    )
    ids = []
    for i in range(6):
        row = new_run(store, scheduled_at=100.0 + i)
        store.insert_run(row)
        ids.append(row["id"])
    store.flush()  # the launcher starts a run only after its insert committed
    assert store.begin_starts([ids[0]], 199.0) == set()
    assert store.mark_started([(200.0, 4242, 1.5, ids[0], "a")]).result() == []
    store.update_run(
        ids[0],
        {"status": "failed", "finished_at": 201.0, "duration": 1.0, "exit_code": 3},
        job="a",
    )
    for run_id in ids[1:4]:
        store.update_run(
            run_id, {"status": "succeeded", "finished_at": 202.0, "duration": 2.0}
        )
    store.flush()
    first = store.get_run(ids[0])
    assert (first["status"], first["pid"], first["exit_code"]) == ("failed", 4242, 3)
    assert store.get_run(10**9) is None
    rows, total = store.list_runs(job="a", limit=2)
    assert total == 6 and [r["id"] for r in rows] == ids[::-1][:2]  # newest first
    rows, total = store.list_runs(job="a", before=ids[3], limit=10)
    assert [r["id"] for r in rows] == ids[:3][::-1] and total == 6
    assert store.list_runs(status="succeeded")[1] == 3
    assert [r["id"] for r in store.list_runs(job="a", offset=5)[0]] == [ids[0]]
    assert store.count_failed(0) == 1 and store.count_failed(1e12) == 0
    assert store.last_runs()["a"]["id"] == ids[0]
    assert store.last_successes() == {"a": 202.0}


def test_store_output_chunks_in_order(new_store):
    store = new_store()
    row = new_run(store, status="running")
    store.insert_run(row)
    store.add_chunks(
        [(row["id"], seq, "stdout", 1.0, f"line {seq}\n") for seq in (1, 2, 3)]
    )
    store.add_chunks([(row["id"], 4, "stderr", 2.0, "oops\n")])
    store.flush()
    chunks = store.get_chunks(row["id"])
    assert [c["text"] for c in chunks] == ["line 1\n", "line 2\n", "line 3\n", "oops\n"]
    assert [c["seq"] for c in store.get_chunks(row["id"], after_seq=2)] == [3, 4]
    assert len(store.get_chunks(row["id"], limit=1)) == 1


def test_store_retention_keeps_real_runs_apart_from_noise(new_store):
    store = new_store()
    for _ in range(30):
        for status in ("succeeded", "skipped"):
            row = new_run(store, status=status)
            store.insert_run(row)
            store.add_chunks([(row["id"], 1, "stdout", 0.0, "x")])
    store.prune("a", 5).result()
    rows, total = store.list_runs(job="a", limit=1000)
    assert total == 5 + minisched.KEEP_NOISE_RUNS
    assert sum(r["status"] == "succeeded" for r in rows) == 5
    gone = set(range(1, 61)) - {r["id"] for r in rows}
    assert all(store.get_chunks(run_id) == [] for run_id in gone)  # output too


def test_store_repair_marks_active_runs_lost_and_jobs_persist(new_store):
    store = new_store("persist")
    definition = {"name": "a", "command": "true"}
    store.save_job(
        "a", {"definition": definition, "source": "api", "created_at": 5.0,
              "updated_at": 5.0, "last_slot": 60.0, "scheduled_runs": 2},
    ).result()  # fmt: skip
    store.save_job("a", {"paused": 1}).result()
    running = new_run(store, status="running")
    store.insert_run(running)
    done = new_run(store, status="succeeded", finished_at=9.0)
    store.insert_run(done)
    store.close()
    store = new_store("persist")
    [job] = store.load_jobs()
    assert (
        job["definition"] == definition and job["paused"] and job["last_slot"] == 60.0
    )
    [lost] = store.mark_lost(100.0).result()
    assert lost["id"] == running["id"]
    store.flush()
    assert store.get_run(running["id"])["status"] == "lost"
    assert store.get_run(done["id"])["status"] == "succeeded"
    assert store.allocate_run_id() > done["id"]  # ids are never reused
    store.delete_job("a", purge=True).result()
    assert store.load_jobs() == [] and store.list_runs(job="a")[1] == 0


def test_store_sessions_deliveries_and_incidents(new_store):
    store = new_store()
    session = {"id": "h1", "token_name": "admin", "token_check": "c", "address": None,
               "created_at": 1.0, "last_seen": 1.0, "expires_at": 1e12}  # fmt: skip
    store.add_session(session).result()
    store.touch_session("h1", 50.0).result()
    assert store.get_session("h1")["last_seen"] == 50.0
    store.delete_sessions("h1").result()
    assert store.get_session("h1") is None
    delivery = store.add_delivery(
        {"run_id": 7, "job": "a", "event": "on_failure", "kind": "url",
         "target": "http://127.0.0.1:1/", "spec": {"url": "http://127.0.0.1:1/"},
         "status": "pending", "created_at": 1.0, "next_at": 1.0},
    ).result()  # fmt: skip
    assert [d["id"] for d in store.pending_deliveries()] == [delivery]
    store.update_delivery(delivery, {"status": "ok", "attempts": 1, "at": 2.0}).result()
    assert store.pending_deliveries() == []
    [shown] = store.deliveries_for([7])[7]
    assert (shown["status"], shown["attempts"]) == ("ok", 1)
    incident = {"job": "a", "opened_at": 1.0, "failures": 2, "unsent": 1,
                "last_sent_at": None, "last_run_id": 7}  # fmt: skip
    store.save_incident(incident).result()
    assert [i["failures"] for i in store.load_incidents()] == [2]
    store.delete_incident("a").result()
    assert store.load_incidents() == []


def test_store_stats_count_each_ended_run_once(new_store):
    store = new_store()
    now = time.time()
    for status, duration in [("succeeded", 1.0), ("succeeded", 3.0), ("failed", 2.0)]:
        row = new_run(store, status="running")
        store.insert_run(row)
        store.update_run(
            row["id"], {"status": status, "finished_at": now, "duration": duration}
        )
    store.insert_run(new_run(store, status="running"))  # not ended: not counted
    store.flush()
    stats = store.stats(now - 86400, "a")
    assert stats["runs"] == 3
    assert stats["by_status"]["succeeded"] == 2 and stats["by_status"]["failed"] == 1
    assert stats["duration"]["max"] == 3.0
    assert store.stats(now - 86400)["runs"] == 3
    assert store.stats(now - 86400, "other")["runs"] == 0


# -- admission: concurrency, queues and --max-concurrent, without processes ----


class Admitted:
    """An :class:`minisched.Admission` on a fake clock, with what it hands
    back collected: ``ready`` (to spawn), ``late``, ``armed``."""

    def __init__(self, max_concurrent=0):
        self.clock = FakeClock(1000.0)
        self.admission = minisched.Admission(max_concurrent, self.clock)
        self.ready, self.late, self.armed = [], [], []
        self.ids = itertools.count(1)

    def job(self, name="j", **fields):
        definition = dict({"name": name, "command": "true"}, **fields)
        return minisched.Job(validate_job(definition), UTC)

    def submit(self, job, trigger="schedule", force=False, slot=None):
        def make_run():
            return minisched.Run(next(self.ids), job, trigger, 1, slot, self.clock())

        run, to_stop, _later = self.admission.add(
            job, trigger, force, None, self.clock(), make_run
        )
        if run.status == "queued":
            self.carry(self.admission.queue(run))
        return run, to_stop

    def end(self, run):
        self.carry(self.admission.ended(run))

    def carry(self, decided):
        ready, late, armed = decided
        self.ready += ready
        self.late += late
        self.armed += armed


def test_admission_forbid_skips_and_force_overrides():
    a = Admitted()
    job = a.job(concurrency="forbid")
    first, _ = a.submit(job)
    assert first.status == "starting" and a.ready == [first]
    second, _ = a.submit(job)
    assert second.status == "skipped" and "still active" in second.error
    with pytest.raises(ConflictError, match="force=1"):
        a.submit(job, trigger="manual")
    forced, _ = a.submit(job, trigger="manual", force=True)
    assert forced.status == "starting"
    assert a.admission.counts() == {"running": 2, "queued": 0}
    retry, _ = a.submit(job, trigger="retry")  # retries are never skipped
    assert retry.status == "queued"  # but wait for the job's runs to end
    a.end(first)
    assert retry.status == "queued"  # the forced run still holds the job
    a.end(forced)
    assert retry.status == "starting" and a.ready[-1] is retry


def test_admission_queue_holds_queue_max_and_starts_in_order():
    a = Admitted()
    job = a.job(concurrency="queue", queue_max=2)
    running, _ = a.submit(job)
    waiting = [a.submit(job)[0] for _ in range(2)]
    full, _ = a.submit(job)
    assert [r.status for r in waiting] == ["queued", "queued"]
    assert full.status == "skipped" and "queue_max 2" in full.error
    a.end(running)
    assert [r.status for r in waiting] == ["starting", "queued"]
    a.end(waiting[0])
    assert waiting[1].status == "starting" and a.ready[1:] == waiting


def test_admission_replace_names_the_runs_to_stop_and_allow_overlaps():
    a = Admitted()
    replaced = a.job("r", concurrency="replace")
    old, _ = a.submit(replaced)
    new, to_stop = a.submit(replaced)
    assert to_stop == [old] and new.status == "queued"  # starts once old ends
    a.end(old)
    assert new.status == "starting"
    overlapping = a.job("o", concurrency="allow")
    runs = [a.submit(overlapping)[0] for _ in range(3)]
    assert all(r.status == "starting" for r in runs)


def test_admission_max_concurrent_waits_then_misses_past_the_deadline():
    a = Admitted(max_concurrent=2)
    jobs = [a.job(f"j{i}", starting_deadline=30) for i in range(4)]
    runs = [a.submit(job, slot=a.clock())[0] for job in jobs]
    assert [r.status for r in runs] == ["starting", "starting", "queued", "queued"]
    assert a.armed == runs[2:]  # their deadline timers are armed once
    assert a.admission.full()
    a.clock.advance(10)
    a.end(runs[0])
    assert runs[2].status == "starting" and runs[3].status == "queued"
    a.clock.advance(25)  # 35 s after its slot: past starting_deadline 30
    a.end(runs[1])
    assert a.late == [runs[3]] and runs[3].status == "queued"
    assert a.admission.take(runs[3], "queued", "missed")
    assert runs[3].status == "missed" and not a.admission.take(runs[3], "queued", "x")
    assert a.admission.counts() == {"running": 1, "queued": 0}


def test_admission_refuses_new_runs_once_closing():
    a = Admitted()
    job = a.job(concurrency="queue", queue_max=5)
    a.submit(job)
    queued = a.submit(job)[0]
    assert a.admission.close() == [queued]
    with pytest.raises(minisched.UnavailableError, match="shutting down"):
        a.submit(job)


# -- job timers on a fake clock: timeouts, kill grace, retries, jitter ---------


@pytest.fixture
def timed(harness):
    """A harness whose job timers run on a fake monotonic clock: ``move(s)``
    moves it and makes the io thread look.  Processes and pipes stay real."""
    clock = FakeClock(1000.0)
    h = harness(monotonic=clock)

    def move(seconds):
        clock.advance(seconds)
        h.runner.watcher.poke()

    h.move = move
    yield h
    move(10**6)  # whatever still waits on a timer gets it


def settles(h, run_id, status, within=0.3):
    """The run is still ``status`` after ``within`` real seconds."""
    time.sleep(within)
    h.store.flush()
    return h.store.get_run(run_id)["status"] == status


def test_a_timeout_and_its_kill_grace_on_a_fake_clock(timed):
    h = timed
    h.add(name="stubborn", command="trap '' TERM; sleep 60", timeout=30, kill_grace=10)
    started = time.monotonic()
    run = h.runner.submit(h.sched.get_job("stubborn"), "manual")
    wait_for(lambda: h.store.flush() or h.store.get_run(run["id"])["pid"])
    h.move(29.9)
    assert settles(h, run["id"], "running")
    h.move(0.2)  # the timeout: SIGTERM, which the job ignores
    assert settles(h, run["id"], "running")
    h.move(9.8)
    assert settles(h, run["id"], "running")  # still within its kill grace
    h.move(0.3)  # SIGKILL
    h.wait_idle(5)
    row = h.store.get_run(run["id"])
    assert row["status"] == "timed_out" and row["signal"] == signal.SIGKILL
    assert "30" in row["error"]
    assert time.monotonic() - started < 10  # 40 s of job time


def test_retries_wait_their_backoff_on_a_fake_clock(timed):
    h = timed
    h.add(name="flaky", command="exit 1", retries=2, retry_delay=100, retry_backoff=2)
    first = h.runner.submit(h.sched.get_job("flaky"), "manual")
    wait_for(lambda: len(h.runs("flaky")) == 2)  # the failure and its queued retry
    time.sleep(0.3)
    assert [r["status"] for r in h.runs("flaky")] == ["failed", "queued"]
    h.move(99.5)
    time.sleep(0.3)
    assert [r["status"] for r in h.runs("flaky")] == ["failed", "queued"]
    h.move(0.6)  # 100 s: the second attempt
    wait_for(lambda: [r["status"] for r in h.runs("flaky")][:2] == ["failed", "failed"])
    wait_for(lambda: len(h.runs("flaky")) == 3)
    h.move(199.0)  # the next waits 200 s (backoff 2)
    time.sleep(0.3)
    assert h.runs("flaky")[2]["status"] == "queued"
    h.move(1.1)
    wait_for(lambda: h.runs("flaky")[2]["status"] == "failed")
    assert [r["attempt"] for r in h.runs("flaky")] == [1, 2, 3]
    assert h.runs("flaky")[0]["id"] == first["id"]


def test_jitter_delays_a_scheduled_start_on_a_fake_clock(tmp_path, harness):
    wall = FakeClock(ts("2026-06-01T00:00:00Z"))
    job_clock = FakeClock(1000.0)
    h = harness(clock=wall, monotonic=job_clock)
    h.sched.rand = lambda: 0.5
    h.add(name="spread", schedule="@every 1m", jitter=30)
    wall.advance(60)
    h.sched.tick()
    h.store.flush()
    [run] = h.runs("spread")
    assert run["status"] == "queued" and run["scheduled_at"] == wall() + 15
    job_clock.advance(14.8)
    h.runner.watcher.poke()
    time.sleep(0.3)
    assert h.runs("spread")[0]["started_at"] is None
    job_clock.advance(0.3)
    h.runner.watcher.poke()
    wait_for(lambda: h.runs("spread")[0]["status"] == "succeeded")


# -- scheduler with a fake clock -----------------------------------------------


def test_a_day_of_every_five_minutes(harness):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    h.add(
        name="five",
        schedule="*/5 * * * *",
        concurrency="allow",
        keep_runs=1000,
        starting_deadline=3 * 86400,  # the fake day passes in real milliseconds
    )
    ticks = 0
    end = clock.t + 86400
    while clock.t < end:
        delay = h.sched.tick()
        ticks += 1
        clock.t = min(end, clock.t + delay)
    h.sched.tick()
    h.wait_idle()
    runs = h.runs("five")
    assert len(runs) == 288
    assert {r["status"] for r in runs} == {"succeeded"}
    assert len({r["slot"] for r in runs}) == 288
    assert runs[0]["slot"] == ts("2026-06-01T00:05:00Z")
    assert runs[-1]["slot"] == ts("2026-06-02T00:00:00Z")
    assert ticks <= 290  # it sleeps until the next slot, no idle wake-ups


def test_exactly_once_across_a_restart(harness, tmp_path):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    h.add(
        name="five",
        schedule="*/5 * * * *",
        concurrency="allow",
        keep_runs=1000,
        starting_deadline=3 * 86400,  # the fake day passes in real milliseconds
    )
    while clock.t < ts("2026-06-01T12:00:00Z"):
        clock.t += h.sched.tick()
    h.sched.tick()
    h.wait_idle()
    h.close()
    # A new server on the same database at the same instant repeats nothing.
    h2 = harness(clock=clock)
    h2.sched.started_at = clock.t - 1  # it restarted just before the last slot
    h2.sched.tick()
    while clock.t < ts("2026-06-02T00:00:00Z"):
        clock.t += h2.sched.tick()
    h2.sched.tick()
    h2.wait_idle()
    runs = h2.runs("five")
    assert len({r["slot"] for r in runs}) == len(runs)  # no slot ran twice
    day = [r for r in runs if r["slot"] <= ts("2026-06-02T00:00:00Z")]
    assert len(day) == 288  # and none was lost


@pytest.mark.parametrize(
    "catch_up,deadline,expect_runs,expect_missed",
    [
        ("none", None, 0, "5 slots missed"),
        ("latest", None, 1, "4 slots missed"),
        ("all", None, 5, None),
        ("latest", 600, 0, "5 slots missed"),
    ],
)
def test_catch_up_after_downtime(
    harness, catch_up, deadline, expect_runs, expect_missed
):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    extra = {"starting_deadline": deadline} if deadline else {}
    h.add(name="hourly", schedule="0 * * * *", catch_up=catch_up, **extra)
    h.close()
    clock.t = ts("2026-06-01T05:30:00Z")  # down for 5 slots
    h2 = harness(clock=clock)
    h2.sched.tick()
    h2.wait_idle()
    runs = h2.runs("hourly")
    real = [r for r in runs if r["status"] != "missed"]
    assert len(real) == expect_runs
    assert all(r["trigger"] == "catch_up" and r["status"] == "succeeded" for r in real)
    if expect_runs:
        assert real[-1]["slot"] == ts("2026-06-01T05:00:00Z")
    missed = [r for r in runs if r["status"] == "missed"]
    if expect_missed:
        assert len(missed) == 1 and expect_missed in missed[0]["error"]
        assert "server was down" in missed[0]["error"]
    else:
        assert not missed
    # Nothing more fires until the next real slot.
    assert h2.sched.tick() == pytest.approx(1800 - minisched.LOOKAHEAD)


def test_catch_up_all_is_capped(harness):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    h.add(name="minutely", schedule="* * * * *", catch_up="all", concurrency="allow")
    h.close()
    clock.t += 3 * 3600 + 30
    h2 = harness(clock=clock)
    h2.sched.tick()
    h2.wait_idle(60)
    runs = h2.runs("minutely")
    assert sum(r["trigger"] == "catch_up" for r in runs) == minisched.CATCH_UP_CAP
    missed = [r for r in runs if r["status"] == "missed"]
    assert missed[0]["error"].startswith("80 slots missed")


def test_pause_survives_restart_and_resume_skips_the_pause(harness):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    h.add(name="p", schedule="@every 60s")
    h.sched.set_paused("p", True)
    h.close()
    clock.t += 3600
    h2 = harness(clock=clock)
    state = h2.sched.state("p")
    assert state["paused"] and state["next_run_at"] is None
    h2.sched.tick()
    h2.sched.set_paused("p", False)
    clock.t += 60
    h2.sched.tick()
    h2.wait_idle()
    assert [r["status"] for r in h2.runs("p")] == ["succeeded"]


def test_jitter_max_runs_and_deadline(harness):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    h.sched.rand = lambda: 0.5
    h.add(name="j", schedule="@every 10s", jitter=4, max_runs=2, concurrency="allow")
    for _ in range(4):
        clock.t += 10
        h.sched.tick()
    h.wait_idle()
    runs = h.runs("j")
    assert len(runs) == 2
    assert runs[0]["scheduled_at"] == runs[0]["slot"] + 2
    assert h.sched.get_job("j").enabled is False
    # starting_deadline: a slot handled too late is recorded missed.
    h.add(name="d", schedule="@every 10s", starting_deadline=1)
    clock.t += 15
    h.sched.tick()
    h.wait_idle()
    assert [r["status"] for r in h.runs("d")] == ["missed"]
    assert "starting_deadline" in h.runs("d")[0]["error"]


def test_after_dependencies_and_cycles(harness):
    h = harness()
    h.add(name="first", command="true")
    h.add(name="second", command="true", after=["first"])
    with pytest.raises(InvalidError, match="after"):
        h.add(name="first", command="true", after=["second"])
    h.sched.trigger("first")
    wait_for(lambda: [r for r in h.runs("second") if r["status"] == "succeeded"])
    assert h.runs("second")[0]["trigger"] == "dependency"


# -- runner and process trees ---------------------------------------------------


def release_file(tmp_path):
    return str(tmp_path / "release")


def blocking_command(tmp_path):
    path = release_file(tmp_path)
    return f"while [ ! -e {path} ]; do sleep 0.02; done"


def status_of(h, run_id):
    return (h.store.get_run(run_id) or {}).get("status")


def statuses(h, name):
    return [r["status"] for r in h.runs(name)]


def test_concurrency_forbid_allow(harness, tmp_path):
    h = harness()
    cmd = blocking_command(tmp_path)
    forbid = h.add(name="forbid", command=cmd)
    allow = h.add(name="allow", command=cmd, concurrency="allow")
    for job in (forbid, allow):
        h.runner.submit(job, "schedule")
        h.runner.submit(job, "schedule")
    wait_for(lambda: statuses(h, "allow") == ["running", "running"])
    assert statuses(h, "forbid")[1] == "skipped"
    with pytest.raises(ConflictError):
        h.sched.trigger("forbid")
    forced = h.sched.trigger("forbid", force=True)
    wait_for(lambda: status_of(h, forced["id"]) == "running")
    open(release_file(tmp_path), "w").close()
    h.wait_idle()
    assert statuses(h, "forbid") == ["succeeded", "skipped", "succeeded"]
    assert statuses(h, "allow") == ["succeeded", "succeeded"]


def test_concurrency_replace(harness, tmp_path):
    h = harness()
    job = h.add(name="replace", command="sleep 30", concurrency="replace", kill_grace=2)
    first = h.runner.submit(job, "schedule")
    wait_for(lambda: status_of(h, first["id"]) == "running")
    job2 = h.add(name="replace", command="echo new", concurrency="replace")
    h.runner.submit(job2, "schedule")
    h.wait_idle()
    runs = h.runs("replace")
    assert [r["status"] for r in runs] == ["cancelled", "succeeded"]
    assert "replaced by run" in runs[0]["error"]


def test_concurrency_queue_and_global_limit(harness, tmp_path):
    h = harness(max_concurrent=1)
    cmd = blocking_command(tmp_path)
    job = h.add(name="queue", command=cmd, concurrency="queue", queue_max=1)
    other = h.add(name="other", command="true", concurrency="allow")
    for _ in range(3):
        h.runner.submit(job, "schedule")
    h.runner.submit(other, "schedule")
    wait_for(lambda: statuses(h, "queue")[0] == "running")
    assert statuses(h, "queue")[1:] == ["queued", "skipped"]
    assert statuses(h, "other") == ["queued"]  # the global limit holds it back
    open(release_file(tmp_path), "w").close()
    h.wait_idle()
    assert statuses(h, "queue") == ["succeeded", "succeeded", "skipped"]
    assert statuses(h, "other") == ["succeeded"]


def test_retries_with_backoff(harness):
    h = harness()
    job = h.add(
        name="flaky",
        command="echo try $MINISCHED_RUN_ID; exit 3",
        retries=2,
        retry_delay=0.2,
        retry_backoff=2,
    )
    assert [job.retry_delay_for(n) for n in (2, 3, 4)] == [0.2, 0.4, 0.8]
    capped = minisched.Job(dict(job.definition, retry_max_delay=0.3), UTC)
    assert capped.retry_delay_for(4) == 0.3
    h.sched.trigger("flaky")
    wait_for(lambda: len(h.runs("flaky")) == 3 and not h.runner.active_runs())
    h.store.flush()
    runs = h.runs("flaky")
    assert [
        (r["attempt"], r["trigger"], r["status"], r["exit_code"]) for r in runs
    ] == [
        (1, "manual", "failed", 3),
        (2, "retry", "failed", 3),
        (3, "retry", "failed", 3),
    ]
    assert runs[1]["started_at"] - runs[0]["finished_at"] >= 0.2
    assert runs[2]["started_at"] - runs[1]["finished_at"] >= 0.4
    assert runs[0]["error"] == "exit code 3"


def test_timeout_kills_the_whole_tree_including_setsid(harness):
    h = harness()
    h.add(
        name="tree",
        command="sleep 100 & (setsid sleep 101 &); sleep 102",
        timeout=0.5,
        kill_grace=1,
    )
    run = h.sched.trigger("tree")
    mine = {"run_ids": {str(run["id"])}, "server": h.store.server_id}
    wait_for(lambda: minisched.find_marked_pids(**mine))
    h.wait_idle()
    row = h.store.get_run(run["id"])
    assert row["status"] == "timed_out"
    assert "timeout" in row["error"]
    assert minisched.find_marked_pids(**mine) == []
    log = "".join(c["text"] for c in h.store.get_chunks(run["id"]))
    assert "killed after timeout of 0.5s" in log


def test_stop_cancels_and_leaves_no_zombie(harness):
    h = harness()
    h.add(name="long", command="trap '' TERM; sleep 60", kill_grace=0.3)
    run = h.sched.trigger("long")
    pid = wait_for(lambda: (h.store.get_run(run["id"]) or {}).get("pid"))
    wait_for(lambda: h.runner.get_active(run["id"]).status == "running")
    assert h.runner.stop_job("long") == 1
    h.wait_idle()
    row = h.store.get_run(run["id"])
    assert row["status"] == "cancelled" and row["signal"] == signal.SIGKILL
    assert not psutil.pid_exists(pid)


@pytest.mark.parametrize(
    "definition,message",
    [
        ({"command": ["/no/such/binary"]}, "cannot start: '/no/such/binary' not found"),
        (
            {"command": "true", "cwd": "/no/such/dir"},
            "cwd '/no/such/dir' is not a directory",
        ),
        (
            {"command": "true", "user": "no-such-user-x"},
            "user 'no-such-user-x' does not exist",
        ),
        ({"command": "no-such-command-x"}, "exit code 127 (command not found)"),
        (
            {"command": ["no-such-binary-x"]},
            "cannot start: 'no-such-binary-x' not found",
        ),
        ({"command": ["/etc/passwd"]}, "cannot start: permission denied"),
        # cwd or an own PATH take Popen instead of posix_spawn: same messages
        (
            {"command": ["no-such-binary-x"], "env": {"PATH": "/nonexistent"}},
            "cannot start: 'no-such-binary-x' not found",
        ),
        ({"command": ["/etc/passwd"], "cwd": "/"}, "cannot start: permission denied"),
    ],
)
def test_a_command_that_cannot_start_fails_with_a_reason(harness, definition, message):
    h = harness()
    h.add(name="broken", **definition)
    run = h.sched.trigger("broken")
    h.wait_idle()
    row = h.store.get_run(run["id"])
    assert row["status"] == "failed"
    assert message in row["error"]


@pytest.mark.parametrize(
    "extra,popen",
    [
        ({}, False),
        ({"cwd": "/"}, True),
        ({"env": {"PATH": "/bin:/usr/bin:/nonexistent-minisched"}}, True),
    ],
    ids=["posix_spawn", "popen-for-cwd", "popen-for-own-path"],
)
def test_jobs_start_the_same_whichever_way_they_are_spawned(
    harness, tmp_path, monkeypatch, extra, popen
):
    """posix_spawn (the fast path) and Popen (cwd, user, an own PATH) give a
    job the same start: stdin from /dev/null, its own session, SIGPIPE and
    SIGXFSZ at their defaults, and no descriptor beyond 0-2, not even one the
    server inherited."""
    inherited = os.open(tmp_path / "inherited", os.O_CREAT | os.O_RDONLY)
    os.set_inheritable(inherited, True)
    try:
        h = harness()
        popens = []
        real_popen = subprocess.Popen

        def counting_popen(*args, **kwargs):
            popens.append(args[0])
            return real_popen(*args, **kwargs)

        monkeypatch.setattr(minisched.subprocess, "Popen", counting_popen)
        probe = (
            # No pipe or $(...) before ls: the shell would hold that pipe
            "ls /proc/$$/fd; echo --; readlink /proc/$$/fd/0;"
            " echo $$ $(cut -d' ' -f6 /proc/$$/stat);"
            " grep SigIgn /proc/$$/status | cut -f2; yes | head -n 1"
        )
        h.add(name="probe", command=["sh", "-c", probe], **extra)
        run = h.sched.trigger("probe")
        h.wait_idle()
    finally:
        os.close(inherited)
    row = h.store.get_run(run["id"])
    assert row["status"] == "succeeded", row
    lines = "".join(c["text"] for c in h.store.get_chunks(run["id"])).splitlines()
    fds, rest = lines[: lines.index("--")], lines[lines.index("--") + 1 :]
    assert fds == ["0", "1", "2"]
    assert rest[0] == "/dev/null"
    pid, sid = rest[1].split()
    assert pid == sid  # a session leader
    ignored = int(rest[2], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
    assert rest[3:] == ["y"]  # yes died of SIGPIPE quietly: no "Broken pipe"
    assert (["sh", "-c", probe] in popens) is popen


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_a_job_runs_as_its_user(harness):
    nobody = pwd.getpwnam("nobody")
    h = harness()
    h.add(name="as-nobody", command="id -u; id -g; echo $USER $HOME", user="nobody")
    run = h.sched.trigger("as-nobody")
    h.wait_idle()
    assert h.store.get_run(run["id"])["status"] == "succeeded"
    text = "".join(c["text"] for c in h.store.get_chunks(run["id"]))
    assert text.split("\n")[:3] == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        f"nobody {nobody.pw_dir}",
    ]


def test_no_read_of_a_pipe_the_run_already_closed(harness, monkeypatch):
    """One select() can report a run's exit before its pipes; handling the
    exit closes them, and their numbers may be reused at once by another
    thread: the later events of that round must be dropped, not read."""
    stale = []
    real_read_once = minisched.Watcher._read_once

    def read_once(self, run, stream, fd):
        if fd not in run.fds:
            stale.append(fd)
        return real_read_once(self, run, stream, fd)

    monkeypatch.setattr(minisched.Watcher, "_read_once", read_once)
    h = harness()
    h.add(name="pair", command="sleep 30 & sleep 30 & wait", concurrency="allow")
    ids = [h.sched.trigger("pair")["id"] for _ in range(20)]
    wait_for(lambda: all(status_of(h, i) == "running" for i in ids))
    for run_id in ids:
        h.runner.stop_run(run_id)
    h.wait_idle()
    assert {status_of(h, i) for i in ids} == {"cancelled"}
    assert stale == []


def test_a_spawn_that_runs_out_of_descriptors_fails_and_leaks_none(
    harness, monkeypatch
):
    h = harness()
    h.add(name="starved", concurrency="allow")
    real_pipe, calls = os.pipe, []

    def second_pipe_fails():
        calls.append(1)
        if len(calls) % 2 == 0:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_pipe()

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(minisched.os, "pipe", second_pipe_fails)
    runs = [h.sched.trigger("starved") for _ in range(5)]
    h.wait_idle()
    monkeypatch.undo()
    for run in runs:
        row = h.store.get_run(run["id"])
        assert row["status"] == "failed"
        assert "cannot start: [Errno 24] Too many open files" in row["error"]
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_run_stopped_before_the_io_thread_has_it_says_so_once(harness):
    h = harness()
    h.add(name="slow", command="sleep 30")
    real_after = h.runner.launcher._after_launch

    def after_launch(runs):
        for run in runs:  # the stop reaches the io thread before the run does
            h.runner.stop_run(run.id)
        real_after(runs)

    h.runner.launcher._after_launch = after_launch
    run = h.sched.trigger("slow")
    h.wait_idle()
    assert status_of(h, run["id"]) == "cancelled"
    lines = [c["text"] for c in h.store.get_chunks(run["id"])]
    assert lines == ["stopped by request\n"]


def test_the_launcher_takes_the_runs_of_one_instant_together():
    runner = Runner(None, None)  # not started: its queue is driven by hand
    now = time.monotonic()
    runs = [
        types.SimpleNamespace(id=i, due=now + offset)
        for i, offset in enumerate([-0.5, 0.0, 0.0005, 30.0])
    ]
    for run in runs:
        runner.launcher.queue.put(run)
    held = []
    batch = runner.launcher._take_due(held, 0)
    assert batch == runs[:3]  # due now or within a millisecond...
    assert time.monotonic() >= runs[2].due  # ...after waiting for the last one
    assert [entry[2] for entry in held] == [runs[3]]
    assert runner.launcher._take_due(held, 0) == []
    runner.launcher.queue.put(None)
    assert runner.launcher._take_due(held, 0) == [None]
    assert held  # the later run still waits


def test_a_run_due_while_a_batch_spawns_joins_the_batch(harness):
    h = harness()
    h.add(name="first")
    h.add(name="second")
    batches = []
    launcher = h.runner.launcher
    real_after, real_spawn = launcher._after_launch, launcher._spawn_run

    def after_launch(runs):
        batches.append(sorted(r.job.name for r in runs))
        real_after(runs)

    def spawn_run(run):
        if run.job.name == "first":
            h.sched.trigger("second")  # queued in the middle of the batch
        return real_spawn(run)

    launcher._after_launch = after_launch
    launcher._spawn_run = spawn_run
    h.sched.trigger("first")
    h.wait_idle()
    assert ["first", "second"] in batches
    assert [r["status"] for r in h.runs()] == ["succeeded", "succeeded"]


def test_output_invalid_utf8_and_no_newlines_stream_live(harness, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    h = harness()
    sub = h.bus.subscribe()
    h.add(name="bytes", command=r"printf 'caf\303\251 \377\376 ok\n' >&2")
    script = (
        "import sys, time\nfor i in range(3):\n    sys.stdout.write('%d%%.' % i)\n"
        "    time.sleep(0.3)\n"
    )
    h.add(name="progress", command=[sys.executable, "-c", script])
    run_b = h.sched.trigger("bytes")
    run_p = h.sched.trigger("progress")
    live = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        item = sub.get(0.1)
        if item and item[0] == "log" and item[1]["run_id"] == run_p["id"]:
            live.append((time.time(), item[1]["text"]))
        if (
            item
            and item[0] == "run"
            and item[1]["id"] == run_p["id"]
            and item[1]["status"] == "succeeded"
        ):
            ended = time.time()
            break
    assert [text for _t, text in live] == ["0%.", "1%.", "2%."]
    assert live[0][0] < ended - 0.4  # the first piece arrived while the run went on
    h.wait_idle()
    chunks = h.store.get_chunks(run_b["id"])
    assert [c["stream"] for c in chunks] == ["stderr"]
    assert chunks[0]["text"] == "café \ufffd\ufffd ok\n"
    assert "".join(c["text"] for c in h.store.get_chunks(run_p["id"])) == "0%.1%.2%."


def test_max_output_keeps_head_and_tail(harness):
    h = harness()
    cmd = "seq 1 200000; echo THE-END"
    h.add(name="big", command=cmd, max_output=65536)
    run = h.sched.trigger("big")
    h.wait_idle()
    row = h.store.get_run(run["id"])
    chunks = h.store.get_chunks(run["id"])
    text = "".join(c["text"] for c in chunks)
    assert row["output_truncated"] == 1
    assert row["output_bytes"] == len(subprocess.check_output(cmd, shell=True))
    assert text.startswith("1\n2\n3\n")
    assert text.rstrip().endswith("THE-END")
    assert len(text.encode()) < 65536 + 200
    markers = [c for c in chunks if c["stream"] == "system"]
    assert len(markers) == 1 and "bytes of output dropped" in markers[0]["text"]


def test_http_jobs(harness):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/ok" else 503
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"body " + self.path.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    h = harness()
    h.add(name="ok", kind="http", url=base + "/ok", command=None)
    h.add(
        name="down", kind="http", url=base + "/down", command=None, expect_status=[200]
    )
    ok, down = h.sched.trigger("ok"), h.sched.trigger("down")
    h.wait_idle()
    server.shutdown()
    assert h.store.get_run(ok["id"])["status"] == "succeeded"
    assert "body /ok" in "".join(c["text"] for c in h.store.get_chunks(ok["id"]))
    row = h.store.get_run(down["id"])
    assert row["status"] == "failed" and row["error"] == "HTTP status 503 not expected"


def test_stopping_an_http_run_records_it_cancelled(harness):
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.5)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h = harness()
    h.add(
        name="slow",
        kind="http",
        command=None,
        url=f"http://127.0.0.1:{server.server_address[1]}/",
    )
    run = h.sched.trigger("slow")
    assert h.runner.stop_run(run["id"])  # at once, while it is being started
    h.wait_idle()
    server.shutdown()
    row = h.store.get_run(run["id"])
    assert row["status"] == "cancelled"
    assert not h.runner.active_runs()


def test_cpu_time_and_peak_rss_cover_the_tree(harness):
    h = harness()
    burn = (
        f'{sys.executable} -c "import time; x = bytearray(60 << 20); t = time.time()\n'
        'while time.time() - t < 1.3: pass"'
    )
    h.add(name="burn", command=f"{burn} & wait")
    run = h.sched.trigger("burn")
    h.wait_idle()
    row = h.store.get_run(run["id"])
    assert row["cpu_time"] >= 1.0
    assert row["peak_rss"] >= 60 << 20


# -- serve as a real process ----------------------------------------------------


def start_serve(tmp_path, *args, env=None):
    env = dict(os.environ, **(env or {}))
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "minisched.py"),
            "serve",
            "--db",
            str(tmp_path / "m.db"),
            "--port",
            "0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(tmp_path),
    )


def read_runs(tmp_path):
    conn = sqlite3.connect(str(tmp_path / "m.db"), timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_guard_kills_runs_being_spawned_and_spares_kept_leftovers():
    """A server killed in the middle of a batch (runs spawned, their groups
    not registered yet) takes them along; what a finished ``leftovers: keep``
    run left (unregistered) stays."""
    guard = minisched.ProcessGuard()
    guard.server = "guardtest" + secrets.token_hex(3)

    def job(run_id):
        env = dict(os.environ, MINISCHED_SERVER=guard.server)
        env["MINISCHED_RUN_ID"] = str(run_id)
        return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)

    guard.start()
    spawning, kept, registered = job(1), job(2), job(3)
    try:
        guard.expect(1)  # the launcher says so before it spawns
        guard.expect(2)
        guard.unregister(2)  # ended; its leftovers are kept
        guard.expect(3)
        guard.register((3, registered.pid))
        guard.close()  # EOF: what the guard sees when the server dies
        for proc in (spawning, registered):
            assert proc.wait(10) == -signal.SIGKILL
        assert kept.poll() is None
    finally:
        for proc in (spawning, kept, registered):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kill_guard_too", [False, True])
def test_serve_killed_with_sigkill_then_restarted(tmp_path, kill_guard_too):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(
        json.dumps(
            [
                {
                    "name": "long",
                    "command": "sleep 300 & sleep 301",
                    "schedule": "@reboot",
                }
            ]
        )
    )
    server = start_serve(tmp_path, "--jobs", str(jobs))
    try:
        run = wait_for(
            lambda: [
                r
                for r in read_runs(tmp_path)
                if r["status"] == "running" and r["pid_create_time"]
            ]
        )[0]
        pids = [p.pid for p in psutil.Process(run["pid"]).children()] + [run["pid"]]
        if kill_guard_too:  # the guard is gone too: the restart must clean up
            for child in psutil.Process(server.pid).children():
                if child.pid != run["pid"]:
                    child.kill()
        server.kill()
        server.wait()
        if not kill_guard_too:
            wait_for(lambda: all(gone(p) for p in pids), 10)
    finally:
        server.kill()
        server.stdout.close()
    jobs.write_text("[]")  # no @reboot this time
    server = start_serve(tmp_path, "--jobs", str(jobs), "--shutdown-grace", "5")
    try:
        wait_for(
            lambda: read_runs(tmp_path) and read_runs(tmp_path)[0]["status"] == "lost"
        )
        wait_for(lambda: all(gone(p) for p in pids), 10)
        server_id = json.loads(
            sqlite3.connect(str(tmp_path / "m.db"))
            .execute("SELECT value FROM settings WHERE key = 'server_id'")
            .fetchone()[0]
        )
        assert minisched.find_marked_pids({str(run["id"])}, server=server_id) == []
        server.send_signal(signal.SIGUSR1)  # the stacks, and nothing else
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        server.kill()
        output = server.stdout.read().decode()
        server.stdout.close()
    assert "marked lost" in output
    assert "WARNING thread MainThread:\n" in output
    assert len(read_runs(tmp_path)) == 1  # the @reboot run did not run again


def test_jobs_never_see_the_token(tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(
        json.dumps([{"name": "peek", "command": "env", "schedule": "@reboot"}])
    )
    server = start_serve(
        tmp_path, "--jobs", str(jobs), env={"MINISCHED_TOKEN": "s3cret-token-value"}
    )
    try:
        wait_for(lambda: [r for r in read_runs(tmp_path) if r["status"] == "succeeded"])
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.stdout.close()
    conn = sqlite3.connect(str(tmp_path / "m.db"))
    output = "".join(row[0] for row in conn.execute("SELECT text FROM chunks"))
    conn.close()
    assert "MINISCHED_RUN_ID=" in output
    assert "s3cret-token-value" not in output


def test_sigterm_exits_zero_within_the_grace(tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(
        json.dumps(
            [
                {
                    "name": "stubborn",
                    "command": "trap '' TERM; sleep 100",
                    "schedule": "@reboot",
                }
            ]
        )
    )
    server = start_serve(tmp_path, "--jobs", str(jobs), "--shutdown-grace", "2")
    try:
        wait_for(lambda: [r for r in read_runs(tmp_path) if r["status"] == "running"])
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(10)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGUSR1)  # every thread's stack, into the log
            time.sleep(1)
            server.kill()
            out = server.communicate()[0].decode(errors="replace")
            raise AssertionError(f"no exit 10 s after SIGTERM; its log:\n{out[-6000:]}")
        assert code == 0
        assert time.monotonic() - started < 4
    finally:
        server.kill()
        server.stdout.close()
    run = read_runs(tmp_path)[0]
    assert run["status"] == "cancelled"
    assert "shutting down" in run["error"]


def test_serve_keeps_its_command_line_visible(tmp_path):
    """serve re-executes itself once (to free the script's parse tree); ps and
    pkill -f "minisched.py serve" must still find it, under the same pid."""
    server = start_serve(tmp_path)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "m.db"))
        cmdline = wait_for(
            lambda: (
                "minisched.py serve" in " ".join(psutil.Process(server.pid).cmdline())
                and psutil.Process(server.pid).cmdline()
            )
        )
        assert os.path.join(HERE, "minisched.py") in cmdline
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.stdout.close()


def test_serve_refuses_public_bind_without_token(tmp_path, capsys):
    assert (
        minisched.main(["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "x.db")])
        == 2
    )
    assert "without a token" in capsys.readouterr().err


def test_config_flags_beat_environment_beat_defaults():
    parser = minisched._build_parser()
    ns = parser.parse_args(["serve", "--port", "9000"])
    config = Config.from_args(
        ns,
        {
            "MINISCHED_PORT": "9100",
            "MINISCHED_DB": "/tmp/x.db",
            "MINISCHED_ALLOW_IP": "10.0.0.0/8, 127.0.0.1/32",
        },
    )
    assert config.port == 9000
    assert config.db == "/tmp/x.db"
    assert config.allow_ip == ["10.0.0.0/8", "127.0.0.1/32"]
    assert config.shutdown_grace == 30.0
    assert Config.from_args(parser.parse_args(["serve"]), {}).host == "127.0.0.1"


def test_engine_start_repairs_and_reboot_runs(tmp_path):
    config = Config(db=str(tmp_path / "m.db"))
    engine = Engine(config).start()
    try:
        engine.scheduler.put_job(
            validate_job({"name": "r", "command": "true", "schedule": "@reboot"})
        )
        assert engine.store.list_runs(job="r")[1] == 0  # adding it does not fire it
    finally:
        engine.shutdown(2)
    engine = Engine(config).start()
    try:
        wait_for(lambda: engine.store.list_runs(job="r", status="succeeded")[1] == 1)
    finally:
        engine.shutdown(2)


# -- API in-process through WSGI -----------------------------------------------

_NO_BODY = object()


class WsgiResponse:
    def __init__(self, status_line, headers, body):
        self.status = int(status_line.split()[0])
        self.headers = headers
        self.body = body

    def header(self, name):
        values = self.header_list(name)
        return values[0] if values else None

    def header_list(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def text(self):
        return self.body.decode("utf-8")

    def json(self):
        assert (self.header("Content-Type") or "").startswith("application/json")
        return json.loads(self.body)

    def error(self, status, field=None):
        """Assert this is the JSON error ``status`` naming ``field``; return it."""
        assert self.status == status, (self.status, self.body[:500])
        data = self.json()
        assert set(data) == {"error", "field"}, data
        assert isinstance(data["error"], str) and data["error"]
        assert data["field"] == field, data
        return data


def without_hooks(run):
    return {k: v for k, v in run.items() if k != "hooks"}


class RunWaiting:
    """Waiting on runs through the API (``find_run`` is None until it is there)."""

    def wait_run(self, run_id, timeout=15):
        """The run once it has ended."""

        def ended():
            run = self.find_run(run_id)
            return (
                run if run and run["status"] not in minisched.ACTIVE_STATUSES else None
            )

        return wait_for(ended, timeout)

    def wait_running(self, run_id):
        wait_for(lambda: (self.find_run(run_id) or {}).get("status") == "running")

    def wait_visible(self, run_id):
        return wait_for(lambda: self.find_run(run_id))


class WsgiClient(RunWaiting):
    """Calls a bottle app in-process, as wsgiref would, from 127.0.0.1 with
    ``Host: 127.0.0.1:8100``."""

    def __init__(self, app, engine=None, **default_headers):
        self.app = app
        self.engine = engine
        self.default_headers = default_headers

    @property
    def api(self):
        return self.app.config["minisched.api"]

    def __call__(
        self, method, path, body=_NO_BODY, data=None, headers=None, remote="127.0.0.1"
    ):
        environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        path, _, query = path.partition("?")
        if body is not _NO_BODY:
            data = json.dumps(body).encode()
        environ.update(
            REQUEST_METHOD=method,
            PATH_INFO=urllib.parse.unquote(path).encode().decode("latin-1"),
            QUERY_STRING=query,
            HTTP_HOST="127.0.0.1:8100",
            REMOTE_ADDR=remote,
            CONTENT_LENGTH="0",
        )
        environ.pop("CONTENT_TYPE", None)
        wanted = {}
        if data is not None:
            wanted["Content-Type"] = "application/json"
            wanted["Content-Length"] = str(len(data))
        wanted.update(self.default_headers)
        wanted.update(headers or {})
        for name, value in wanted.items():
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        environ["wsgi.input"] = io.BytesIO(data or b"")
        started = {}

        def start_response(status, response_headers, exc_info=None):
            started.update(status=status, headers=response_headers)

        result = self.app(environ, start_response)
        try:
            body = b"".join(
                part.encode() if isinstance(part, str) else part for part in result
            )
        finally:
            if hasattr(result, "close"):
                result.close()
        return WsgiResponse(started["status"], started["headers"], body)

    def get(self, path, **kwargs):
        return self("GET", path, **kwargs)

    def post(self, path, body=_NO_BODY, **kwargs):
        return self("POST", path, body, **kwargs)

    def put(self, path, body=_NO_BODY, **kwargs):
        return self("PUT", path, body, **kwargs)

    def patch(self, path, body=_NO_BODY, **kwargs):
        return self("PATCH", path, body, **kwargs)

    def delete(self, path, **kwargs):
        return self("DELETE", path, **kwargs)

    def ok(self, method, path, body=_NO_BODY, status=200, **kwargs):
        """The JSON answer of a request that must succeed with ``status``."""
        response = self(method, path, body, **kwargs)
        assert response.status == status, (response.status, response.body[:500])
        return response.json()

    def find_run(self, run_id):
        response = self.get(f"/api/runs/{run_id}")
        return response.json() if response.status == 200 else None


@pytest.fixture
def engines(tmp_path):
    """Factory of started engines on fresh databases; all shut down afterwards."""
    made = []

    def make(**settings):
        settings.setdefault("db", str(tmp_path / f"engine{len(made)}.db"))
        settings.setdefault("timezone", "UTC")
        engine = Engine(Config(**settings)).start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        with contextlib.suppress(Exception):
            engine.shutdown(2)


@pytest.fixture
def api(engines):
    engine = engines()
    return WsgiClient(make_app(engine), engine)


def names_of(listing):
    return [job["name"] for job in listing["jobs"]]


def test_api_job_crud_with_put_and_patch(api):
    created = api.ok(
        "POST",
        "/api/jobs",
        {
            "name": "crud",
            "command": "echo hi",
            "schedule": "@hourly",
            "tags": ["t1"],
            "description": "The FIRST job",
            "timeout": 5,
        },
        status=201,
    )
    assert created["name"] == "crud" and created["command"] == "echo hi"
    assert created["source"] == "api" and created["paused"] is False
    assert created["running"] == 0 and created["last_run"] is None
    assert created["next_run_at"].endswith("Z")
    api.post("/api/jobs", {"name": "crud", "command": "true"}).error(409, "name")
    api.ok("POST", "/api/jobs", {"name": "other", "command": "true"}, status=201)

    listing = api.ok("GET", "/api/jobs")
    assert names_of(listing) == ["crud", "other"] and listing["total"] == 2
    assert names_of(api.ok("GET", "/api/jobs?tag=t1")) == ["crud"]
    assert names_of(api.ok("GET", "/api/jobs?q=first")) == ["crud"]
    assert names_of(api.ok("GET", "/api/jobs?q=echo")) == ["crud"]
    page = api.ok("GET", "/api/jobs?limit=1&offset=1")
    assert names_of(page) == ["other"] and page["total"] == 2
    api.get("/api/jobs?status=bogus").error(400, "status")
    api.get("/api/jobs?limit=x").error(400, "limit")
    api.get("/api/jobs?offset=-1").error(400, "offset")

    got = api.ok("GET", "/api/jobs/crud")
    assert got["timeout"] == 5 and got["tags"] == ["t1"]
    assert got["schedule_description"]

    # PUT replaces the whole definition.
    replaced = api.ok("PUT", "/api/jobs/crud", {"command": "echo replaced"})
    assert replaced["command"] == "echo replaced"
    assert "timeout" not in replaced and replaced["next_run_at"] is None
    api.put("/api/jobs/crud", {"name": "x", "command": "true"}).error(400, "name")
    api.put("/api/jobs/crud", {"command": "true", "timeout": "x"}).error(400, "timeout")
    api.put("/api/jobs/crud", [1]).error(400)

    # PATCH changes some fields; null resets one to its default.
    patched = api.ok("PATCH", "/api/jobs/crud", {"timeout": 7, "description": "d"})
    assert patched["timeout"] == 7 and patched["command"] == "echo replaced"
    reset = api.ok("PATCH", "/api/jobs/crud", {"timeout": None})
    assert reset.get("timeout", 0) == 0 and reset["description"] == "d"
    assert api.engine.scheduler.get_job("crud").timeout == 0
    api.patch("/api/jobs/crud", {"name": "other"}).error(400, "name")
    api.patch("/api/jobs/crud", {"retries": -1}).error(400, "retries")
    api.patch("/api/jobs/crud", {"bogus_field": 1}).error(400, "bogus_field")
    api.patch("/api/jobs/crud", "text").error(400)

    assert api.ok("DELETE", "/api/jobs/crud") == {"deleted": "crud", "purged": False}
    api.get("/api/jobs/crud").error(404, "name")
    api.delete("/api/jobs/crud").error(404, "name")
    assert names_of(api.ok("GET", "/api/jobs")) == ["other"]


def test_api_every_invalid_field_is_a_400_naming_it(api):
    for field, value in INVALID_FIELDS:
        if isinstance(value, float) and math.isnan(value):
            continue  # NaN is not JSON: see test_api_malformed_bodies
        response = api.post(
            "/api/jobs", {"name": "job1", "command": "true", field: value}
        )
        data = response.error(400, field)
        assert data["error"].startswith(field + ":"), data
    assert api.ok("GET", "/api/jobs")["total"] == 0


def test_api_malformed_bodies_are_400(api):
    api.post("/api/jobs", data=b'{"name": "x",').error(400)
    assert "invalid JSON" in api.post("/api/jobs", data=b"{bad").json()["error"]
    api.post(
        "/api/jobs", data=b'{"name": "n", "command": "true", "timeout": NaN}'
    ).error(400)
    api.post(
        "/api/jobs", data=b'{"name": "n", "command": "true", "timeout": 1e999}'
    ).error(400, "timeout")
    api.post("/api/jobs", data=b"").error(400)
    api.post("/api/jobs", data=b"   ").error(400)
    api.post("/api/jobs", [{"name": "n", "command": "true"}]).error(400)
    api.post("/api/jobs", data=b'{"name": "caf\xc3", "command": "true"}').error(400)
    api.post("/api/jobs", data=b"[" * 100000 + b"]" * 100000).error(400)
    api.post("/api/jobs", data=b"1" * 5000).error(400)
    assert api.ok("GET", "/api/jobs")["total"] == 0


def fill_path(path, name="ghost", run_id="999999"):
    return path.replace("{name}", name).replace("{id}", str(run_id))


def test_api_unknown_jobs_runs_paths_and_methods(api):
    for method, path, *_rest in API_ROUTES:
        if "{name}" in path:
            body = {"command": "true"} if method in ("PUT", "PATCH") else _NO_BODY
            api(method, fill_path(path), body).error(404, "name")
        if "{id}" in path:
            for run_id in ("999999", "abc"):
                api(method, fill_path(path, run_id=run_id)).error(404, "id")
    for path in ("/api/nope", "/api/jobs/a/b/c", "/api/runs/1/nope"):
        api.get(path).error(404)
    methods = collections.defaultdict(set)
    for method, path, *_rest in API_ROUTES:
        methods[path].add(method)
    for path, allowed in methods.items():
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            if method not in allowed:
                api(method, fill_path(path, "x", 1)).error(405)


def test_api_trigger_stop_pause_resume(api, tmp_path):
    cmd = blocking_command(tmp_path)
    api.ok("POST", "/api/jobs", {"name": "busy", "command": cmd, "kill_grace": 1}, 201)
    run = api.ok("POST", "/api/jobs/busy/run", status=202)
    assert run["job"] == "busy" and run["trigger"] == "manual"
    assert run["status"] in ("queued", "running") and isinstance(run["id"], int)
    api.wait_running(run["id"])
    assert api.ok("GET", "/api/jobs/busy")["running"] == 1
    assert names_of(api.ok("GET", "/api/jobs?status=running")) == ["busy"]
    assert "force=1" in api.post("/api/jobs/busy/run").error(409)["error"]
    forced = api.ok("POST", "/api/jobs/busy/run?force=1", status=202)
    wait_for(lambda: api.ok("GET", "/api/jobs/busy")["running"] == 2)
    assert api.ok("POST", "/api/jobs/busy/stop") == {"stopped": 2}
    for run_id in (run["id"], forced["id"]):
        assert api.wait_run(run_id)["status"] == "cancelled"
    api.post(f"/api/runs/{run['id']}/stop").error(409, "id")
    third = api.ok("POST", "/api/jobs/busy/run", status=202)
    api.wait_running(third["id"])
    assert api.ok("POST", f"/api/runs/{third['id']}/stop") == {"stopped": 1}
    assert api.wait_run(third["id"])["status"] == "cancelled"
    assert api.ok("POST", "/api/jobs/busy/stop") == {"stopped": 0}

    api.ok(
        "POST",
        "/api/jobs",
        {"name": "sched", "command": "true", "schedule": "@hourly"},
        201,
    )
    paused = api.ok("POST", "/api/jobs/sched/pause")
    assert paused["paused"] is True and paused["next_run_at"] is None
    assert names_of(api.ok("GET", "/api/jobs?status=paused")) == ["sched"]
    resumed = api.ok("POST", "/api/jobs/sched/resume")
    assert resumed["paused"] is False and resumed["next_run_at"].endswith("Z")
    assert api.ok("GET", "/api/jobs?status=paused")["total"] == 0


ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def slow_disk(monkeypatch, engine, delay=0.05):
    """Every database commit takes ``delay`` longer, as on a slow SD card."""
    commit = engine.store._commit

    def slow_commit(batch):
        time.sleep(delay)
        return commit(batch)

    monkeypatch.setattr(engine.store, "_commit", slow_commit)


def test_api_a_triggered_run_is_visible_at_once(api, monkeypatch):
    # The 202 answer names a run: reading it at once must not be a 404.
    job = {"name": "quick", "command": "sleep 5", "concurrency": "allow"}
    api.ok("POST", "/api/jobs", job, status=201)
    slow_disk(monkeypatch, api.engine)
    for _ in range(3):
        run = api.ok("POST", "/api/jobs/quick/run", status=202)
        assert api.ok("GET", f"/api/runs/{run['id']}")["job"] == "quick"
        assert api.get(f"/api/runs/{run['id']}/log").status == 200
        assert api.ok("POST", f"/api/runs/{run['id']}/stop") == {"stopped": 1}
        assert api.wait_run(run["id"])["status"] == "cancelled"


def test_api_runs_filters_pagination_and_totals(api):
    api.ok("POST", "/api/jobs", {"name": "seq", "command": "echo run"}, status=201)
    api.ok("POST", "/api/jobs", {"name": "bad", "command": "exit 3"}, status=201)
    ids = []
    for _ in range(5):
        ids.append(api.ok("POST", "/api/jobs/seq/run", status=202)["id"])
        api.wait_run(ids[-1])
    failed = api.wait_run(api.ok("POST", "/api/jobs/bad/run", status=202)["id"])
    assert failed["status"] == "failed" and failed["exit_code"] == 3

    runs = api.ok("GET", "/api/jobs/seq/runs")
    assert [r["id"] for r in runs["runs"]] == ids[::-1] and runs["total"] == 5
    page = api.ok("GET", "/api/jobs/seq/runs?limit=2")
    assert [r["id"] for r in page["runs"]] == ids[:2:-1] and page["total"] == 5
    older = api.ok("GET", f"/api/jobs/seq/runs?limit=2&before={ids[3]}")
    assert [r["id"] for r in older["runs"]] == [ids[2], ids[1]]
    assert older["total"] == 5  # before= is a cursor: total counts every match
    oldest = api.ok("GET", f"/api/jobs/seq/runs?limit=2&before={ids[1]}")
    assert [r["id"] for r in oldest["runs"]] == [ids[0]]
    assert api.ok("GET", "/api/jobs/seq/runs?status=failed") == {"runs": [], "total": 0}

    everything = api.ok("GET", "/api/runs")
    assert everything["total"] == 6 and everything["runs"][0]["id"] == failed["id"]
    assert [r["id"] for r in api.ok("GET", "/api/runs?status=failed")["runs"]] == [
        failed["id"]
    ]
    by_job = api.ok("GET", "/api/runs?job=seq&status=succeeded&limit=1")
    assert by_job["total"] == 5 and by_job["runs"][0]["id"] == ids[-1]
    assert api.ok("GET", "/api/runs?offset=5")["runs"][0]["id"] == ids[0]
    api.get("/api/runs?status=nope").error(400, "status")
    api.get("/api/runs?before=abc").error(400, "before")
    api.get("/api/runs?limit=0").error(400, "limit")
    api.get("/api/runs?limit=5000").error(400, "limit")
    api.get("/api/jobs/seq/runs?limit=x").error(400, "limit")
    api.get("/api/jobs/ghost/runs").error(404, "name")
    assert names_of(api.ok("GET", "/api/jobs?status=failed")) == ["bad"]
    assert names_of(api.ok("GET", "/api/jobs?status=succeeded")) == ["seq"]

    # Deleting keeps the history unless ?purge=1.
    api.ok("DELETE", "/api/jobs/seq")
    assert api.ok("GET", "/api/jobs/seq/runs")["total"] == 5
    assert api.ok("DELETE", "/api/jobs/bad?purge=1")["purged"] is True
    assert api.ok("GET", "/api/runs?job=bad")["total"] == 0


def parse_sse(text):
    """``[(event, id, data)]`` of a whole SSE body."""
    events = []
    for block in text.split("\n\n"):
        fields = {"event": None, "id": None, "data": []}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                fields["data"].append(value)
            elif name in ("event", "id"):
                fields[name] = value
        if fields["event"] or fields["data"]:
            data = json.loads("\n".join(fields["data"])) if fields["data"] else None
            events.append((fields["event"], fields["id"], data))
    return events


def test_api_run_log_and_replayed_stream(api):
    command = "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2"
    api.ok("POST", "/api/jobs", {"name": "talk", "command": command}, status=201)
    run = api.wait_run(api.ok("POST", "/api/jobs/talk/run", status=202)["id"])
    assert run["status"] == "succeeded" and run["exit_code"] == 0
    assert run["job"] == "talk" and run["attempt"] == 1 and run["trigger"] == "manual"
    for key in ("scheduled_at", "started_at", "finished_at"):
        assert ISO_MS.match(run[key]), run[key]
    assert run["duration"] >= 0.2 and run["output_bytes"] == 15
    assert run["output_truncated"] is False and run["signal"] is None
    assert api.ok("GET", f"/api/runs/{run['id']}") == run

    log = api.get(f"/api/runs/{run['id']}/log")
    assert log.status == 200
    assert log.header("Content-Type").startswith("text/plain")
    assert log.text == "out1\nerr1\nout2\n"
    chunks = api.ok("GET", f"/api/runs/{run['id']}/log?format=json")["chunks"]
    assert [(c["stream"], c["text"]) for c in chunks] == [
        ("stdout", "out1\n"),
        ("stderr", "err1\n"),
        ("stdout", "out2\n"),
    ]
    assert all(set(c) == {"seq", "stream", "ts", "text"} for c in chunks)
    assert [c["seq"] for c in chunks] == sorted({c["seq"] for c in chunks})
    assert all(ISO_MS.match(c["ts"]) for c in chunks)
    api.get(f"/api/runs/{run['id']}/log?format=xml").error(400, "format")

    stream = api.get(f"/api/runs/{run['id']}/stream")
    assert stream.status == 200
    assert stream.header("Content-Type").startswith("text/event-stream")
    events = parse_sse(stream.text)
    assert [e[0] for e in events] == ["log", "log", "log", "status", "end"]
    assert [int(e[1]) for e in events[:3]] == [c["seq"] for c in chunks]
    # Live events carry the run without its deliveries (they may be pending).
    assert events[-1][2] == without_hooks(run)
    resumed = parse_sse(
        api.get(
            f"/api/runs/{run['id']}/stream",
            headers={"Last-Event-ID": str(chunks[0]["seq"])},
        ).text
    )
    assert [e[2]["text"] for e in resumed if e[0] == "log"] == ["err1\n", "out2\n"]
    api.get(f"/api/runs/{run['id']}/stream", headers={"Last-Event-ID": "x"}).error(
        400, "Last-Event-ID"
    )


def test_api_batch(api):
    for name in ("a1", "a2"):
        api.ok("POST", "/api/jobs", {"name": name, "command": "true"}, status=201)
    out = api.ok("POST", "/api/batch", {"action": "pause", "jobs": ["a1", "a2", "zz"]})
    assert [(r["job"], r["ok"]) for r in out["results"]] == [
        ("a1", True),
        ("a2", True),
        ("zz", False),
    ]
    assert "zz" in out["results"][2]["error"]
    assert api.ok("GET", "/api/jobs?status=paused")["total"] == 2
    out = api.ok("POST", "/api/batch", {"action": "resume", "jobs": ["a1", "a2"]})
    assert all(r["ok"] for r in out["results"])
    assert api.ok("GET", "/api/jobs?status=paused")["total"] == 0
    out = api.ok("POST", "/api/batch", {"action": "run", "jobs": ["a1"]})
    run = out["results"][0]["run"]
    assert run["job"] == "a1" and api.wait_run(run["id"])["status"] == "succeeded"
    out = api.ok("POST", "/api/batch", {"action": "stop", "jobs": ["a1"]})
    assert out["results"] == [{"job": "a1", "ok": True}]
    out = api.ok("POST", "/api/batch", {"action": "delete", "jobs": ["a2"]})
    assert out["results"] == [{"job": "a2", "ok": True}]
    assert names_of(api.ok("GET", "/api/jobs")) == ["a1"]
    assert api.ok("POST", "/api/batch", {"action": "run", "jobs": []}) == {
        "results": []
    }
    api.post("/api/batch", {"action": "explode", "jobs": ["a1"]}).error(400, "action")
    api.post("/api/batch", {"action": "run", "jobs": "a1"}).error(400, "jobs")
    api.post("/api/batch", {"action": "run", "jobs": [1]}).error(400, "jobs")
    api.post("/api/batch", ["run"]).error(400)


def test_api_validate_a_job_or_a_document(api):
    good = {"name": "v", "command": "true", "schedule": "@daily"}
    assert api.ok("POST", "/api/validate", good) == {"valid": True, "errors": []}
    api.get("/api/jobs/v").error(404, "name")  # nothing was saved
    out = api.ok("POST", "/api/validate", dict(good, timeout=-1, retries="x"))
    assert out["valid"] is False
    assert [e["field"] for e in out["errors"]][:1] == ["timeout"]
    assert all(set(e) == {"field", "error"} for e in out["errors"])
    doc = {"jobs": [good, {"name": "w", "command": "true", "schedule": "nope"}]}
    out = api.ok("POST", "/api/validate", doc)
    assert out["valid"] is False and out["errors"][0]["field"] == "jobs[1].schedule"
    assert api.ok("POST", "/api/validate", [good])["valid"] is True
    assert api.ok("POST", "/api/validate", {"defaults": {}, "jobs": [good]})["valid"]
    assert api.ok("POST", "/api/validate", 42)["valid"] is False
    api.post("/api/validate", data=b"{nope").error(400)
    assert api.ok("GET", "/api/jobs")["total"] == 0


def cron_next_path(**params):
    return "/api/cron/next?" + urllib.parse.urlencode(params)


def test_api_cron_next(api):
    out = api.ok(
        "GET",
        cron_next_path(
            expr="*/15 * * * *", n=3, timezone="UTC", after="2026-01-01T00:00:00Z"
        ),
    )
    assert out["times"] == [
        {"local": f"2026-01-01T00:{m}:00+00:00", "utc": f"2026-01-01T00:{m}:00.000Z"}
        for m in ("15", "30", "45")
    ]
    assert isinstance(out["description"], str) and out["description"]
    # The same code as the scheduler and ``next``: DST rules included.
    out = api.ok(
        "GET",
        cron_next_path(
            expr="30 2 * * *",
            n=2,
            timezone="America/New_York",
            after="2026-03-07T12:00:00Z",
        ),
    )
    assert [t["utc"] for t in out["times"]] == [
        "2026-03-08T07:00:00.000Z",
        "2026-03-09T06:30:00.000Z",
    ]
    assert len(api.ok("GET", cron_next_path(expr="@hourly"))["times"]) == 5
    api.get("/api/cron/next").error(400, "expr")
    api.get(cron_next_path(expr="61 * * * *")).error(400, "schedule")
    api.get(cron_next_path(expr="@hourly", n=0)).error(400, "n")
    api.get(cron_next_path(expr="@hourly", n="x")).error(400, "n")
    api.get(cron_next_path(expr="@hourly", timezone="Mars/Base")).error(400, "timezone")
    api.get(cron_next_path(expr="@hourly", after="soon")).error(400, "after")


EXPORTED_JOBS = [
    {
        "name": "e1",
        "command": "echo $SECRET",
        "schedule": "@daily",
        "env": {"SECRET": "s3cret value"},
        "tags": ["a", "b,c"],
        "timeout": 5,
        "retries": 2,
        "on_failure": [{"command": "true"}],
    },
    {"name": "e2", "command": ["echo", "a,b", 'say "hi"'], "description": 'x, "y"'},
    {"name": "e4", "command": "[ -d /tmp ] && echo yes", "description": "[draft]"},
    {
        "name": "e3",
        "kind": "http",
        "url": "http://127.0.0.1:9/x",
        "expect_status": [200],
        "body": {"a": 1},
        "enabled": False,
    },
]


EXPORTED_NAMES = sorted(job["name"] for job in EXPORTED_JOBS)


def by_name(jobs):
    return {job["name"]: job for job in jobs}


def test_api_export_and_import_json_and_csv(engines):
    source = WsgiClient(make_app(engines()))
    for job in EXPORTED_JOBS:
        source.ok("POST", "/api/jobs", job, status=201)
    exported = source.get("/api/export")
    assert exported.status == 200
    assert "attachment" in exported.header("Content-Disposition")
    doc = exported.json()
    assert by_name(doc["jobs"]) == by_name(EXPORTED_JOBS)  # env values whole
    csv_export = source.get("/api/export?format=csv")
    assert csv_export.status == 200
    assert csv_export.header("Content-Type").startswith("text/csv")
    assert csv_export.text.splitlines()[0].startswith("name,command,")
    source.get("/api/export?format=xml").error(400, "format")

    target = WsgiClient(make_app(engines()))
    report = target.ok("POST", "/api/import?dry_run=1", doc)
    assert sorted(report["created"]) == EXPORTED_NAMES and report["dry_run"]
    assert target.ok("GET", "/api/jobs")["total"] == 0
    report = target.ok("POST", "/api/import", doc)
    assert sorted(report["created"]) == EXPORTED_NAMES
    assert report["dry_run"] is False
    assert by_name(target.ok("GET", "/api/export")["jobs"]) == by_name(EXPORTED_JOBS)
    report = target.ok("POST", "/api/import", doc)
    assert sorted(report["unchanged"]) == EXPORTED_NAMES
    changed = {"jobs": [dict(EXPORTED_JOBS[1], description="new")]}
    assert target.ok("POST", "/api/import", changed)["updated"] == ["e2"]
    bad = {"jobs": [{"name": "ok", "command": "true"}, {"name": "x", "timeout": 1}]}
    target.post("/api/import", bad).error(400, "jobs[1].command")
    target.get("/api/jobs/ok").error(404, "name")

    from_csv = WsgiClient(make_app(engines()))
    csv_body = csv_export.body
    report = from_csv.ok(
        "POST",
        "/api/import?dry_run=1",
        data=csv_body,
        headers={"Content-Type": "text/csv"},
    )
    assert sorted(report["created"]) == EXPORTED_NAMES
    assert from_csv.ok("GET", "/api/jobs")["total"] == 0
    report = from_csv.ok(
        "POST", "/api/import", data=csv_body, headers={"Content-Type": "text/csv"}
    )
    assert sorted(report["created"]) == EXPORTED_NAMES
    assert by_name(from_csv.ok("GET", "/api/export")["jobs"]) == by_name(EXPORTED_JOBS)


def test_api_env_values_are_masked_in_the_list_only(api):
    api.ok(
        "POST",
        "/api/jobs",
        {"name": "envy", "command": "true", "env": {"API_KEY": "hunter2"}},
        status=201,
    )
    listing = api.get("/api/jobs")
    assert listing.json()["jobs"][0]["env"] == {"API_KEY": "***"}
    assert b"hunter2" not in listing.body
    assert api.ok("GET", "/api/jobs/envy")["env"] == {"API_KEY": "hunter2"}
    assert api.ok("GET", "/api/export")["jobs"][0]["env"] == {"API_KEY": "hunter2"}
    assert b"hunter2" in api.get("/api/export?format=csv").body


def write_jobs_file(path, jobs):
    path.write_text(json.dumps({"defaults": {"timezone": "UTC"}, "jobs": jobs}))
    return str(path)


def test_api_health_status_system(engines, tmp_path, monkeypatch):
    path = write_jobs_file(
        tmp_path / "jobs.json", [{"name": "f", "command": "true", "schedule": "@daily"}]
    )
    engine = engines(jobs=path)
    api = WsgiClient(make_app(engine), engine)
    health = api.ok("GET", "/api/health")
    assert health["status"] == "ok" and all(health["checks"].values())
    status = api.ok("GET", "/api/status")
    assert status["version"] == minisched.__version__
    assert status["uptime"] >= 0 and ISO_MS.match(status["started_at"])
    assert status["counts"]["jobs"] == 1 and status["counts"]["running"] == 0
    assert status["jobs_file"]["path"] == path
    assert status["jobs_file"]["error"] is None
    assert ISO_MS.match(status["jobs_file"]["loaded_at"])
    assert isinstance(status["scheduler"]["lag"], (int, float))
    assert {"cpu_percent", "memory_percent", "disk_percent"} <= set(status["system"])

    write_jobs_file(
        tmp_path / "jobs.json", [{"name": "f", "command": "true", "schedule": "soon"}]
    )
    assert not engine.jobs_file.load()
    error = api.ok("GET", "/api/status")["jobs_file"]["error"]
    assert "jobs[0].schedule: " in error
    assert api.ok("GET", "/api/jobs/f")["schedule"] == "@daily"  # old one kept

    system = api.ok("GET", "/api/system")
    assert system["host"]["cpu_count"] >= 1
    assert system["host"]["memory"]["total"] > 0
    assert system["host"]["disk"]["total"] > 0
    assert system["server"]["pid"] == os.getpid()
    assert system["server"]["rss"] > 0 and system["server"]["threads"] >= 1

    monkeypatch.setattr(engine.scheduler, "alive", lambda: False)
    sick = api.get("/api/health")
    assert sick.status == 503 and sick.json()["checks"]["scheduler"] is False


def test_api_jobs_file_jobs_are_read_only(engines, tmp_path):
    path = write_jobs_file(tmp_path / "jobs.json", [{"name": "f", "command": "true"}])
    engine = engines(jobs=path)
    api = WsgiClient(make_app(engine), engine)
    assert api.ok("GET", "/api/jobs/f")["source"] == "file"
    for response in (
        api.put("/api/jobs/f", {"command": "false"}),
        api.patch("/api/jobs/f", {"description": "x"}),
        api.delete("/api/jobs/f"),
        api.post("/api/import", {"jobs": [{"name": "f", "command": "false"}]}),
    ):
        assert "edit the file" in response.error(409, "name")["error"]
    out = api.ok("POST", "/api/batch", {"action": "delete", "jobs": ["f"]})
    assert out["results"][0]["ok"] is False
    assert api.ok("POST", "/api/jobs/f/pause")["paused"] is True
    assert api.ok("POST", "/api/jobs/f/resume")["paused"] is False
    run = api.ok("POST", "/api/jobs/f/run", status=202)
    assert api.wait_run(run["id"])["status"] == "succeeded"
    assert api.ok("POST", "/api/jobs/f/stop") == {"stopped": 0}
    assert api.ok("GET", "/api/jobs/f")["command"] == "true"


def test_api_metrics(api):
    api.ok("POST", "/api/jobs", {"name": "m.ok", "command": "true"}, status=201)
    api.ok("POST", "/api/jobs", {"name": "m-bad", "command": "exit 1"}, status=201)
    for name in ("m.ok", "m-bad"):
        api.wait_run(api.ok("POST", f"/api/jobs/{name}/run", status=202)["id"])

    def scrape():
        response = api.get("/metrics")
        assert response.status == 200
        return response.text if 'job="m-bad"' in response.text else None

    text = wait_for(scrape)
    assert api.get("/metrics").header("Content-Type").startswith("text/plain")
    lines = text.splitlines()
    assert 'minisched_runs_total{job="m.ok",status="succeeded"} 1' in lines
    assert 'minisched_runs_total{job="m-bad",status="failed"} 1' in lines
    assert 'minisched_run_duration_seconds_count{job="m.ok"} 1' in lines
    assert "minisched_running 0" in lines and "minisched_queued 0" in lines
    assert "minisched_jobs 2" in lines and "minisched_up 1" in lines
    helped, typed = set(), set()
    sample = re.compile(r'^([a-z_]+)(\{([a-z_]+="(\\.|[^"\\])*",?)*\})? (\S+)$')
    for line in lines:
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[3] in ("counter", "gauge", "summary", "histogram")
            typed.add(line.split()[2])
        else:
            match = sample.match(line)
            assert match, line
            float(match.group(5))
            base = re.sub(r"_(sum|count|bucket)$", "", match.group(1))
            assert base in helped and base in typed, line


def test_prom_label_escaping():
    assert minisched._prom_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert minisched._prom_label("plain.name-1") == "plain.name-1"


def test_api_openapi_describes_exactly_the_served_routes(api):
    doc = api.ok("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, operations in doc["paths"].items()
        for method in operations
    }
    served = {
        (route.method, re.sub(r"<(\w+)>", r"{\1}", route.rule))
        for route in api.app.routes
        if route.rule.startswith("/api/") or route.rule == "/metrics"
    }
    assert documented == served
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert set(doc["components"]["schemas"]["Error"]["required"]) == {"error", "field"}


def test_meta_serves_the_tables_everything_else_is_derived_from(api):
    meta = api.ok("GET", "/api/meta")
    statuses = {s["name"]: s for s in meta["statuses"]}
    assert list(statuses) == list(minisched.RUN_STATUSES)
    assert [n for n, s in statuses.items() if not s["terminal"]] == [
        "queued",
        "running",
    ]
    assert {n for n, s in statuses.items() if s["failure"]} == {
        "failed", "timed_out", "missed", "lost"
    }  # fmt: skip
    assert minisched.ACTIVE_STATUSES == ("queued", "running")
    assert minisched.KEPT_APART_STATUSES == ("skipped", "missed")
    fields = {f["name"]: f for f in meta["fields"]}
    assert (
        list(fields) == list(minisched.CSV_FIELDS) == ["name", *minisched.JOB_DEFAULTS]
    )
    assert fields["concurrency"]["choices"] == ["forbid", "allow", "replace", "queue"]
    assert fields["env"]["masked"] and not fields["tags"]["masked"]
    assert fields["kill_grace"]["schema"] == {
        "type": "number", "minimum": 0, "maximum": 3600, "default": 10
    }  # fmt: skip
    # OpenAPI, validation and CSV say what the tables say.
    doc = api.ok("GET", "/api/openapi.json")["components"]["schemas"]
    assert doc["Run"]["properties"]["status"]["enum"] == list(statuses)
    properties = doc["JobDefinition"]["properties"]
    for name, field in fields.items():
        if name != "name":
            assert properties[name] == field["schema"], name
    problem = api.post("/api/jobs", {"name": "j", "command": "x", "kill_grace": -1})
    assert problem.error(400, "kill_grace")["error"] == (
        "kill_grace: must be between 0 and 3600"
    )
    problem = api.post("/api/jobs", {"name": "j", "command": "x", "catch_up": "x"})
    assert problem.error(400, "catch_up")["error"] == (
        "catch_up: must be one of none, latest, all"
    )


# -- security -------------------------------------------------------------------

TOKEN = "s3cret-token-value"
#: Open without the token (SPEC §9); the OpenAPI description is checked apart.
OPEN_ROUTES = {
    ("GET", "/api/health"),
    ("POST", "/api/login"),
    ("POST", "/api/logout"),  # ending a session needs no valid one
    ("GET", "/api/meta"),
}


@pytest.fixture
def secured(engines):
    engine = engines(token=TOKEN)
    return WsgiClient(make_app(engine), engine)


def test_every_route_but_health_and_login_needs_the_token(secured):
    bearer = {"Authorization": "Bearer " + TOKEN}
    for method, path, *_rest in API_ROUTES:
        if (method, path) in OPEN_ROUTES or path == "/api/openapi.json":
            continue
        target = fill_path(path, "x", 1)
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer " + TOKEN[:-1]},
            {"Authorization": "Basic " + TOKEN},
            {"Cookie": minisched.SESSION_COOKIE + "=forged"},
        ):
            response = secured(method, target, headers=headers)
            response.error(401)
            assert response.header("WWW-Authenticate").startswith("Bearer")
    assert secured.get("/api/health").status == 200
    assert secured.ok("GET", "/api/jobs", headers=bearer)["total"] == 0
    assert secured.get("/metrics", headers=bearer).status == 200
    secured.ok(
        "POST", "/api/jobs", {"name": "t", "command": "true"}, 201, headers=bearer
    )
    assert secured.ok("POST", "/api/jobs/t/run", status=202, headers=bearer)["id"]


def test_openapi_description_needs_the_token_too(secured):
    # SPEC §9 opens only /api/health, the page shell and POST /api/login.
    secured.get("/api/openapi.json").error(401)
    bearer = {"Authorization": "Bearer " + TOKEN}
    assert secured.get("/api/openapi.json", headers=bearer).status == 200


def test_login_sets_a_strict_httponly_session_cookie(secured):
    secured.post("/api/login", {"token": "nope"}).error(401, "token")
    secured.post("/api/login", {}).error(401, "token")
    secured.post("/api/login", {"token": 12}).error(401, "token")
    response = secured.post("/api/login", {"token": TOKEN})
    assert response.status == 200 and response.json()["ok"] is True
    [cookie] = response.header_list("Set-Cookie")
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert "path=/" in attributes
    assert TOKEN not in cookie and TOKEN.encode() not in response.body
    pair = cookie.split(";")[0]
    assert pair.startswith(minisched.SESSION_COOKIE + "=")
    session = {"Cookie": pair}
    assert secured.ok("GET", "/api/jobs", headers=session)["total"] == 0
    secured.ok(
        "POST", "/api/jobs", {"name": "c", "command": "true"}, 201, headers=session
    )
    logout = secured.post("/api/logout", headers=session)
    assert logout.status == 200
    assert any(
        "max-age=0" in c.lower() or "expires=" in c.lower()
        for c in logout.header_list("Set-Cookie")
    )


def test_login_is_rate_limited(secured):
    for _ in range(minisched.LOGIN_ATTEMPTS):
        secured.post("/api/login", {"token": "guess"}).error(401, "token")
    assert secured.post("/api/login", {"token": TOKEN}).status == 429
    # Another client is not locked out.
    assert (
        secured.post("/api/login", {"token": TOKEN}, remote="127.0.0.2").status == 200
    )


def test_login_without_a_token_configured(api):
    assert api.ok("POST", "/api/login", {}) == {
        "ok": True,
        "token_required": False,
        "name": "anonymous",
        "role": "admin",
    }


def test_cross_origin_writes_are_refused(api):
    evil = {"Origin": "http://evil.example"}
    job = {"name": "x", "command": "true"}
    for origin in (
        "http://evil.example",
        "null",
        "http://127.0.0.1:8100.evil.example",
        "http://127.0.0.1:8100@evil.example",
        "http://127.0.0.1:9999",
    ):
        api.post("/api/jobs", job, headers={"Origin": origin}).error(403, "Origin")
    assert api.ok("GET", "/api/jobs")["total"] == 0
    created = api.post("/api/jobs", job, headers={"Origin": "http://127.0.0.1:8100"})
    assert created.status == 201
    api.post("/api/jobs/x/run", headers=evil).error(403, "Origin")
    api.post("/api/batch", {"action": "run", "jobs": ["x"]}, headers=evil).error(
        403, "Origin"
    )
    api.post("/api/import", {"jobs": [job]}, headers={"Origin": "null"}).error(
        403, "Origin"
    )
    api.patch("/api/jobs/x", {"command": "false"}, headers=evil).error(403, "Origin")
    api.put("/api/jobs/x", {"command": "false"}, headers=evil).error(403, "Origin")
    api.delete("/api/jobs/x", headers=evil).error(403, "Origin")
    api.post("/api/jobs/x/pause", headers=evil).error(403, "Origin")
    assert api.ok("GET", "/api/runs")["total"] == 0
    assert api.ok("GET", "/api/jobs/x")["command"] == "true"
    assert api.ok("GET", "/api/jobs/x")["paused"] is False


def test_forged_host_public_host_and_allow_ip(engines):
    api = WsgiClient(make_app(engines()))
    for host in ("evil.example", "evil.example:8100", "127.0.0.1.evil.example"):
        api.get("/api/jobs", headers={"Host": host}).error(403, "Host")
        api.post(
            "/api/jobs", {"name": "h", "command": "true"}, headers={"Host": host}
        ).error(403, "Host")
    for host in ("localhost:8100", "[::1]:8100", "127.0.0.1", "LOCALHOST"):
        assert api.get("/api/jobs", headers={"Host": host}).status == 200, host
    assert api.ok("GET", "/api/jobs")["total"] == 0

    public = WsgiClient(make_app(engines(public_host=["sched.example.com"])))
    for host in ("sched.example.com", "SCHED.example.com:443"):
        assert public.get("/api/jobs", headers={"Host": host}).status == 200
    public.get("/api/jobs", headers={"Host": "other.example.com"}).error(403, "Host")
    same_origin = {"Host": "sched.example.com", "Origin": "https://sched.example.com"}
    created = public.post(
        "/api/jobs", {"name": "p", "command": "true"}, headers=same_origin
    )
    assert created.status == 201

    limited = WsgiClient(make_app(engines(allow_ip=["10.0.0.0/8", "::1/128"])))
    for remote in ("127.0.0.1", "11.0.0.1", "192.168.1.10"):
        limited.get("/api/jobs", remote=remote).error(403)
        limited.get("/api/health", remote=remote).error(403)
    for remote in ("10.1.2.3", "::1"):
        assert limited.get("/api/jobs", remote=remote).status == 200


def test_bodies_must_be_json_and_at_most_one_mib(api):
    job = json.dumps({"name": "b", "command": "true"}).encode()
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ):
        api.post("/api/jobs", data=job, headers={"Content-Type": ctype}).error(
            415, "Content-Type"
        )
    big = b'{"name": "b", "command": "true", "description": "' + b"x" * MAX_BODY + b'"}'
    api.post("/api/jobs", data=big).error(413)
    api.post("/api/validate", data=big).error(413)
    api.put("/api/jobs/b", data=big).error(413)
    assert api.ok("GET", "/api/jobs")["total"] == 0
    # A chunked body has no Content-Length: the limits hold all the same.
    chunked = {"Transfer-Encoding": "chunked", "Content-Length": None}
    api.post("/api/jobs", data=chunk_encode(big), headers={**chunked}).error(413)
    api.post(
        "/api/jobs",
        data=chunk_encode(job),
        headers={**chunked, "Content-Type": "text/plain"},
    ).error(415, "Content-Type")
    assert api.ok("GET", "/api/jobs")["total"] == 0
    # Exactly one MiB is fine, and so is a charset parameter.
    exact = job[:-1] + b" " * (MAX_BODY - len(job)) + b"}"
    assert len(exact) == MAX_BODY
    assert api.post("/api/jobs", data=exact).status == 201
    assert api.post(
        "/api/validate",
        data=job,
        headers={"Content-Type": "application/json; charset=utf-8"},
    ).json() == {"valid": True, "errors": []}


def chunk_encode(data, size=65536):
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_a_public_bind_without_a_token(
    tmp_path, capsys, monkeypatch, host
):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    code = minisched.main(["serve", "--host", host, "--db", str(tmp_path / "x.db")])
    assert code == 2
    assert "without a token" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_the_token_is_never_returned(secured, caplog):
    caplog.set_level(logging.DEBUG)
    bearer = {"Authorization": "Bearer " + TOKEN}
    secured.ok(
        "POST", "/api/jobs", {"name": "t", "command": "true"}, 201, headers=bearer
    )
    bodies = []
    for path in (
        "/api/status",
        "/api/system",
        "/api/health",
        "/api/jobs",
        "/api/jobs/t",
        "/api/export",
        "/api/export?format=csv",
        "/api/openapi.json",
        "/metrics",
    ):
        response = secured.get(path, headers=bearer)
        assert response.status == 200, path
        bodies.append(response.body)
        bodies.extend(v.encode() for _k, v in response.headers)
    login = secured.post("/api/login", {"token": TOKEN})
    bodies += [login.body, *(v.encode() for _k, v in login.headers)]
    secured.post("/api/login", {"token": TOKEN + "x"})
    status = secured.ok("GET", "/api/status", headers=bearer)
    assert TOKEN not in json.dumps(status)
    assert not [b for b in bodies if TOKEN.encode() in b]
    assert TOKEN not in caplog.text


def test_api_review_regressions(engines):
    """Export/import keeps ``after`` working, a bad Content-Length is a 400, a
    name ending in a newline is refused, a trigger during shutdown is a 503."""
    source = WsgiClient(make_app(engines()))
    source.ok("POST", "/api/jobs", {"name": "a1", "command": "true"}, status=201)
    source.ok(
        "POST",
        "/api/jobs",
        {"name": "a0", "command": "true", "after": ["a1"]},
        status=201,
    )
    doc = source.ok("GET", "/api/export")
    assert [j["name"] for j in doc["jobs"]] == ["a0", "a1"]  # a0 first, depends on a1
    target = WsgiClient(make_app(engines()))
    assert sorted(target.ok("POST", "/api/import", doc)["created"]) == ["a0", "a1"]
    bad_length = source(
        "POST",
        "/api/jobs",
        data=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "abc"},
    )
    bad_length.error(400, "Content-Length")
    source.post("/api/jobs", {"name": "a2\n", "command": "true"}).error(400, "name")
    engine = engines()
    engine.scheduler.put_job(validate_job({"name": "late", "command": "true"}))
    client = WsgiClient(make_app(engine))
    engine.runner.admission.closing = True
    client.post("/api/jobs/late/run").error(503)
    engine.runner.admission.closing = False


# -- live server on port 0 with real SSE ----------------------------------------

SseEvent = collections.namedtuple("SseEvent", "event id data at")


class SseClient:
    """Reads server-sent events over ``http.client``; ``at`` is the arrival time."""

    def __init__(self, port, path, headers=None, timeout=10):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.request(
            "GET", path, headers={"Accept": "text/event-stream", **(headers or {})}
        )
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def next_event(self):
        """The next event, or None once the server has closed the stream."""
        name, event_id, data = None, None, []
        while True:
            raw = self.response.readline()
            if not raw:
                return None
            line = raw.decode("utf-8").rstrip("\n")
            if not line:
                if name or data:
                    payload = json.loads("\n".join(data)) if data else None
                    return SseEvent(name or "message", event_id, payload, time.time())
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                event_id = value

    def until(self, predicate):
        """Events up to and including the first one ``predicate`` accepts."""
        events = []
        while True:
            event = self.next_event()
            assert event is not None, f"the stream ended early after {events}"
            events.append(event)
            if predicate(event):
                return events

    def rest(self):
        """Every event until the server closes the stream."""
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def close(self):
        self.response.close()
        self.conn.close()


class LiveServer(RunWaiting):
    """An engine served on 127.0.0.1, port 0: by :class:`HttpServer`, or with
    ``heartbeat`` by ``make_app`` + ``make_server`` in a thread."""

    def __init__(self, engine, heartbeat=None, headers=None):
        self.engine = engine
        if heartbeat is None:
            self.http = HttpServer(engine, engine.config).start()
            self.api, self.port, self.server = self.http.api, self.http.port, None
        else:
            app = make_app(engine, engine.config, heartbeat=heartbeat)
            self.http, self.api = None, app.config["minisched.api"]
            self.server = make_server(app, "127.0.0.1", 0)
            self.port = self.server.server_port
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = headers or {}
        self.clients = []
        self.closed = False

    def request(self, method, path, body=_NO_BODY, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            data, all_headers = None, {**self.headers, **(headers or {})}
            if body is not _NO_BODY:
                data = json.dumps(body).encode()
                all_headers["Content-Type"] = "application/json"
            conn.request(method, path, data, all_headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def ok(self, method, path, body=_NO_BODY, status=200):
        code, raw = self.request(method, path, body)
        assert code == status, (code, raw[:500])
        return json.loads(raw)

    def find_run(self, run_id):
        code, raw = self.request("GET", f"/api/runs/{run_id}")
        return json.loads(raw) if code == 200 else None

    def sse(self, path, headers=None, timeout=10):
        client = SseClient(
            self.port, path, {**self.headers, **(headers or {})}, timeout
        )
        self.clients.append(client)
        return client

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.http is not None:
            self.http.close()
        else:
            self.api.closing.set()
            self.engine.bus.publish("shutdown", None)
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def live(engines):
    servers = []

    def start(heartbeat=None, **settings):
        settings.setdefault("port", 0)
        headers = {}
        if settings.get("token"):
            headers["Authorization"] = "Bearer " + settings["token"]
        server = LiveServer(engines(**settings), heartbeat, headers)
        servers.append(server)
        return server

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()
        for client in server.clients:
            client.close()


TICKER = "for i in 1 2 3; do echo line $i; sleep 0.2; done"


def test_sse_delivers_each_line_while_the_run_goes_on(live):
    srv = live()
    srv.ok("POST", "/api/jobs", {"name": "ticker", "command": TICKER}, status=201)
    run = srv.ok("POST", "/api/jobs/ticker/run", status=202)
    srv.wait_visible(run["id"])  # see test_api_a_triggered_run_is_visible_at_once
    stream = srv.sse(f"/api/runs/{run['id']}/stream")
    assert stream.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    lines, states = [], []
    while True:
        event = stream.next_event()
        assert event is not None
        if event.event == "log":
            lines.append(event)
            states.append(srv.ok("GET", f"/api/runs/{run['id']}")["status"])
        elif event.event == "end":
            break
    assert [e.data["text"] for e in lines] == ["line 1\n", "line 2\n", "line 3\n"]
    assert all(state in minisched.ACTIVE_STATUSES for state in states), states
    assert event.data["status"] == "succeeded" and event.data["id"] == run["id"]
    assert all(e.at < event.at - 0.1 for e in lines)  # each before the run ended
    assert lines[2].at - lines[1].at > 0.1  # as written, not all at the end
    assert stream.next_event() is None  # the stream closes after ``end``


def test_sse_replays_a_finished_run_and_honours_last_event_id(live):
    srv = live()
    command = "echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three"
    srv.ok("POST", "/api/jobs", {"name": "done", "command": command}, status=201)
    run = srv.wait_run(srv.ok("POST", "/api/jobs/done/run", status=202)["id"])
    path = f"/api/runs/{run['id']}/stream"
    started = time.monotonic()
    events = srv.sse(path).rest()
    assert time.monotonic() - started < 2
    assert [e.event for e in events] == ["log", "log", "log", "status", "end"]
    assert [(e.data["stream"], e.data["text"]) for e in events[:3]] == [
        ("stdout", "one\n"),
        ("stderr", "two\n"),
        ("stdout", "three\n"),
    ]
    assert [int(e.id) for e in events[:3]] == [e.data["seq"] for e in events[:3]]
    assert events[-1].data == without_hooks(run)
    resumed = srv.sse(path, headers={"Last-Event-ID": events[0].id}).rest()
    assert [e.data["text"] for e in resumed if e.event == "log"] == ["two\n", "three\n"]
    assert resumed[-1].event == "end"
    after_all = srv.sse(path, headers={"Last-Event-ID": events[2].id}).rest()
    assert [e.event for e in after_all] == ["status", "end"]
    # A replay larger than one write (they are joined up to 64 KiB) is whole.
    command = "seq 1 60000"
    srv.ok("POST", "/api/jobs", {"name": "long", "command": command}, status=201)
    run = srv.wait_run(srv.ok("POST", "/api/jobs/long/run", status=202)["id"])
    logs = [
        e for e in srv.sse(f"/api/runs/{run['id']}/stream").rest() if e.event == "log"
    ]
    assert "".join(e.data["text"] for e in logs) == "".join(
        f"{i}\n" for i in range(1, 60001)
    )
    ids = [int(e.id) for e in logs]
    assert ids == sorted(set(ids)) and len(logs) > 2


def test_sse_resumes_a_live_run_after_a_reconnect(live):
    srv = live()
    command = "for i in 1 2 3 4; do echo l$i; sleep 0.2; done"
    srv.ok("POST", "/api/jobs", {"name": "slow", "command": command}, status=201)
    run = srv.ok("POST", "/api/jobs/slow/run", status=202)
    srv.wait_visible(run["id"])  # see test_api_a_triggered_run_is_visible_at_once
    path = f"/api/runs/{run['id']}/stream"
    first = srv.sse(path)
    seen = first.until(lambda e: e.event == "log")[-1]
    first.close()
    assert seen.data["text"] == "l1\n"
    rest = srv.sse(path, headers={"Last-Event-ID": seen.id}).until(
        lambda e: e.event == "end"
    )
    assert [e.data["text"] for e in rest if e.event == "log"] == [
        "l2\n",
        "l3\n",
        "l4\n",
    ]
    assert rest[-1].data["status"] == "succeeded"


def test_events_stream_reports_runs_and_jobs(live):
    srv = live()
    events = srv.sse("/api/events")
    assert events.status == 200
    srv.ok("POST", "/api/jobs", {"name": "ev", "command": "echo hi"}, status=201)
    run = srv.ok("POST", "/api/jobs/ev/run", status=202)
    seen = events.until(
        lambda e: (
            e.event == "run"
            and e.data["id"] == run["id"]
            and e.data["status"] == "succeeded"
        )
    )
    assert ("job", {"action": "created", "name": "ev"}) in [
        (e.event, e.data) for e in seen
    ]
    states = [e.data["status"] for e in seen if e.event == "run"]
    assert "running" in states and states[-1] == "succeeded"
    assert seen[-1].data["exit_code"] == 0 and seen[-1].data["job"] == "ev"
    srv.ok("POST", "/api/jobs/ev/pause")
    job_event = events.until(lambda e: e.event == "job")[-1]
    assert job_event.data == {"action": "paused", "name": "ev"}


def test_api_answers_200_requests_with_three_sse_clients_open(live, tmp_path):
    srv = live()
    job = {"name": "hold", "command": blocking_command(tmp_path)}
    srv.ok("POST", "/api/jobs", job, status=201)
    run = srv.ok("POST", "/api/jobs/hold/run", status=202)
    srv.wait_running(run["id"])
    stream_path = f"/api/runs/{run['id']}/stream"
    clients = [srv.sse("/api/events"), srv.sse(stream_path), srv.sse(stream_path)]
    assert [c.status for c in clients] == [200, 200, 200]
    wait_for(lambda: srv.api._streams == 3)
    paths = [
        "/api/jobs",
        "/api/runs",
        "/api/status",
        "/api/jobs/hold",
        "/api/health",
        "/metrics",
        f"/api/runs/{run['id']}",
        f"/api/runs/{run['id']}/log",
        "/api/jobs/hold/runs",
    ]
    codes = []

    def worker(k):
        for i in range(50):
            codes.append(srv.request("GET", paths[(k + i) % len(paths)])[0])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(codes) == 200 and set(codes) == {200}
    assert srv.api._streams == 3
    open(release_file(tmp_path), "w").close()
    for client in clients[1:]:
        end = client.until(lambda e: e.event == "end")[-1]
        assert end.data["status"] == "succeeded"
    clients[0].until(lambda e: e.event == "run" and e.data["status"] == "succeeded")


def test_a_disconnected_sse_client_is_released(live, tmp_path):
    srv = live(heartbeat=0.2)
    job = {"name": "hold", "command": blocking_command(tmp_path)}
    srv.ok("POST", "/api/jobs", job, status=201)
    run = srv.ok("POST", "/api/jobs/hold/run", status=202)
    srv.wait_running(run["id"])
    bus = srv.engine.bus
    base = bus.count()
    for path in ("/api/events", f"/api/runs/{run['id']}/stream"):
        client = srv.sse(path)
        assert client.status == 200
        wait_for(lambda: srv.api._streams == 1 and bus.count() == base + 1)
        client.close()
        wait_for(lambda: srv.api._streams == 0 and bus.count() == base, timeout=10)
    open(release_file(tmp_path), "w").close()


def test_more_subscribers_than_max_streams_get_503(live):
    srv = live(heartbeat=0.2, max_streams=2)
    srv.ok("POST", "/api/jobs", {"name": "q", "command": "true"}, status=201)
    run = srv.wait_run(srv.ok("POST", "/api/jobs/q/run", status=202)["id"])
    first, second = srv.sse("/api/events"), srv.sse("/api/events")
    assert (first.status, second.status) == (200, 200)
    for path in ("/api/events", f"/api/runs/{run['id']}/stream"):
        refused = srv.sse(path)
        assert refused.status == 503
        assert refused.response.getheader("Content-Type").startswith("application/json")
        error = json.loads(refused.response.read())
        assert set(error) == {"error", "field"} and "max-streams" in error["error"]
    assert srv.ok("GET", "/api/jobs")["total"] == 1  # plain requests still work
    first.close()
    wait_for(lambda: srv.api._streams == 1, timeout=10)
    assert srv.sse("/api/events").status == 200


def test_closing_the_server_ends_open_streams_at_once(live, tmp_path):
    srv = live()  # HttpServer: heartbeats every 15 s, so only close() ends them
    job = {"name": "hold", "command": blocking_command(tmp_path)}
    srv.ok("POST", "/api/jobs", job, status=201)
    run = srv.ok("POST", "/api/jobs/hold/run", status=202)
    srv.wait_running(run["id"])
    events = srv.sse("/api/events")
    stream = srv.sse(f"/api/runs/{run['id']}/stream")
    stream.until(lambda e: e.event == "status")
    wait_for(lambda: srv.api._streams == 2)
    started = time.monotonic()
    srv.close()
    for client in (events, stream):
        tail = client.rest()
        assert tail and tail[-1].event == "end"
        assert tail[-1].data == {"reason": "shutdown"}
    assert time.monotonic() - started < 3
    with pytest.raises(OSError):
        srv.request("GET", "/api/health")


def run_cli(capsys, *argv):
    code = minisched.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_client_commands_against_a_live_server(live, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    srv = live()
    url = ("--url", srv.url)
    code, out, _err = run_cli(capsys, "list", *url)  # no jobs yet: a bare header
    assert code == 0 and out.split() == ["NAME", "SCHEDULE", "NEXT", "LAST", "STATE"]
    one = tmp_path / "one.json"
    one.write_text(
        json.dumps({"name": "hello", "command": "echo hello-out; echo hello-err >&2"})
    )
    code, out, _err = run_cli(capsys, "add", one, *url)
    assert code == 0 and json.loads(out)["name"] == "hello"
    doc = tmp_path / "doc.json"
    doc.write_text(
        json.dumps(
            {
                "jobs": [
                    {"name": "bad", "command": "echo about to fail; exit 4"},
                    {
                        "name": "sleeper",
                        "command": "sleep 30",
                        "schedule": "@hourly",
                        "kill_grace": 1,
                    },
                ]
            }
        )
    )
    code, out, _err = run_cli(capsys, "add", doc, *url)
    assert code == 0 and sorted(json.loads(out)["created"]) == ["bad", "sleeper"]

    code, out, _err = run_cli(capsys, "list", *url)
    table = out.splitlines()
    assert code == 0 and table[0].split()[:2] == ["NAME", "SCHEDULE"]
    assert [row.split()[0] for row in table[1:]] == ["bad", "hello", "sleeper"]
    code, out, _err = run_cli(capsys, "list", "--json", *url)
    assert code == 0 and json.loads(out)["total"] == 3
    code, out, _err = run_cli(capsys, "show", "hello", "--json", *url)
    assert code == 0 and json.loads(out)["command"].startswith("echo hello-out")
    code, out, _err = run_cli(capsys, "show", "hello", *url)
    assert code == 0 and re.search(r"^command +echo hello-out", out, re.MULTILINE)
    code, out, err = run_cli(capsys, "show", "ghost", *url)
    assert code == 1 and "no job named 'ghost'" in err and "HTTP 404" in err

    code, out, err = run_cli(capsys, "trigger", "hello", "--follow", *url)
    assert code == 0 and out == "hello-out\n"
    assert "hello-err" in err and "succeeded" in err
    code, out, err = run_cli(capsys, "trigger", "bad", "--follow", *url)
    assert code == 1 and out == "about to fail\n"
    assert "failed" in err and "exit code 4" in err
    code, out, _err = run_cli(capsys, "trigger", "hello", *url)
    run = json.loads(out)
    assert code == 0 and run["job"] == "hello"
    srv.wait_run(run["id"])
    code, out, _err = run_cli(capsys, "logs", run["id"], *url)
    assert code == 0 and sorted(out.splitlines()) == ["hello-err", "hello-out"]
    code, out, _err = run_cli(capsys, "logs", run["id"], "--follow", *url)
    assert code == 0 and out == "hello-out\n"
    code, out, err = run_cli(capsys, "logs", 99999, *url)
    assert code == 1 and "HTTP 404" in err

    code, out, _err = run_cli(capsys, "pause", "sleeper", *url)
    assert code == 0 and json.loads(out)["paused"] is True
    assert srv.ok("GET", "/api/jobs/sleeper")["paused"] is True
    code, out, _err = run_cli(capsys, "list", *url)
    assert "paused" in next(line for line in out.splitlines() if "sleeper" in line)
    code, out, _err = run_cli(capsys, "resume", "sleeper", *url)
    assert code == 0 and srv.ok("GET", "/api/jobs/sleeper")["paused"] is False
    code, out, _err = run_cli(capsys, "trigger", "sleeper", *url)
    run = json.loads(out)
    srv.wait_running(run["id"])
    code, out, _err = run_cli(capsys, "stop", "sleeper", *url)
    assert code == 0 and json.loads(out) == {"stopped": 1}
    assert srv.wait_run(run["id"])["status"] == "cancelled"

    code, out, _err = run_cli(capsys, "status", "--json", *url)
    status = json.loads(out)
    assert code == 0 and status["version"] == minisched.__version__
    assert status["counts"]["jobs"] == 3
    code, out, _err = run_cli(capsys, "remove", "hello", *url)
    assert code == 0 and json.loads(out)["deleted"] == "hello"
    assert run_cli(capsys, "show", "hello", *url)[0] == 1

    invalid = tmp_path / "invalid.json"
    invalid.write_text(
        json.dumps({"name": "x", "command": "true", "timeout": "soon", "retries": -1})
    )
    code, out, err = run_cli(capsys, "add", invalid, *url)
    assert code == 1 and "timeout: must be a number" in err
    assert "retries: must be between 0 and 100" in err  # every error, like validate
    assert run_cli(capsys, "add", tmp_path / "missing.json", *url)[0] == 2


def test_client_commands_report_a_down_server_and_a_wrong_token(
    live, capsys, monkeypatch, caplog
):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    code, out, err = run_cli(capsys, "list", "--url", f"http://127.0.0.1:{free_port}")
    assert code == 1 and not out
    assert "cannot reach minisched" in err and str(free_port) in err

    srv = live(token=TOKEN)
    srv.ok("POST", "/api/jobs", {"name": "hi", "command": "echo hi"}, status=201)
    code, out, err = run_cli(capsys, "status", "--url", srv.url)
    assert code == 1 and "HTTP 401" in err and "--token" in err
    code, out, err = run_cli(capsys, "list", "--url", srv.url, "--token", "wrong")
    assert code == 1 and "wrong token" in err and "HTTP 401" in err
    code, out, err = run_cli(capsys, "list", "--url", srv.url, "--token", TOKEN)
    assert code == 0 and "hi" in out
    monkeypatch.setenv("MINISCHED_TOKEN", TOKEN)
    code, out, err = run_cli(capsys, "trigger", "hi", "--follow", "--url", srv.url)
    assert code == 0 and out == "hi\n"
    assert TOKEN not in caplog.text


def test_trigger_follow_works_on_a_slow_disk(live, capsys, monkeypatch):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    srv = live()
    srv.ok("POST", "/api/jobs", {"name": "hi", "command": "echo hi"}, status=201)
    slow_disk(monkeypatch, srv.engine, 0.2)
    code, out, err = run_cli(capsys, "trigger", "hi", "--follow", "--url", srv.url)
    assert (code, out) == (0, "hi\n"), err


# -- fuzz -------------------------------------------------------------------------

JSON = "application/json"
#: Every route that takes a body, with the job ``fz`` and run 1 in the path.
FUZZ_ROUTES = [
    (method, fill_path(path, "fz", 1))
    for method, path, *_rest in API_ROUTES
    if method in ("POST", "PUT", "PATCH")
]


def nested(depth, open_=b"[", close=b"]", inner=b""):
    return open_ * depth + inner + close * depth


def fz_job(field, raw):
    """A job document with ``field`` set to the raw JSON text ``raw``."""
    return b'{"name": "fz", "command": "true", "%s": %s}' % (field.encode(), raw)


#: Bodies known to be nasty for JSON and CSV parsers, as (bytes, Content-Type).
NASTY_BODIES = [
    *((nested(depth), "application/json") for depth in (500, 990, 1000, 100000)),
    *(
        (nested(depth, b'{"a":', b"}", b"1"), "application/json")
        for depth in (990, 100000)
    ),
    *(
        (
            b'{"name": "fz", "kind": "http", "url": "http://127.0.0.1:9/", "body": '
            + nested(depth)
            + b"}",
            "application/json",
        )
        for depth in (400, 900, 990)
    ),
    (fz_job("timeout", b"1e999"), "application/json"),
    (fz_job("jitter", b"-Infinity"), "application/json"),
    (fz_job("retries", b"9" * 400), "application/json"),
    (fz_job("timeout", b"-" + b"9" * 400), "application/json"),
    (fz_job("retries", b"9" * 5000), "application/json"),
    (fz_job("schedule", b'"@every 3000000d"'), "application/json"),
    (fz_job("schedule", b'"@every ' + b"9" * 40 + b'd"'), "application/json"),
    (fz_job("schedule", b'"@at 9999-12-31T23:59:59-14:00"'), "application/json"),
    (fz_job("after", b"5"), "application/json"),
    (b"1" * 5000, "application/json"),
    (b'{"a": 1}{"b": 2}', "application/json"),
    (b"\xef\xbb\xbf{}", "application/json"),
    (b"\xff\xfe{\x00}\x00", "application/json"),
    (b'{"name": "\xed\xa0\x80", "command": "true"}', "application/json"),
    (b'{"name": "fz", "command": "\\ud800"}', "application/json"),
    (b'{"name": "fz", "command": "a\\u0000b"}', "application/json"),
    (b'{"jobs": null}', "application/json"),
    (b'{"jobs": [null, 1, "x", []]}', "application/json"),
    (b'{"defaults": [], "jobs": []}', "application/json"),
    (b'{"defaults": {"name": "x"}, "jobs": [{}]}', "application/json"),
    (b'{"action": "run", "jobs": [null]}', "application/json"),
    (b'{"action": ["run"], "jobs": ["fz"]}', "application/json"),
    (b"name\r\nfz\x00x\r\n", "text/csv"),
    (b'name,command\r\n"' + b"x" * 200000 + b'",true\r\n', "text/csv"),
    (b'name,command\r\nfz,"unterminated\r\n', "text/csv"),
    (b"name,timeout\r\nfz,{bad\r\n", "text/csv"),
    (b"name,name\r\nfz,fz\r\n", "text/csv"),
    (b"\xff\xfe\x00n", "text/csv"),
    (b"command\r\ntrue\r\n", "text/csv"),
    (b"name,env,tags\r\nfz,[1],{}\r\n", "text/csv"),
]


@pytest.fixture
def fuzz_api(engines):
    engine = engines()
    client = WsgiClient(make_app(engine), engine)
    client.ok("POST", "/api/jobs", {"name": "fz", "command": "true"}, status=201)
    client.wait_run(client.ok("POST", "/api/jobs/fz/run", status=202)["id"])
    return client


def reset_fz(client):
    """Put the job ``fz`` back as it was, if a junk request changed it."""
    job = client.engine.scheduler.get_job("fz")
    if job is None or job.definition != {"name": "fz", "command": "true"}:
        client.put("/api/jobs/fz", {"command": "true"})
        if job is None:
            client.post("/api/jobs", {"name": "fz", "command": "true"})


def fuzz_problems(
    client, method, path, body=_NO_BODY, data=None, ctype=None, check_after=True
):
    """What is wrong with the answer to one junk request (empty if nothing):
    a 5xx, an error that is not ``{"error", "field"}``, or (``check_after``)
    an API left broken: health or the jobs list no longer 200."""
    headers = {"Content-Type": ctype} if ctype else None
    response = client(method, path, body, data=data, headers=headers)
    problems = []
    if response.status >= 500:
        problems.append(f"{response.status} {response.body[:90]!r}")
    elif response.status >= 400:
        ctype_out = response.header("Content-Type") or ""
        if not ctype_out.startswith("application/json") or set(
            json.loads(response.body)
        ) != {"error", "field"}:
            problems.append(f"error body {response.body[:90]!r}")
    for check in ("/api/health", "/api/jobs") if check_after else ():
        after = client.get(check)
        if after.status != 200:
            problems.append(f"then GET {check}: {after.status} {after.body[:60]!r}")
    return problems


def test_fuzz_known_nasty_bodies_on_every_body_route(fuzz_api):
    found = {}
    for method, path in FUZZ_ROUTES:
        for data, ctype in NASTY_BODIES:
            for problem in fuzz_problems(
                fuzz_api, method, path, data=data, ctype=ctype
            ):
                found.setdefault(problem, f"{method} {path} {ctype} {data[:70]!r}")
            reset_fz(fuzz_api)
    assert not found, "\n".join(f"{p}\n    e.g. {e}" for p, e in found.items())


#: Wrong, extreme or surprising values for any job field.
FIELD_JUNK = [
    None,
    True,
    0,
    -1,
    1.5,
    10**400,
    -(10**400),
    1e308,
    "",
    "x",
    "fz",
    "\x00",
    [],
    [1],
    ["fz"],
    [None],
    [[]],
    [10**400],
    {},
    {"a": 1},
    {"A": 10**400},
    [{}],
    [{"url": 5}],
    [{"command": 5}],
    [{"url": "http://127.0.0.1:9/", "headers": [1]}],
    "@every 3000000d",
    "@every " + "9" * 40 + "d",
    "@at 9999-12-31T23:59:59-14:00",
]


def test_fuzz_wrong_types_for_every_job_field(fuzz_api):
    found = {}
    bases = (
        {"name": "fz", "command": "true"},
        {"name": "fz", "kind": "http", "url": "http://127.0.0.1:9/"},
    )
    for field in ("name", *minisched.JOB_DEFAULTS, "bogus"):
        for value in FIELD_JUNK:
            if field == "command" and isinstance(value, (str, list)):
                continue  # never run made-up commands
            requests = [("PATCH", "/api/jobs/fz", {field: value})]
            for base in bases:
                job = {**base, field: value}
                defaults = {"defaults": {field: value}, "jobs": [dict(base, name="d")]}
                requests += [
                    ("POST", "/api/validate", job),
                    ("POST", "/api/import?dry_run=1", {"jobs": [job]}),
                    ("POST", "/api/validate", defaults),
                ]
            for method, path, body in requests:
                changes = method != "POST"  # validate and dry runs save nothing
                for problem in fuzz_problems(
                    fuzz_api, method, path, body, None, None, changes
                ):
                    found.setdefault(
                        (field, problem), f"{method} {path} {field}={value!r:.50}"
                    )
            reset_fz(fuzz_api)
    assert not found, "\n".join(
        f"{p[0]}: {p[1]}\n    e.g. {e}" for p, e in found.items()
    )


def test_fuzz_huge_numbers_in_paths_queries_and_headers(fuzz_api):
    huge = "9" * 30
    found = []
    for method, path in (
        ("GET", f"/api/runs/{huge}"),
        ("GET", f"/api/runs/{huge}/log"),
        ("GET", f"/api/runs/{huge}/stream"),
        ("POST", f"/api/runs/{huge}/stop"),
        ("GET", f"/api/runs?before={huge}"),
        ("GET", f"/api/runs?offset={huge}"),
        ("GET", f"/api/jobs/fz/runs?before={huge}"),
        ("GET", f"/api/jobs?offset={huge}"),
        ("GET", cron_next_path(expr="@every 3000000d")),
        ("GET", cron_next_path(expr="@hourly", after="9999-12-31T23:59:59Z")),
        ("GET", cron_next_path(expr="@hourly", after="0001-01-01T00:00:00+14:00")),
    ):
        found += [
            f"{method} {path}: {p}" for p in fuzz_problems(fuzz_api, method, path)
        ]
    try:
        response = fuzz_api.get("/api/runs/1/stream", headers={"Last-Event-ID": huge})
    except (OverflowError, ValueError, sqlite3.Error) as exc:
        found.append(f"GET /api/runs/1/stream, Last-Event-ID {huge}: {exc!r}")
    else:
        events = parse_sse(response.text) if response.status == 200 else []
        if response.status != 400 and (not events or events[-1][0] != "end"):
            found.append(f"Last-Event-ID {huge}: {response.status} {response.body!r}")
    assert not found, "\n".join(found)


CSV_HEADER = list(minisched.CSV_FIELDS)
_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**4000),
    st.integers(min_value=-(10**4000), max_value=-(10**300)),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(
        ["", "*/5 * * * *", "@every 1s", "@every 9000000d", "UTC", "queue", "\x00"]
    ),
)
_json_values = st.recursive(
    _json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
#: A job whose one field has a random value.  ``command`` never gets a random
#: string: the fuzzer must not run made-up shell commands.
_job_bodies = st.one_of(
    st.builds(
        lambda field, value: {"name": "fz", "command": "true", field: value},
        st.sampled_from(["name", *minisched.JOB_DEFAULTS, "bogus"]).filter(
            lambda field: field != "command"
        ),
        _json_leaves | _json_values,
    ),
    st.builds(
        lambda value: {"name": "fz", "command": value},
        _json_values.filter(lambda v: not isinstance(v, (str, list)))
        | st.sampled_from(["", " ", [], [""], ["true", 1], [None]]),
    ),
)


def _encode(value):
    return json.dumps(value).encode()


_json_bodies = st.one_of(
    _json_values.map(_encode),
    _job_bodies.map(_encode),
    _job_bodies.map(lambda job: {"jobs": [job]}).map(_encode),
    st.builds(
        lambda action, jobs: _encode({"action": action, "jobs": jobs}),
        _json_values | st.sampled_from(["run", "stop", "pause"]),
        _json_values,
    ),
    st.binary(max_size=200),
    st.binary(max_size=40).map(
        lambda raw: b'{"name": "fz", "command": "true", "description": "' + raw + b'"}'
    ),
    st.sampled_from([data for data, ctype in NASTY_BODIES if ctype != "text/csv"]),
)
_csv_bodies = st.lists(
    st.lists(st.text(alphabet='ab,"[]{}1 \n\x00', max_size=8), max_size=5),
    max_size=4,
).map(
    lambda rows: (
        ",".join(CSV_HEADER[:5])
        + "\r\n"
        + "".join(",".join(row) + "\r\n" for row in rows)
    ).encode()
)
_fuzz_cases = st.one_of(
    st.tuples(
        st.sampled_from(FUZZ_ROUTES),
        _json_bodies,
        st.sampled_from(["application/json", "application/json; charset=utf-8"]),
    ),
    st.tuples(st.just(("POST", "/api/import")), _csv_bodies, st.just("text/csv")),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: report it as found
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_fuzz_cases)
@example(case=(("POST", "/api/jobs"), fz_job("timeout", b"1" + b"0" * 400), JSON))
def test_fuzz_junk_bodies_never_cause_a_500(fuzz_api, case):
    (method, path), data, ctype = case
    problems = fuzz_problems(fuzz_api, method, path, data=data, ctype=ctype)
    reset_fz(fuzz_api)
    assert not problems, (method, path, ctype, data[:120], problems)


# -- the page in a real browser ---------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.path.join(os.environ.get("TMPDIR", "/tmp"), "minisched-screenshots")


def _playwright():
    """Playwright's sync API and Debian's Chromium; skipped locally when absent,
    required in CI."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            raise AssertionError(
                "CI needs playwright and /usr/bin/chromium for the page tests"
            )
        pytest.skip("playwright or /usr/bin/chromium not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
            ],
        )
        yield chromium
        chromium.close()


@contextlib.contextmanager
def live_site(tmp_path, db=None, **config):
    db = db or str(tmp_path / "page.db")
    engine = Engine(Config(db=db, port=0, **config)).start()
    server = minisched.HttpServer(engine, engine.config).start()
    try:
        yield engine, f"http://127.0.0.1:{server.port}/"
    finally:
        server.close()
        engine.shutdown(3)


@pytest.fixture
def site(tmp_path):
    with live_site(tmp_path) as value:
        yield value


def open_page(browser, url, width=1280, height=900):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_dialog(dialog):
        # Confirmations of a delete are accepted; any other dialog is a bug.
        if dialog.type == "confirm" and dialog.message.startswith("Delete"):
            dialog.accept()
        else:
            errors.append("dialog: " + dialog.message)
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(url)
    return page, errors


def shot(page, name):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    path = os.path.join(SCREENSHOTS, name + ".png")
    page.screenshot(path=path, full_page=True)
    print("screenshot:", path)
    return path


def test_page_create_trigger_watch_live_log(browser, site):
    engine, url = site
    page, errors = open_page(browser, url + "#/new")
    page.fill("#f-name", "page-job")
    page.fill("#f-command", "for i in 1 2 3 4 5 6; do echo step $i; sleep 0.4; done")
    page.fill("#f-schedule", "every day at noon")
    page.wait_for_selector("#f-schedule-err:has-text('schedule')")
    page.click("button[type=submit]")
    page.wait_for_selector(".field.invalid #f-schedule")
    shot(page, "editor-validation-desktop")
    assert engine.scheduler.get_job("page-job") is None
    page.fill("#f-schedule", "*/10 * * * *")
    page.wait_for_selector(
        ".preview li:has-text(':')"
    )  # the live preview of fire times
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('page-job')")
    assert engine.scheduler.get_job("page-job").schedule == "*/10 * * * *"
    assert engine.scheduler.get_job("page-job").enabled is True
    page.click("button[aria-label='Run page-job now']")
    page.wait_for_selector("a[href^='#/run/']")
    page.click("td[data-label=Run] a")
    page.wait_for_selector("#log span:has-text('step 2')")
    run_id = int(page.url.rsplit("/", 1)[1])
    # The line arrived while the run was still going.
    assert engine.store.get_run(run_id)["status"] == "running"
    assert page.locator("h1 .badge").inner_text() == "running"
    shot(page, "live-log-desktop")
    page.wait_for_selector("h1 .badge.s-succeeded", timeout=15000)
    assert page.locator("#log span").all_inner_texts() == [
        f"step {i}\n" for i in range(1, 7)
    ]
    page.set_viewport_size({"width": 375, "height": 800})
    shot(page, "live-log-phone")
    page.goto(url + "#/job/page-job")
    page.wait_for_selector(".chart rect.s-succeeded")
    shot(page, "job-phone")
    page.set_viewport_size({"width": 1280, "height": 900})
    shot(page, "job-desktop")
    assert not errors


def test_page_pause_resume_stop_delete(browser, site):
    engine, url = site
    engine.scheduler.put_job(
        validate_job(
            {
                "name": "sleeper",
                "command": "sleep 60",
                "schedule": "@hourly",
                "kill_grace": 1,
            }
        )
    )
    page, errors = open_page(browser, url)
    page.click("button[aria-label='Pause sleeper']")
    page.wait_for_selector("tr[data-job=sleeper] .badge:has-text('paused')")
    assert engine.scheduler.state("sleeper")["paused"]
    page.click("button[aria-label='Resume sleeper']")
    page.wait_for_selector("button[aria-label='Pause sleeper']")
    assert not engine.scheduler.state("sleeper")["paused"]
    page.click("button[aria-label='Run sleeper now']")
    page.wait_for_selector("tr[data-job=sleeper] .s-running")  # live, from /api/events
    page.click("button[aria-label='Stop sleeper']")
    page.wait_for_selector("tr[data-job=sleeper] .badge.s-cancelled", timeout=15000)
    page.click("button[aria-label='Delete sleeper']")
    page.wait_for_selector("tr[data-job=sleeper]", state="detached")
    assert engine.scheduler.get_job("sleeper") is None
    assert not errors


def test_page_shows_markup_as_text(browser, site):
    engine, url = site
    engine.scheduler.put_job(
        validate_job(
            {
                "name": "xss",
                "description": "<img src=x onerror=alert(2)>",
                "command": "echo '<script>alert(1)</script>'; echo '<b>bold</b>' >&2",
            }
        )
    )
    run = engine.scheduler.trigger("xss")
    wait_for(
        lambda: (engine.store.get_run(run["id"]) or {}).get("status") == "succeeded"
    )
    page, errors = open_page(browser, url)
    page.wait_for_selector("tr[data-job=xss]")
    assert (
        "<img src=x onerror=alert(2)>" in page.locator("tr[data-job=xss]").inner_text()
    )
    page.goto(url + f"#/run/{run['id']}")
    page.wait_for_selector("#log span.stderr")
    assert "<script>alert(1)</script>" in page.locator("#log").inner_text()
    assert page.locator("#log script, #log b, img").count() == 0
    assert not [e for e in errors if e.startswith("dialog")]


def test_page_login_with_token(browser, tmp_path):
    with live_site(tmp_path, token="s3cret-token") as (engine, url):
        engine.scheduler.put_job(validate_job({"name": "guarded", "command": "true"}))
        page, _errors = open_page(browser, url)
        page.wait_for_selector("#login:not(.hidden)")
        page.fill("#token", "wrong")
        page.click("#login button[type=submit]")
        page.wait_for_selector("#login-error:has-text('wrong token')")
        page.fill("#token", "s3cret-token")
        page.click("#login button[type=submit]")
        page.wait_for_selector("tr[data-job=guarded]")
        cookie = next(
            c for c in page.context.cookies() if c["name"] == "minisched_session"
        )
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert "s3cret-token" not in cookie["value"]


def test_page_on_a_phone_has_no_horizontal_scroll(browser, site):
    engine, url = site
    for i in range(3):
        engine.scheduler.put_job(
            validate_job(
                {
                    "name": f"a-rather-long-job-name-number-{i}-for-phones",
                    "command": "true",
                    "schedule": "30 2 * * mon-fri",
                    "tags": ["nightly", "backup"],
                    "description": "x" * 120,
                }
            )
        )
    page, errors = open_page(browser, url, 375, 800)
    page.wait_for_selector("tr[data-job]")
    for fragment in ("#/", "#/job/a-rather-long-job-name-number-0-for-phones", "#/new"):
        page.goto(url + fragment)
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375, fragment
    page.goto(url)
    page.wait_for_selector("tr[data-job]")
    shot(page, "dashboard-phone")
    page.set_viewport_size({"width": 1280, "height": 900})
    shot(page, "dashboard-desktop")
    assert not errors


def test_page_edits_a_job_and_shows_file_jobs_read_only(browser, site):
    engine, url = site
    engine.scheduler.put_job(
        validate_job(
            {
                "name": "editable",
                "command": "true",
                "schedule": "@daily",
                "env": {"TOKEN": "abc"},
                "retries": 2,
                "tags": ["x"],
            }
        )
    )
    engine.scheduler.put_job(
        validate_job({"name": "from-file", "command": "true"}), source="file"
    )
    page, errors = open_page(browser, url + "#/edit/editable")
    page.wait_for_selector("#f-description")
    page.fill("#f-description", "edited in the browser")
    page.click("button[type=submit]")
    page.wait_for_selector("h2:has-text('Run history')")  # the job's page
    job = engine.scheduler.get_job("editable")
    assert job.description == "edited in the browser"
    assert (job.env, job.retries, job.tags, job.enabled) == (
        {"TOKEN": "abc"},
        2,
        ["x"],
        True,
    )
    assert "abc" not in page.locator("main").inner_text()  # env values masked
    page.goto(url + "#/edit/from-file")
    page.wait_for_selector(".note:has-text('jobs file')")
    assert page.locator("#f-command").is_disabled()
    assert page.locator("main button[type=submit]").count() == 0
    assert not errors


def test_page_shows_the_nodes_of_a_cluster(browser, tmp_path, pg_url):
    node = {"node_name": "page-node", "node_tag": ["gpu", "eu-west"], "node_timeout": 2}
    cluster_with_a_job(pg_url, {"name": "on-node", "command": "echo hi"})
    with live_site(tmp_path, db=pg_url, **node) as (engine, url):
        run = engine.wait(engine.trigger("on-node")["id"])
        assert run["node"] == "page-node"
        page, errors = open_page(browser, url)
        page.wait_for_selector("#nodes tr[data-node=page-node]")
        me = page.locator("#nodes tr[data-node=page-node]")
        assert "(this node)" in me.inner_text()
        assert me.locator(".tag").all_inner_texts() == ["gpu", "eu-west"]
        assert me.locator("td[data-label=State]").inner_text() == "alive"
        assert me.locator("td[data-label=Version]").inner_text() == (
            minisched.__version__
        )
        assert me.locator("td[data-label=Heartbeat]").inner_text().endswith("ago")
        old = page.locator("#nodes tr[data-node=old-node]")
        assert old.locator("td[data-label=State]").inner_text() == "dead"
        assert "(this node)" not in old.inner_text()
        assert page.locator("#clockstate").is_hidden()
        shot(page, "nodes-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        shot(page, "nodes-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        # Each run names the node it ran on: in its job's history and its page.
        page.goto(url + "#/job/on-node")
        page.wait_for_selector("td.run-node:has-text('page-node')")
        shot(page, "nodes-job-desktop")
        page.goto(url + f"#/run/{run['id']}")
        page.wait_for_selector("b.run-node:has-text('page-node')")

        # This node's clock 2.5 s ahead of the database's: said across the top.
        def skewed(route):
            response = route.fetch()
            data = response.json()
            for row in data["nodes"]:
                row["clock_skew"] = 2.5 if row["self"] else row["clock_skew"]
            route.fulfill(response=response, json=data)

        page.route("**/api/nodes", skewed)
        page.goto(url + "#/")
        page.reload()
        page.wait_for_selector("#clockstate:has-text('2.5 s ahead of the database')")
        assert "page-node" in page.locator("#clockstate").inner_text()
        page.wait_for_selector("#nodes tr[data-node=page-node] .c-warn")
        shot(page, "nodes-clock-skew-desktop")
        page.unroute("**/api/nodes")
        page.close()  # its route must not outlive this server
        assert not errors
    # A lone server (SQLite) has no nodes panel and no node column.
    with live_site(tmp_path) as (engine, url):
        engine.add_job({"name": "alone", "command": "true"})
        engine.wait(engine.trigger("alone")["id"])
        page, errors = open_page(browser, url + "#/job/alone")
        page.wait_for_selector("td[data-label=Run] a")
        assert page.locator("td.run-node").count() == 0
        page.goto(url + "#/")
        page.wait_for_selector("tr[data-job=alone]")
        page.wait_for_function("() => nodes !== null")  # GET /api/nodes answered
        assert page.locator("#nodes").is_hidden()
        page.close()
        assert not errors


def test_page_says_when_this_nodes_jobs_file_differs_from_the_owners(
    browser, tmp_path, pg_url
):
    first, mine = tmp_path / "first.json", tmp_path / "mine.json"
    backup = {"name": "backup", "command": "echo one", "schedule": "@daily"}
    _jobs_doc(first, backup)
    _jobs_doc(mine, dict(backup, command="echo two"))
    owner = Node(tmp_path, pg_url, "first-node", "--jobs", str(first))
    try:
        with live_site(tmp_path, db=pg_url, node_name="page-node", jobs=str(mine)) as (
            engine,
            url,
        ):
            page, errors = open_page(browser, url)
            page.wait_for_selector("#filestate.warn li[data-job=backup]")
            text = page.locator("#filestate").inner_text()
            assert "differs from what other nodes loaded first" in text
            assert "backup is defined differently in this node's file" in text
            assert "(kept from node first-node)" in text
            assert (
                engine.scheduler.get_job("backup").definition["command"] == "echo one"
            )
            shot(page, "jobs-file-conflict-desktop")
            page.set_viewport_size({"width": 375, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            shot(page, "jobs-file-conflict-phone")
            page.close()
            assert not errors
    finally:
        owner.stop()


# -- the page for several people (issue 14): sign-in, roles, audit, settings ---


def api_as(url, token, method, path, body=None):
    """``(status, decoded JSON)`` of one request to a live site as ``token``."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        headers = {"Authorization": "Bearer " + token}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def open_page_confirming(browser, url, prefix, width=1280, height=900):
    """Like :func:`open_page`, but confirmations starting with ``prefix`` are
    accepted too; their messages are collected in the third value."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors, confirmed = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_dialog(dialog):
        if dialog.type == "confirm" and dialog.message.startswith(prefix):
            confirmed.append(dialog.message)
            dialog.accept()
        else:
            errors.append("dialog: " + dialog.message)
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(url)
    return page, errors, confirmed


def sign_in(page, secret):
    """Sign in through the login overlay, which must be showing."""
    page.wait_for_selector("#login:not(.hidden)")
    page.fill("#token", secret)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#login", state="hidden")


def assert_read_only_editor(page, url, name):
    page.goto(url + "#/edit/" + name)
    page.wait_for_selector("#f-command")
    fields = page.locator("main form input, main form textarea, main form select")
    assert fields.count() > 10
    assert fields.evaluate_all("els => els.filter(e => !e.disabled).length") == 0
    assert page.locator("main button[type=submit]").count() == 0
    assert page.locator("main button:has-text('Save')").count() == 0


def assert_no_horizontal_scroll(page, what):
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, (what, width)


def test_page_sign_in_with_a_named_token_and_a_viewers_read_only_page(
    browser, tmp_path
):
    with live_site(tmp_path, token=TOKEN) as (engine, url):
        engine.add_job({"name": "nightly", "command": "true", "schedule": "@daily"})
        secret, row = engine.access.add({"name": "vera", "role": "viewer"}, by="test")
        assert secret.startswith("msk_") and row["role"] == "viewer"
        page, errors = open_page(browser, url)
        page.wait_for_selector("#login:not(.hidden)")
        assert page.locator("#login-error").inner_text() == ""
        page.fill("#token", secret[:-1])
        page.click("#login button[type=submit]")
        page.wait_for_selector("#login-error:has-text('wrong')")
        assert page.locator("#login").is_visible()
        shot(page, "login-wrong-token-desktop")
        sign_in(page, secret)
        page.wait_for_selector("tr[data-job=nightly]")
        page.wait_for_selector("#whoami .badge.role-viewer")
        who = page.locator("#whoami")
        assert who.locator("b").inner_text() == "vera"
        assert who.locator(".badge").inner_text() == "viewer"
        assert "signed in as" in who.inner_text()
        assert who.locator("button:has-text('Sign out')").is_visible()
        assert page.locator("#login-error").inner_text() == ""
        # A viewer sees the jobs but gets no button that changes anything.
        assert page.locator("a[href='#/new']").count() == 0
        job = page.locator("tr[data-job=nightly]")
        assert job.locator("td[data-label=Actions]").inner_text() == "view only"
        assert job.locator("button, a.button").count() == 0
        assert page.locator("header a[href='#/audit']").is_hidden()
        assert page.locator("header a[href='#/settings']").is_hidden()
        shot(page, "viewer-dashboard-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        assert_no_horizontal_scroll(page, "viewer dashboard")
        shot(page, "viewer-dashboard-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(url + "#/job/nightly")
        page.wait_for_selector("h2:has-text('Run history')")
        assert page.locator("main .actions").inner_text() == "view only"
        assert page.locator("main button:has-text('Run')").count() == 0
        assert_read_only_editor(page, url, "nightly")
        shot(page, "viewer-editor-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        assert_no_horizontal_scroll(page, "viewer editor")
        shot(page, "viewer-editor-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        # The server refuses the session's writes too, not only the page.
        status = page.evaluate(
            "fetch('/api/jobs/nightly/run', {method: 'POST'}).then(r => r.status)"
        )
        assert status == 403
        assert engine.store.get_token(name="vera")["last_used"]
        # Revoked through the API: the page's next request signs it out.
        assert api_as(url, TOKEN, "DELETE", "/api/tokens/vera") == (
            200,
            {"revoked": "vera"},
        )
        page.goto(url + "#/")
        page.wait_for_selector("#login:not(.hidden)")
        page.fill("#token", secret)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#login-error:has-text('revoked')")
        shot(page, "viewer-revoked-desktop")
        page.close()
        assert not errors


def test_page_operator_runs_but_cannot_edit(browser, tmp_path):
    with live_site(tmp_path, token=TOKEN) as (engine, url):
        engine.add_job({"name": "deploy", "command": "echo deployed"})
        secret, _row = engine.access.add(
            {"name": "olivia", "role": "operator"}, by="test"
        )
        page, errors = open_page(browser, url)
        sign_in(page, secret)
        page.wait_for_selector("#whoami .badge.role-operator")
        assert page.locator("#whoami b").inner_text() == "olivia"
        job = page.locator("tr[data-job=deploy]")
        page.wait_for_selector(
            "tr[data-job=deploy] button[aria-label='Run deploy now']"
        )
        assert job.locator("button[aria-label='Stop deploy']").is_disabled()
        assert job.locator("button[aria-label='Pause deploy']").count() == 1
        assert job.locator("[aria-label='Edit deploy']").count() == 0
        assert job.locator("[aria-label='Delete deploy']").count() == 0
        assert page.locator("a[href='#/new']").count() == 0
        assert page.locator("header a[href='#/audit']").is_hidden()
        assert page.locator("header a[href='#/settings']").is_hidden()
        shot(page, "operator-dashboard-desktop")
        page.click("button[aria-label='Run deploy now']")
        link = page.wait_for_selector("tr[data-job=deploy] a[href^='#/run/']")
        run_id = int(link.get_attribute("href").rsplit("/", 1)[1])
        engine.wait(run_id)
        assert engine.store.get_run(run_id)["triggered_by"] == "olivia"
        page.goto(url + f"#/run/{run_id}")
        page.wait_for_selector("main p.muted:has-text('by olivia')")
        page.wait_for_selector("#log span:has-text('deployed')")
        page.goto(url + "#/job/deploy")
        page.wait_for_selector("td[data-label=Trigger]:has-text('by olivia')")
        assert page.locator("main [aria-label='Edit deploy']").count() == 0
        assert page.locator("main [aria-label='Delete deploy']").count() == 0
        page.click("main button[aria-label='Pause deploy']")
        page.wait_for_selector("main button[aria-label='Resume deploy']")
        assert engine.scheduler.state("deploy")["paused"]
        shot(page, "operator-job-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        assert_no_horizontal_scroll(page, "operator job page")
        shot(page, "operator-job-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        assert_read_only_editor(page, url, "deploy")
        # A new role ends the token's sessions: the next request asks again.
        status, body = api_as(
            url, TOKEN, "PATCH", "/api/tokens/olivia", {"role": "viewer"}
        )
        assert (status, body["role"]) == (200, "viewer")
        page.goto(url + "#/")
        page.wait_for_selector("#login:not(.hidden)")
        sign_in(page, secret)
        page.wait_for_selector("#whoami .badge.role-viewer")
        page.wait_for_selector("tr[data-job=deploy] .actions:has-text('view only')")
        assert page.locator("tr[data-job=deploy] button").count() == 0
        page.close()
        assert not errors


def test_page_audit_and_settings_views_for_an_admin(browser, tmp_path):
    with live_site(tmp_path, token=TOKEN) as (engine, url):
        engine.access.add({"name": "old-ci", "role": "operator"}, by="test")
        other = {"name": "other", "command": "true"}
        assert api_as(url, TOKEN, "POST", "/api/jobs", other)[0] == 201
        page, errors, confirmed = open_page_confirming(browser, url, "Revoke token")
        sign_in(page, TOKEN)
        page.wait_for_selector("#whoami .badge.role-admin")
        assert page.locator("#whoami b").inner_text() == "bootstrap"
        assert page.locator("header a[href='#/audit']").is_visible()
        assert page.locator("header a[href='#/settings']").is_visible()
        # Through the page: create a job, run it, pause it.
        page.click("a.button.primary[href='#/new']")
        page.fill("#f-name", "audited")
        page.fill("#f-command", "echo audited")
        page.click("button[type=submit]")
        page.wait_for_selector("h1:has-text('audited')")
        page.click("button[aria-label='Run audited now']")
        page.wait_for_selector("td[data-label=Trigger]:has-text('by bootstrap')")
        page.click("button[aria-label='Pause audited']")
        page.wait_for_selector("button[aria-label='Resume audited']")
        page.click("header a[href='#/audit']")
        page.wait_for_selector("table.audit tr[data-action='job.pause']")
        audit = page.locator("table.audit tbody tr")
        for action in ("job.create", "job.trigger", "job.pause", "login"):
            row = page.locator(f"table.audit tr[data-action='{action}']").first
            assert row.locator("td[data-label=Who]").inner_text() == "bootstrap"
            assert row.locator("td[data-label=From]").inner_text() == "127.0.0.1"
        trigger = page.locator("table.audit tr[data-action='job.trigger']")
        assert trigger.locator("td[data-label=Job]").inner_text() == "audited"
        assert "run #" in trigger.locator("td[data-label=Change]").inner_text()
        jobs = set(audit.locator("td[data-label=Job]").all_inner_texts())
        assert {"audited", "other", "—"} <= jobs
        shot(page, "audit-desktop")
        page.fill("input[placeholder=job]", "audited")
        page.wait_for_selector("table.audit tr[data-action=login]", state="detached")
        assert set(audit.locator("td[data-label=Job]").all_inner_texts()) == {"audited"}
        actions = audit.evaluate_all("rows => rows.map(r => r.dataset.action)")
        assert {"job.create", "job.trigger", "job.pause"} <= set(actions), actions
        shot(page, "audit-filtered-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        assert_no_horizontal_scroll(page, "audit")
        shot(page, "audit-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        # Settings: a token added through the form shows its secret once.
        page.click("header a[href='#/settings']")
        page.wait_for_selector("table.tokens tr[data-token=old-ci]")
        page.fill("#tok-name", "ci-bot")
        page.select_option("#tok-role", "operator")
        page.fill("#tok-expires", "90d")
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("code#new-secret")
        made = page.locator("#new-secret").inner_text()
        assert made.startswith("msk_")
        assert engine.access.identify(made) == {"name": "ci-bot", "role": "operator"}
        bot = page.locator("table.tokens tr[data-token=ci-bot]")
        bot.wait_for()
        assert bot.locator("td[data-label=Role]").inner_text() == "operator"
        assert "by bootstrap" in bot.locator("td[data-label=Created]").inner_text()
        assert bot.locator("td[data-label=Expires]").inner_text().startswith("in ")
        assert page.locator("#tok-name").input_value() == ""
        setting = page.locator("table.settings tr[data-setting=token]")
        assert setting.locator("td[data-label=Setting]").inner_text() == "--token"
        assert setting.locator("td[data-label=Value]").inner_text() == "(set)"
        assert setting.locator("td[data-label=From]").inner_text() == "flag"
        assert TOKEN not in page.content()
        shot(page, "settings-desktop")
        page.set_viewport_size({"width": 375, "height": 800})
        assert_no_horizontal_scroll(page, "settings")
        shot(page, "settings-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        page.click("button[aria-label='Revoke old-ci']")
        page.wait_for_selector("tr[data-token=old-ci]", state="detached")
        assert confirmed == ["Revoke token old-ci? Its sessions end at once."]
        assert engine.store.get_token(name="old-ci") is None
        assert page.locator("tr[data-token=ci-bot]").count() == 1
        assert made not in page.content()  # shown once only
        page.goto(url + "#/audit")
        page.wait_for_selector("table.audit tr[data-action='token.revoke']")
        added = page.locator("table.audit tr[data-action='token.add']")
        assert "ci-bot" in added.locator("td[data-label=Change]").inner_text()
        assert made not in page.content() and TOKEN not in page.content()
        # Signing out ends the session on the server, not only in the page.
        page.click("#whoami button:has-text('Sign out')")
        page.wait_for_selector("#login:not(.hidden)")
        page.reload()
        page.wait_for_selector("#login:not(.hidden)")
        assert engine.access.entries(who="bootstrap")[0]["action"] == "logout"
        page.close()
        assert not errors


# -- hardening: defects found by a day of faults and bad input (issue 9) --------
# Each test here failed on the code before the fix it covers.


class _Http(http.server.BaseHTTPRequestHandler):
    """A loopback receiver: ``/slow`` answers after 3 s, others at once."""

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8100/x?a=b c",
        "http://127.0.0.1:8100/x\t",
        "http://127.0.0.1:8100/\x00",
        "http://127.0.0.1:8100/\x7f",
        "http://127.0.0.1:8100/caf\u00e9",
        "http://127.0.0.1:99999/",
        "http://[::1/",
        "http:///path",
        "ftp://example.com/",
        "http://\ud800/",
    ],
)
def test_urls_are_parsed_not_pattern_matched(url):
    with pytest.raises(InvalidError) as caught:
        validate_job({"name": "h", "kind": "http", "url": url})
    assert caught.value.field == "url"
    with pytest.raises(InvalidError) as caught:
        validate_job({"name": "c", "command": "true", "on_failure": [{"url": url}]})
    assert caught.value.field == "on_failure"


def test_good_urls_and_headers_still_pass():
    for url in ("http://127.0.0.1:8100/x?a=b%20c", "https://user:pw@example.com/p#f"):
        validate_job({"name": "h", "kind": "http", "url": url})
    validate_job(
        {"name": "h", "kind": "http", "url": "http://h/", "headers": {"X-A": "v\tw"}}
    )
    for headers in ({"X A": "v"}, {"X": "a\r\nB: c"}, {"X": "\u20ac"}, {"": "v"}):
        with pytest.raises(InvalidError) as caught:
            validate_job(
                {"name": "h", "kind": "http", "url": "http://h/", "headers": headers}
            )
        assert caught.value.field == "headers"


SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("command", "echo " + SURROGATE),
        ("command", ["echo", SURROGATE]),
        ("env", {"A": SURROGATE}),
        ("env", {"A": "x\x00y"}),
        ("cwd", "/tmp/" + SURROGATE),
        ("cwd", "/tmp\x00"),
        ("user", "nobody" + SURROGATE),
        ("user", "no\x00body"),
        ("description", "about " + SURROGATE),
        ("tags", [SURROGATE]),
        ("on_success", [{"command": "echo " + SURROGATE}]),
        ("on_failure", [{"url": "http://h/", "headers": {"X": SURROGATE}}]),
        ("schedule", "@every 5m" + SURROGATE),
        ("timezone", SURROGATE),
    ],
)
def test_surrogates_and_nul_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidError) as caught:
        validate_job({"name": "j", "command": "true", field: value})
    assert caught.value.field == field
    assert caught.value.message.startswith(field + ": ")


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("url", "http://h/" + SURROGATE, False),
        ("url", "http://h/\x00", False),
        ("headers", {"X": "a\x00"}, False),
        ("body", "x" + SURROGATE, False),
        ("body", {"k": [SURROGATE]}, False),
        ("body", "binary\x00is fine", True),
    ],
)
def test_http_fields_refuse_surrogates_and_nul_where_http_does(field, value, ok):
    job = {"name": "h", "kind": "http", "url": "http://h/", field: value}
    if ok:
        validate_job(job)
        return
    with pytest.raises(InvalidError) as caught:
        validate_job(job)
    assert caught.value.field == field


def test_the_api_jobs_file_and_import_refuse_surrogates_alike(engines, tmp_path):
    engine = engines()
    api = WsgiClient(make_app(engine), engine)
    raw = b'{"name": "s", "command": "echo \\ud800"}'
    api("POST", "/api/jobs", data=raw).error(400, "command")
    doc = b'{"jobs": [{"name": "s", "command": "true", "env": {"A": "\\udfff"}}]}'
    api("POST", "/api/import", data=doc).error(400, "jobs[0].env")
    result = api.ok("POST", "/api/validate", data=raw)
    assert result["valid"] is False and result["errors"][0]["field"] == "command"
    path = tmp_path / "jobs.json"
    path.write_bytes(doc)
    with pytest.raises(InvalidError) as caught:
        minisched.load_jobs_file(str(path), UTC)
    assert caught.value.field == "jobs[0].env"


def test_no_route_ever_answers_an_html_error_page(engines, monkeypatch):
    engine = engines()
    api = WsgiClient(make_app(engine), engine)
    # A job stored by an older minisched with text this one refuses: it is
    # not loaded again (and an export cannot trip over it).
    engine.store.save_job(
        "old",
        {
            "definition": {"name": "old", "command": "echo " + SURROGATE},
            "created_at": 0,
            "updated_at": 0,
        },
    ).result()
    engine.scheduler.load()
    assert engine.scheduler.get_job("old") is None
    response = api.get("/api/export?format=csv")
    assert response.status == 200 and "old" not in response.text
    # A failure past Bottle's own handlers (a body that cannot be encoded):
    monkeypatch.setattr(
        minisched.Api, "system", lambda self: bottle_text("x" + SURROGATE)
    )
    response = WsgiClient(make_app(engine), engine).get("/api/system")
    assert response.status == 500
    assert response.json() == {"error": "internal error", "field": None}
    assert b"<h1>" not in response.body


def bottle_text(text):
    import bottle

    return bottle.HTTPResponse(text)


def test_an_http_run_that_fails_in_any_way_ends_failed(harness, monkeypatch):
    h = harness()
    h.add(name="h", kind="http", url="http://127.0.0.1:9/", command=None)

    def explode(*args, **kwargs):
        raise http.client.InvalidURL("URL can't contain control characters")

    monkeypatch.setattr(minisched.urllib.request, "urlopen", explode)
    run = h.sched.trigger("h")
    h.wait_idle(10)
    row = h.store.get_run(run["id"])
    assert row["status"] == "failed"
    assert "InvalidURL" in row["error"] and "control characters" in row["error"]
    assert all(t.is_alive() for t in h.runner._threads)


def test_an_http_run_is_stopped_and_timed_out_at_once(harness, receiver):
    h = harness()
    h.add(name="slow", kind="http", url=receiver + "/slow", command=None)
    h.add(name="late", kind="http", url=receiver + "/slow", command=None, timeout=0.5)
    run = h.sched.trigger("slow")
    wait_for(lambda: (h.store.get_run(run["id"]) or {}).get("status") == "running")
    t0 = time.monotonic()
    assert h.runner.stop_run(run["id"])
    wait_for(lambda: h.store.get_run(run["id"])["status"] == "cancelled", 1.5)
    assert time.monotonic() - t0 < 1.5  # not after the 3 s answer
    again = h.sched.trigger("slow")  # forbid: not blocked by the stopped one
    assert h.runner.stop_run(again["id"])
    late = h.sched.trigger("late")
    wait_for(
        lambda: (h.store.get_run(late["id"]) or {}).get("status") == "timed_out", 2.5
    )
    assert "timeout of 0.5s" in h.store.get_run(late["id"])["error"]


def test_shutdown_ends_a_pending_http_run(tmp_path, receiver):
    engine = Engine(Config(db=str(tmp_path / "m.db"), timezone="UTC")).start()
    engine.scheduler.put_job(
        validate_job({"name": "slow", "kind": "http", "url": receiver + "/slow"})
    )
    run = engine.scheduler.trigger("slow")
    wait_for(lambda: engine.runner.active_runs()[0].status == "running")
    t0 = time.monotonic()
    engine.shutdown(1)
    assert time.monotonic() - t0 < 2.5
    assert read_run(tmp_path / "m.db", run["id"])["status"] == "cancelled"


def read_run(db, run_id):
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    try:
        return dict(
            conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        )
    finally:
        conn.close()


def fill_disk(store, extra_pages=0):
    """Make the store's database full: it cannot grow by a page more."""
    pages = store._query("PRAGMA page_count", one=True)["page_count"]
    store._writer_conn.execute(f"PRAGMA max_page_count={pages + extra_pages}")


def free_disk(store):
    store._writer_conn.execute("PRAGMA max_page_count=1073741823")


def test_a_full_disk_loses_nothing_and_answers_503(engines, monkeypatch, tmp_path):
    monkeypatch.setattr(minisched, "WRITE_WAIT", 1.0)
    engine = engines()
    api = WsgiClient(make_app(engine), engine)
    gate = tmp_path / "gate"
    api.ok(
        "POST",
        "/api/jobs",
        {
            "name": "w",
            "command": f"while [ ! -e {gate} ]; do sleep 0.05; done; head -c 300000 /dev/zero | tr '\\0' x",
        },
        201,
    )
    running = api.ok("POST", "/api/jobs/w/run", status=202)
    api.wait_running(running["id"])
    fill_disk(engine.store)
    gate.touch()  # the run ends (with output) while nothing can be written
    wait_for(lambda: engine.store.outage is not None)
    wait_for(lambda: not engine.runner.active_runs())
    health = api.get("/api/health")
    assert health.status == 503 and health.json()["checks"]["database"] is False
    api.post("/api/jobs", {"name": "n", "command": "true"}).error(503)
    api.post("/api/jobs/w/run").error(503)
    api.ok("POST", "/api/validate", {"name": "v", "command": "true"})
    assert api.ok("GET", f"/api/runs/{running['id']}")["status"] == "running"
    free_disk(engine.store)  # space returns
    wait_for(lambda: engine.store.outage is None)
    assert api.wait_run(running["id"])["status"] == "succeeded"
    assert api.ok("GET", "/api/jobs/w")["running"] == 0
    assert len(api.get(f"/api/runs/{running['id']}/log").body) >= 300000
    assert api.get("/api/health").status == 200
    created = api.ok("POST", "/api/jobs", {"name": "n", "command": "true"}, 201)
    assert created["name"] == "n"


def test_a_scheduled_slot_during_a_full_disk_is_accounted_for(harness):
    h = harness()
    h.add(name="s", command="true")
    fill_disk(h.store)
    h.store.add_chunks([(0, 1, "stdout", 0.0, "x" * 100000)])  # the outage shows
    wait_for(lambda: h.store.outage is not None)
    now = time.time()
    run = h.runner.submit(h.sched.get_job("s"), "schedule", slot=now, scheduled_at=now)
    wait_for(lambda: not h.runner.active_runs(), 5)
    free_disk(h.store)
    wait_for(lambda: h.store.outage is None)
    row = h.store.get_run(run["id"])
    assert row["status"] == "missed"
    assert "database cannot record it" in row["error"]


def disk_full(monkeypatch, store):
    """An Event: while it is set, every commit of ``store`` fails as on a full
    disk (for writes that would fit in the pages the file already has)."""
    full = threading.Event()
    transaction = store._transaction

    def faulty(batch):
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return transaction(batch)

    monkeypatch.setattr(store, "_transaction", faulty)
    return full


def test_a_trigger_answered_202_is_always_there(engines, monkeypatch):
    """The disk fills up between the request's checks and its run's insert:
    the answer is 503, not a run id that later turns out to be unknown."""
    monkeypatch.setattr(minisched, "WRITE_WAIT", 1.0)
    engine = engines()
    api = WsgiClient(make_app(engine), engine)
    api.ok("POST", "/api/jobs", {"name": "t", "command": "true"}, 201)
    full = disk_full(monkeypatch, engine.store)
    full.set()
    response = api.post("/api/jobs/t/run")
    assert response.status == 503 and "disk is full" in response.json()["error"]
    full.clear()
    wait_for(lambda: engine.store.outage is None)
    run = api.ok("POST", "/api/jobs/t/run", status=202)
    assert api.get(f"/api/runs/{run['id']}").status == 200


def test_close_commits_held_writes_once_it_can(tmp_path, monkeypatch):
    """A run that ended during an outage is written before the server exits."""
    store = SQLiteStore(str(tmp_path / "m.db")).open()
    store.insert_run(
        {"id": 1, "job": "j", "status": "running", "trigger": "manual"}
    ).result()
    full = disk_full(monkeypatch, store)
    full.set()
    held = store.update_run(1, {"status": "succeeded", "finished_at": 1.0})
    wait_for(lambda: store.outage is not None)
    threading.Timer(0.5, full.clear).start()
    store.close()
    assert held.result(0) is None
    assert read_run(tmp_path / "m.db", 1)["status"] == "succeeded"


def raw_connect(port, data=b""):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_all(sock):
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_slow_clients_are_cut_off_and_connections_capped(live):
    server = live(request_timeout=1.0, max_connections=8)
    t0 = time.monotonic()
    short = raw_connect(
        server.port,
        b"POST /api/jobs HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        b'{"name": "x",',
    )
    silent = raw_connect(server.port)  # never sends a byte
    answer = read_all(short)
    assert time.monotonic() - t0 < 3.5
    assert answer == b"" or b"408" in answer.split(b"\r\n", 1)[0]
    assert read_all(silent) == b""
    http_server = server.http.server
    wait_for(lambda: http_server._open == 0, 3)
    baseline = threading.active_count()
    idle = [raw_connect(server.port) for _ in range(8)]
    wait_for(lambda: http_server._open == 8, 3)
    refused = raw_connect(server.port, b"GET /api/health HTTP/1.0\r\n\r\n")
    head, _, body = read_all(refused).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 503")
    assert json.loads(body)["error"].startswith("too many open connections")
    assert threading.active_count() <= baseline + 8  # no thread for the refused one
    for sock in idle:
        sock.close()
    wait_for(lambda: server.request("GET", "/api/health")[0] == 200, 5)


def test_an_sse_stream_outlives_the_request_deadline(live, tmp_path):
    server = live(heartbeat=0.3, request_timeout=0.5)
    stream = server.sse("/api/events")
    assert stream.status == 200
    time.sleep(1.5)  # three deadlines: the stream is not cut
    server.ok("POST", "/api/jobs", {"name": "e", "command": "true"}, 201)
    events = stream.until(lambda e: e.event == "job")
    assert events[-1].data["name"] == "e"


def marked(run_id, store):
    return minisched.find_marked_pids({str(run_id)}, server=store.server_id)


FORK_200 = "for i in $(seq 200); do sleep 30 </dev/null >/dev/null 2>&1 & done"


def test_leftovers_of_a_succeeded_run_are_stopped(harness):
    h = harness()
    h.add(name="forker", command=FORK_200, kill_grace=1)
    h.add(
        name="detacher",
        command="(setsid sleep 30 </dev/null >/dev/null 2>&1 &); echo done",
        kill_grace=1,
    )
    runs = [h.sched.trigger("forker"), h.sched.trigger("detacher")]
    h.wait_idle()
    for run, count in zip(runs, (200, 1)):
        row = h.store.get_run(run["id"])
        assert row["status"] == "succeeded", row
        assert row["leftovers_stopped"] == count
        wait_for(lambda run=run: not marked(run["id"], h.store), 5)
        log = "".join(c["text"] for c in h.store.get_chunks(run["id"]))
        assert "(leftovers: kill)" in log
        assert h.api_run(run["id"])["leftovers_stopped"] == count


def test_leftovers_keep_lets_daemons_live(harness):
    h = harness()
    h.add(
        name="daemon", command="sleep 30 </dev/null >/dev/null 2>&1 &", leftovers="keep"
    )
    run = h.sched.trigger("daemon")
    h.wait_idle()
    row = h.store.get_run(run["id"])
    assert row["status"] == "succeeded" and row["leftovers_stopped"] is None
    pids = marked(run["id"], h.store)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)


def test_starting_deadline_holds_for_runs_held_by_max_concurrent(harness, tmp_path):
    h = harness(max_concurrent=1)
    h.add(name="hog", command=blocking_command(tmp_path), kill_grace=1)
    h.add(name="tight", command="true", starting_deadline=0.3)
    hog = h.sched.trigger("hog")
    wait_for(lambda: h.runner.counts()["running"] == 1)
    now = time.time()
    late = h.runner.submit(
        h.sched.get_job("tight"), "schedule", slot=now, scheduled_at=now
    )
    wait_for(lambda: (h.store.get_run(late["id"]) or {}).get("status") == "missed", 3)
    row = h.store.get_run(late["id"])
    assert (
        "starting_deadline 0.3s" in row["error"]
        and "--max-concurrent 1" in row["error"]
    )
    h.runner.stop_run(hog["id"])
    h.wait_idle()
    assert [r["status"] for r in h.runs("tight")] == ["missed"]


CYCLE = {
    "jobs": [
        {"name": "a", "command": "true", "after": ["b"]},
        {"name": "b", "command": "true", "after": ["a"]},
    ]
}


def test_one_cycle_check_everywhere(engines, tmp_path, capsys):
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps(CYCLE))
    code, _out, err = run_cli(capsys, "validate", path)
    assert code == 1
    assert "jobs[0].after: depends on itself through a cycle: a -> b -> a" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"jobs": [{"name": "a", "command": "true"}]}))
    engine = engines(jobs=str(good))
    good.write_text(json.dumps(CYCLE))
    assert not engine.jobs_file.load()
    api = WsgiClient(make_app(engine), engine)
    result = api.ok("POST", "/api/validate", CYCLE)
    assert result["valid"] is False
    assert result["errors"][0]["field"] == "jobs[0].after"
    error = api.ok("GET", "/api/status")["jobs_file"]["error"]
    assert "jobs[0].after: depends on itself through a cycle" in error
    api.post("/api/import", CYCLE).error(400, "jobs[0].after")
    api.ok("POST", "/api/jobs", {"name": "x", "command": "true"}, 201)
    api.ok("POST", "/api/jobs", {"name": "y", "command": "true", "after": ["x"]}, 201)
    single = api.ok(
        "POST", "/api/validate", {"name": "x", "command": "true", "after": ["y"]}
    )
    assert single["valid"] is False and single["errors"][0]["field"] == "after"
    assert "x -> y -> x" in single["errors"][0]["error"]


def test_deleting_a_job_others_run_after(api, tmp_path):
    api.ok("POST", "/api/jobs", {"name": "up", "command": "true"}, 201)
    marker = tmp_path / "down-ran"
    api.ok(
        "POST",
        "/api/jobs",
        {"name": "down", "command": f"touch {marker}", "after": ["up"]},
        201,
    )
    error = api.delete("/api/jobs/up").error(409, "name")["error"]
    assert "'down'" in error and "force" in error
    assert api.ok("DELETE", "/api/jobs/up?force=1")["deleted"] == "up"
    assert "after" not in api.ok("GET", "/api/jobs/down")
    api.ok("POST", "/api/jobs", {"name": "up", "command": "true"}, 201)
    run = api.ok("POST", "/api/jobs/up/run", status=202)
    assert api.wait_run(run["id"])["status"] == "succeeded"
    time.sleep(0.3)
    assert not marker.exists()  # the new "up" is not the one "down" ran after


def test_logout_and_a_new_token_end_sessions(tmp_path):
    db = str(tmp_path / "m.db")
    engine = Engine(Config(db=db, token=TOKEN, timezone="UTC")).start()
    try:
        api = WsgiClient(make_app(engine), engine)
        cookie = api.post("/api/login", {"token": TOKEN}).header("Set-Cookie")
        session = {"Cookie": cookie.split(";")[0]}
        api.ok("GET", "/api/jobs", headers=session)
        api.post("/api/logout", headers=session)
        api.get("/api/jobs", headers=session).error(401)
        cookie = api.post("/api/login", {"token": TOKEN}).header("Set-Cookie")
        session = {"Cookie": cookie.split(";")[0]}
        api.ok("GET", "/api/jobs", headers=session)
    finally:
        engine.shutdown(2)
    engine = Engine(Config(db=db, token="another-token", timezone="UTC")).start()
    try:
        api = WsgiClient(make_app(engine), engine)
        api.get("/api/jobs", headers=session).error(401)  # made with the old token
    finally:
        engine.shutdown(2)


@pytest.mark.parametrize("how", ["env", "flag", "file"])
def test_the_token_is_neither_in_environ_nor_cmdline(tmp_path, how):
    secret = "s3cret-" + how
    args, env = [], {}
    if how == "env":
        env["MINISCHED_TOKEN"] = secret
    elif how == "flag":
        args = ["--token", secret]
    else:
        (tmp_path / "token").write_text(secret + "\n")
        args = ["--token-file", str(tmp_path / "token")]
    server = start_serve(tmp_path, *args, env=env)
    try:
        port = wait_for(lambda: serve_port(server))
        for name in ("environ", "cmdline"):
            with open(f"/proc/{server.pid}/{name}", "rb") as f:
                assert secret.encode() not in f.read(), name
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/jobs")
        assert conn.getresponse().status == 401
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/jobs", headers={"Authorization": "Bearer " + secret})
        assert conn.getresponse().status == 200
        conn.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.stdout.close()


_SERVE_LINES = {}


def serve_port(server):
    """The port a ``start_serve`` process listens on, once it says so."""
    lines = _SERVE_LINES.setdefault(server.pid, [])
    os.set_blocking(server.stdout.fileno(), False)
    with contextlib.suppress(TypeError, OSError):
        while line := server.stdout.readline():
            lines.append(line.decode("utf-8", "replace"))
    for line in lines:
        match = re.search(r"listening on http://[^:]+:(\d+)/", line)
        if match:
            return int(match.group(1))
    return None


def test_engine_threads_survive_a_failing_item(harness, monkeypatch):
    h = harness()
    h.add(name="j", command="sleep 5", kill_grace=1)
    hand_over = h.runner.launcher._hand_over
    calls = []

    def flaky(run):
        calls.append(run.id)
        if len(calls) == 1:
            raise RuntimeError("injected")
        hand_over(run)

    monkeypatch.setattr(h.runner.launcher, "_hand_over", flaky)
    first = h.sched.trigger("j")
    wait_for(lambda: (h.store.get_run(first["id"]) or {}).get("status") == "failed", 5)
    row = h.store.get_run(first["id"])
    assert "internal error" in row["error"] and "injected" in row["error"]
    assert not marked(first["id"], h.store)  # its process was stopped
    assert all(h.runner.threads_alive().values())
    second = h.sched.trigger("j")
    wait_for(lambda: (h.store.get_run(second["id"]) or {}).get("status") == "running")
    h.runner.stop_run(second["id"])


def test_health_reports_every_engine_thread(engines):
    engine = engines()
    api = WsgiClient(make_app(engine), engine)
    checks = api.ok("GET", "/api/health")["checks"]
    assert {"scheduler", "writer", "launcher", "io", "sampler", "notify"} <= set(checks)
    dead = threading.Thread(target=lambda: None, name="minisched-launcher")
    dead.start()
    dead.join()
    engine.runner._threads[0] = dead
    sick = api.get("/api/health")
    assert sick.status == 503 and sick.json()["checks"]["launcher"] is False


def test_a_bad_allow_ip_is_a_usage_error(capsys):
    code, _out, err = run_cli(capsys, "serve", "--allow-ip", "10.0.0.0/33")
    assert code == 2 and "--allow-ip: '10.0.0.0/33' is not an address or CIDR" in err


def test_peak_rss_is_never_zero(harness):
    h = harness()
    h.add(name="short", command="true", concurrency="allow")
    for _ in range(30):
        h.sched.trigger("short")
    h.wait_idle()
    assert all(r["peak_rss"] is None or r["peak_rss"] > 0 for r in h.runs("short"))


def test_the_truncation_marker_stands_on_its_own_line(harness):
    h = harness()
    h.add(name="long", command="head -c 5000 /dev/zero | tr '\\0' a", max_output=1024)
    run = h.sched.trigger("long")
    h.wait_idle()
    log = "".join(c["text"] for c in h.store.get_chunks(run["id"]))
    marker = re.search(
        r"^\[minisched: \d+ bytes of output dropped here .*\]$", log, re.MULTILINE
    )
    assert marker, log


def test_client_commands_say_when_the_server_is_not_minisched(capsys):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for argv in (["list"], ["status"], ["trigger", "x"], ["logs", "1"]):
            code, _out, err = run_cli(capsys, *argv, "--url", url)
            assert code == 1, argv
            assert "does not answer like minisched" in err and "Traceback" not in err
    finally:
        server.shutdown()
        server.server_close()


def test_import_and_validate_refuse_empty_or_garbage_bodies(api):
    garbage = bytes(range(256)) * 4
    response = api(
        "POST", "/api/import", data=garbage, headers={"Content-Type": "text/csv"}
    )
    response.error(400)
    response = api(
        "POST",
        "/api/import",
        data=b"colour,size\nred,1\n",
        headers={"Content-Type": "text/csv"},
    )
    assert "colour" in response.error(400)["error"]
    api("POST", "/api/validate", data=b"").error(400)
    api("POST", "/api/validate", data=b"{").error(400)


def test_a_missed_record_names_the_slots_it_missed(harness):
    clock = FakeClock(ts("2026-01-01T00:00:00+00:00"))
    h = harness(clock=clock)
    h.add(name="m", command="true", schedule="* * * * *", catch_up="latest")
    clock.t += 5 * 60 + 1  # five slots pass before a tick
    h.sched.tick()
    h.wait_idle()
    missed = [r for r in h.runs("m") if r["status"] == "missed"]
    assert len(missed) == 1
    assert missed[0]["error"].startswith(
        "4 slots missed between 2026-01-01T00:01:00.000Z and 2026-01-01T00:04:00.000Z"
    )


def test_log_lines_say_stopped_and_http_status(harness, receiver, caplog, tmp_path):
    h = harness()
    h.add(name="web", kind="http", url=receiver + "/", command=None)
    h.add(name="hang", command=blocking_command(tmp_path), kill_grace=1)
    with caplog.at_level(logging.INFO, "minisched"):
        web = h.sched.trigger("web")
        hang = h.sched.trigger("hang")
        wait_for(
            lambda: (h.store.get_run(web["id"]) or {}).get("status") == "succeeded"
        )
        h.runner.stop_run(hang["id"])
        h.wait_idle()
    text = caplog.text
    assert f"run {web['id']} of web succeeded" in text and "(HTTP 200)" in text
    assert "exit code None" not in text and "exit code 200" not in text
    assert re.search(
        rf"run {hang['id']} of hang cancelled in \S+ \((killed by SIGTERM|stopped)\)",
        text,
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a disk that really fills up.  Needs mount rights."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
        check=False,
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + mounted.stderr.strip())
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path):
    """Write ``path`` until the disk is full."""
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # unbuffered: nothing is left to flush (and fail) on close
            f.write(b"\0" * 65536)


def api_call(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(
            method, path, json.dumps(body) if body is not None else None, headers
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_a_real_full_disk_answers_503_and_loses_nothing(tmp_path, small_disk):
    gate = tmp_path / "gate"
    db = small_disk / "m.db"
    command = f"while [ ! -e {gate} ]; do sleep 0.05; done; head -c 200000 /dev/zero | tr '\\0' x"
    server = start_serve(tmp_path, "--db", str(db))
    try:
        port = wait_for(lambda: serve_port(server))
        assert (
            api_call(port, "POST", "/api/jobs", {"name": "w", "command": command})[0]
            == 201
        )
        status, first = api_call(port, "POST", "/api/jobs/w/run")
        assert status == 202
        wait_for(
            lambda: (
                api_call(port, "GET", f"/api/runs/{first['id']}")[1]["status"]
                == "running"
            )
        )
        fill(small_disk / "filler")
        gate.touch()  # the run ends and its output cannot be written
        wait_for(lambda: api_call(port, "GET", "/api/health")[0] == 503)
        assert (
            api_call(port, "POST", "/api/jobs", {"name": "n", "command": "true"})[0]
            == 503
        )
        assert api_call(port, "POST", "/api/jobs/w/run")[0] == 503
        os.unlink(small_disk / "filler")  # space returns
        wait_for(lambda: api_call(port, "GET", "/api/health")[0] == 200)
        run = api_call(port, "GET", f"/api/runs/{first['id']}")[1]
        assert run["status"] == "succeeded" and run["output_bytes"] == 200000
        assert api_call(port, "GET", "/api/jobs/w")[1]["running"] == 0
        gate.unlink()  # the next run waits for it again
        status, again = api_call(port, "POST", "/api/jobs/w/run")
        assert status == 202
        fill(small_disk / "filler")  # full again: SIGTERM while a run is held
        wait_for(
            lambda: (
                api_call(port, "GET", f"/api/runs/{again['id']}")[1]["status"]
                == "running"
            )
        )
        gate.touch()
        wait_for(lambda: api_call(port, "GET", "/api/health")[0] == 503)
        threading.Timer(1.0, os.unlink, (small_disk / "filler",)).start()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.stdout.close()
    runs = {r["id"]: r for r in read_runs_at(db)}
    assert runs[first["id"]]["status"] == "succeeded"
    assert runs[again["id"]]["status"] == "succeeded"
    assert not [r for r in runs.values() if r["status"] in ("queued", "running")]


def read_runs_at(db):
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        conn.close()


@pytest.mark.parametrize("policy", ["forbid", "replace"])
def test_concurrency_is_decided_at_the_slot_not_when_it_is_handled(harness, policy):
    """A slot handled ahead (LOOKAHEAD) while the previous run still has a
    moment to go: the previous run ends first, so nothing is skipped or
    replaced; one still busy at the slot is.  Found by bench/soak.py."""
    h = harness()
    h.add(name="j", command="sleep 0.2", concurrency=policy)
    h.add(name="k", command="sleep 1", concurrency=policy, kill_grace=1)
    first = h.sched.trigger("j")
    busy = h.sched.trigger("k")
    wait_for(lambda: h.runner.counts()["running"] == 2)
    slot = time.time() + 0.5
    runs = [
        h.runner.submit(
            h.sched.get_job(name),
            "schedule",
            slot=slot,
            scheduled_at=slot,
            not_before=slot,
        )
        for name in ("j", "k")
    ]
    assert all(r["status"] == "queued" for r in runs)  # not decided yet
    ended = lambda run_id: (h.store.get_run(run_id) or {}).get("finished_at")
    wait_for(lambda: ended(runs[0]["id"]) and ended(runs[1]["id"]), 5)
    assert h.store.get_run(first["id"])["status"] == "succeeded"
    assert h.store.get_run(runs[0]["id"])["status"] == "succeeded"
    late = h.store.get_run(runs[1]["id"])
    if policy == "forbid":
        assert late["status"] == "skipped" and "concurrency forbid" in late["error"]
        h.runner.stop_run(busy["id"])
    else:
        assert late["status"] == "succeeded"
        assert h.store.get_run(busy["id"])["status"] == "cancelled"
    h.wait_idle()


# -- the OpenAPI document, checked by schemathesis -------------------------------

try:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
except ImportError:  # a test dependency; CI installs it
    schemathesis = None


@pytest.fixture
def api_schema(tmp_path_factory, monkeypatch):
    """The API of a fresh engine, in process, as schemathesis sees it.  Jobs
    it creates run ``/bin/true`` whatever their command says, and hooks are
    not delivered: generated input must not reach a shell."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    real_spawn = minisched.spawn_session

    def harmless(argv, env, *args, **kwargs):
        return real_spawn(["/bin/true"], env, *args[:3])

    monkeypatch.setattr(minisched, "spawn_session", harmless)
    for sender in ("_send_url", "_run_command", "_send_mail"):
        monkeypatch.setattr(minisched.Notifier, sender, lambda self, delivery: None)
    monkeypatch.chdir(tmp)
    engine = Engine(
        Config(db=str(tmp / "m.db"), timezone="UTC", max_concurrent=4)
    ).start()
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", make_app(engine))
    yield schema.exclude(path="/api/events")  # never ends: not a request/response
    engine.shutdown(2)


#: Examples per operation and generation mode: about a minute for all of them.
SCHEMATHESIS_EXAMPLES = 20


@pytest.mark.skipif(schemathesis is None, reason="pip install schemathesis")
def test_schemathesis_finds_no_5xx_and_every_answer_matches_its_schema(api_schema):
    """Every operation of /api/openapi.json, with valid and invalid input."""
    from schemathesis import GenerationMode

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures, operations = [], 0
    # Public routes without parameters or a body have no input to get wrong.
    nothing_to_negate = {
        (r.method, r.path)
        for r in API_ROUTES
        if r.role == "public" and not r.params and not r.body and "{" not in r.path
    }
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and (
                (operation.method.upper(), operation.path) in nothing_to_negate
            ):
                continue

            @settings(
                max_examples=SCHEMATHESIS_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(case=operation.as_strategy(mode))
            def check(case):
                case.call_and_validate(checks=checks)

            try:
                check()
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert operations >= len(API_ROUTES) - 2
    assert not failures, "\n\n".join(failures)


# -- the soak suite (two minutes; deselect with -k "not soak") -------------------


def test_soak_two_minutes():
    """bench/soak.py for two minutes: the real server under mixed load, killed
    and restarted; every invariant must hold.  README says how to run it for
    hours."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "bench", "soak.py"),
            "--minutes",
            "2",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    verdicts = result.stdout[result.stdout.find("== verdicts ==") :]
    assert result.returncode == 0, (verdicts or result.stdout[-4000:]) + result.stderr[
        -4000:
    ]
    assert "FAIL" not in verdicts


# -- from cron: import-crontab (issue 10) ----------------------------------------

USER_CRONTAB = r"""# crontab -l of an ordinary user, with every construct cron knows
SHELL=/bin/bash
PATH = /usr/local/bin:/usr/bin:/bin
MAILTO="ops@example.com"
GREETING='hello world'
*/15 * * * * /usr/local/bin/poll.sh --quiet
0 9-17 * * mon-fri cd /srv/app && ./report.sh > /dev/null 2>&1
30 2 1,15 * * backup --full
0 0 * jan,jul 7 rotate-logs
0 12 1 * 1 echo first-or-monday
0 0 */2 * 1 echo odd-day-monday
@reboot warm-cache
@yearly yearly-job
@annually annually-job
@monthly monthly-job
@weekly weekly-job
@daily daily-job
@midnight midnight-job
@hourly hourly-job
HOME=@HOME@
5 4 * * * cat > stdin.txt; pwd > cwd.txt; env > env.txt%line one%line two\% and more
CRON_TZ=America/New_York
30 2 * * * ny-job
SHELL=/bin/sh
0 * * * * echo $0 > shell.txt
# the lines that cannot be converted
61 * * * * bad-minute
0 0 31 2 * never-fires
* * * * only-four-fields
@often unknown-macro
0 5 * * *
"""

SYSTEM_CRONTAB = """# /etc/crontab: system-wide crontab
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin
17 *\t* * *\troot    cd / && run-parts --report /etc/cron.hourly
25 6\t* * *\troot\ttest -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.daily; }
47 6\t* * 7\troot\ttest -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.weekly; }
52 6\t1 * *\troot\ttest -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.monthly; }
*/5 * * * * nobody /usr/bin/true
@reboot root /usr/local/bin/at-boot
0 0 * * * nosuchuser /bin/true
0 0 * * * root
"""

_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
#: Names usable per field of a 5-field expression (the months and days
#: minisched accepts; the oracle's own logic stays independent).
_CRON_WORDS = (
    None,
    None,
    None,
    minisched._CRON_NAMES["month"],
    minisched._CRON_NAMES["day-of-week"],
)
_CRON_SPECIALS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _cron_set(text, index):
    """The values a cron field stands for, as Vixie cron reads it."""
    low, high = _CRON_RANGES[index]
    words = _CRON_WORDS[index]
    values = set()
    for part in text.lower().split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = low, high
        else:
            ends = [
                (words.index(v) + (1 if index == 3 else 0))
                if words and v in words
                else int(v)
                for v in base.split("-")
            ]
            first, last = ends[0], ends[-1]
            if step:
                last = last if "-" in base else high
        values.update(range(first, last + 1, int(step or 1)))
    if index == 4 and 7 in values:
        values.add(0)
    return values


def reference_cron(expr, after, tz, n):
    """The next ``n`` fire times of a 5-field cron expression strictly after
    ``after``, computed as Vixie/Debian cron does (day of month and day of
    week OR-ed only when neither field starts with ``*``), for a window with
    no daylight-saving change."""
    fields = _CRON_SPECIALS.get(expr, expr).split()
    minutes, hours, doms, months, dows = (_cron_set(f, i) for i, f in enumerate(fields))
    star = fields[2].startswith("*") or fields[4].startswith("*")
    day = datetime.datetime.fromtimestamp(after, tz).date()
    out = []
    while len(out) < n:
        dom_ok, dow_ok = day.day in doms, (day.isoweekday() % 7) in dows
        if day.month in months and (
            (dom_ok and dow_ok) if star else (dom_ok or dow_ok)
        ):
            for hour in sorted(hours):
                for minute in sorted(minutes):
                    moment = datetime.datetime(
                        day.year, day.month, day.day, hour, minute, tzinfo=tz
                    )
                    if moment.timestamp() > after and len(out) < n:
                        out.append(moment.timestamp())
        day += datetime.timedelta(days=1)
    return out


def converted(text, tmp_path, **kwargs):
    text = text.replace("@HOME@", str(tmp_path))
    return minisched.parse_crontab(text, **kwargs)


def test_a_user_crontab_keeps_cron_meaning(tmp_path):
    jobs, problems = converted(USER_CRONTAB, tmp_path)
    me = pwd.getpwuid(os.geteuid())
    by = {job["description"].split(": ", 1)[1]: job for job in jobs}
    assert len(jobs) == 17
    assert len({job["name"] for job in jobs}) == 17  # unique, valid
    poll = by["*/15 * * * * /usr/local/bin/poll.sh --quiet"]
    assert poll["name"] == "poll.sh"
    assert poll["command"] == ["/bin/bash", "-c", "/usr/local/bin/poll.sh --quiet"]
    assert poll["env"] == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": me.pw_dir,
        "LOGNAME": me.pw_name,
        "SHELL": "/bin/bash",
        "MAILTO": "ops@example.com",
        "GREETING": "hello world",
    }
    assert poll["cwd"] == me.pw_dir and "user" not in poll
    assert poll["concurrency"] == "allow" and poll["leftovers"] == "keep"
    assert (
        by["0 9-17 * * mon-fri cd /srv/app && ./report.sh > /dev/null 2>&1"]["name"]
        == "report.sh"
    )
    assert by["@reboot warm-cache"]["schedule"] == "@reboot"
    ny = by["30 2 * * * ny-job"]
    assert (
        ny["timezone"] == "America/New_York"
        and ny["env"]["CRON_TZ"] == "America/New_York"
    )
    sh = by["0 * * * * echo $0 > shell.txt"]
    assert sh["command"] == "echo $0 > shell.txt"  # SHELL=/bin/sh: the default
    # Every schedule fires as cron does (a window with no DST change).
    after = ts("2026-12-01T00:00:00+00:00")
    for line, job in by.items():
        if job["schedule"] == "@reboot":
            continue
        tz = zoneinfo.ZoneInfo(job["timezone"]) if job.get("timezone") else UTC
        ours = next_fire_times(job["schedule"], 6, tz, after)
        assert ours == reference_cron(job["schedule"], after, tz, 6), line
    assert [n for n, _ in problems] == [27, 28, 29, 30, 31]
    reasons = dict(problems)
    assert "minute field allows 0-59, got 61" in reasons[27]
    assert "can never fire" in reasons[28]
    assert "too few fields" in reasons[29]
    assert "unknown special string '@often'" in reasons[30]
    assert "too few fields" in reasons[31]


def test_a_converted_job_gets_what_cron_gives(harness, tmp_path):
    jobs, _problems = converted(USER_CRONTAB, tmp_path)
    [job] = [j for j in jobs if j["schedule"] == "5 4 * * *"]
    assert job["cwd"] == str(tmp_path)
    h = harness()
    h.sched.put_job(validate_job(job))
    run = h.sched.trigger(job["name"])
    h.wait_idle()
    assert h.store.get_run(run["id"])["status"] == "succeeded"
    assert (tmp_path / "stdin.txt").read_text() == "line one\nline two% and more"
    assert (tmp_path / "cwd.txt").read_text().strip() == str(tmp_path)
    env = dict(
        line.split("=", 1)
        for line in (tmp_path / "env.txt").read_text().splitlines()
        if "=" in line
    )
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["MAILTO"] == "ops@example.com" and env["HOME"] == str(tmp_path)
    assert env["SHELL"] == "/bin/bash"


def test_a_system_crontab_runs_each_line_as_its_user(tmp_path, capsys):
    path = tmp_path / "crontab"
    path.write_text(SYSTEM_CRONTAB)
    code, out, err = run_cli(capsys, "import-crontab", "--system", path)
    assert code == 1
    jobs = {job["name"]: job for job in json.loads(out)["jobs"]}
    assert sorted(jobs) == [
        "at-boot",
        "run-parts-cron.daily",
        "run-parts-cron.hourly",
        "run-parts-cron.monthly",
        "run-parts-cron.weekly",
        "true",
    ]
    daily = jobs["run-parts-cron.daily"]
    assert daily["user"] == "root" and daily["schedule"] == "25 6 * * *"
    assert daily["command"] == (
        "test -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.daily; }"
    )
    assert daily["env"]["PATH"].startswith("/usr/local/sbin:")
    assert jobs["true"]["user"] == "nobody"
    assert f"{path}:10: not converted: unknown user 'nosuchuser'" in err
    assert f"{path}:11: not converted:" in err
    assert run_cli(capsys, "validate", _written(tmp_path, out))[0] == 0
    # Stable from run to run: the same file gives the same names.
    assert run_cli(capsys, "import-crontab", "--system", path)[1] == out


def _written(tmp_path, text):
    path = tmp_path / "converted.json"
    path.write_text(text)
    return path


def test_import_crontab_applies_to_a_running_server(
    live, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    srv = live()
    path = tmp_path / "crontab"
    path.write_text("0 3 * * * /bin/true\n@daily /bin/date\n")
    code, out, err = run_cli(
        capsys, "import-crontab", "--apply", "--url", srv.url, path
    )
    assert code == 0, err
    assert out.splitlines()[0] == "created: 2 (true, date)"
    code, out, _err = run_cli(
        capsys, "import-crontab", "--apply", "--url", srv.url, path
    )
    assert "unchanged: 2" in out
    assert srv.ok("GET", "/api/jobs/true")["schedule"] == "0 3 * * *"


def test_cron_percent_rule():
    split = minisched.split_cron_command
    assert split("echo a") == ("echo a", None)
    assert split("mail root%Hi%there") == ("mail root", "Hi\nthere")
    assert split(r"date +\%F%") == ("date +%F", "")
    assert split(r"printf 'a\%b'%x\%y%z") == ("printf 'a%b'", "x%y\nz")


# -- running as a service (issue 10) ---------------------------------------------


@pytest.mark.skipif(
    not shutil.which("systemd-analyze"),
    reason="systemd-analyze missing (apt install systemd)",
)
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path, capsys):
    code, out, _err = run_cli(
        capsys,
        "systemd-unit",
        "--user",
        "root",
        "--jobs",
        "/etc/minisched/jobs.json",
        "--shutdown-grace",
        "60",
    )
    assert code == 0
    assert (
        f"ExecStart={sys.executable} {os.path.join(HERE, 'minisched.py')} serve " in out
    )
    assert (
        "--db /var/lib/minisched/minisched.db" in out
        and "StateDirectory=minisched" in out
    )
    assert "Restart=on-failure" in out and "KillMode=mixed" in out
    assert "TimeoutStopSec=75" in out  # above the 60 s grace
    assert "EnvironmentFile=-/etc/minisched/env" in out and "User=root" in out
    unit = tmp_path / "minisched.service"
    unit.write_text(out)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    code, _out, err = run_cli(capsys, "systemd-unit", "--token", "t0ps3cret")
    assert code == 2 and "EnvironmentFile" not in err and "/etc/minisched/env" in err
    assert run_cli(capsys, "systemd-unit", "--bogus-flag")[0] == 2


def run_cmd(*args, timeout=30, env=None):
    environ = dict(os.environ, **(env or {}))
    environ.pop("PYTHONUNBUFFERED", None)
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "minisched.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        check=False,
    )


def test_a_daemon_detaches_holds_its_pidfile_and_shuts_down(tmp_path):
    pidfile, logfile = tmp_path / "m.pid", tmp_path / "m.log"
    jobs = tmp_path / "jobs.json"
    jobs.write_text(
        json.dumps(
            [{"name": "tick", "command": "echo tick", "schedule": "* * * * * *"}]
        )
    )
    serve = ("serve", "--db", tmp_path / "m.db", "--port", "0", "--jobs", jobs)
    flags = (
        "--pidfile",
        pidfile,
        "--log-file",
        logfile,
        "--log-max-bytes",
        1024,
        "--log-backups",
        2,
    )
    started = run_cmd(*serve, "--daemon", *flags)
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    try:
        _check_daemon(tmp_path, pid, started, serve, flags)
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # never leave a daemon behind


def _check_daemon(tmp_path, pid, started, serve, flags):
    pidfile = tmp_path / "m.pid"
    assert started.stdout.strip() == f"minisched started in the background (pid {pid})"
    daemon = psutil.Process(pid)
    assert daemon.ppid() != os.getpid()  # detached: not our child
    assert os.getsid(pid) == pid or os.getsid(pid) != os.getsid(0)
    assert "minisched.py serve" in " ".join(daemon.cmdline())
    guard = [c for c in daemon.children() if c.cmdline()[:1] == ["minisched-guard"]]
    assert len(guard) == 1
    again = run_cmd(*serve, "--daemon", *flags)
    assert (
        again.returncode == 2
        and f"held by a running minisched (pid {pid})" in again.stderr
    )
    wait_for(lambda: (tmp_path / "m.log.1").exists(), 20)  # rotated at 1 KiB
    rotated = (tmp_path / "m.log.1").read_text()
    assert "INFO run " in rotated and len(rotated) <= 1024 + 200
    stopped = run_cmd("shutdown", "--pidfile", pidfile, "--timeout", 20)
    assert stopped.returncode == 0 and f"(pid {pid}) stopped" in stopped.stdout
    assert not pidfile.exists() and gone(pid)
    assert run_cmd("shutdown", "--pidfile", pidfile).returncode == 0  # not running


def test_shutdown_says_when_the_server_does_not_stop(tmp_path):
    pidfile = tmp_path / "m.pid"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, signal, sys, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                f"fd = os.open({str(pidfile)!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.write(fd, b'%d\\n' % os.getpid()); print('ready', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"ready\n"
        result = run_cmd("shutdown", "--pidfile", pidfile, "--timeout", 0.5)
        assert result.returncode == 1 and "still running after 0.5s" in result.stderr
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_ps_shows_the_server_and_the_guard_by_name(tmp_path):
    server = start_serve(tmp_path)
    try:
        wait_for(lambda: serve_port(server))
        process = psutil.Process(server.pid)
        args = [a for a in process.cmdline() if a]
        assert args[1:3] == [os.path.join(HERE, "minisched.py"), "serve"]
        guard = wait_for(
            lambda: [
                c for c in process.children() if c.cmdline()[:1] == ["minisched-guard"]
            ]
        )
        assert guard[0].memory_info().rss < 5 << 20  # a shell, not an interpreter
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.stdout.close()


def test_serve_refuses_an_invalid_jobs_file_with_nothing_stored(tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(
        json.dumps(
            [
                {"name": "a", "schedule": "@sometimes", "command": "true"},
                {"name": "b", "timeout": -1, "command": "true"},
            ]
        )
    )
    result = run_cmd("serve", "--db", tmp_path / "m.db", "--port", 0, "--jobs", jobs)
    assert result.returncode == 2
    assert "jobs[0].schedule:" in result.stderr and "jobs[1].timeout:" in result.stderr
    # With earlier definitions from that file stored, it starts with those.
    jobs.write_text(
        json.dumps([{"name": "a", "schedule": "@daily", "command": "true"}])
    )
    engine = Engine(
        Config(db=str(tmp_path / "m.db"), jobs=str(jobs), timezone="UTC")
    ).start()
    engine.shutdown(2)
    jobs.write_text("{not json")
    server = start_serve(tmp_path, "--jobs", str(jobs))
    try:
        port = wait_for(lambda: serve_port(server))
        status = api_call(port, "GET", "/api/status")[1]
        assert "invalid JSON" in status["jobs_file"]["error"]
        assert status["counts"]["jobs"] == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        assert any(
            "WARNING jobs file not loaded, its previous definitions keep running"
            in line
            for line in _SERVE_LINES[server.pid]
        )
    finally:
        server.kill()
        server.stdout.close()


def test_a_backup_taken_while_runs_are_written(tmp_path, capsys):
    db = tmp_path / "live.db"
    engine = Engine(Config(db=str(db), timezone="UTC")).start()
    try:
        engine.scheduler.put_job(
            validate_job(
                {
                    "name": "busy",
                    "command": "seq 1 2000",
                    "schedule": "* * * * * *",
                    "concurrency": "allow",
                }
            )
        )
        wait_for(lambda: engine.store.list_runs(limit=1)[1] >= 3)
        for n in range(3):
            code, out, err = run_cli(
                capsys, "backup", tmp_path / f"copy{n}.db", "--db", db
            )
            assert code == 0, err
            assert "integrity ok" in out
    finally:
        engine.shutdown(2)
    copy = tmp_path / "copy2.db"
    conn = sqlite3.connect(str(copy))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = conn.execute(
        "SELECT count(*) FROM runs WHERE status = 'succeeded'"
    ).fetchone()[0]
    conn.close()
    assert kept >= 1
    restored = Engine(Config(db=str(copy), timezone="UTC")).start()
    try:
        assert restored.scheduler.get_job("busy") is not None
        assert (
            restored.store.list_runs(job="busy", status="succeeded", limit=1)[1] >= kept
        )
    finally:
        restored.shutdown(2)
    assert (
        run_cli(capsys, "backup", tmp_path / "x.db", "--db", tmp_path / "none.db")[0]
        == 2
    )


# -- daily use from the shell (issue 10) -----------------------------------------


def test_runs_upcoming_list_and_logs_for_humans(live, capsys, monkeypatch):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    srv = live()
    url = ("--url", srv.url)
    srv.ok(
        "POST",
        "/api/jobs",
        {
            "name": "often",
            "command": "echo hi; exit 3",
            "schedule": "0 */6 * * *",
            "timezone": "Asia/Tokyo",
        },
        201,
    )
    srv.ok(
        "POST",
        "/api/jobs",
        {"name": "daily", "command": "true", "schedule": "@daily"},
        201,
    )
    run = srv.ok("POST", "/api/jobs/often/run", status=202)
    srv.wait_run(run["id"])
    code, out, _err = run_cli(capsys, "runs", *url)
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "ID",
        "JOB",
        "STATUS",
        "TRIGGER",
        "STARTED",
        "DURATION",
        "EXIT",
    ]
    assert row.split()[:4] == [str(run["id"]), "often", "failed", "manual"]
    assert row.split()[-1] == "3"
    code, out, _err = run_cli(capsys, "runs", "often", "--status", "succeeded", *url)
    assert out.splitlines()[1:] == []
    code, out, _err = run_cli(capsys, "list", *url)
    line = next(ln for ln in out.splitlines() if ln.startswith("often"))
    assert " JST (in " in line  # the next run in the job's own zone, and how soon
    code, out, _err = run_cli(capsys, "upcoming", "--hours", 24, *url)
    rows = out.splitlines()[1:]
    assert [r.split()[-1] for r in rows].count("often") == 4
    assert [r.split()[-1] for r in rows].count("daily") == 1
    upcoming = srv.ok("GET", "/api/upcoming?hours=24")
    times = [f["at"] for f in upcoming["fires"]]
    assert times == sorted(times) and len(times) == 5
    assert srv.request("GET", "/api/upcoming?hours=0")[0] == 400
    code, out, _err = run_cli(capsys, "logs", run["id"], "--json", *url)
    chunks = json.loads(out)["chunks"]
    assert chunks[0]["text"] == "hi\n" and chunks[0]["stream"] == "stdout"
    code, out, _err = run_cli(capsys, "show", "often", *url)
    assert re.search(
        r"^next run +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d JST \(in ", out, re.MULTILINE
    )
    assert re.search(r"^last run +#\d+ failed", out, re.MULTILINE)
    code, out, _err = run_cli(capsys, "status", *url)
    assert code == 0 and re.search(r"^jobs +2 \(0 paused\)", out, re.MULTILINE)


def test_a_busy_job_from_the_cli_says_force(live, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MINISCHED_TOKEN", raising=False)
    srv = live()
    srv.ok(
        "POST",
        "/api/jobs",
        {"name": "hang", "command": blocking_command(tmp_path), "kill_grace": 1},
        201,
    )
    run = srv.ok("POST", "/api/jobs/hang/run", status=202)
    srv.wait_running(run["id"])
    code, _out, err = run_cli(capsys, "trigger", "hang", "--url", srv.url)
    assert code == 1 and "--force" in err and "?force=1" not in err
    srv.ok("POST", "/api/jobs/hang/stop")


def test_ctrl_c_while_following_leaves_the_run_going(live, tmp_path):
    srv = live()
    srv.ok(
        "POST",
        "/api/jobs",
        {"name": "slow", "command": "echo started; sleep 30", "kill_grace": 1},
        201,
    )
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    # As from a terminal: a shell running the tests in the background makes
    # its children ignore SIGINT, so the follower restores Python's handler.
    restore = (
        "import runpy, signal, sys; "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    follower = subprocess.Popen(
        [
            sys.executable,
            "-c",
            restore,
            os.path.join(HERE, "minisched.py"),
            *("trigger", "slow", "--follow", "--url", srv.url),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert follower.stdout.readline() == b"started\n"
        follower.send_signal(signal.SIGINT)
        _out, err = follower.communicate(timeout=10)
        assert follower.returncode == 130
        assert b"Traceback" not in err
        assert err.decode().strip().startswith("stopped following run ")
        assert b"goes on" in err
    finally:
        follower.kill()
        follower.stdout.close()
        follower.stderr.close()
    [run] = srv.ok("GET", "/api/jobs/slow/runs")["runs"]
    assert run["status"] == "running"
    srv.ok("POST", "/api/jobs/slow/stop")


def test_next_says_what_a_schedule_does_in_words(capsys):
    code, out, err = run_cli(capsys, "next", "@reboot")
    assert code == 0 and out == "" and "fires once each time the server starts" in err
    code, out, err = run_cli(capsys, "next", "@at 2020-01-01T00:00:00Z")
    assert code == 0 and "will not fire: the time has passed" in err
    code, out, err = run_cli(capsys, "next", "@every 5m", "-n", 2)
    assert code == 0 and "every 5 minutes" in err
    assert all(
        re.fullmatch(r"\S+T\d\d:\d\d:\d\d[+-]\d\d:\d\d  \S+\.000Z", line)
        for line in out.splitlines()
    )
    code, _out, err = run_cli(capsys, "next", "0", "9", "*", "*", "1")
    assert code == 2 and "quote the expression" in err and "next '0 9 * * 1'" in err
    code, _out, err = run_cli(capsys, "next", "61 * * * *")
    assert code == 2 and "the minute field allows 0-59, got 61" in err
    code, _out, err = run_cli(capsys, "next", "0 0 31 2 *")
    assert code == 2 and "can never fire" in err
    code, _out, err = run_cli(capsys, "next", "* * * * * * *")
    assert code == 2 and "5 cron fields" in err


def test_messages_name_what_is_valid():
    with pytest.raises(InvalidError) as caught:
        validate_job({"name": "my job", "command": "true"})
    assert (
        "letters, digits" in caught.value.message and "'my job'" in caught.value.message
    )
    with pytest.raises(InvalidError) as caught:
        validate_job({"command": "true"})
    assert caught.value.message.startswith("name: required")
    with pytest.raises(InvalidError) as caught:
        validate_job({"name": "x", "command": "true", "schedule": "0 25 * * *"})
    assert "the hour field allows 0-23, got 25" in caught.value.message
    with pytest.raises(InvalidError) as caught:
        validate_job({"name": "x", "command": "true", "schedule": "0 0 * 13 *"})
    assert "the month field allows 1-12 or jan-dec, got 13" in caught.value.message


def test_validate_takes_what_add_takes(tmp_path, capsys):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"name": "solo", "command": "true"}))
    code, out, _err = run_cli(capsys, "validate", one)
    assert code == 0 and out.strip() == f"{one}: 1 job, valid"
    one.write_text(
        json.dumps({"name": "solo", "command": "true", "timeout": -1, "kind": "ftp"})
    )
    code, _out, err = run_cli(capsys, "validate", one)
    assert code == 1 and "timeout: must be" in err and "kind: must be one of" in err


def test_page_lists_upcoming_fires(browser, site):
    engine, url = site
    for name, schedule in (("quarter", "*/15 * * * *"), ("nightly", "@daily")):
        engine.scheduler.put_job(
            validate_job({"name": name, "command": "true", "schedule": schedule})
        )
    page, errors = open_page(browser, url + "#/upcoming")
    page.wait_for_selector("table.upcoming tbody tr td a")
    jobs = page.eval_on_selector_all(
        "table.upcoming tbody td a", "els => els.map(e => e.textContent)"
    )
    assert jobs.count("quarter") in (95, 96, 97) and jobs.count("nightly") == 1
    page.select_option("select[aria-label='How far ahead']", "6")
    wait_for(lambda: page.locator("table.upcoming tbody tr").count() < 30)

    shot(page, "upcoming")
    assert not errors


def test_the_readme_embedding_example_runs(tmp_path):
    """README's "Embedding" program, exactly as written, beside a copy of
    minisched.py."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split("<!-- embedding example -->", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(os.path.join(HERE, "minisched.py"), tmp_path / "minisched.py")
    (tmp_path / "app.py").write_text(code)
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "succeeded hello from minisched",
        "run hello queued",
        "@hourly",
        "my own page",
        "ok",
    ]
    expected = re.findall(r"print\(.*\)  # (.*)", code)
    assert expected == result.stdout.splitlines()  # the comments say what it prints


def test_every_command_and_serve_flag_is_in_the_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    parser = minisched._build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert f"minisched.py {name}" in readme, name
        if name == "serve":
            for action in sub._actions:
                for flag in action.option_strings:
                    if flag.startswith("--") and flag != "--help":
                        assert flag in readme, flag


# -- alerts people read, limits that hold (issue 11) ------------------------------


class Collector(http.server.ThreadingHTTPServer):
    """A loopback webhook receiver: records every POST; ``/fail/N...``
    answers 500 to the first N requests on that path, ``/slow`` takes 3 s."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _CollectorHandler)
        self.received = []
        self.failures = collections.Counter()
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self, path=None):
        return [b for p, _h, b in self.received if path is None or p == path]


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path
        if path.startswith("/slow"):
            time.sleep(3)
        match = re.match(r"/fail/(\d+)", path)
        if match and self.server.failures[path] < int(match.group(1)):
            self.server.failures[path] += 1
            self.send_response(500)
            self.end_headers()
            return
        self.server.received.append((path, dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    server = Collector()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(minisched, "RETRY_DELAYS", (0.05, 0.1, 0.2))


def hooks_of(engine, run_id):
    api = WsgiClient(make_app(engine), engine)
    return api.ok("GET", f"/api/runs/{run_id}")["hooks"]


def test_hook_deliveries_are_recorded_and_retried(
    engines, collector, quick_retries, tmp_path
):
    engine = engines()
    out = tmp_path / "hook-env"
    engine.add_job(
        {
            "name": "flaky",
            "command": "echo doing; echo it broke >&2; exit 3",
            "on_failure": [
                {"url": collector.url + "/fail/2", "headers": {"X-Token": "t0k"}},
                {"url": "http://127.0.0.1:9/nobody-listens"},
                {"command": f"env > {out}"},
            ],
        }
    )
    run = engine.wait(engine.trigger("flaky")["id"])
    assert run["status"] == "failed"  # hooks never change it
    hooks = wait_for(
        lambda: (
            (h := hooks_of(engine, run["id"]))
            and all(d["status"] != "pending" for d in h)
            and h
        )
    )
    by_target = {d["target"]: d for d in hooks}
    ok = by_target[collector.url + "/fail/2"]
    assert (ok["status"], ok["attempts"], ok["event"]) == ("ok", 3, "on_failure")
    dead = by_target["http://127.0.0.1:9/nobody-listens"]
    assert dead["status"] == "failed" and dead["attempts"] == 4 and dead["error"]
    command = by_target[f"env > {out}"]
    assert command["status"] == "ok" and command["attempts"] == 1
    env = dict(
        line.split("=", 1) for line in out.read_text().splitlines() if "=" in line
    )
    assert env["MINISCHED_JOB"] == "flaky" and env["MINISCHED_STATUS"] == "failed"
    assert env["MINISCHED_EXIT_CODE"] == "3" and float(env["MINISCHED_DURATION"]) >= 0
    assert env["MINISCHED_RUN_ID"] == str(run["id"])
    [(_path, headers, body)] = collector.received
    assert headers["X-Token"] == "t0k"
    assert (
        body["job"] == "flaky"
        and body["run_id"] == run["id"]
        and body["exit_code"] == 3
    )
    assert "it broke" in body["output_tail"] and body["host"] == socket.gethostname()
    assert (
        body["link"].endswith(f"/#/run/{run['id']}")
        and "flaky failed (exit 3)" in body["text"]
    )
    assert engine.store.get_run(run["id"])["status"] == "failed"
    metrics = WsgiClient(make_app(engine), engine).get("/metrics").text
    assert 'minisched_hook_deliveries_total{job="flaky",result="ok"} 2' in metrics
    assert 'minisched_hook_deliveries_total{job="flaky",result="failed"} 1' in metrics


def test_a_slow_receiver_delays_no_one_else(engines, collector):
    engine = engines()
    engine.add_job(
        {
            "name": "slow",
            "command": "true",
            "on_success": [{"url": collector.url + "/slow"}],
        }
    )
    engine.add_job(
        {
            "name": "fast",
            "command": "true",
            "on_success": [{"url": collector.url + "/fast"}],
        }
    )
    engine.wait(engine.trigger("slow")["id"])
    t0 = time.monotonic()
    run = engine.wait(engine.trigger("fast")["id"])
    wait_for(lambda: collector.bodies("/fast"), 5)
    assert time.monotonic() - t0 < 2  # not after the 3 s one
    assert run["status"] == "succeeded"


def test_a_command_hook_is_stopped_with_its_tree(engines, monkeypatch):
    monkeypatch.setattr(minisched, "HOOK_COMMAND_TIMEOUT", 0.5)
    engine = engines()
    engine.add_job(
        {
            "name": "j",
            "command": "true",
            "on_success": [{"command": "sleep 30 & sleep 31"}],
        }
    )
    run = engine.wait(engine.trigger("j")["id"])
    [hook] = wait_for(
        lambda: [d for d in hooks_of(engine, run["id"]) if d["status"] != "pending"], 15
    )
    assert hook["status"] == "failed" and "hook timeout of 0.5s" in hook["error"]
    leftover = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] in (["sleep", "30"], ["sleep", "31"])
    ]
    assert not leftover


def test_a_pending_delivery_survives_a_restart(tmp_path, collector, monkeypatch):
    monkeypatch.setattr(minisched, "RETRY_DELAYS", (2.0, 2.0, 2.0))
    db = str(tmp_path / "m.db")
    engine = Engine(Config(db=db, timezone="UTC")).start()
    engine.add_job(
        {
            "name": "j",
            "command": "true",
            "on_success": [{"url": collector.url + "/fail/1"}],
        }
    )
    run = engine.wait(engine.trigger("j")["id"])
    wait_for(lambda: collector.failures["/fail/1"] == 1)
    engine.shutdown(1)  # the retry was 2 s away
    assert collector.bodies() == []
    engine = Engine(Config(db=db, timezone="UTC")).start()
    try:
        wait_for(lambda: collector.bodies(), 10)
        [hook] = wait_for(
            lambda: [d for d in hooks_of(engine, run["id"]) if d["status"] == "ok"]
        )
        assert hook["attempts"] == 2
    finally:
        engine.shutdown(1)


def alert_notifier(tmp_path, collector, clock, **settings):
    store = SQLiteStore(str(tmp_path / "alerts.db")).open()
    config = Config(
        db=str(tmp_path / "alerts.db"),
        notify_url=[collector.url + "/alert"],
        timezone="UTC",
        **settings,
    )
    notifier = minisched.Notifier(store, config, clock=clock)
    notifier.start()
    return notifier, store


def fake_run(run_id, status="failed", exit_code=3):
    return {
        "id": run_id,
        "status": status,
        "exit_code": exit_code,
        "trigger": "schedule",
    }


def test_alerts_are_one_per_incident(tmp_path, collector):
    clock = FakeClock(ts("2026-12-02T14:00:00+00:00"))
    notifier, store = alert_notifier(tmp_path, collector, clock)
    job = minisched.Job(validate_job({"name": "etl", "command": "true"}), UTC)
    try:
        notifier.fire("on_failure", fake_run(1), job)
        wait_for(lambda: len(collector.bodies()) == 1)
        assert collector.bodies()[0]["text"].startswith(
            f"[minisched {socket.gethostname()}] etl failed (exit 3)"
        )
        for n in range(2, 12):  # failures within the hour: no message
            clock.t += 60
            notifier.fire("on_failure", fake_run(n), job)
        time.sleep(0.3)
        assert len(collector.bodies()) == 1
        clock.t = ts("2026-12-02T15:00:30+00:00")
        notifier.fire("on_failure", fake_run(12), job)
        wait_for(lambda: len(collector.bodies()) == 2)
        assert "etl failed 12 times since 14:00" in collector.bodies()[1]["text"]
        notifier.fire("on_success", fake_run(13, "succeeded", 0), job)
        wait_for(lambda: len(collector.bodies()) == 3)
        assert (
            "etl is back to normal (12 failures since 14:00)"
            in collector.bodies()[2]["text"]
        )
        notifier.fire("on_success", fake_run(14, "succeeded", 0), job)
        time.sleep(0.3)
        assert len(collector.bodies()) == 3  # no incident: nothing to say
        assert [b["event"] for b in collector.bodies()] == [
            "alert:failure",
            "alert:summary",
            "alert:recovered",
        ]
    finally:
        notifier.close()
        store.close()


def test_the_alert_cap_holds_and_says_what_it_held(tmp_path, collector):
    clock = FakeClock(ts("2026-12-02T14:00:00+00:00"))
    notifier, store = alert_notifier(tmp_path, collector, clock, alert_cap=2)
    jobs = [
        minisched.Job(validate_job({"name": n, "command": "true"}), UTC) for n in "abc"
    ]
    try:
        for i, job in enumerate(jobs):
            notifier.fire("on_failure", fake_run(i + 1), job)
        wait_for(lambda: len(collector.bodies()) == 2)
        time.sleep(0.3)
        assert len(collector.bodies()) == 2  # c's failure is held back
        clock.t += 3601
        notifier.fire("on_success", fake_run(9, "succeeded", 0), jobs[0])
        wait_for(lambda: len(collector.bodies()) == 3)
        assert "(1 held back by the cap)" in collector.bodies()[2]["text"]
    finally:
        notifier.close()
        store.close()


class SmtpSink(socketserver.ThreadingTCPServer):
    """A loopback SMTP receiver that refuses the first ``refuse`` connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refuse=0):
        super().__init__(("127.0.0.1", 0), _SmtpHandler)
        self.refuse = refuse
        self.messages = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _SmtpHandler(socketserver.StreamRequestHandler):
    def reply(self, text):
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self):
        if self.server.refuse > 0:
            self.server.refuse -= 1
            self.reply("421 busy, try again later")
            return
        self.reply("220 sink ready")
        envelope = {"to": []}
        while line := self.rfile.readline():
            command = line.decode("ascii", "replace").strip()
            verb = command.upper()
            if verb.startswith(("EHLO", "HELO")):
                self.reply("250 sink")
            elif verb.startswith("MAIL FROM:"):
                envelope["from"] = command[10:].strip(" <>")
                self.reply("250 ok")
            elif verb.startswith("RCPT TO:"):
                envelope["to"].append(command[8:].strip(" <>"))
                self.reply("250 ok")
            elif verb == "DATA":
                self.reply("354 go on")
                data = []
                while (part := self.rfile.readline()) not in (b".\r\n", b""):
                    data.append(part)
                envelope["message"] = email.message_from_bytes(b"".join(data))
                self.server.messages.append(envelope)
                envelope = {"to": []}
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


def test_mail_alerts_reach_a_real_smtp_receiver(engines, quick_retries):
    sink = SmtpSink(refuse=1)
    try:
        engine = engines(
            smtp_host="127.0.0.1",
            smtp_port=sink.server_address[1],
            smtp_from="minisched@example.com",
            notify_email=["ops@example.com"],
        )
        engine.add_job(
            {
                "name": "backup",
                "command": "echo step one; echo disk full >&2; exit 3",
                "notify_email": ["dba@example.com"],
            }
        )
        run = engine.wait(engine.trigger("backup")["id"])
        [mail] = wait_for(lambda: sink.messages, 10)
        message = mail["message"]
        assert sorted(mail["to"]) == ["dba@example.com", "ops@example.com"]
        assert (
            message["Subject"]
            == f"[minisched {socket.gethostname()}] backup failed (exit 3)"
        )
        assert message["From"] == "minisched@example.com"
        body = message.get_payload(decode=True).decode()
        assert f"run:      #{run['id']}" in body and "disk full" in body
        assert f"/#/run/{run['id']}" in body and "finished:" in body
        [alert] = wait_for(  # the sink has it before the delivery is recorded
            lambda: [
                d
                for d in hooks_of(engine, run["id"])
                if d["event"] == "alert:failure" and d["status"] != "pending"
            ]
        )
        assert alert["status"] == "ok" and alert["attempts"] == 2  # refused once
    finally:
        sink.shutdown()
        sink.server_close()


def test_a_late_run_is_missed_and_alerts(engines, collector, tmp_path):
    engine = engines(max_concurrent=1, notify_url=[collector.url + "/alert"])
    engine.add_job(
        {"name": "hog", "command": blocking_command(tmp_path), "kill_grace": 1}
    )
    engine.add_job({"name": "tight", "command": "true", "starting_deadline": 0.3})
    engine.trigger("hog")
    wait_for(lambda: engine.runner.counts()["running"] == 1)
    now = time.time()
    late = engine.runner.submit(
        engine.scheduler.get_job("tight"), "schedule", slot=now, scheduled_at=now
    )
    wait_for(lambda: collector.bodies("/alert"), 5)
    assert "tight missed" in collector.bodies("/alert")[0]["text"]
    assert engine.run(late["id"])["status"] == "missed"
    engine.stop("hog")


def test_late_means_sixty_seconds_without_a_deadline(harness):
    clock = FakeClock(ts("2026-12-02T13:59:00+00:00"))
    h = harness(clock=clock)
    h.sched.started_at = clock.t
    h.add(name="hourly", command="true", schedule="0 * * * *")
    h.add(name="other", command="true", schedule="0 * * * *", starting_deadline=120)
    clock.t = ts("2026-12-02T14:01:05+00:00")  # the 14:00 slot is handled 65 s late
    h.sched.tick()
    h.wait_idle()
    [missed] = h.runs("hourly")
    assert missed["status"] == "missed"
    assert missed["error"].endswith("it could not start within 60s of its time")
    assert [r["status"] for r in h.runs("other")] == ["succeeded"]  # its own deadline


def test_max_rss_and_max_cpu_stop_a_run(harness):
    h = harness()
    hog = f"{sys.executable} -c 'import time; b = bytearray(300 << 20); time.sleep(30)'"
    h.add(name="fat", command=hog, max_rss=100 << 20, kill_grace=1)
    h.add(name="busy", command="while :; do :; done", max_cpu=1.5, kill_grace=1)
    fat, busy = h.sched.trigger("fat"), h.sched.trigger("busy")
    h.wait_idle(20)
    row = h.store.get_run(fat["id"])
    assert row["status"] == "failed" and row["error"].startswith(
        "stopped: max_rss: its processes used "
    )
    assert "over the limit of 100.0 MiB" in row["error"]
    row = h.store.get_run(busy["id"])
    assert row["status"] == "failed" and "max_cpu" in row["error"], row["error"]
    assert row["duration"] < 10


def test_server_wide_default_limits(harness):
    h = harness()
    h.runner.default_cpu = 1.0
    h.add(name="spin", command="while :; do :; done", kill_grace=1)
    run = h.sched.trigger("spin")
    h.wait_idle(20)
    assert "max_cpu" in h.store.get_run(run["id"])["error"]


def insert_runs(store, job, rows):
    now = time.time()
    for i, (status, duration, age_days) in enumerate(rows):
        finished = now - age_days * 86400 - i
        store.insert_run(
            {
                "id": store.allocate_run_id(),
                "job": job,
                "status": status,
                "trigger": "schedule",
                "started_at": finished - (duration or 0),
                "finished_at": finished,
                "duration": duration,
                "cpu_time": 0.5,
                "peak_rss": 10 << 20,
            }
        )
    store.flush()


def test_job_stats(api):
    engine = api.engine
    api.ok("POST", "/api/jobs", {"name": "s", "command": "true"}, 201)
    runs = [("succeeded", d, 0) for d in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    runs += [
        ("failed", 1, 1),
        ("timed_out", 30, 1),
        ("failed", 1, 1),
        ("succeeded", 2, 1),
    ]
    runs += [
        ("skipped", None, 0),
        ("cancelled", 3, 0),
        ("succeeded", 100, 20),
    ]  # the last is old
    insert_runs(engine.store, "s", runs)
    stats = api.ok("GET", "/api/jobs/s/stats?days=7")
    assert stats["runs"] == 16
    assert stats["by_status"]["succeeded"] == 11 and stats["by_status"]["failed"] == 2
    assert stats["success_rate"] == round(11 / 14, 4)
    assert stats["duration"]["max"] == 30
    # From a histogram of 20 buckets a decade: to within 6 %.
    assert stats["duration"]["p50"] == pytest.approx(4, rel=0.06)
    assert stats["duration"]["p95"] == pytest.approx(10, rel=0.06)
    assert stats["longest_failure_streak"] == 3
    assert stats["mean_cpu"] == 0.5 and stats["peak_rss"] == 10 << 20
    assert ISO_MS.match(stats["last_success"]) and ISO_MS.match(stats["last_failure"])
    assert (
        len(stats["per_day"]) == 8
        and sum(d["succeeded"] for d in stats["per_day"]) == 11
    )
    api.get("/api/jobs/ghost/stats").error(404, "name")
    api.get("/api/jobs/s/stats?days=0").error(400, "days")
    everyone = api.ok("GET", "/api/stats")
    assert everyone["job"] is None and everyone["runs"] == 16 and "jobs" not in everyone
    by_job = api.ok("GET", "/api/stats?by_job=1")
    assert by_job["jobs"]["s"]["success_rate"] == round(11 / 14, 4)


def assert_promtool_accepts(text):
    check = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool missing (apt install prometheus)"
)
def test_metrics_pass_promtool(api):
    api.ok(
        "POST",
        "/api/jobs",
        {"name": "m", "command": "echo out", "on_success": [{"command": "true"}]},
        201,
    )
    api.wait_run(api.ok("POST", "/api/jobs/m/run", status=202)["id"])
    wait_for(
        lambda: (
            "minisched_hook_deliveries_total"
            in api.get("/metrics").text.split("# TYPE minisched_running")[0]
            and 'result="ok"' in api.get("/metrics").text
        )
    )
    text = api.get("/metrics").text
    for name in (
        'minisched_job_last_success_timestamp_seconds{job="m"}',
        'minisched_run_duration_seconds_bucket{job="m",le="+Inf"} 1',
        "minisched_schedule_lag_seconds_count",
        'minisched_output_bytes_total{job="m"} 4',
        "minisched_queued 0",
    ):
        assert name in text, name
    assert_promtool_accepts(text)


def cluster_with_a_job(url, definition):
    """A PostgreSQL database holding ``definition``, saved by a node named
    ``old-node`` (tags ``batch``) that then stopped: a node started next
    finds the job at its start."""
    engine = Engine(db=url, node_name="old-node", node_tag=["batch"]).start()
    try:
        engine.add_job(definition)
    finally:
        engine.shutdown(2)


def test_metrics_of_a_cluster_node_carry_its_name(engines, pg_url):
    cluster_with_a_job(pg_url, {"name": "m", "command": "echo out"})
    engine = engines(db=pg_url, node_name='n"1', node_timeout=5)
    api = WsgiClient(make_app(engine), engine)
    api.wait_run(api.ok("POST", "/api/jobs/m/run", status=202)["id"])
    text = wait_for(
        lambda: (
            (t := api.get("/metrics").text)
            and "minisched_output_bytes_total{" in t
            and t
        )
    )
    lines = text.splitlines()
    node = 'node="n\\"1"'
    for line in (
        f'minisched_runs_total{{job="m",status="succeeded",{node}}} 1',
        f'minisched_run_duration_seconds_bucket{{job="m",{node},le="+Inf"}} 1',
        f'minisched_run_duration_seconds_count{{job="m",{node}}} 1',
        f'minisched_output_bytes_total{{job="m",{node}}} 4',
        f"minisched_running{{{node}}} 0",
        f"minisched_queued{{{node}}} 0",
        'minisched_job_last_success_timestamp_seconds{job="m"}',  # the cluster's
    ):
        assert any(x == line or x.startswith(line + " ") for x in lines), line
    if shutil.which("promtool"):
        assert_promtool_accepts(text)


def test_busiest_processes_name_their_runs(api, tmp_path):
    api.ok(
        "POST",
        "/api/jobs",
        {"name": "sleepy", "command": blocking_command(tmp_path), "kill_grace": 1},
        201,
    )
    run = api.ok("POST", "/api/jobs/sleepy/run", status=202)
    api.wait_running(run["id"])
    data = api.ok("GET", "/api/system/processes?sort=mem&limit=200")
    assert data["sort"] == "mem" and data["total"] >= len(data["processes"]) > 0
    rss = [p["rss"] for p in data["processes"]]
    assert rss == sorted(rss, reverse=True)
    assert any(
        p["run"] == {"id": run["id"], "job": "sleepy"} for p in data["processes"]
    )
    api.get("/api/system/processes?sort=name").error(400, "sort")
    api.ok("POST", "/api/jobs/sleepy/stop")


def test_health_is_503_when_the_scheduler_lags(api):
    api.engine.scheduler.lag = 61
    sick = api.get("/api/health")
    assert sick.status == 503 and sick.json()["checks"]["scheduler_lag"] is False
    api.engine.scheduler.lag = 0
    assert api.get("/api/health").status == 200


def test_page_shows_stats_hooks_and_processes(browser, site, tmp_path):
    engine, url = site
    engine.add_job(
        {"name": "mixed", "command": "exit 0", "on_success": [{"command": "true"}]}
    )
    insert_runs(engine.store, "mixed", [("succeeded", 1, 0)] * 3 + [("failed", 2, 1)])
    run = engine.wait(engine.trigger("mixed")["id"])
    wait_for(
        lambda: [
            d
            for d in engine.store.deliveries_for([run["id"]]).get(run["id"], [])
            if d["status"] == "ok"
        ]
    )
    page, errors = open_page(browser, url)
    rate = page.wait_for_selector("tr[data-job=mixed] .rate")
    assert rate.inner_text().startswith("80% ok in 7 d (5 runs)")
    page.goto(url + "#/job/mixed")
    page.wait_for_selector(".success-rate")
    assert page.inner_text(".success-rate").startswith("80%")
    assert page.locator("svg.days rect").count() >= 2
    shot(page, "job-stats")
    page.goto(url + f"#/run/{run['id']}")
    page.wait_for_selector("ul.hooks li.hook-ok")
    assert "on_success" in page.inner_text("ul.hooks")
    engine.add_job(
        {"name": "sleepy", "command": blocking_command(tmp_path), "kill_grace": 1}
    )
    sleepy = engine.trigger("sleepy")
    wait_for(lambda: engine.run(sleepy["id"])["status"] == "running")
    page.goto(url + "#/system")
    page.select_option("select[aria-label='Sort processes by']", "mem")
    page.wait_for_selector("table.processes tbody tr")
    shot(page, "system")
    engine.stop("sleepy")
    assert not errors


def test_stats_outlive_keep_runs_and_are_built_for_old_databases(harness, tmp_path):
    h = harness()
    h.add(name="k", command="true", keep_runs=2)
    for _ in range(5):
        h.sched.trigger("k")
        h.wait_idle()
    assert len(h.runs("k")) == 2  # the history is pruned...
    assert h.store.stats(time.time() - 86400, "k")["runs"] == 5  # ...the account is not
    db = tmp_path / "old.db"
    store = SQLiteStore(str(db)).open()
    insert_runs(store, "o", [("succeeded", 1, 0), ("failed", 2, 0)])
    store.close()
    conn = sqlite3.connect(str(db))
    conn.execute("DELETE FROM run_days")  # as a database written before run_days
    conn.commit()
    conn.close()
    store = SQLiteStore(str(db)).open()
    try:
        stats = store.stats(time.time() - 86400, "o")
        assert stats["runs"] == 2 and stats["by_status"]["failed"] == 1
    finally:
        store.close()


# -- several hosts on one PostgreSQL (issue 13) ----------------------------------


def http_json(port, method, path, body=None, timeout=10):
    """``(status, decoded JSON)`` of one request to a live server on loopback."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


class Node:
    """One ``serve`` of a cluster as a real process, its log in a file (a
    pipe nobody reads would fill up and block it)."""

    def __init__(self, tmp_path, url, name, *args, timeout=4):
        self.name = name
        self.log = tmp_path / f"{name}.log"
        env = dict(os.environ)
        env.pop("PYTHONUNBUFFERED", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, os.path.join(HERE, "minisched.py"), "serve",
                    "--db", url, "--port", "0", "--node-name", name,
                    "--node-timeout", str(timeout), "--shutdown-grace", "5", *args,
                ],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
            )  # fmt: skip
        self.port = wait_for(self._port, 30)

    def _port(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited:\n{self.output()}")
        ports = re.findall(r"listening on http://[^:]+:(\d+)/", self.output())
        return int(ports[-1]) if ports else None

    def output(self):
        return self.log.read_text(errors="replace")

    def get(self, path):
        status, body = http_json(self.port, "GET", path)
        assert status == 200, (path, status, body)
        return body

    def post(self, path, body=None, expect=(200, 202)):
        status, answer = http_json(self.port, "POST", path, body)
        assert status in expect, (path, status, answer)
        return answer

    def run(self, run_id):
        return self.get(f"/api/runs/{run_id}")

    def alive_nodes(self):
        return sorted(n["name"] for n in self.get("/api/nodes")["nodes"] if n["alive"])

    def stop(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def tree_pids(node, run):
    """The pids of a running run's process tree (found by its marker)."""
    return minisched.find_marked_pids({str(run["id"])})


def pg_rows(url, sql, *args):
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        cursor = conn.execute(sql, args)
        return cursor.fetchall() if cursor.description else None


def test_pg_missing_driver_is_one_line_naming_both_installs(tmp_path):
    (tmp_path / "psycopg.py").write_text("raise ImportError('no psycopg here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for argv in (
        ["serve", "--db", "postgresql://nobody@127.0.0.1:1/none", "--port", "0"],
        ["copy-db", "postgresql://nobody@127.0.0.1:1/none", str(tmp_path / "c.db")],
    ):
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, "minisched.py"), *argv],
            capture_output=True, text=True, env=env, timeout=60, cwd=str(tmp_path),
            check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert 'pip install "psycopg[binary]"' in lines[0]
        assert "apt install python3-psycopg" in lines[0]


def test_pg_newer_schema_is_refused_and_left_untouched(pg_url):
    store = minisched.PostgresStore(pg_url).open()
    store.close()
    pg_rows(pg_url, "UPDATE settings SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(minisched.DatabaseError, match="schema version 999"):
        minisched.PostgresStore(pg_url).open()
    rows = pg_rows(pg_url, "SELECT value FROM settings WHERE key = 'schema_version'")
    assert rows == [{"value": "999"}]


def test_pg_a_run_begun_by_a_node_that_died_is_lost_never_run_again(pg_url):
    """A run is recorded started before its process exists: a node killed
    right after the spawn leaves it ``running`` (so ``lost``), and only a run
    it never began is claimed again.  A node declared dead may begin none."""
    a, b = (minisched.PostgresStore(pg_url).open() for _ in range(2))
    try:
        a.register("A", [], None)
        b.register("B", [], None)
        a.save_job("j", {"definition": {"name": "j"}, "created_at": 1, "updated_at": 1})
        begun, waiting, late = (new_run(a, job="j", slot=float(i)) for i in (1, 2, 3))
        for row in (begun, waiting, late):
            assert a.insert_run(row).result() is True
        assert a.begin_starts([begun["id"]], time.time()) == set()
        time.sleep(0.3)  # A's heartbeat is older than the timeout below
        dead, lost, unstarted = b.reap(0.2, time.time()).result()
        assert [d["name"] for d in dead] == ["A"]
        assert [r["id"] for r in lost] == [begun["id"]]
        assert b.get_run(begun["id"])["status"] == "lost"
        assert sorted(r["id"] for r in unstarted) == [waiting["id"], late["id"]]
        # A wakes: fenced, it may begin nothing and record no start.
        assert a.begin_starts([late["id"]], time.time()) == {late["id"]}
        refused = a.mark_started([(1.0, 99, 1.0, begun["id"], "j")]).result()
        assert refused == [begun["id"]]
        assert b.get_run(begun["id"])["status"] == "lost"
    finally:
        a.close()
        b.close()


def test_pg_a_node_frozen_inside_a_transaction_does_not_block_the_others(pg_url):
    """A node stopped (SIGSTOP, a VM pause) in the middle of its writer's
    transaction holds its row locks; the server ends that session after
    ``PG_STALLED_AFTER`` so the live node declares it dead anyway."""
    a, b = (minisched.PostgresStore(pg_url).open() for _ in range(2))
    frozen = a._connect()  # as the writer's: a heartbeat, then nothing
    try:
        a.register("A", [], None)
        b.register("B", [], None)
        frozen.execute("BEGIN")
        frozen.execute("UPDATE nodes SET running = 1 WHERE id = ?", (a.node_id,))
        time.sleep(0.3)
        started = time.monotonic()
        dead, _lost, _unstarted = b.reap(0.2, time.time()).result(timeout=30)
        waited = time.monotonic() - started
        assert [d["name"] for d in dead] == ["A"]
        assert (
            minisched.PG_STALLED_AFTER - 0.5 < waited < minisched.PG_STALLED_AFTER + 5
        )
        assert not _pg_alive(frozen)  # ended by the server, its locks let go
    finally:
        with contextlib.suppress(Exception):
            frozen.close()
        a.close()
        b.close()


def _pg_alive(conn) -> bool:
    try:
        conn.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - the server ended the session
        return False
    return True


def test_copy_db_sqlite_to_postgresql_and_back(tmp_path, pg_url):
    source = str(tmp_path / "one.db")
    engine = Engine(db=source, timezone="UTC").start()
    try:
        engine.add_job({"name": "say", "command": "echo hello; echo oops >&2"})
        engine.add_job({"name": "rest", "command": "true", "schedule": "@hourly"})
        engine.pause("rest")
        for _ in range(3):
            engine.wait(engine.trigger("say")["id"])
    finally:
        engine.shutdown()
    conn = sqlite3.connect(source)
    conn.execute("UPDATE runs SET status = 'running' WHERE id = 1")  # left active
    conn.commit()
    conn.close()

    def copy(src, dst):
        return subprocess.run(
            [sys.executable, os.path.join(HERE, "minisched.py"), "copy-db", src, dst],
            capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
            check=False,
        )  # fmt: skip

    done = copy(source, pg_url)
    assert done.returncode == 0, done.stderr
    assert "runs: 3 rows" in done.stdout and "jobs: 2 rows" in done.stdout
    again = copy(source, pg_url)  # the target is not empty any more
    assert again.returncode == 2 and "already holds 2 jobs" in again.stderr
    back = str(tmp_path / "back.db")
    done = copy(pg_url, back)
    assert done.returncode == 0, done.stderr

    for db in (pg_url, back):
        engine = Engine(db=db, timezone="UTC", node_name="copy").start()
        try:
            assert {j["name"] for j in engine.jobs()} == {"say", "rest"}
            assert engine.scheduler.state("rest")["paused"]
            runs = engine.runs(job="say")
            assert sorted(r["status"] for r in runs) == [
                "lost",
                "succeeded",
                "succeeded",
            ]
            log = engine.store.get_chunks(runs[0]["id"])
            assert sorted(
                c["text"].strip() for c in log if c["stream"] != "system"
            ) == [
                "hello",
                "oops",
            ]
            assert engine.store.stats(time.time() - 86400, "say")["runs"] == 3
            # New runs do not reuse the copied ids.
            new = engine.wait(engine.trigger("say")["id"])
            assert new["id"] > max(r["id"] for r in runs)
        finally:
            engine.shutdown()


CLUSTER_JOBS = [
    *({"name": f"tick{i}", "command": "true", "schedule": "* * * * * *"} for i in (1, 2, 3)),
    {"name": "each", "command": "true", "schedule": "* * * * * *", "placement": "all"},
    {"name": "nomatch", "command": "true", "schedule": "*/5 * * * * *", "nodes": ["nowhere"]},
    {"name": "sleeper", "command": "sleep 300 & sleep 301", "kill_grace": 1},
    {"name": "talker", "command": "for i in $(seq 20); do echo line $i; sleep 0.1; done"},
]  # fmt: skip


def _running(node, name):
    """Trigger ``name`` on ``node`` and wait until its whole tree is up."""
    run = node.post(f"/api/jobs/{name}/run")
    wait_for(lambda: node.run(run["id"])["status"] == "running", 15)
    return run, wait_for(
        lambda: len(tree_pids(node, run)) >= 3 and tree_pids(node, run), 15
    )


def _health(node):
    with contextlib.suppress(OSError):
        return http_json(node.port, "GET", "/api/health", timeout=5)[0]
    return None


def _jobs_doc(path, *jobs):
    path.write_text(json.dumps({"jobs": list(jobs)}))


def _file_state(node):
    return node.get("/api/status")["jobs_file"]


def test_cluster_jobs_files_converge_and_a_differing_one_is_reported(tmp_path, pg_url):
    """Nodes loading the same file write nothing; a node whose file differs
    is told so and the first owner's definition stays, until that owner is
    dead: then the differing node takes the job over."""
    same = {"name": "same", "command": "echo same", "schedule": "@hourly"}
    x_a = {"name": "x", "command": "echo from A", "schedule": "@hourly"}
    x_b = dict(x_a, command="echo from B")
    only_b = {"name": "only-b", "command": "echo b", "schedule": "@daily"}
    file_a, file_b, file_c = (tmp_path / f"{n}.json" for n in "abc")
    _jobs_doc(file_a, same, x_a)
    _jobs_doc(file_b, same, x_b, only_b)
    _jobs_doc(file_c, same, x_a)
    nodes = []
    try:
        a = Node(tmp_path, pg_url, "A", "--jobs", str(file_a))
        nodes.append(a)
        assert _file_state(a)["conflicts"] == []
        b = Node(tmp_path, pg_url, "B", "--jobs", str(file_b))
        c = Node(tmp_path, pg_url, "C", "--jobs", str(file_c))
        nodes += [b, c]

        def owners():
            rows = pg_rows(pg_url, "SELECT name, file_owner, updated_at FROM jobs")
            return {r["name"]: (r["file_owner"], r["updated_at"]) for r in rows}

        # B's x differs: reported on B, A's definition kept on every node.
        wait_for(lambda: _file_state(b)["conflicts"], 10)
        assert _file_state(b)["conflicts"] == [
            {
                "job": "x",
                "owner": "A",
                "problem": "defined differently in this node's file",
            }
        ]
        for node in (a, b, c):
            assert node.get("/api/jobs/x")["command"] == "echo from A"
        # B's job of its own is B's; A's and C's files lack it: said on both.
        missing = [
            {"job": "only-b", "owner": "B", "problem": "not in this node's file"}
        ]
        wait_for(lambda: _file_state(a)["conflicts"] == missing, 10)
        wait_for(lambda: _file_state(c)["conflicts"] == missing, 10)
        assert b.get("/api/jobs/only-b")["command"] == "echo b"
        assert "node A loaded it first and keeps it" in b.output()
        # Converged: nobody rewrites a job for three polls.
        before = owners()
        assert before["same"][0] == "A" and before["x"][0] == "A"
        assert before["only-b"][0] == "B"
        time.sleep(3 * minisched.JOBS_FILE_POLL + 1)
        assert owners() == before

        # B's file agrees about x now: its conflict ends, nothing is written.
        _jobs_doc(file_b, same, x_a, only_b)
        wait_for(lambda: _file_state(b)["conflicts"] == [], 10)
        assert owners()["x"] == before["x"]
        # The owner changes x in its file: every node runs the new definition,
        # and C, whose file still has the old one, is told.
        x_a2 = dict(x_a, command="echo from A again")
        _jobs_doc(file_a, same, x_a2)
        for node in (a, b, c):
            wait_for(
                lambda n=node: n.get("/api/jobs/x")["command"] == x_a2["command"], 10
            )
        wait_for(
            lambda: (
                sorted(i["job"] for i in _file_state(c)["conflicts"]) == ["only-b", "x"]
            ),
            10,
        )

        # A leaves: B, whose file now differs about x, takes it over.
        _jobs_doc(file_b, same, x_b, only_b)
        wait_for(lambda: _file_state(b)["conflicts"], 10)
        assert a.stop() == 0
        nodes.remove(a)
        wait_for(lambda: owners()["x"][0] in ("B", "C"), 20)
        # B and C both differ from A's last definition; the first to see A
        # dead owns x now, and the other reports it.
        owner = owners()["x"][0]
        winner, other = (b, c) if owner == "B" else (c, b)
        expected = (x_b if owner == "B" else x_a)["command"]
        for node in (b, c):
            wait_for(lambda n=node: n.get("/api/jobs/x")["command"] == expected, 10)
        assert not [i for i in _file_state(winner)["conflicts"] if i["job"] == "x"]
        wait_for(
            lambda: (
                [i["owner"] for i in _file_state(other)["conflicts"] if i["job"] == "x"]
                == [owner]
            ),
            10,
        )
        assert "Traceback" not in b.output() + c.output()
    finally:
        for node in nodes:
            node.stop()


def test_cluster_three_nodes_kill_freeze_stop_follow_and_a_database_restart(
    tmp_path, pg_cluster, pg_url
):
    """Three real nodes on one PostgreSQL, every-second jobs throughout: one
    node SIGKILLed mid-run, one SIGSTOPped past its lease, a stop and a live
    log across nodes, PostgreSQL restarted under them.  Then the history must
    show every slot once, accounted for, and nothing run by a fenced node."""
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps(CLUSTER_JOBS))
    nodes = {}
    try:
        for name in ("A", "B", "C"):
            nodes[name] = Node(
                tmp_path, pg_url, name, "--jobs", str(jobs), "--node-tag", "t"
            )
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        wait_for(lambda: all(n.alive_nodes() == ["A", "B", "C"] for n in (a, b, c)), 20)
        time.sleep(1.5)  # every node's placement has seen all three
        all_three = (math.ceil(time.time()), None)
        time.sleep(12)
        all_three = (all_three[0], math.floor(time.time()) - 1)

        # SIGKILL A in the middle of a run: a live node marks it lost.
        run_a, pids_a = _running(a, "sleeper")
        a.proc.kill()
        killed = time.monotonic()
        wait_for(lambda: b.run(run_a["id"])["status"] == "lost", 30)
        failover = time.monotonic() - killed
        wait_for(lambda: all(gone(p) for p in pids_a), 10)
        assert b.alive_nodes() == ["B", "C"]

        # SIGSTOP B past its lease: C takes over; B wakes fenced.
        old_b = next(n["id"] for n in c.get("/api/nodes")["nodes"] if n["name"] == "B")
        run_b, pids_b = _running(b, "sleeper")
        frozen = time.time()
        os.kill(b.proc.pid, signal.SIGSTOP)
        wait_for(lambda: c.run(run_b["id"])["status"] == "lost", 30)
        assert c.alive_nodes() == ["C"]
        time.sleep(2)  # B's scheduler has slots due when it wakes
        os.kill(b.proc.pid, signal.SIGCONT)
        wait_for(lambda: all(gone(p) for p in pids_b), 15)
        wait_for(lambda: "declared dead by the cluster" in b.output(), 10)
        wait_for(lambda: c.alive_nodes() == ["B", "C"], 20)

        # A stop through B reaches the run on C at once.
        run_c, pids_c = _running(c, "sleeper")
        asked = time.monotonic()
        b.post(f"/api/runs/{run_c['id']}/stop")
        wait_for(lambda: all(gone(p) for p in pids_c), 5, interval=0.005)
        stop_delay = time.monotonic() - asked
        wait_for(lambda: b.run(run_c["id"])["status"] == "cancelled", 10)

        # B follows the live output of a run on C.
        talk = c.post("/api/jobs/talker/run")
        stream = SseClient(b.port, f"/api/runs/{talk['id']}/stream", timeout=30)
        try:
            events = stream.until(lambda e: e.event == "end")
        finally:
            stream.close()
        lines = [e.data["text"] for e in events if e.event == "log"]
        assert (
            "".join(lines).split()
            == " ".join(f"line {i}" for i in range(1, 21)).split()
        )
        assert events[-1].data["status"] == "succeeded"

        # PostgreSQL restarted under the nodes.
        outage = [time.time(), None]
        pg_cluster.stop("fast")
        wait_for(lambda: _health(b) == 503 and _health(c) == 503, 20)
        time.sleep(2)
        pg_cluster.start()
        outage[1] = time.time()
        wait_for(lambda: _health(b) == 200 and _health(c) == 200, 60, interval=0.2)
        time.sleep(6)
        end = math.floor(time.time()) - 3
        for node in (b, c):
            assert node.stop() == 0, node.output()
    finally:
        for node in nodes.values():
            node.stop()
    print(f"failover {failover:.1f}s, cross-node stop {stop_delay * 1000:.0f} ms")

    runs = pg_rows(pg_url, "SELECT * FROM runs ORDER BY id")
    by_slot = collections.defaultdict(list)
    for row in runs:
        if row["slot"] is not None:
            by_slot[row["job"], int(row["slot"])].append(row)
    # Every slot of the every-second jobs is accounted for, once, with a
    # reason where it did not run -- through the kill, the freeze and the
    # database restart.
    for name in ("tick1", "tick2", "tick3"):
        for slot in range(all_three[0], end):
            rows = by_slot.get((name, slot))
            assert rows and len(rows) == 1, (name, slot, rows)
            if rows[0]["status"] in ("skipped", "missed"):
                assert rows[0]["error"], rows[0]
    # The load is spread while all three are alive.
    share = collections.Counter(
        rows[0]["node"]
        for (name, slot), rows in by_slot.items()
        if name.startswith("tick") and all_three[0] <= slot <= all_three[1]
    )
    assert set(share) == {"A", "B", "C"}, share
    # placement: all -- one run per live node per slot.
    for slot in range(all_three[0], all_three[1] + 1):
        assert sorted(r["node"] for r in by_slot[("each", slot)]) == ["A", "B", "C"]
    # A slot no live node matches is missed, saying so.
    nomatch = [r for r in runs if r["job"] == "nomatch"]
    assert len(nomatch) >= 4
    assert all(
        r["status"] == "missed" and "no live node matches" in r["error"]
        for r in nomatch
    )
    # The fenced registration of B started nothing after it froze.
    late = [
        r
        for r in runs
        if r["node_id"] == old_b and r["started_at"] and r["started_at"] > frozen
    ]
    assert late == [], late
    lost = {r["id"]: r for r in runs if r["status"] == "lost"}
    assert run_a["id"] in lost and run_b["id"] in lost
    # No process of any run survives.
    assert minisched.find_marked_pids({str(r["id"]) for r in runs}) == []


# -- several people: tokens, roles, sessions, audit (issue 14) -------------------

#: The least role of every route.  A route added without a row here fails
#: the first assertion of the test below: decide its role, then add it.
ROUTE_ROLES = {
    ("GET", "/api/health"): "public",
    ("GET", "/api/meta"): "public",
    ("POST", "/api/login"): "public",
    ("POST", "/api/logout"): "public",
    ("GET", "/api/nodes"): "viewer",
    ("GET", "/api/status"): "viewer",
    ("GET", "/api/jobs"): "viewer",
    ("GET", "/api/jobs/{name}"): "viewer",
    ("GET", "/api/jobs/{name}/runs"): "viewer",
    ("GET", "/api/runs"): "viewer",
    ("GET", "/api/runs/{id}"): "viewer",
    ("GET", "/api/runs/{id}/log"): "viewer",
    ("GET", "/api/runs/{id}/stream"): "viewer",
    ("GET", "/api/events"): "viewer",
    ("POST", "/api/validate"): "viewer",
    ("GET", "/api/cron/next"): "viewer",
    ("GET", "/api/export"): "viewer",
    ("GET", "/api/jobs/{name}/stats"): "viewer",
    ("GET", "/api/stats"): "viewer",
    ("GET", "/api/upcoming"): "viewer",
    ("GET", "/api/system"): "viewer",
    ("GET", "/api/system/processes"): "viewer",
    ("GET", "/api/me"): "viewer",
    ("GET", "/api/openapi.json"): "viewer",
    ("GET", "/api/docs"): "viewer",
    ("GET", "/metrics"): "viewer",
    ("POST", "/api/jobs/{name}/run"): "operator",
    ("POST", "/api/jobs/{name}/stop"): "operator",
    ("POST", "/api/jobs/{name}/pause"): "operator",
    ("POST", "/api/jobs/{name}/resume"): "operator",
    ("POST", "/api/runs/{id}/stop"): "operator",
    ("POST", "/api/batch"): "operator",
    ("POST", "/api/jobs"): "admin",
    ("PUT", "/api/jobs/{name}"): "admin",
    ("PATCH", "/api/jobs/{name}"): "admin",
    ("DELETE", "/api/jobs/{name}"): "admin",
    ("POST", "/api/import"): "admin",
    ("GET", "/api/tokens"): "admin",
    ("POST", "/api/tokens"): "admin",
    ("PATCH", "/api/tokens/{name}"): "admin",
    ("DELETE", "/api/tokens/{name}"): "admin",
    ("GET", "/api/audit"): "admin",
    ("GET", "/api/settings"): "admin",
}
#: Harmless bodies: each allowed request fails validation or finds nothing.
_ROLE_BODIES = {
    "/api/batch": {"action": "run", "jobs": []},
    "/api/import": {"jobs": []},
    "/api/validate": {"name": "x", "command": "true"},
}


def _bearer(secret):
    return {"Authorization": "Bearer " + secret}


def _role_client(engines, **settings):
    """An app with a bootstrap token and one named token per role."""
    engine = engines(token=TOKEN, **settings)
    client = WsgiClient(make_app(engine), engine, Authorization="Bearer " + TOKEN)
    secrets = {"bootstrap": TOKEN}
    for role in minisched.ROLES:
        secrets[role], _row = engine.access.add(
            {"name": f"{role}-1", "role": role}, by="test"
        )
    return client, secrets


def test_every_route_answers_every_role_as_its_role_says(engines):
    assert {(r.method, r.path) for r in API_ROUTES} == set(ROUTE_ROLES), (
        "a route without a role in ROUTE_ROLES"
    )
    for route in API_ROUTES:
        assert route.role == ROUTE_ROLES[(route.method, route.path)], route.path
    client, secrets = _role_client(engines)
    as_who = [("nobody", None), *((r, secrets[r]) for r in minisched.ROLES)]
    for route in API_ROUTES:
        path = fill_path(route.path)
        body = _ROLE_BODIES.get(route.path, {} if route.method != "GET" else _NO_BODY)
        streams = route.path in ("/api/events",)
        for role, secret in as_who:
            headers = _bearer(secret) if secret else {"Authorization": None}
            if role == "nobody":
                allowed = route.role == "public"
            else:
                allowed = route.role == "public" or minisched.role_allows(
                    role, route.role
                )
            if allowed and streams:
                continue  # an open stream never ends; its refusals are checked
            answer = client(route.method, path, body, headers=headers)
            where = (route.method, route.path, role)
            if allowed:
                assert answer.status not in (403,), (where, answer.body[:300])
                if route.path != "/api/login":
                    assert answer.status != 401, (where, answer.body[:300])
            elif role == "nobody":
                answer.error(401)
                assert "wrong token" in answer.json()["error"]
            else:
                error = answer.error(403, "role")
                assert f"needs the {route.role} role" in error["error"], where
                assert f"has the {role} role" in error["error"], where
    # The batch's delete is an admin's, whoever may batch.
    error = client(
        "POST",
        "/api/batch",
        {"action": "delete", "jobs": ["x"]},
        headers=_bearer(secrets["operator"]),
    ).error(403, "role")
    assert "needs the admin role" in error["error"]
    # The bootstrap token is an admin.
    assert client.ok("GET", "/api/me", headers=_bearer(TOKEN)) == {
        "name": "bootstrap",
        "role": "admin",
        "token_required": True,
    }


def test_viewers_and_operators_never_see_env_values(engines):
    client, secrets = _role_client(engines)
    job = {"name": "db-dump", "command": "true", "env": {"PGPASSWORD": "hunter2"}}
    client.ok("POST", "/api/jobs", job, status=201, headers=_bearer(TOKEN))
    for role in ("viewer", "operator"):
        headers = _bearer(secrets[role])
        for path in ("/api/jobs/db-dump", "/api/jobs", "/api/export"):
            text = client.get(path, headers=headers).body.decode()
            assert "hunter2" not in text and '"PGPASSWORD": "***"' in text, path
    shown = client.ok("GET", "/api/jobs/db-dump", headers=_bearer(secrets["admin"]))
    assert shown["env"] == {"PGPASSWORD": "hunter2"}
    exported = client.ok("GET", "/api/export", headers=_bearer(TOKEN))
    assert exported["jobs"][0]["env"] == {"PGPASSWORD": "hunter2"}


def test_token_commands_against_the_database_while_a_server_runs(
    tmp_path, capsys, engines
):
    db = str(tmp_path / "t.db")
    engine = engines(db=db)
    client = WsgiClient(make_app(engine), engine)
    assert client.ok("GET", "/api/me")["name"] == "anonymous"  # no token yet
    code, out, err = run_cli(
        capsys,
        "token",
        "add",
        "ops",
        "--role",
        "operator",
        "--expires",
        "90d",
        "--db",
        db,
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("msk_") and len(secret) > 40
    assert "shown only now" in err and secret not in err
    with open(db, "rb") as f:
        assert secret.encode() not in f.read()  # a hash only
    # The running server needs a token from now on (within a second), and
    # knows this one.
    wait_for(lambda: client.get("/api/jobs").status == 401, 3)
    who = client.ok("GET", "/api/me", headers=_bearer(secret))
    assert who == {"name": "ops", "role": "operator", "token_required": True}
    code, out, err = run_cli(capsys, "token", "list", "--json", "--db", db)
    (row,) = json.loads(out)["tokens"]
    assert row["name"] == "ops" and row["role"] == "operator"
    assert row["created_by"].startswith("cli:") and row["last_used"]
    days = (minisched.parse_iso(row["expires_at"], UTC) - time.time()) / 86400
    assert 89.9 < days <= 90
    code, out, _err = run_cli(capsys, "token", "list", "--db", db)
    assert out.splitlines()[0].split() == [
        "NAME", "ROLE", "CREATED_AT", "LAST_USED", "EXPIRES_AT"
    ]  # fmt: skip
    code, _out, err = run_cli(
        capsys, "token", "add", "ops", "--role", "viewer", "--db", db
    )
    assert code == 1 and "a token named 'ops' exists" in err
    code, _out, err = run_cli(
        capsys, "token", "add", "bad name", "--role", "viewer", "--db", db
    )
    assert code == 2 and "name:" in err
    code, _out, err = run_cli(capsys, "token", "role", "ops", "viewer", "--db", db)
    assert code == 0
    assert client.ok("GET", "/api/me", headers=_bearer(secret))["role"] == "viewer"
    code, _out, err = run_cli(capsys, "token", "revoke", "ops", "--db", db)
    assert code == 0 and "revoked" in err
    client.get("/api/me", headers=_bearer(secret)).error(401)  # at once
    code, _out, err = run_cli(capsys, "token", "revoke", "ops", "--db", db)
    assert code == 1 and "no token named 'ops'" in err
    code, _out, err = run_cli(capsys, "token", "list", "--db", str(tmp_path / "no.db"))
    assert code == 2 and "does not exist" in err
    actions = [e["action"] for e in engine.access.entries()]
    assert actions[:3] == ["token.revoke", "token.role", "token.add"]
    assert all(e["who"].startswith("cli:") for e in engine.access.entries()[:3])


def _login(client, secret):
    answer = client("POST", "/api/login", {"token": secret})
    assert answer.status == 200, answer.body
    cookie = answer.header("Set-Cookie")
    return {"Cookie": cookie.split(";")[0]}


def test_sessions_end_with_their_token_its_role_and_their_time(engines, monkeypatch):
    client, secrets = _role_client(engines)
    admin = _bearer(TOKEN)
    session = _login(client, secrets["viewer"])
    session["Authorization"] = None  # the cookie alone
    assert client.ok("GET", "/api/me", headers=session)["name"] == "viewer-1"
    # A new role ends the session at once; a new login has the new role.
    client.ok("PATCH", "/api/tokens/viewer-1", {"role": "operator"}, headers=admin)
    client.get("/api/me", headers=dict(session, Authorization=None)).error(401)
    session = _login(client, secrets["viewer"])
    session["Authorization"] = None
    assert client.ok("GET", "/api/me", headers=session)["role"] == "operator"
    # So does a revocation, for the bearer token and every session of it.
    other = _login(client, secrets["viewer"])
    client.ok("DELETE", "/api/tokens/viewer-1", headers=admin)
    for headers in (session, other):
        client.get("/api/me", headers=dict(headers, Authorization=None)).error(401)
    client.get("/api/me", headers=_bearer(secrets["viewer"])).error(401)
    client("POST", "/api/login", {"token": secrets["viewer"]}).error(401, "token")
    # Idle sessions end, and every session ends at its maximum age.
    monkeypatch.setattr(minisched, "SESSION_IDLE", 0.3)
    idle = _login(client, secrets["operator"])
    idle["Authorization"] = None
    assert client.ok("GET", "/api/me", headers=idle)["role"] == "operator"
    time.sleep(0.4)
    client.get("/api/me", headers=idle).error(401)
    monkeypatch.setattr(minisched, "SESSION_IDLE", 3600)
    monkeypatch.setattr(minisched, "SESSION_MAX_AGE", 0.3)
    short = _login(client, secrets["admin"])
    short["Authorization"] = None
    assert client.ok("GET", "/api/me", headers=short)["role"] == "admin"
    time.sleep(0.4)
    client.get("/api/me", headers=short).error(401)
    # A token that expires is refused afterwards, bearer or login alike.
    made = client.ok(
        "POST",
        "/api/tokens",
        {"name": "brief", "role": "viewer", "expires": "1s"},
        status=201,
        headers=admin,
    )
    assert (
        client.ok("GET", "/api/me", headers=_bearer(made["token"]))["name"] == "brief"
    )
    time.sleep(1.1)
    client.get("/api/me", headers=_bearer(made["token"])).error(401)
    client("POST", "/api/login", {"token": made["token"]}).error(401, "token")
    # Bad token requests name their field.
    for body, field in (
        ({"name": "x", "role": "root"}, "role"),
        ({"name": "", "role": "viewer"}, "name"),
        ({"name": "bootstrap", "role": "viewer"}, "name"),
        ({"name": "x", "role": "viewer", "expires": "soon"}, "expires"),
        ({"name": "x", "role": "viewer", "colour": 1}, "colour"),
        (["x"], None),
    ):
        client("POST", "/api/tokens", body, headers=admin).error(400, field)
    client("PATCH", "/api/tokens/brief", {"role": "boss"}, headers=admin).error(
        400, "role"
    )
    # Failed logins stay rate-limited (and are in the audit trail).
    for _ in range(minisched.LOGIN_ATTEMPTS):
        client("POST", "/api/login", {"token": "nope"}, remote="10.9.9.9").error(
            401, "token"
        )
    client("POST", "/api/login", {"token": TOKEN}, remote="10.9.9.9").error(429)
    failed = client.ok("GET", "/api/audit?who=-&limit=1000", headers=admin)["entries"]
    assert len([e for e in failed if e["address"] == "10.9.9.9"]) == 10
    assert all(e["action"] == "login.failed" for e in failed)


def test_the_audit_trail_records_every_change_and_who_made_it(engines, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "from-file", "command": "true"}]))
    client, secrets = _role_client(engines, jobs=str(jobs))
    admin, ops = _bearer(secrets["admin"]), _bearer(secrets["operator"])
    engine = client.engine
    secret_job = {"name": "s", "command": "sleep 30", "env": {"API_KEY": "topsecret"}}
    client.ok("POST", "/api/jobs", secret_job, status=201, headers=admin)
    client.ok(
        "PATCH",
        "/api/jobs/s",
        {"timeout": 60, "env": {"API_KEY": "other"}},
        headers=admin,
    )
    run = client.ok("POST", "/api/jobs/s/run", status=202, headers=ops)
    assert run["triggered_by"] == "operator-1"
    client.wait_running(run["id"])
    client.ok("POST", f"/api/runs/{run['id']}/stop", headers=ops)
    client.ok("POST", "/api/jobs/s/stop", headers=ops)
    client.ok("POST", "/api/jobs/s/pause", headers=ops)
    client.ok("POST", "/api/jobs/s/resume", headers=ops)
    client.ok("POST", "/api/batch", {"action": "pause", "jobs": ["s"]}, headers=ops)
    client.ok(
        "POST",
        "/api/import",
        {"jobs": [{"name": "imp", "command": "true"}]},
        headers=admin,
    )
    client.ok("DELETE", "/api/jobs/imp", headers=admin)
    made = client.ok(
        "POST",
        "/api/tokens",
        {"name": "t2", "role": "viewer"},
        status=201,
        headers=admin,
    )
    client.ok("PATCH", "/api/tokens/t2", {"role": "operator"}, headers=admin)
    client.ok("DELETE", "/api/tokens/t2", headers=admin)
    session = _login(client, secrets["viewer"])
    client.ok("POST", "/api/logout", headers=dict(session, Authorization=None))
    client("POST", "/api/login", {"token": "wrong"}).error(401, "token")
    jobs.write_text(json.dumps([{"name": "from-file", "command": "echo changed"}]))
    engine.jobs_file.load()
    entries = client.ok("GET", "/api/audit?limit=1000", headers=admin)["entries"]
    by_action = collections.defaultdict(list)
    for entry in entries:
        by_action[entry["action"]].append(entry)
    expected = {
        "job.create": "admin-1", "job.update": "admin-1", "job.trigger": "operator-1",
        "run.stop": "operator-1", "job.stop": "operator-1", "job.pause": "operator-1",
        "job.resume": "operator-1", "batch": "operator-1", "import": "admin-1",
        "job.delete": "admin-1", "token.add": "admin-1", "token.role": "admin-1",
        "token.revoke": "admin-1", "login": "viewer-1", "logout": "viewer-1",
        "login.failed": "-",
    }  # fmt: skip
    for action, who in expected.items():
        assert who in [e["who"] for e in by_action[action]], (action, by_action[action])
    assert all(e["address"] == "127.0.0.1" for e in entries if e["who"] != "file")
    update = next(e for e in by_action["job.update"] if e["who"] == "admin-1")
    assert update["job"] == "s" and update["detail"] == {"fields": ["env", "timeout"]}
    trigger = by_action["job.trigger"][0]
    assert trigger["run_id"] == run["id"]
    assert by_action["batch"][0]["detail"] == {
        "action": "pause",
        "jobs": ["s"],
        "failed": [],
    }
    assert by_action["import"][0]["detail"]["created"] == ["imp"]
    # Jobs-file reloads are the file's doing.
    file_entries = [e for e in entries if e["who"] == "file"]
    assert [e["action"] for e in file_entries] == ["job.update", "job.create"]
    assert file_entries[0]["detail"] == {"fields": ["command"]}
    # Secrets never: neither env values nor token secrets.
    text = json.dumps(entries)
    assert "topsecret" not in text and "other" not in text and made["token"] not in text
    # Filters and the cursor.
    only_s = client.ok("GET", "/api/audit?job=s", headers=admin)["entries"]
    assert only_s and all(e["job"] == "s" for e in only_s)
    mine = client.ok("GET", "/api/audit?who=operator-1", headers=admin)["entries"]
    assert {e["who"] for e in mine} == {"operator-1"}
    first = client.ok("GET", "/api/audit?limit=2", headers=admin)["entries"]
    older = client.ok(
        "GET", f"/api/audit?limit=2&before={first[-1]['id']}", headers=admin
    )["entries"]
    assert [e["id"] for e in first + older] == [e["id"] for e in entries[:4]]
    client("GET", "/api/audit?limit=0", headers=admin).error(400, "limit")
    # Runs say who started them; scheduled ones nobody.
    assert (
        client.ok("GET", f"/api/runs/{run['id']}", headers=admin)["triggered_by"]
        == "operator-1"
    )


def test_the_audit_trail_keeps_its_newest_entries(engines):
    engine = engines(audit_keep=5)
    client = WsgiClient(make_app(engine), engine)
    client.ok("POST", "/api/jobs", {"name": "p", "command": "true"}, status=201)
    for _ in range(6):
        client.ok("POST", "/api/jobs/p/pause")
        client.ok("POST", "/api/jobs/p/resume")
    entries = engine.access.entries(limit=100)
    assert len(entries) == 5
    assert [e["action"] for e in entries][:2] == ["job.resume", "job.pause"]
    assert all(e["who"] == "anonymous" for e in entries)


def test_deny_ip_refuses_those_addresses_and_a_bad_cidr_is_a_usage_error(
    engines, tmp_path
):
    engine = engines(deny_ip=["10.1.0.0/16", "::1"])
    client = WsgiClient(make_app(engine), engine)
    client.ok("GET", "/api/status", remote="127.0.0.1")
    client.ok("GET", "/api/status", remote="10.2.0.1")
    for remote in ("10.1.2.3", "::1"):
        error = client.get("/api/status", remote=remote).error(403)
        assert "--deny-ip" in error["error"]
    # Deny beats allow.
    engine = engines(allow_ip=["10.0.0.0/8"], deny_ip=["10.1.0.0/16"])
    client = WsgiClient(make_app(engine), engine)
    client.ok("GET", "/api/status", remote="10.2.0.1")
    client.get("/api/status", remote="10.1.0.1").error(403)
    result = run_cmd(
        "serve", "--db", tmp_path / "d.db", "--port", 0, "--deny-ip", "10.0.0.300/8"
    )
    assert result.returncode == 2
    assert "--deny-ip: '10.0.0.300/8' is not an address or CIDR" in result.stderr


PY_MODULE = """\
import os, subprocess, sys, time

def add(a, b=0, *, scale=1):
    print("adding", a, b, flush=True)
    return {"sum": (a + b) * scale, "python": sys.executable}

def fails(message):
    raise ValueError(message)

def returns_a_set():
    return {1, 2}

def spawns_and_hangs():
    child = subprocess.Popen(["sleep", "300"])
    print("child", child.pid, flush=True)
    time.sleep(300)

class Tools:
    @staticmethod
    def where():
        return os.getcwd()
"""


def test_kind_python_calls_a_function_in_a_child_process(engines, tmp_path):
    lib = tmp_path / "lib" / "mypkg"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "tasks.py").write_text(PY_MODULE)
    engine = engines()
    client = WsgiClient(make_app(engine), engine)
    base = {"kind": "python", "pythonpath": [str(tmp_path / "lib")]}

    def run(name, **fields):
        client.ok("POST", "/api/jobs", dict(base, name=name, **fields), status=201)
        done = engine.wait(
            client.ok("POST", f"/api/jobs/{name}/run", status=202)["id"], 30
        )
        log = client.get(f"/api/runs/{done['id']}/log?format=json").json()["chunks"]
        return done, log

    done, log = run("adds", call="mypkg.tasks:add", args=[2, 3], kwargs={"scale": 10})
    assert done["status"] == "succeeded" and done["exit_code"] == 0
    assert done["pid"] and done["pid"] != os.getpid()  # never inside the server
    assert "".join(c["text"] for c in log if c["stream"] == "stdout") == "adding 2 3\n"
    system = [c["text"] for c in log if c["stream"] == "system"]
    assert system == [
        'returned: {"sum": 50, "python": ' + json.dumps(sys.executable) + "}\n"
    ]
    done, log = run("raises", call="mypkg.tasks:fails", args=["no disk"])
    assert done["status"] == "failed" and done["exit_code"] == 1
    err = "".join(c["text"] for c in log if c["stream"] == "stderr")
    assert "Traceback (most recent call last)" in err and "ValueError: no disk" in err
    assert not [c for c in log if c["stream"] == "system"]
    done, log = run("odd", call="mypkg.tasks:returns_a_set")
    assert done["status"] == "succeeded"
    assert "returned: a set (not JSON-serialisable)" in log[-1]["text"]
    done, log = run("nested", call="mypkg.tasks:Tools.where", cwd=str(tmp_path))
    assert log[-1]["text"] == f"returned: {json.dumps(str(tmp_path))}\n"
    done, log = run("missing", call="mypkg.nope:f")
    assert done["status"] == "failed"
    assert "ModuleNotFoundError" in "".join(c["text"] for c in log)
    done, _log = run(
        "other-python", call="mypkg.tasks:add", args=[1], python="/no/python"
    )
    assert done["status"] == "failed" and "/no/python" in done["error"]
    # A timeout stops the whole tree, as for a command.
    client.ok(
        "POST",
        "/api/jobs",
        dict(
            base,
            name="hangs",
            call="mypkg.tasks:spawns_and_hangs",
            timeout=1,
            kill_grace=1,
        ),
        status=201,
    )
    started = client.ok("POST", "/api/jobs/hangs/run", status=202)
    child = wait_for(
        lambda: re.findall(
            r"child (\d+)", client.get(f"/api/runs/{started['id']}/log").body.decode()
        ),
        10,
    )
    done = engine.wait(started["id"], 30)
    assert done["status"] == "timed_out"
    wait_for(lambda: gone(int(child[0])), 10)
    leftovers = [
        p
        for p in os.listdir(tempfile.gettempdir())
        if p.startswith("minisched-result-")
    ]
    assert not [
        p for p in leftovers if p.split("-")[2] in {str(started["id"]), str(done["id"])}
    ]
    # Bad definitions name their field.
    for fields, field in (
        ({}, "call"),
        ({"call": "no colon"}, "call"),
        ({"call": "m:f", "command": "true"}, "command"),
        ({"call": "m:f", "args": {"a": 1}}, "args"),
        ({"call": "m:f", "kwargs": {"not valid": 1}}, "kwargs"),
        ({"call": "m:f", "pythonpath": "/x"}, "pythonpath"),
        ({"call": "m:f", "url": "http://x"}, "url"),
    ):
        body = dict(fields, name="bad", kind="python")
        client("POST", "/api/jobs", body).error(400, field)
    client(
        "POST", "/api/jobs", {"name": "bad", "command": "true", "call": "m:f"}
    ).error(400, "call")


def test_api_docs_and_settings_views(engines, monkeypatch):
    client, secrets = _role_client(engines)
    docs = client.get("/api/docs", headers=_bearer(secrets["viewer"]))
    assert docs.status == 200
    assert docs.header("Content-Type").startswith("text/html")
    page = docs.body.decode()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    for route in API_ROUTES:
        section = re.search(rf'<section id="{route.handler}" data-role="(\w+)">', page)
        assert section and section.group(1) == route.role, route.handler
    assert page.count('data-role="admin"') == sum(r.role == "admin" for r in API_ROUTES)
    doc = client.ok("GET", "/api/openapi.json", headers=_bearer(TOKEN))
    assert doc["paths"]["/api/tokens"]["post"]["x-minisched-role"] == "admin"
    assert doc["paths"]["/api/health"]["get"]["security"] == []
    # The settings: values, where they came from, never a secret.
    client("GET", "/api/settings", headers=_bearer(secrets["operator"])).error(
        403, "role"
    )
    ns = minisched._build_parser().parse_args(
        ["serve", "--port", "9999", "--token", "flag-secret"]
    )
    config = minisched.Config.from_args(
        ns,
        {
            "MINISCHED_MAX_STREAMS": "7",
            "MINISCHED_SMTP_PASSWORD": "mail-secret",
            "MINISCHED_NOTIFY_URL": "https://hooks.example/T000/B000/XXXX",
            "MINISCHED_DB": "postgresql://u:pw@db/minisched",
        },
    )
    shown = {s["name"]: s for s in config.effective()}
    assert shown["port"] == {
        "name": "port",
        "flag": "--port",
        "value": 9999,
        "source": "flag",
    }
    assert (
        shown["max_streams"]["value"] == 7
        and shown["max_streams"]["source"] == "environment"
    )
    assert shown["shutdown_grace"]["source"] == "default"
    assert (
        shown["token"]["value"] == "(set)"
        and shown["smtp_password"]["value"] == "(set)"
    )
    assert shown["db"]["value"] == "postgresql://u:***@db/minisched"
    assert shown["notify_url"]["value"] == ["https://hooks.example/***"]
    assert "secret" not in json.dumps(config.effective()).replace("(set)", "")
    settings = client.ok("GET", "/api/settings", headers=_bearer(TOKEN))
    assert TOKEN not in json.dumps(settings)
    by_name = {s["name"]: s for s in settings["settings"]}
    assert by_name["token"]["value"] == "(set)"
    assert settings["database"]["kind"] == "sqlite" and settings["jobs_file"] is None


def test_serve_off_loopback_needs_a_token_or_a_named_one(tmp_path, capsys):
    db = str(tmp_path / "n.db")
    assert not minisched._has_named_tokens(db)
    result = run_cmd("serve", "--db", db, "--host", "0.0.0.0", "--port", 0)
    assert result.returncode == 2 and "token add NAME --role admin" in result.stderr
    store = minisched.SQLiteStore(db).open()
    minisched.Access(store).add({"name": "boss", "role": "admin"}, by="test")
    store.close()
    assert minisched._has_named_tokens(db)


def test_open_streams_end_when_their_token_is_revoked(live):
    srv = live(token=TOKEN)
    srv.ok(
        "POST",
        "/api/jobs",
        {"name": "talks", "command": "while :; do echo hi; sleep 0.1; done"},
        status=201,
    )
    run = srv.ok("POST", "/api/jobs/talks/run", status=202)
    secret, _row = srv.engine.access.add(
        {"name": "watcher", "role": "viewer"}, by="test"
    )
    events = srv.sse("/api/events", headers=_bearer(secret))
    log = srv.sse(f"/api/runs/{run['id']}/stream", headers=_bearer(secret))
    log.until(lambda e: e.event == "log")
    revoked = time.monotonic()
    srv.ok("DELETE", "/api/tokens/watcher")
    for stream in (events, log):
        tail = stream.rest()
        assert tail and tail[-1].event == "end", tail[-3:]
        assert tail[-1].data == {"reason": "signed out"}
    assert time.monotonic() - revoked < minisched.ACCESS_RECHECK + 2
    srv.ok("POST", f"/api/runs/{run['id']}/stop")


#: tgkill(2) by architecture: a signal to one thread of another process.
_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


@pytest.mark.skipif(
    platform.machine() not in _SYS_TGKILL, reason="tgkill number unknown here"
)
def test_sigterm_taken_by_a_worker_thread_still_stops_the_server(tmp_path):
    """The kernel may hand a process's SIGTERM to any thread (one that just
    unblocked signals after creating a thread or spawning takes it first);
    the server must stop at once all the same.  Found by bench/soak.py: the
    main thread slept on until its hour-long wait ended."""
    server = start_serve(tmp_path, "--shutdown-grace", "2")
    try:
        proc = psutil.Process(server.pid)
        workers = wait_for(
            lambda: [t.id for t in proc.threads() if t.id != server.pid][:1], 20
        )
        time.sleep(1)  # listening: the main thread waits for a signal
        libc = ctypes.CDLL(None, use_errno=True)
        sent = time.monotonic()
        assert (
            libc.syscall(_SYS_TGKILL[platform.machine()], server.pid, workers[0], 15)
            == 0
        )
        assert server.wait(15) == 0
        assert time.monotonic() - sent < 8
    finally:
        server.kill()
        output = server.stdout.read().decode()
        server.stdout.close()
    assert "received SIGTERM" in output and "minisched stopped" in output


def _random_cron(rng):
    """A random cron expression of the syntax minisched reads without croniter."""

    months = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
              "nov", "dec")  # fmt: skip
    days_ = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")

    def field(low, high, names=(), step_ok=True):
        kind = rng.random()
        if kind < 0.25:
            return "*"
        if kind < 0.4 and step_ok:
            return f"*/{rng.randint(1, high - low + 1)}"
        if kind < 0.5 and step_ok:
            return f"{rng.randint(low, high)}/{rng.randint(1, 10)}"
        parts, seen = [], set()
        while len(parts) < rng.randint(1, 3):
            a = rng.randint(low, high)
            if rng.random() < 0.4 and a < high:
                b = rng.randint(a + 1, high)  # croniter 7 misreads 31-31
                step = f"/{rng.randint(1, 5)}" if step_ok and rng.random() < 0.3 else ""
                part = f"{a}-{b}{step}"
            elif names and rng.random() < 0.3:
                part = names[a - low]
            else:
                part = str(a)
            values = set(range(a, high + 1)) if "-" in part else {a}
            if "/" in part:
                values = set(
                    range(
                        a,
                        int(part.split("-")[1].split("/")[0]) + 1,
                        int(part.split("/")[1]),
                    )
                )
            if values & seen:  # croniter misreads overlapping parts
                continue
            seen |= values
            parts.append(part)
        return ",".join(parts)

    fields = [
        field(0, 59), field(0, 23), field(1, 31), field(1, 12, months),
        field(0, 7, days_, step_ok=False),
    ]  # fmt: skip
    if rng.random() < 0.5:
        fields.insert(0, field(0, 59))
    return " ".join(fields)


def test_a_zone_without_dst_takes_the_short_way_to_the_same_fire_times(monkeypatch):
    """In UTC, a ``datetime.timezone`` or ``Etc/GMT-14`` every wall time is
    one instant: ``next_after`` skips the DST search, and finds what the
    search finds, for random expressions (a croniter-only one included)."""
    rng = random.Random(16)
    zones = [UTC, minisched.get_zone("Etc/GMT-14"), minisched.get_zone("Etc/UTC")]
    zones.append(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    assert [minisched._fixed_offset(z) for z in zones] == [0, 50400, 0, 19800]
    assert minisched._fixed_offset(minisched.get_zone("Europe/Berlin")) is None
    exprs = [_random_cron(rng) for _ in range(150)] + ["0 0 L * *", "0 0 31 12 *"]
    cases = []
    for expr in exprs:
        for tz in zones:
            start = (
                1767225600.0 + rng.randint(0, 3 * 365 * 86400) + rng.choice([0, 0.5])
            )
            try:
                fires = minisched.next_fire_times(expr, 3, tz, start)
            except minisched.InvalidError:
                continue
            cases.append((expr, tz, start, fires))
    assert len(cases) > 400
    monkeypatch.setattr(minisched, "_fixed_offset", lambda tz: None)
    for expr, tz, start, fires in cases:
        assert minisched.next_fire_times(expr, 3, tz, start) == fires, (expr, tz)


def test_croniter_is_imported_only_for_an_expression_that_needs_it():
    """Plain cron, @every and @at never import croniter (nor dateutil): 30 ms
    and 1 MB at every start; ``L`` does, and still fires right."""
    code = (
        "import datetime, sys; import minisched as m; utc = datetime.timezone.utc\n"
        "for expr in ('*/5 * * * *', '0 9 * * mon-fri', '@every 5m', '@daily'):\n"
        "    m.Schedule(expr, utc).next_after(0)\n"
        "print('croniter' in sys.modules, 'dateutil' in sys.modules)\n"
        "s = m.Schedule('0 0 L * *', utc)\n"
        "print('croniter' in sys.modules, s.next_after(0))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=HERE,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True", "2592000.0"]


def test_a_dependency_version_is_read_beside_it_without_importlib_metadata(
    tmp_path, monkeypatch
):
    """The start check reads a version from pip's ``NAME-VERSION.dist-info``
    or Debian's ``NAME-VERSION.egg-info`` (importlib.metadata's import alone
    costs every command 15 ms), and says a too old one in one line."""
    for package, entry in (
        ("minisched_fake_a", "minisched_fake_a-1.2.0.dist-info"),
        ("minisched_fake_b", "Minisched_Fake_B-1.3.8-py3.11.egg-info"),
    ):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / entry).mkdir()
    (tmp_path / "minisched_fake_c.py").write_text("")
    (tmp_path / "minisched_fake_c-0.9.dist-info").mkdir()
    (tmp_path / "minisched_fake_c-0.10.egg-info").write_text("")  # distutils' file
    monkeypatch.syspath_prepend(str(tmp_path))
    assert minisched._installed_version("minisched_fake_a") == "1.2.0"
    assert minisched._installed_version("minisched_fake_b") == "1.3.8"
    assert minisched._installed_version("minisched_fake_c") == "0.10"
    assert minisched._installed_version("minisched_not_there") is None
    monkeypatch.setattr(
        minisched, "DEPENDENCIES", (("minisched_fake_a", "1.3.5", "python3-fake"),)
    )
    problem = minisched._dependency_problem()
    assert problem.startswith("minisched needs minisched_fake_a 1.3.5 or newer")
    assert "found 1.2.0" in problem and "apt install python3-fake" in problem
    out = subprocess.run(
        [sys.executable, "-c", "import sys, minisched; print(sorted(sys.modules))"],
        check=True,
        cwd=HERE,
        capture_output=True,
        text=True,
    )
    assert "'importlib.metadata'" not in out.stdout


def test_a_croniter_that_cannot_import_is_refused_at_start(monkeypatch):
    """croniter is imported late, so the start checks what it needs."""
    assert minisched._dependency_problem() is None
    monkeypatch.setitem(sys.modules, "dateutil", None)
    problem = minisched._dependency_problem()
    assert "croniter" in problem and "python-dateutil" in problem


def test_cron_fire_times_without_croniter_are_croniters():
    """Plain cron syntax is computed by minisched itself (``_CronTimes``, no
    croniter object per job): for random expressions and start times, every
    next wall time equals croniter's, and whole schedules agree across the
    DST nights of two zones; croniter-only syntax still goes to croniter."""
    rng = random.Random(15)
    checked = 0
    for _ in range(400):
        expr = _random_cron(rng)
        fields = expr.split()
        times = minisched._CronTimes.parse(fields)
        if "/" in fields[-3] and not minisched._croniter_seconds_first():
            continue  # croniter 1.x skips the 1st after a short month: not a reference
        if re.search(r"\b7\b", fields[-1]):
            assert times is None  # croniter releases read 7 their own ways
            continue
        if times is None:  # a day field that lists every day: croniter's
            assert not fields[-3].startswith("*") and not fields[-1].startswith("*")
            continue
        try:
            reference = minisched._make_croniter(fields, datetime.datetime(2000, 1, 1))
            reference.get_next(datetime.datetime)
        except (ValueError, KeyError):
            continue  # rare enough to pass croniter's search limit
        for _ in range(5):
            start = datetime.datetime(2026, 1, 1) + datetime.timedelta(
                seconds=rng.randint(0, 3 * 365 * 86400), microseconds=rng.choice([0, 5])
            )
            reference.set_current(start, force=True)
            ours = start
            for _ in range(4):
                want = reference.get_next(datetime.datetime)
                ours = times.after(ours)
                assert ours == want, (expr, start)
                checked += 1
    assert checked > 3000
    for zone in ("Europe/Berlin", "America/New_York"):
        tz = minisched.get_zone(zone)
        for expr in ("30 2 * * *", "*/7 * * * * *", "0 9 * * mon-fri", "15 1-3 * * *",
                     "0 0 29 2 *", "0 12 1 * 1", "0 0 */2 * 1"):  # fmt: skip
            ours = minisched.Schedule(expr, tz)
            theirs = minisched.Schedule(expr, tz)
            assert ours._times is not None
            theirs._times = None  # the croniter path
            for t in (1774746000.0, 1792890000.0, 1772326800.0):  # DST nights
                for _ in range(6):
                    a, b = ours.next_after(t), theirs.next_after(t)
                    assert a == b, (zone, expr, t)
                    t = a
    for theirs in ("0 0 L * *", "0 0 * * 5#3", "0 0 * * 7"):
        assert minisched.Schedule(theirs, UTC)._times is None
    for bad in ("0 0 31 2 *", "61 * * * *", "0 0 30 2 *"):
        for _ in range(2):  # an invalid one is never remembered as valid
            with pytest.raises(minisched.InvalidError):
                minisched.Schedule(bad, UTC)
