"""Tests of minisched, grouped by behaviour.

Run with ``python -m pytest -q test_minisched.py``.  Live tests bind port 0 and
wait on conditions with deadlines; the scheduler is driven by a fake clock.
"""

import contextlib
import datetime
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zoneinfo

import psutil
import pytest

import minisched
from minisched import (
    Config,
    ConflictError,
    Engine,
    EventBus,
    InvalidError,
    Runner,
    Scheduler,
    Store,
    next_fire_times,
    validate_job,
)

HERE = os.path.dirname(os.path.abspath(__file__))
UTC = datetime.UTC


def ts(text):
    return datetime.datetime.fromisoformat(text).timestamp()


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


class Harness:
    """Store + Runner + Scheduler on a temporary database, no scheduler thread:
    tests call ``tick()`` themselves."""

    def __init__(self, path, clock=time.time, max_concurrent=0, tz=UTC):
        self.clock = clock
        self.store = Store(str(path)).open()
        self.bus = EventBus()
        self.runner = Runner(self.store, self.bus, max_concurrent, clock=clock)
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
        ]
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


# -- storage --------------------------------------------------------------------


def test_store_refuses_newer_schema_and_second_server(tmp_path):
    path = str(tmp_path / "m.db")
    store = Store(path).open()
    with pytest.raises(minisched.DatabaseError, match="in use by another"):
        Store(path).open()
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(minisched.DatabaseError, match="schema version 99"):
        Store(path).open()


def test_a_slot_is_recorded_once(tmp_path):
    store = Store(str(tmp_path / "m.db")).open()
    row = {
        "id": store.allocate_run_id(),
        "job": "a",
        "status": "queued",
        "trigger": "schedule",
        "slot": 1000.0,
    }
    assert store.insert_run(row).result() is True
    again = dict(row, id=store.allocate_run_id())
    assert store.insert_run(again).result() is False
    store.close()


def test_retention_keeps_real_runs_apart_from_noise(tmp_path):
    store = Store(str(tmp_path / "m.db")).open()
    for i in range(30):
        for status in ("succeeded", "skipped"):
            run_id = store.allocate_run_id()
            store.insert_run(
                {"id": run_id, "job": "a", "status": status, "trigger": "schedule"}
            )
            store.add_chunks([(run_id, 1, "stdout", 0.0, "x")])
    store.prune("a", 5).result()
    rows, total = store.list_runs(job="a", limit=1000)
    assert total == 5 + minisched.KEEP_NOISE_RUNS
    assert sum(r["status"] == "succeeded" for r in rows) == 5
    kept = {r["id"] for r in rows}
    conn = sqlite3.connect(str(tmp_path / "m.db"))
    assert {r[0] for r in conn.execute("SELECT run_id FROM chunks")} == kept
    store.close()


# -- scheduler with a fake clock -----------------------------------------------


def test_a_day_of_every_five_minutes(harness):
    clock = FakeClock(ts("2026-06-01T00:00:00Z"))
    h = harness(clock=clock)
    h.add(name="five", schedule="*/5 * * * *", concurrency="allow", keep_runs=1000)
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
    h.add(name="five", schedule="*/5 * * * *", concurrency="allow", keep_runs=1000)
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
    assert len(runs) == 288
    assert len({r["slot"] for r in runs}) == 288


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
    assert h2.sched.tick() == pytest.approx(1800)


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
    assert h2.sched.state("p") == {"paused": True, "next_run_at": None}
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
    wait_for(lambda: minisched.find_marked_pids({str(run["id"])}))
    h.wait_idle()
    row = h.store.get_run(run["id"])
    assert row["status"] == "timed_out"
    assert "timeout" in row["error"]
    assert minisched.find_marked_pids({str(run["id"])}) == []
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
        assert minisched.find_marked_pids({str(run["id"])}) == []
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    finally:
        server.kill()
        output = server.stdout.read().decode()
        server.stdout.close()
    assert "marked lost" in output
    assert len(read_runs(tmp_path)) == 1  # the @reboot run did not run again


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
        assert server.wait(10) == 0
        assert time.monotonic() - started < 4
    finally:
        server.kill()
        server.stdout.close()
    run = read_runs(tmp_path)[0]
    assert run["status"] == "cancelled"
    assert "shutting down" in run["error"]


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
