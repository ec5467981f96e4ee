#!/usr/bin/env python3
"""minisched: a cron replacement for small servers, in one file.

Copy this file onto a host, ``pip install bottle croniter psutil`` and run::

    python minisched.py serve --jobs jobs.json

Jobs fire on cron, ``@every``, ``@at`` or ``@reboot`` schedules in their own time
zone, exactly once per slot, even across restarts.  Each run is a process tree in
its own session; its output, exit status, CPU time and peak memory are recorded
in one SQLite file.  ``python minisched.py --help`` lists the commands.

Components
----------
::

    HTTP server ─► Api (routes from API_ROUTES, one error plugin)
                    │  job edits, triggers, stops ─► Scheduler, Runner; reads ─► Store
                    ▼
    JobsFile ──► Scheduler ──(decides under its lock, then)──► Runner ─────────► Store
                  ▲   heap of due slots                         │ Admission     (SQLiteStore:
                  │                                             │ launcher      all SQL,
                  │                                             │ io (watcher)  one writer)
                  └──── run_finished (dependents) ◄──────────── │ Completion
                                        Notifier ◄── on_hook ───┤ sampler
                                        EventBus ◄── events ────┘ ──► SSE, page

``Engine`` builds these and passes each what it needs as constructor
arguments; the tables they share (``RUN_STATUS_TABLE``, ``JOB_FIELDS``,
``API_ROUTES``) are constants.

Threads
-------
All threads are daemons with a name; each loop ends on its owner's ``stopping``
event (``Engine.shutdown`` stops them in order: jobs file, scheduler, runner,
notifier, store).

``minisched-scheduler``  owns the job registry and the heap of due slots; sleeps
                         until the next slot or a change; decides under its lock
                         what fires, then hands the runs to the Runner.
``minisched-launcher``   the only thread that spawns jobs (so the parent of every
                         child and of the guard process outlives them).
``minisched-io``         the watcher: owns every started run (its pipes, pidfd,
                         output capture, usage) and the job timers: reads output,
                         reaps exits with ``os.wait4``, fires timeouts, kill
                         escalation, retries and deadlines, settles each run's
                         outcome.  Talks to others through a command queue and a
                         wake pipe.
``minisched-completion`` ends runs in order of their outcome: release (Admission),
                         record, announce, retry, hooks, prune, dependents.
``minisched-writer``     the only database writer; batches queued operations into
                         one transaction and resolves their futures.
``minisched-sampler``    measures CPU and RSS of running process trees (``/proc``,
                         else psutil), once a second and only while runs are
                         active, and sends the figures to the io thread.
``minisched-jobsfile``   re-reads the jobs file when it changes (or on SIGHUP).
``minisched-notify``     decides alerts (incidents, summaries, the hourly cap).
``minisched-deliver``    makes hook and alert deliveries, with retries.
``minisched-http-run``   one short-lived thread per running ``http`` job.
``minisched-http``       the API server's accept loop (wsgiref + ThreadingMixIn).
``minisched-http-request`` one daemon thread per connection; an SSE stream holds
                         its thread and reads a bounded EventBus queue.

Locks
-----
Each lock guards one component's state and is held for memory work only.
Where one is held while taking another, the order is::

    Scheduler._lock  →  Admission._lock  →  Store._lock (run ids)
    Scheduler._lock  →  the Store's writer queue, EventBus._lock

Admission's lock is held only for its own bookkeeping (and to take a run id,
so that two submissions of a ``forbid`` job cannot both pass).

Nothing takes them the other way round.  No lock is held across a call out of
its component that can block or reach foreign code: the scheduler calls the
Runner after releasing its lock; Admission hands back what to do (spawn, arm a
deadline, record a miss) and the Runner does it with no lock held; events,
logging, hooks and ``on_finished`` happen with no lock held; the Store's writer
commits without the lock that guards its queue.

Readers (API requests) borrow pooled SQLite connections and never wait for the
writer: WAL gives them a consistent snapshot.

Besides threads, ``serve`` starts one *guard* process (see ``ProcessGuard``): it
holds a pipe from the server and kills every running job's process tree when the
server dies, however it dies.
"""

# ruff: noqa: UP017 (datetime.UTC needs Python 3.11; minisched supports 3.9+)
from __future__ import annotations

__version__ = "0.1.0"

import os
import sys

###############################################################################
# The first image of serve ####################################################
###############################################################################

#: Environment variables that hold secrets: ``serve`` hands them (and a
#: ``--token`` flag) to its re-executed self through a pipe, so they are in
#: neither its environment nor its command line (``/proc/PID/environ`` is
#: readable by every job running as the same user, ``cmdline`` by anyone).
SECRET_VARIABLES = ("MINISCHED_TOKEN", "MINISCHED_SMTP_PASSWORD")


def _reexec_serve(argv) -> bool:
    """For ``serve`` only: CPython keeps the whole parse tree of the script it
    runs (about 10 MB for this file) until the script ends.  A long-running
    server therefore replaces itself (same pid) with an interpreter that loads
    the file as a module (its cached bytecode, or a compile whose tree is
    freed at once); secrets travel through a pipe (see
    :data:`SECRET_VARIABLES`).  It runs before the module imports anything
    else, so the first image costs no more than its compile.  Returns True
    in the re-executed image, and does not return in the first one."""
    if os.environ.pop("MINISCHED_REEXEC", None) is not None:
        return True
    if argv[:1] != ["serve"]:
        return False
    path = os.path.abspath(__file__)
    # Loaded as a module is loaded: from the cached bytecode in __pycache__
    # when it is current (no second compile of 14 000 lines), under __main__.
    code = (
        "import importlib.util as u, sys; sys.argv.pop(0); "
        "s = u.spec_from_file_location('__main__', sys.argv[0]); "
        "m = sys.modules['__main__'] = u.module_from_spec(s); s.loader.exec_module(m)"
    )
    env = dict(os.environ, MINISCHED_REEXEC="1")
    handed = {name: env.pop(name) for name in SECRET_VARIABLES if name in env}
    argv, token = _without_option(argv, "--token")
    if token is not None:
        handed["--token"] = token
    read_end = None
    if handed:
        import json

        read_end, write_end = os.pipe()  # a few bytes: the pipe holds them
        os.write(write_end, json.dumps(handed).encode())
        os.close(write_end)
        os.set_inheritable(read_end, True)
        env["MINISCHED_SECRETS_FD"] = str(read_end)
    try:
        os.execve(sys.executable, [sys.executable, "-c", code, path, *argv], env)
    except OSError:
        if read_end is not None:
            os.close(read_end)
    return False  # run as we are


def _without_option(argv, flag) -> tuple:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``, and the value (or None)."""
    out, value, args = [], None, iter(argv)
    for arg in args:
        if arg == flag:
            value = next(args, "")
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
        else:
            out.append(arg)
    return out, value


if __name__ == "__main__":
    _REEXECUTED = _reexec_serve(sys.argv[1:])

import abc
import argparse
import base64
import bisect
import codecs
import collections
import contextlib
import csv
import ctypes
import datetime
import fcntl
import functools
import hashlib
import heapq
import hmac
import html
import http.client
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import pwd
import queue
import random
import re
import resource
import secrets
import select
import selectors
import shlex
import signal
import socket
import socketserver
import sqlite3
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import weakref
import wsgiref.simple_server
import zoneinfo

try:
    import bottle
    import psutil
except ImportError as exc:  # said in one line below, never as a traceback
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None
# croniter (and dateutil under it: 30 ms and 1 MB) is imported when an
# expression first needs it (see _croniter_module); most never do.

#: The public surface, for programs that embed minisched (see README,
#: "Embedding"): build an :class:`Engine`, ``start()`` it, manage jobs and read
#: runs through its methods, serve it with :func:`serve_engine` or mount it with
#: :func:`wsgi_app`, ``shutdown()`` it.  The rest is importable but internal.
__all__ = [
    "Api",
    "Config",
    "ConflictError",
    "Engine",
    "EventBus",
    "HttpServer",
    "InvalidError",
    "Job",
    "MinischedError",
    "NotFoundError",
    "Runner",
    "Schedule",
    "Scheduler",
    "Store",
    "UnavailableError",
    "main",
    "make_app",
    "next_fire_times",
    "parse_crontab",
    "serve_engine",
    "validate_job",
    "wsgi_app",
]

log = logging.getLogger("minisched")

#: Runtime dependencies: (module, oldest version, Debian/Ubuntu package).
#: The oldest are what Debian 12 ships; the newest releases work too.
DEPENDENCIES = (
    ("bottle", "0.12.23", "python3-bottle"),
    ("croniter", "1.3.5", "python3-croniter"),
    ("psutil", "5.9.4", "python3-psutil"),
)


def _version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _installed_version(name: str) -> str | None:
    """The version of the installed distribution ``name``, from the name of
    its ``NAME-VERSION.dist-info`` (or ``.egg-info``) entry beside the package,
    as pip and Debian name them; else from ``importlib.metadata``, whose
    import (zipfile, pathlib, typing) costs every command 15 ms more."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # a module in sys.modules without a spec
        spec = None
    if spec is not None and spec.origin:
        site = os.path.dirname(spec.origin)
        if spec.submodule_search_locations:  # a package: its directory's
            site = os.path.dirname(site)
        pattern = re.compile(
            rf"{re.escape(name)}-(\d[\w.]*?)(?:-py\d[\d.]*)?\.(?:dist|egg)-info",
            re.IGNORECASE,
        )
        found = []
        with contextlib.suppress(OSError):
            found = [m.group(1) for m in map(pattern.fullmatch, os.listdir(site)) if m]
        if found:  # an older entry left beside the new one: the newest is in use
            return max(found, key=_version_tuple)
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dependency_problem() -> str | None:
    """One line saying which dependency is missing or too old and how to
    install it, or None when all are there."""
    import importlib.util

    for module, oldest, package in DEPENDENCIES:
        if _IMPORT_ERROR is not None and _IMPORT_ERROR.name not in (
            "bottle",
            "croniter",
            "psutil",
        ):
            found = f"it fails to import: {_IMPORT_ERROR}"
            if _IMPORT_ERROR.name == "cgi":  # removed in Python 3.13
                module, oldest, found = (
                    "bottle",
                    "0.13",
                    "0.12 needs cgi, gone in Python 3.13",
                )
        elif module not in sys.modules and importlib.util.find_spec(module) is None:
            found = "not installed"
        elif module == "croniter" and importlib.util.find_spec("dateutil") is None:
            found = "it is installed without python-dateutil, which it needs"
        else:
            version = getattr(sys.modules.get(module), "__version__", None)
            version = version or _installed_version(module)
            if version is None:
                continue  # found, of no version it can tell
            if _version_tuple(version) >= _version_tuple(oldest):
                continue
            found = f"found {version}"
        return (
            f"minisched needs {module} {oldest} or newer ({found}): install it in a "
            f"virtual environment (python3 -m venv .venv && .venv/bin/pip install "
            f"'{module}>={oldest}') or from the distribution (apt install {package})"
        )
    return None


def _refuse_without_dependencies() -> None:
    problem = _dependency_problem()
    if problem is None:
        return
    if __name__ == "__main__":
        print(problem, file=sys.stderr)
        sys.exit(2)
    raise ImportError(problem)


_refuse_without_dependencies()


###############################################################################
# Configuration ###############################################################
###############################################################################

#: Default TCP port of ``serve`` and default ``--url`` of the client commands.
DEFAULT_PORT = 8100
#: Every run status, in the order the page shows them: whether it is final
#: (``terminal``), whether it means something went wrong (``failure``:
#: alerts, WARNING log lines, the success rate), whether its records are
#: ``kept_apart`` (a job keeps :data:`KEEP_NOISE_RUNS` of them besides its
#: ``keep_runs``), the page's colour and what it means.  The tuples below,
#: the store's SQL, the API's enums and the page (through ``GET /api/meta``)
#: are derived from this table.
RunStatus = collections.namedtuple(
    "RunStatus", "name terminal failure kept_apart colour meaning"
)
RUN_STATUS_TABLE = (
    RunStatus("queued", False, False, False, "run", "waiting for a free slot"),
    RunStatus("running", False, False, False, "run", "started, not finished"),
    RunStatus("succeeded", True, False, False, "ok", "exited 0 / expected status"),
    RunStatus("failed", True, True, False, "bad", "exited non-zero or could not start"),
    RunStatus("timed_out", True, True, False, "bad", "killed at its timeout"),
    RunStatus("cancelled", True, False, False, "warn", "stopped by someone"),
    RunStatus("skipped", True, False, True, "warn", "not run: concurrency"),
    RunStatus("missed", True, True, True, "warn", "not run in time"),
    RunStatus("lost", True, True, False, "bad", "the server died during it"),
)
RUN_STATUSES = tuple(s.name for s in RUN_STATUS_TABLE)
#: Statuses that are not final.
ACTIVE_STATUSES = tuple(s.name for s in RUN_STATUS_TABLE if not s.terminal)
TERMINAL_STATUSES = tuple(s.name for s in RUN_STATUS_TABLE if s.terminal)
FAILURE_STATUSES = tuple(s.name for s in RUN_STATUS_TABLE if s.failure)
KEPT_APART_STATUSES = tuple(s.name for s in RUN_STATUS_TABLE if s.kept_apart)
#: What started a run.
TRIGGERS = ("schedule", "manual", "retry", "catch_up", "reboot", "dependency")
#: Slots beyond this many missed while down are summarised, never run.
CATCH_UP_CAP = 100
#: ``skipped`` and ``missed`` records kept per job, apart from ``keep_runs``.
KEEP_NOISE_RUNS = 20
#: Bytes read from a child's pipe at once.
READ_SIZE = 65536
#: After the main process exits, how long its pipes may stay open before the
#: leftovers holding them are killed.
DRAIN_SECONDS = 0.1
#: Shortest time between two scans of ``/proc`` for a finished run's
#: leftover processes, and how long a run that ended waits for it: runs that
#: end together share one scan, and no scan competes with a batch of spawns.
LEFTOVER_SCAN_INTERVAL = 0.05
LEFTOVER_SCAN_DELAY = 0.02
#: How often the jobs file is checked for changes.
JOBS_FILE_POLL = 2.0
#: How long before its time a slot is handled: its run is recorded and queued
#: early, so at the slot's time only the spawn itself is left to do.
LOOKAHEAD = 0.25
#: How long runs that come due while the launcher spawns a batch may join it
#: (their output, timeouts and records wait until the batch ends).
LAUNCH_JOIN_SECONDS = 0.5
#: A scheduled run not started this long after its time (and without a
#: ``starting_deadline`` of its own) is ``missed``, and alerts.
LATE_AFTER = 60.0
#: Longest single sleep of the scheduler, so wall-clock jumps are noticed.
MAX_SLEEP = 60.0
#: Seconds a client has to send a request's headers and body (and longest
#: wait on one socket operation): a slow or silent client cannot hold a
#: thread for longer.
REQUEST_TIMEOUT = 20.0
#: Size at which ``--log-file`` is rotated, and how many old files are kept.
LOG_MAX_BYTES = 10 << 20
LOG_BACKUPS = 5
#: Connections served at once; beyond them a client gets 503 and is closed,
#: so a host with the common limit of 1024 descriptors stays up.
MAX_CONNECTIONS = 200


class Config:
    """Settings of one ``serve``: flags beat ``MINISCHED_*`` variables beat defaults.

    Built once in :func:`main` and passed to constructors; nothing reads the
    environment after that.
    """

    #: (name, default, type) of every ``serve`` setting; the flag is ``--name``
    #: with dashes, the variable ``MINISCHED_NAME``.
    FIELDS = (
        ("host", "127.0.0.1", str),
        ("port", DEFAULT_PORT, int),
        ("db", "minisched.db", str),
        ("jobs", None, str),
        ("token", None, str),
        ("max_concurrent", 0, int),
        ("timezone", None, str),
        ("allow_ip", [], list),
        ("deny_ip", [], list),
        ("public_host", [], list),
        ("max_streams", 64, int),
        ("shutdown_grace", 30.0, float),
        ("insecure_no_auth", False, bool),
        ("log_level", "info", str),
        ("token_file", None, str),
        ("request_timeout", REQUEST_TIMEOUT, float),
        ("max_connections", MAX_CONNECTIONS, int),
        ("daemon", False, bool),
        ("pidfile", None, str),
        ("log_file", None, str),
        ("log_max_bytes", LOG_MAX_BYTES, int),
        ("log_backups", LOG_BACKUPS, int),
        ("public_url", None, str),
        ("notify_url", [], list),
        ("notify_email", [], list),
        ("smtp_host", None, str),
        ("smtp_port", 25, int),
        ("smtp_user", None, str),
        ("smtp_password", None, str),  # from MINISCHED_SMTP_PASSWORD only
        ("smtp_starttls", False, bool),
        ("smtp_from", None, str),
        ("alert_cap", 30, int),
        ("max_rss_default", None, int),
        ("max_cpu_default", None, float),
        ("node_name", None, str),
        ("node_tag", [], list),
        ("node_timeout", 20.0, float),
        ("audit_keep", 10000, int),
    )
    #: Settings whose values are never shown (the settings view says "set").
    SECRET_FIELDS = ("token", "smtp_password")

    def __init__(self, **values):
        #: Where each setting came from: "flag", "environment" or "default"
        #: (:meth:`from_args` knows; settings given in code are "flag").
        self.sources = {}
        for name, default, _type in self.FIELDS:
            value = values.pop(name, None)
            setattr(self, name, default if value is None else value)
            self.sources[name] = "default" if value is None else "flag"
        if values:
            raise TypeError("unknown settings: {}".format(", ".join(sorted(values))))

    @classmethod
    def from_args(cls, ns, environ) -> Config:
        """Merge parsed flags (None when absent) over the environment."""
        values, sources = {}, {}
        for name, _default, kind in cls.FIELDS:
            value = getattr(ns, name, None)
            sources[name] = "flag"
            if value in (None, [], False):
                sources[name] = "default"
                raw = environ.get("MINISCHED_" + name.upper())
                if raw not in (None, ""):
                    value = _parse_setting(name, raw, kind)
                    sources[name] = "environment"
            values[name] = value
        config = cls(**values)
        config.sources = sources
        return config

    def effective(self) -> list:
        """Every setting as the settings view shows it: ``name``, ``flag``,
        ``value`` (secrets only as set or not; a database URL without its
        password) and ``source``."""
        out = []
        for name, _default, _kind in self.FIELDS:
            value = getattr(self, name)
            if name in self.SECRET_FIELDS:
                value = "(set)" if value else "(not set)"
            elif name == "db":
                value = _redacted(value)
            elif name == "notify_url":  # a webhook's path is often its secret
                value = [re.sub(r"^(\w+://[^/?#]*).*", r"\1/***", u) for u in value]
            out.append(
                {
                    "name": name,
                    "flag": "--" + name.replace("_", "-"),
                    "value": value,
                    "source": self.sources.get(name, "default"),
                }
            )
        return out

    def zone(self) -> datetime.tzinfo:
        """The server's default zone for jobs without ``timezone``."""
        return get_zone(self.timezone) if self.timezone else local_zone()

    def networks(self, name: str) -> list:
        """The CIDRs of ``allow_ip`` (or another list setting) as networks;
        :class:`UsageError` naming the flag for a bad one."""
        out = []
        for cidr in getattr(self, name):
            try:
                out.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"{flag}: {cidr!r} is not an address or CIDR "
                    "(such as 10.0.0.0/8 or ::1)"
                ) from None
        return out

    def check(self) -> None:
        """Every setting usable, else :class:`UsageError` naming its flag.
        Reads ``token_file`` into ``token``."""
        try:
            self.zone()
        except InvalidError as exc:
            raise UsageError("--timezone: " + exc.message) from None
        self.networks("allow_ip")
        self.networks("deny_ip")
        if self.audit_keep < 1:
            raise UsageError("--audit-keep: must be at least 1")
        if self.notify_email and not self.smtp_host:
            raise UsageError("--notify-email: needs --smtp-host (a mail relay)")
        for url in self.notify_url:
            problem = _url_problem(url)
            if problem:
                raise UsageError(f"--notify-url: {url!r} {problem}")
        for address in self.notify_email:
            if not _EMAIL_RE.fullmatch(address):
                raise UsageError(f"--notify-email: {address!r} is not a mail address")
        if self.alert_cap < 1:
            raise UsageError("--alert-cap: must be at least 1")
        if self.daemon and not self.pidfile:
            raise UsageError("--daemon: needs --pidfile FILE (shutdown finds it there)")
        if self.log_max_bytes < 1024 or self.log_backups < 0:
            raise UsageError(
                "--log-max-bytes: at least 1024; --log-backups: at least 0"
            )
        if self.node_timeout < 1:
            raise UsageError("--node-timeout: must be at least 1 (seconds)")
        for name, low in (
            ("port", 0),
            ("max_concurrent", 0),
            ("max_streams", 1),
            ("max_connections", 1),
            ("shutdown_grace", 0),
            ("request_timeout", 0.1),
        ):
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag}: must be at least {low}")
        if self.token_file:
            if self.token:
                raise UsageError("--token-file: give either a token or a token file")
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    self.token = f.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--token-file: cannot read it: {exc}") from None
            if not self.token:
                raise UsageError(f"--token-file: {self.token_file} is empty")
            self.sources["token"] = "file"


def _parse_setting(name, raw, kind):
    flag = "MINISCHED_" + name.upper()
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{flag}: expected true or false, got {raw!r}")
    if kind is list:
        return [part for part in re.split(r"[,\s]+", raw) if part]
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"{flag}: expected a number, got {raw!r}") from None


###############################################################################
# Errors ######################################################################
###############################################################################


class MinischedError(Exception):
    """Root of minisched's errors.  ``status`` is the HTTP status it maps to,
    ``field`` names the offending field (or is None) and ``headers`` go on the
    response.  Raise one anywhere below a route: the app's one error plugin
    turns it into ``{"error", "field"}`` with that status."""

    status = 500
    headers = ()  # (name, value) pairs

    def __init__(self, message: str, field: str | None = None, errors=None):
        super().__init__(message)
        self.message = message
        self.field = field
        #: Every problem found, as ``[{"field", "error"}]``; the first is ``message``.
        self.errors = errors or [{"field": field, "error": message}]


class InvalidError(MinischedError):
    """Bad input: a job field, a schedule, a jobs file, a query parameter."""

    status = 400


class UnauthorizedError(MinischedError):
    """No token, or a wrong one."""

    status = 401
    headers = (("WWW-Authenticate", 'Bearer realm="minisched"'),)


class ForbiddenError(MinischedError):
    """Refused whoever asks: address, Host header, origin."""

    status = 403


class NotFoundError(MinischedError):
    status = 404


class MethodNotAllowedError(MinischedError):
    status = 405


class RequestTimeoutError(MinischedError):
    """The client did not send its request in time."""

    status = 408


class ConflictError(MinischedError):
    """The request clashes with the current state (name taken, job busy, owned by
    the jobs file)."""

    status = 409


class TooLargeError(MinischedError):
    status = 413


class UnsupportedMediaError(MinischedError):
    status = 415


class TooManyRequestsError(MinischedError):
    status = 429


class UsageError(MinischedError):
    """Wrong command-line use; exit status 2."""

    status = 400


class UnavailableError(MinischedError):
    """Not now: the server is shutting down or overloaded."""

    status = 503


class DatabaseError(MinischedError):
    """The database cannot be used (newer schema, locked by another server)."""

    status = 503


###############################################################################
# Time and schedules ##########################################################
###############################################################################

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_SINGLE_VALUE = re.compile(r"^\d+$")
#: Times minisched accepts (``@at``, ``after``); later ones cannot be formatted.
MIN_TIME, MAX_TIME = 0.0, 221845392000.0  # 1970 .. 9000-01-01
#: Longest ``@every`` interval: 100 years.
MAX_EVERY = 100 * 365 * 86400


def parse_duration(text: str) -> float:
    """``"1h30m"`` -> 5400.0.  Units ms, s, m, h, d, w; a bare number is seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise InvalidError(
            f"invalid duration {text!r} (use a number with units s, m, h, d, e.g. 30s, 5m, 1h30m)"
        )
    return total


def iso_utc(ts: float | None) -> str | None:
    """Epoch seconds -> ``2026-11-23T09:00:00.000Z`` (None stays None)."""
    if ts is None:
        return None
    ms = round(ts * 1000)
    t = time.gmtime(ms // 1000)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:"
        f"{t.tm_min:02d}:{t.tm_sec:02d}.{ms % 1000:03d}Z"
    )


def _zone_name(tz: datetime.tzinfo) -> str:
    return getattr(tz, "key", None) or str(tz)


def iso_local(ts: float, tz: datetime.tzinfo) -> str:
    """Epoch seconds -> local ISO 8601 with offset, e.g. ``2026-03-08T03:00:00-04:00``."""
    return datetime.datetime.fromtimestamp(ts, tz).isoformat()


def local_zone() -> datetime.tzinfo:
    """The host's zone: ``$TZ``, ``/etc/localtime``, else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    try:
        link = os.readlink("/etc/localtime")
        return zoneinfo.ZoneInfo(link.split("zoneinfo/", 1)[1])
    except (OSError, IndexError, zoneinfo.ZoneInfoNotFoundError, ValueError):
        return datetime.timezone.utc


def get_zone(name: str) -> datetime.tzinfo:
    """IANA name -> tzinfo, or InvalidError naming ``timezone``."""
    if name in ("UTC", "Z", "utc"):
        return datetime.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        # OSError: a name the file system refuses (too long, a bad byte).
        raise InvalidError(
            f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin or UTC)",
            "timezone",
        ) from None


def parse_iso(text: str, tz: datetime.tzinfo) -> float:
    """ISO 8601 -> epoch seconds; a naive time is read in ``tz`` with the DST rules
    of fixed-time jobs (a time in the gap means the end of the gap, a repeated
    time its first occurrence)."""
    clean = text.strip()
    if clean[-1:] in ("Z", "z"):  # Python < 3.11 does not read "Z"
        clean = clean[:-1] + "+00:00"
    try:
        dt = datetime.datetime.fromisoformat(clean)
        if dt.tzinfo is not None:
            value = dt.timestamp()
        else:
            instants = _resolve_wall(dt, tz)
            value = instants[0] if instants[0] is not None else instants[2]
    except (ValueError, OverflowError, OSError):
        raise InvalidError(f"invalid ISO 8601 time {text!r}") from None
    if not MIN_TIME <= value <= MAX_TIME:
        raise InvalidError(f"time {text!r} is out of range (years 1970 to 9000)")
    return value


def _resolve_wall(naive: datetime.datetime, tz) -> tuple:
    """Map a wall time in ``tz`` to ``(first, second, gap_end)`` instants.

    A normal time gives ``(t, None, None)``; a repeated one (fall back) gives both
    occurrences; one in the spring-forward gap gives ``(None, None, end of gap)``.
    """
    u0 = naive.replace(tzinfo=tz, fold=0).timestamp()
    u1 = naive.replace(tzinfo=tz, fold=1).timestamp()
    if u0 == u1:
        return (u0, None, None)
    if u0 < u1:
        return (u0, u1, None)
    return (None, None, _transition(tz, u1, u0))


#: tzdata's names of zones that never change their offset.
_FIXED_ZONE_NAMES = re.compile(
    r"(?:Etc/)?(?:UTC|UCT|Universal|Zulu|Greenwich|GMT(?:[+-]?\d{1,2})?)"
)


@functools.lru_cache(maxsize=256)
def _fixed_offset(tz: datetime.tzinfo) -> float | None:
    """The UTC offset (seconds) of a zone that never changes it (UTC, a
    ``datetime.timezone``, ``Etc/GMT-3``): there, every wall time is one
    instant and a fire time needs no DST search.  None for any other zone."""
    if isinstance(tz, datetime.timezone):
        return tz.utcoffset(None).total_seconds()
    if _FIXED_ZONE_NAMES.fullmatch(str(getattr(tz, "key", None) or "")):
        return tz.utcoffset(datetime.datetime(2000, 1, 1)).total_seconds()
    return None


def _naive_epoch(naive: datetime.datetime) -> float:
    return naive.replace(tzinfo=datetime.timezone.utc).timestamp()


def _transition(tz, lo: float, hi: float) -> float:
    """The instant in ``(lo, hi]`` where the UTC offset of ``tz`` changes."""
    off_lo = datetime.datetime.fromtimestamp(lo, tz).utcoffset()
    lo, hi = math.floor(lo), math.ceil(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.datetime.fromtimestamp(mid, tz).utcoffset() == off_lo:
            lo = mid
        else:
            hi = mid
    return float(hi)


# -- croniter, whichever version ---------------------------------------------
# Everything that differs between croniter releases is handled here, and
# only here: Debian 12 ships 1.3.5, PyPI has 7.
#
# - 6 fields: 1.x reads the sixth as seconds; 2.0 added ``second_at_beginning``
#   (minisched's order, as Quartz, Spring and dkron use).
# - Exceptions: ``CroniterError`` is exported by the package only in newer
#   releases; every croniter error is a ValueError (or TypeError), which is
#   what is caught.
# - ``day_or``: croniter counts a step such as ``*/2`` as a restricted field;
#   cron (Vixie, Debian) counts a field starting with ``*`` as unrestricted.
#   minisched follows cron: the day-of-month and day-of-week fields are OR-ed
#   only when neither starts with ``*`` (``0 12 1 * 1``: the 1st and Mondays;
#   ``0 0 */2 * 1``: Mondays that are odd days).
# - ``expand`` changed its signature; minisched checks field ranges itself
#   (:func:`_cron_field_problem`), so messages are the same everywhere.


def _croniter_module():
    """The croniter module, imported on first use (any thread)."""
    try:
        import croniter
    except ImportError as exc:  # found at start, yet broken
        raise InvalidError(
            f"this schedule needs croniter, which fails to import: {exc}", "schedule"
        ) from None
    return croniter


@functools.cache
def _croniter_seconds_first() -> bool:
    """True on croniter releases that take the seconds field first (2.0+)."""
    init = _croniter_module().croniter.__init__
    return "second_at_beginning" in inspect.signature(init).parameters


def _make_croniter(fields: list, start: datetime.datetime):
    """A croniter for minisched's 5 or 6 fields (seconds first), with cron's
    day-of-month/day-of-week rule, on any croniter release."""
    croniter = _croniter_module().croniter
    dom, dow = fields[-3], fields[-1]
    day_or = not (dom.startswith("*") or dow.startswith("*"))
    if len(fields) == 5:
        return croniter(" ".join(fields), start, day_or=day_or)
    if _croniter_seconds_first():
        return croniter(
            " ".join(fields), start, day_or=day_or, second_at_beginning=True
        )
    return croniter(" ".join(fields[1:] + fields[:1]), start, day_or=day_or)


#: Each cron field's name and range, seconds first.
_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_CRON_NAMES = {
    "month": (
        "jan",
        "feb",
        "mar",
        "apr",
        "may",
        "jun",
        "jul",
        "aug",
        "sep",
        "oct",
        "nov",
        "dec",
    ),
    "day-of-week": ("sun", "mon", "tue", "wed", "thu", "fri", "sat"),
}


def _cron_field_problem(fields: list) -> str | None:
    """What is out of range in 5 or 6 cron fields, in words
    (``minute field allows 0-59, got 61``); None if nothing is.  Syntax that
    croniter supports beyond numbers and names (``L``, ``W``, ``#``, ``H``)
    is left to croniter."""
    specs = _CRON_FIELDS if len(fields) == 6 else _CRON_FIELDS[1:]
    for text, (name, low, high) in zip(fields, specs):
        names = _CRON_NAMES.get(name, ())
        for part in text.lower().split(","):
            base, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                return (
                    f"the {name} field has an invalid step {step!r} (use */N, N >= 1)"
                )
            for value in base.split("-"):
                if value.isdigit() and not low <= int(value) <= high:
                    allowed = f"{low}-{high}"
                    if names:
                        allowed += f" or {names[0]}-{names[-1]}"
                    return f"the {name} field allows {allowed}, got {value}"
                if (
                    value.isalpha()
                    and names
                    and value not in names
                    and value not in "lw"
                ):
                    return f"the {name} field allows {low}-{high} or names {', '.join(names)}, got {value!r}"
    return None


def _cron_number(text: str, names: tuple, first: int) -> int | None:
    if text.isdigit():
        return int(text)
    return names.index(text) + first if text in names else None


@functools.lru_cache(maxsize=1024)
def _cron_values(text: str, spec: tuple) -> tuple | None:
    """The values one cron field allows, sorted, when it is made of numbers,
    names, ranges, steps and lists only (None for ``L``, ``W``, ``#``, ``H``,
    ``?``, a wrapping range, a stepped day of week or a 7 in it: croniter's
    business, so every expression fires as it did with croniter alone).
    Cached: a thousand jobs' expressions share a few dozen field texts."""
    name, low, high = spec
    names = _CRON_NAMES.get(name, ())
    first = 1 if name == "month" else 0
    values = set()
    for part in text.lower().split(","):
        base, slash, step = part.partition("/")
        if slash and (name == "day-of-week" or not step.isdigit()):
            return None
        if base == "*":
            lo, hi = low, (6 if name == "day-of-week" else high)
        else:
            start, dash, end = base.partition("-")
            lo = _cron_number(start, names, first)
            hi = _cron_number(end, names, first) if dash else (high if slash else lo)
            if lo is None or hi is None or lo > hi:
                return None
            if name == "day-of-week" and hi == 7:
                return None  # croniter releases read 7 and 5-7 their own ways
        values.update(range(lo, hi + 1, int(step) if slash else 1))
    return tuple(sorted(values))


class _CronTimes:
    """The fire times of a cron expression that needs no croniter (see
    :func:`_cron_values`): :meth:`after` is croniter's ``get_next`` on naive
    wall times for it, some twenty times cheaper, and stateless, so one
    instance serves every job with that expression.  Cron's day rule: the
    day-of-month and day-of-week fields are OR-ed only when neither starts
    with ``*``."""

    __slots__ = (
        "day_list",
        "day_or",
        "days",
        "hours",
        "minutes",
        "months",
        "seconds",
        "weekdays",
    )

    @classmethod
    def parse(cls, fields: list):
        """A ``_CronTimes`` for 5 or 6 valid fields, or None (croniter's)."""
        if len(fields) == 5:
            fields = ["0", *fields]
        values = [_cron_values(text, spec) for text, spec in zip(fields, _CRON_FIELDS)]
        if None in values:
            return None
        self = cls()
        self.seconds, self.minutes, self.hours, _, self.months, _ = values
        self.day_list = values[3]
        self.days, self.weekdays = frozenset(values[3]), frozenset(values[5])
        self.day_or = not (fields[3].startswith("*") or fields[5].startswith("*"))
        if self.day_or and (len(self.days) == 31 or len(self.weekdays) == 7):
            return None  # croniter 1.3 reads a full field as *, later ones do not
        return self

    def _day_ok(self, day: datetime.datetime) -> bool:
        dom = day.day in self.days
        dow = (day.weekday() + 1) % 7 in self.weekdays
        return (dom or dow) if self.day_or else (dom and dow)

    def _next_day(self, day: datetime.datetime) -> datetime.datetime:
        """Midnight of the first day after ``day`` that may match.  When the
        day of month alone decides (day of week ``*``), that is its next listed
        day, or the 1st of the next month: a monthly or yearly job is found
        without a walk through the days between."""
        if self.day_or or len(self.weekdays) < 7:
            return datetime.datetime(day.year, day.month, day.day) + _DAY
        following = _next_value(self.day_list, day.day + 1)
        if following is not None:
            with contextlib.suppress(ValueError):  # past the month's end
                return datetime.datetime(day.year, day.month, following)
        if day.month == 12:
            return datetime.datetime(day.year + 1, 1, 1)
        return datetime.datetime(day.year, day.month + 1, 1)

    def after(self, wall: datetime.datetime) -> datetime.datetime:
        """The first wall time strictly after ``wall`` (naive); ValueError
        when there is none in the next 30 years (31 February)."""
        t = wall.replace(microsecond=0) + _SECOND
        limit = t.year + 30
        while t.year <= limit:
            if t.month not in self.months:
                month = _next_value(self.months, t.month)
                year = t.year if month else t.year + 1
                t = datetime.datetime(year, month or self.months[0], 1)
                continue
            hour = _next_value(self.hours, t.hour) if self._day_ok(t) else None
            if hour is None:
                t = self._next_day(t)
                continue
            if hour != t.hour:
                t = t.replace(hour=hour, minute=0, second=0)
            minute = _next_value(self.minutes, t.minute)
            if minute is None:
                t = t.replace(minute=0, second=0) + _HOUR
                continue
            if minute != t.minute:
                t = t.replace(minute=minute, second=0)
            second = _next_value(self.seconds, t.second)
            if second is None:
                t = t.replace(second=0) + _MINUTE
                continue
            return t.replace(second=second)
        raise ValueError("no date has all of its day and month fields")


_SECOND = datetime.timedelta(seconds=1)
_MINUTE = datetime.timedelta(minutes=1)
_HOUR = datetime.timedelta(hours=1)
_DAY = datetime.timedelta(days=1)


def _next_value(values: tuple, at_least: int) -> int | None:
    i = bisect.bisect_left(values, at_least)
    return values[i] if i < len(values) else None


#: Cron texts already parsed: their :class:`_CronTimes` (None: croniter's,
#: proven to parse and fire, which holds in any zone).  A schedule seen
#: before (a restart's stored jobs, then the jobs file; every reload) is
#: checked by its fields alone and shares the parse.
_CRON_KNOWN = {}


class Schedule:
    """A parsed ``schedule`` field: cron, ``@every``, ``@at``, ``@reboot`` or manual.

    :meth:`next_after` is the one function that decides fire times; the
    scheduler, ``next`` and ``/api/cron/next`` all use it.  Not thread-safe (it
    keeps one croniter to reposition): each owner keeps its own instance.
    """

    def __init__(self, expr: str | None, tz: datetime.tzinfo):
        self.expr = (expr or "").strip()
        self.tz = tz
        self.kind = "manual"
        self.interval = None
        self.at = None
        self.fixed = False
        self._cron = None
        self._times = None
        text = self.expr
        low = text.lower()
        if not text:
            return
        if low == "@reboot":
            self.kind = "reboot"
        elif low.startswith("@every"):
            self.kind = "every"
            try:
                self.interval = parse_duration(text[6:])
            except InvalidError as exc:
                raise InvalidError(exc.message, "schedule") from None
            if not 1 <= self.interval <= MAX_EVERY:
                raise InvalidError(
                    "@every needs an interval between 1s and 100 years", "schedule"
                )
        elif low.startswith("@at"):
            self.kind = "at"
            try:
                self.at = parse_iso(text[3:], tz)
            except InvalidError as exc:
                raise InvalidError("@at: " + exc.message, "schedule") from None
        else:
            self.kind = "cron"
            self._parse_cron(_MACROS.get(low, text))

    def _parse_cron(self, text: str) -> None:
        fields = text.split()
        if text.startswith("@") or len(fields) not in (5, 6):
            hint = ""
            if len(fields) == 1 and not text.startswith("@"):
                hint = " (on a command line, quote the whole expression: '0 9 * * 1')"
            raise InvalidError(
                f"invalid schedule {self.expr!r}: use 5 cron fields (min hour dom month dow), "
                "6 with seconds first, @hourly/@daily/@weekly/@monthly/@yearly, "
                "@every 5m, @at ISO-TIME or @reboot" + hint,
                "schedule",
            )
        minute, hour = fields[-5], fields[-4]
        self.fixed = bool(_SINGLE_VALUE.match(minute) and _SINGLE_VALUE.match(hour))
        self._fields = fields
        key = " ".join(fields)
        if key in _CRON_KNOWN:
            self._times = _CRON_KNOWN[key]
            return  # known good: a croniter is made when first needed
        problem = _cron_field_problem(fields)
        if problem:
            raise InvalidError(f"invalid schedule {self.expr!r}: {problem}", "schedule")
        self._times = _CronTimes.parse(fields)
        if self._times is None:
            try:
                self._cron = _make_croniter(fields, datetime.datetime(2000, 1, 1))
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidError(
                    f"invalid cron expression {self.expr!r}: {exc}", "schedule"
                ) from None
        following = self._croniter_next if self._times is None else self._times.after
        try:
            # An impossible date (0 0 31 2 *) parses, so find one fire to be sure.
            following(datetime.datetime(2000, 1, 1))
        except (ValueError, KeyError, TypeError):
            raise InvalidError(
                f"invalid schedule {self.expr!r}: it can never fire (no date has "
                "all of its day and month fields)",
                "schedule",
            ) from None
        self._remember(key)

    def _remember(self, key: str) -> None:
        if len(_CRON_KNOWN) >= 10000:
            _CRON_KNOWN.clear()
        _CRON_KNOWN[key] = self._times

    def next_after(self, t: float, anchor: float | None = None) -> float | None:
        """The first fire instant strictly after ``t`` (epoch seconds), or None.

        ``anchor`` is where ``@every`` counts from (the job's creation time).
        Cron times are wall times in ``self.tz``: a fixed-time job fires once in
        a repeated hour (first occurrence) and right after a gap; other cron
        jobs skip gap times and fire in both occurrences of a repeated hour.
        """
        if self.kind == "every":
            base = t if anchor is None else anchor
            steps = max(1, math.floor((t - base) / self.interval) + 1)
            nxt = base + steps * self.interval
            return nxt if nxt > t else nxt + self.interval
        if self.kind == "at":
            return self.at if self.at > t else None
        if self.kind != "cron":
            return None
        return self._next_cron(t)

    def _next_cron(self, t: float) -> float | None:
        local = datetime.datetime.fromtimestamp(t, self.tz)
        start = local.replace(tzinfo=None, fold=0)
        offset = _fixed_offset(self.tz)
        if offset is None and local.fold == 0 and not self.fixed:
            # In the first pass of a repeated hour the second pass is still to
            # come: start from the wall time where it begins.
            later = datetime.datetime.fromtimestamp(t + 7200, self.tz)
            if later.utcoffset() < local.utcoffset():
                gap_end = _transition(self.tz, t, t + 7200)
                wall = datetime.datetime.fromtimestamp(gap_end, self.tz)
                if wall.replace(tzinfo=None) <= start:
                    start = wall.replace(tzinfo=None) - datetime.timedelta(seconds=1)
        if self._times is not None:
            following = self._times.after
        else:
            if self._cron is None:
                self._cron = _make_croniter(self._fields, datetime.datetime(2000, 1, 1))
            self._cron.set_current(start, force=True)
            following = self._croniter_next
        if offset is not None:
            # No gap, no repeated hour: the next wall time is the next instant.
            try:
                cand = following(start)
                while _naive_epoch(cand) - offset <= t:
                    cand = following(cand)
            except ValueError:
                return None
            return _naive_epoch(cand) - offset
        best, bound, cand = None, None, start
        for _ in range(100000):
            try:
                cand = following(cand)
            except ValueError:  # no later fire time (e.g. an @at-like date)
                return best
            # No later wall time can map to an instant before ``best`` once it is
            # past ``best`` even under the larger of the two offsets in play.
            if bound is not None and _naive_epoch(cand) - bound > best:
                return best
            first, second, gap_end = _resolve_wall(cand, self.tz)
            if self.fixed:
                options = (first if first is not None else gap_end,)
            else:
                options = (first, second)
            for instant in options:
                if (
                    instant is not None
                    and instant > t
                    and (best is None or instant < best)
                ):
                    best = instant
            if best is not None:
                offsets = [
                    datetime.datetime.fromtimestamp(x, self.tz).utcoffset()
                    for x in (t, best, best + 10800)
                ]
                if best - t < 86400 and second is None and len(set(offsets)) == 1:
                    return best  # no transition near: the common case
                bound = max(offsets).total_seconds()
        return best

    def _croniter_next(self, _wall) -> datetime.datetime:
        return self._cron.get_next(datetime.datetime)

    def describe(self) -> str:
        """Plain words for the page: ``every 90 seconds``, ``manual``..."""
        if self.kind == "manual":
            return "manual"
        if self.kind == "reboot":
            return "on start"
        if self.kind == "at":
            return "once at " + iso_local(self.at, self.tz)
        if self.kind == "every":
            return "every " + _plain_duration(self.interval)
        return _describe_cron(
            _MACROS.get(self.expr.lower(), self.expr).split(), self.tz
        )


_DAY_NAMES = (
    "Sundays",
    "Mondays",
    "Tuesdays",
    "Wednesdays",
    "Thursdays",
    "Fridays",
    "Saturdays",
)
_DOW = {
    "sun": "0",
    "mon": "1",
    "tue": "2",
    "wed": "3",
    "thu": "4",
    "fri": "5",
    "sat": "6",
    "7": "0",
}
_MONTH_NAMES = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def _describe_cron(fields: list, tz) -> str:
    """Plain words for common cron shapes; the expression itself otherwise."""
    zone = getattr(tz, "key", None) or str(tz)
    second = fields[0] if len(fields) == 6 else "0"
    minute, hour, dom, month, dow = fields[-5:]
    dow = ",".join(_DOW.get(part, part) for part in dow.lower().split(","))
    step = re.fullmatch(r"\*/(\d+)", minute)
    if dom == month == "*" and dow == "*" and hour == "*":
        sec_step = re.fullmatch(r"\*/(\d+)", second)
        if second == "*":
            return "every second"
        if sec_step and minute == "*":
            return "every " + _plain_duration(int(sec_step.group(1)))
        if second == "0" and minute == "*":
            return "every minute"
        if second == "0" and step:
            return "every " + _plain_duration(int(step.group(1)) * 60)
        if second == "0" and minute.isdigit():
            return f"every hour at minute {int(minute)}"
    if second != "0" and not second.isdigit():
        return f"cron {' '.join(fields)} ({zone})"
    days = ""
    if dom == "*" and month == "*":
        if dow in ("1-5", "mon-fri"):
            days = " on weekdays"
        elif dow in ("0,6", "6,0", "6-7", "sat,sun"):
            days = " on weekends"
        elif dow.isdigit() and int(dow) < 7:
            days = " on " + _DAY_NAMES[int(dow)]
        elif dow != "*":
            return f"cron {' '.join(fields)} ({zone})"
    elif dow == "*" and dom.isdigit() and month == "*":
        days = f" on day {int(dom)} of every month"
    elif dow == "*" and dom.isdigit() and month.isdigit() and 1 <= int(month) <= 12:
        days = f" on {_MONTH_NAMES[int(month) - 1]} {int(dom)}"
    else:
        return f"cron {' '.join(fields)} ({zone})"
    secs = f":{int(second):02d}" if second.isdigit() and int(second) else ""
    if minute.isdigit() and re.fullmatch(r"\d+(,\d+)*", hour):
        times = [f"{int(h):02d}:{int(minute):02d}{secs}" for h in hour.split(",")]
        joined = (
            times[0] if len(times) == 1 else ", ".join(times[:-1]) + " and " + times[-1]
        )
        return f"at {joined}{days} ({zone})"
    hour_step = re.fullmatch(r"\*/(\d+)", hour)
    if minute.isdigit() and hour_step:
        return (
            f"every {hour_step.group(1)} hours at minute {int(minute)}{days} ({zone})"
        )
    if minute.isdigit() and hour == "*":
        return f"every hour at minute {int(minute)}{days} ({zone})"
    return f"cron {' '.join(fields)} ({zone})"


def _plain_duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    n = seconds if seconds % 1 else int(seconds)
    return "{} second{}".format(n, "" if n == 1 else "s")


def next_fire_times(
    expr: str,
    n: int = 5,
    tz: datetime.tzinfo | None = None,
    after: float | None = None,
    anchor: float | None = None,
) -> list[float]:
    """The next ``n`` fire instants of ``expr`` strictly after ``after`` (default:
    now), as the scheduler will use them.  ``@every`` counts from ``anchor``
    (a job's creation time), by default ``after``."""
    tz = tz or local_zone()
    after = time.time() if after is None else after
    anchor = after if anchor is None else anchor
    schedule = Schedule(expr, tz)
    times, t = [], after
    while len(times) < n:
        t = schedule.next_after(t, anchor=anchor)
        if t is None:
            break
        times.append(t)
    return times


###############################################################################
# Job definitions #############################################################
###############################################################################

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EMAIL_RE = re.compile(r"[^@\s,<>]+@[^@\s,<>]+\.[^@\s,<>]+")
_HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
#: Environment variables minisched sets itself; a job may not override them.
RESERVED_ENV = ("MINISCHED_RUN_ID", "MINISCHED_JOB", "MINISCHED_SERVER")


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _check_number(value, low, high, integer=False):
    """None if ``value`` is a number in [low, high], else what is wrong."""
    if not _is_number(value) or (integer and value != int(value)):
        return "must be %s" % ("an integer" if integer else "a number")
    if value < low or (high is not None and value > high):
        if high is None:
            return f"must be at least {low}"
        return f"must be between {low} and {high}"
    return None


#: Header names HTTP allows (RFC 9110 tokens).
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: What a header value may not hold: control characters (tab aside) and line breaks.
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _text_problem(value, nul_ok=False):
    """None if every string in ``value`` (nested lists and objects, keys too)
    is valid Unicode and, unless ``nul_ok``, holds no NUL; else what is wrong.
    JSON escapes can carry lone surrogates (``"\\ud800"``) that no file,
    environment, URL or database encoding accepts."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "must be valid Unicode text (it holds a lone surrogate such as \\ud800)"
            if not nul_ok and "\0" in item:
                return "must not contain NUL characters"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _check_str_map(value):
    if not isinstance(value, dict):
        return "must be an object of strings"
    for key, item in value.items():
        if not isinstance(item, str):
            return f"value of {key!r} must be a string"
    return None


def _headers_problem(value):
    """None if ``value`` is an object of HTTP header names to values that
    ``http.client`` can send; else what is wrong."""
    if not isinstance(value, dict):
        return "must be an object of header names to strings"
    for key, item in value.items():
        if not _HEADER_NAME_RE.fullmatch(key):
            return (
                f"has an invalid header name {key!r} "
                "(letters, digits and !#$%&'*+.^_`|~- only)"
            )
        if not isinstance(item, str):
            return f"value of {key!r} must be a string"
        if _HEADER_VALUE_BAD.search(item):
            return (
                f"value of {key!r} must not contain control characters or line breaks"
            )
        if any(ord(c) > 255 for c in item):
            return f"value of {key!r} must be Latin-1 text (HTTP headers cannot carry other characters)"
    return None


def _url_problem(value):
    """None if ``value`` is an http(s) URL that a request can be made to;
    else what is wrong.  Parsed, not pattern-matched: ``http.client`` refuses
    spaces, control characters and non-ASCII text anywhere in it."""
    if not isinstance(value, str):
        return "must be a string"
    if re.search(r"[\x00-\x20\x7f]", value):
        return "must be an http:// or https:// URL without spaces or control characters (percent-encode them)"
    if not value.isascii():
        return "must be an ASCII URL (percent-encode other characters; punycode for host names)"
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"must be an http:// or https:// URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def _check_hooks(value):
    if not isinstance(value, list):
        return "must be a list of hooks"
    for i, hook in enumerate(value):
        where = f"[{i}]"
        if not isinstance(hook, dict):
            return where + " must be an object with url or command"
        unknown = set(hook) - {"url", "method", "headers", "command"}
        if unknown:
            return where + f" has unknown field {min(unknown)!r}"
        if ("url" in hook) == ("command" in hook):
            return where + " needs exactly one of url or command"
        problem = _url_problem(hook["url"]) if "url" in hook else None
        if problem:
            return where + ".url " + problem
        if "command" in hook and not _valid_command(hook["command"]):
            return where + ".command must be a string or a list of strings"
        if hook.get("method", "POST") not in _HTTP_METHODS:
            return where + ".method must be one of " + ", ".join(_HTTP_METHODS)
        problem = _headers_problem(hook["headers"]) if "headers" in hook else None
        if problem:
            return where + ".headers " + problem
    return None


def _valid_command(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(a, str) for a in value)
        and bool(value[0])
    )


def _command_problem(value):
    if value is None or _valid_command(value):
        return None
    return "must be a non-empty string or list of strings"


_CALL_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _call_problem(value):
    if value is None or (isinstance(value, str) and _CALL_RE.fullmatch(value)):
        return None
    return "must be package.module:function (a function or other callable)"


def _args_problem(value):
    return None if isinstance(value, list) else "must be a JSON list"


def _kwargs_problem(value):
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k.isidentifier() for k in value
    ):
        return "must be a JSON object whose keys are argument names"
    return None


def _paths_problem(value):
    if not isinstance(value, list) or not all(
        isinstance(p, str) and p and "\0" not in p for p in value
    ):
        return "must be a list of directories"
    return None


def _optional_url_problem(value):
    return None if value is None else _url_problem(value)


def _optional_str_problem(value):
    return None if value is None or isinstance(value, str) else "must be a string"


def _description_problem(value):
    if not isinstance(value, str) or len(value) > 2000:
        return "must be a string of at most 2000 characters"
    return None


def _bool_problem(value):
    return None if isinstance(value, bool) else "must be true or false"


def _env_problem(value):
    problem = _check_str_map(value)
    if problem:
        return problem
    for key in value:
        if not _ENV_KEY_RE.fullmatch(key):
            return f"has an invalid variable name {key!r}"
        if key in RESERVED_ENV:
            return f"must not set {key} (minisched sets it)"
    return None


def _expect_status_problem(value):
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of HTTP status codes"
    for code in value:
        if _check_number(code, 100, 599, integer=True):
            return "must contain HTTP status codes (100..599)"
    return None


def _tags_problem(value):
    if not isinstance(value, list) or not all(
        isinstance(t, str) and 0 < len(t) <= 64 for t in value
    ):
        return "must be a list of non-empty strings (at most 64 characters each)"
    return None


def _emails_problem(value):
    if not isinstance(value, list) or not all(
        isinstance(a, str) and _EMAIL_RE.fullmatch(a) for a in value
    ):
        return "must be a list of mail addresses (name@example.com)"
    return None


def _names_problem(value):
    if not isinstance(value, list) or not all(
        isinstance(n, str) and _NAME_RE.fullmatch(n) for n in value
    ):
        return "must be a list of job names"
    return None


#: One job field (SPEC §3): its default; how the editor shows it (``form``:
#: text, textarea, number, checkbox, select, list, ints, json or env), its
#: label and help; whether it is among the basic fields and which ``kind``
#: it belongs to (None: both); and its rule: a ``check`` function (value ->
#: problem or None), numeric ``limits`` (low, high or None, integer) or
#: ``choices``.  ``schema`` is its OpenAPI schema where not derived from
#: limits or choices; ``masked`` fields show ``***`` values to those who
#: may not see secrets; ``csv_text`` fields are plain text in CSV (others
#: JSON).  Validation, the CSV code, OpenAPI and the page's editor (through
#: ``GET /api/meta``) are all derived from :data:`JOB_FIELDS`.
JobField = collections.namedtuple(
    "JobField",
    "name default form label help basic kind check limits choices schema masked"
    " csv_text",
)


def _field(
    name,
    default,
    form,
    label,
    help="",
    basic=False,
    kind=None,
    check=None,
    limits=None,
    choices=None,
    schema=None,
    masked=False,
    csv_text=False,
):
    return JobField(
        name, default, form, label, help, basic, kind, check, limits, choices,
        schema, masked, csv_text,
    )  # fmt: skip


_STRING = {"type": "string"}
_STRINGS = {"type": "array", "items": _STRING}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}
#: The ``kind`` of fields about a process: a command's or a Python call's
#: (a field's kinds are space-separated; None: every kind).
_PROCESS = "command python"
_HOOKS = {"type": "array", "items": {"$ref": "#/components/schemas/Hook"}}
_HOOK_HELP = 'JSON list: [{"url": "https://…"}] or [{"command": "…"}]'

JOB_FIELDS = (
    _field("name", None, "text", "Name", "Letters, digits, _ . - (up to 64)", True,
           csv_text=True),
    _field("command", None, "textarea", "Command",
           'Run by /bin/sh -c; or a JSON list like ["/usr/bin/env", "python3"] '
           "for argv", True, "command", _command_problem, csv_text=True,
           schema={"oneOf": [{"type": "string", "minLength": 1},
                             dict(_STRINGS, minItems=1)]}),
    _field("kind", "command", "select", "Kind",
           "A command, an HTTP request or a Python function",
           True, choices=("command", "http", "python"), csv_text=True),
    _field("call", None, "text", "Function", "package.module:function, run in a "
           "child Python process; its return value is logged", True, "python",
           _call_problem, schema={"type": "string", "pattern": _CALL_RE.pattern},
           csv_text=True),
    _field("args", [], "json", "Arguments", "JSON list of positional arguments",
           False, "python", _args_problem, schema={"type": "array"}),
    _field("kwargs", {}, "json", "Keyword arguments", "JSON object", False,
           "python", _kwargs_problem, schema={"type": "object"}),
    _field("python", None, "text", "Python", "Interpreter (default: the server's)",
           False, "python", _optional_str_problem, schema=_STRING, csv_text=True),
    _field("pythonpath", [], "list", "Python path",
           "Comma-separated directories put before sys.path", False, "python",
           _paths_problem, schema=_STRINGS),
    _field("url", None, "text", "URL", "http:// or https://", True, "http",
           _optional_url_problem, schema={"type": "string", "format": "uri"},
           csv_text=True),
    _field("method", "GET", "select", "Method", "", True, "http",
           choices=_HTTP_METHODS, csv_text=True),
    _field("headers", {}, "json", "Headers",
           'JSON object, e.g. {"Authorization": "Bearer …"}', False, "http",
           _headers_problem, schema=_STRING_MAP),
    _field("body", None, "textarea", "Body", "Sent as is (JSON if it parses as JSON)",
           False, "http", lambda value: None,
           schema={"description": "a string, or any JSON value sent as JSON"}),
    _field("expect_status", None, "ints", "Expected status",
           "Comma-separated, e.g. 200, 204 (default: any 2xx)", True, "http",
           _expect_status_problem,
           schema={"type": "array", "minItems": 1,
                   "items": {"type": "integer", "minimum": 100, "maximum": 599}}),
    _field("schedule", None, "text", "Schedule",
           "*/5 * * * *, 0 30 2 * * * (seconds first), @daily, @every 90s, "
           "@at 2026-12-01T09:00, @reboot; empty = manual only", True,
           check=_optional_str_problem, schema=_STRING, csv_text=True),
    _field("timezone", None, "text", "Time zone",
           "IANA name such as Europe/Berlin (default: the server's)", True,
           check=_optional_str_problem, schema=_STRING, csv_text=True),
    _field("enabled", True, "checkbox", "Enabled",
           "Unticked: never fires on schedule (can still be run)", True,
           check=_bool_problem, schema={"type": "boolean"}),
    _field("description", "", "text", "Description", "", True,
           check=_description_problem,
           schema={"type": "string", "maxLength": 2000}, csv_text=True),
    _field("tags", [], "list", "Tags", "Comma-separated", True, check=_tags_problem,
           schema={"type": "array",
                   "items": {"type": "string", "minLength": 1, "maxLength": 64}}),
    _field("cwd", None, "text", "Working directory", "Default: the server's",
           False, _PROCESS, _optional_str_problem, schema=_STRING, csv_text=True),
    _field("env", {}, "env", "Environment", "One KEY=value per line", False,
           _PROCESS, _env_problem, schema=_STRING_MAP, masked=True),
    _field("user", None, "text", "Run as user", "Needs the server to run as root",
           False, _PROCESS, _optional_str_problem, schema=_STRING, csv_text=True),
    _field("timeout", 0, "number", "Timeout (s)",
           "0 = none; then the whole tree is killed", limits=(0, 31536000, False)),
    _field("kill_grace", 10, "number", "Kill grace (s)",
           "Between SIGTERM and SIGKILL (default 10)", limits=(0, 3600, False)),
    _field("retries", 0, "number", "Retries",
           "Extra attempts after a failure or timeout", limits=(0, 100, True)),
    _field("retry_delay", 10, "number", "Retry delay (s)", "Default 10",
           limits=(0, 31536000, False)),
    _field("retry_backoff", 2, "number", "Retry backoff",
           "Multiplier per retry (default 2)", limits=(1, 100, False)),
    _field("retry_max_delay", 3600, "number", "Retry max delay (s)", "Default 3600",
           limits=(0, 31536000, False)),
    _field("concurrency", "forbid", "select", "Concurrency",
           "When a fire comes while a run is active (default forbid)",
           choices=("forbid", "allow", "replace", "queue"), csv_text=True),
    _field("queue_max", 1, "number", "Queue max",
           "With queue: how many fires may wait (default 1)",
           limits=(1, 10000, True)),
    _field("catch_up", "none", "select", "Catch up",
           "Slots missed while the server was down (default none)",
           choices=("none", "latest", "all"), csv_text=True),
    _field("starting_deadline", None, "number", "Starting deadline (s)",
           "A slot that cannot start within this is missed",
           limits=(0.001, 31536000, False)),
    _field("jitter", 0, "number", "Jitter (s)",
           "Random delay added to each scheduled start", limits=(0, 86400, False)),
    _field("max_runs", 0, "number", "Max runs",
           "Then the job disables itself (0 = unlimited)", limits=(0, None, True)),
    _field("keep_runs", 100, "number", "Keep runs", "History kept (default 100)",
           limits=(1, 1000000, True)),
    _field("max_output", 1048576, "number", "Max output (bytes)",
           "Default 1048576; beginning and end are kept",
           limits=(1024, 1 << 30, True)),
    _field("on_success", [], "json", "On success hooks", "JSON list of hooks",
           check=_check_hooks, schema=_HOOKS),
    _field("on_failure", [], "json", "On failure hooks", "JSON list of hooks",
           check=_check_hooks, schema=_HOOKS),
    _field("on_start", [], "json", "On start hooks", _HOOK_HELP,
           check=_check_hooks, schema=_HOOKS),
    _field("after", [], "list", "Run after",
           "Comma-separated job names: run when one of them succeeds",
           check=_names_problem,
           schema={"type": "array",
                   "items": {"type": "string", "pattern": _NAME_RE.pattern}}),
    _field("leftovers", "kill", "select", "Leftover processes",
           "When the job exits: stop what it left running (kill, default) or "
           "keep it, as cron does (for jobs that start daemons)", False, _PROCESS,
           choices=("kill", "keep")),
    _field("notify_email", [], "list", "Mail on failure",
           "Comma-separated addresses, besides the server's --notify-email",
           check=_emails_problem,
           schema={"type": "array", "items": {"type": "string", "format": "email"}}),
    _field("max_rss", None, "number", "Max memory (bytes)",
           "The whole tree; over it the run is stopped and fails", False,
           _PROCESS, limits=(1 << 20, 1 << 50, True)),
    _field("max_cpu", None, "number", "Max CPU (s)",
           "The whole tree's CPU seconds; over it the run is stopped and fails",
           False, _PROCESS, limits=(0.1, 31536000, False)),
    _field("nodes", [], "list", "Nodes",
           "Several hosts: node names or tags that may run it (default: any)",
           check=_tags_problem,
           schema={"type": "array",
                   "items": {"type": "string", "minLength": 1, "maxLength": 64}}),
    _field("placement", "any", "select", "Placement",
           "Several hosts: each slot on one node (any) or on every node (all)",
           choices=("any", "all"), csv_text=True),
    _field("retry_lost", False, "checkbox", "Retry lost runs",
           "Several hosts: a run lost with its node runs again on another",
           check=_bool_problem, schema={"type": "boolean"}),
)  # fmt: skip
FIELDS_BY_NAME = {f.name: f for f in JOB_FIELDS}
#: Every job field but ``name`` and its default (SPEC §3).
JOB_DEFAULTS = {f.name: f.default for f in JOB_FIELDS if f.name != "name"}
#: Fields only meaningful for ``kind: http``, and for ``kind: python``.
HTTP_FIELDS = tuple(f.name for f in JOB_FIELDS if f.kind == "http")
PYTHON_FIELDS = tuple(f.name for f in JOB_FIELDS if f.kind == "python")


def _field_problem(name, value):
    """What is wrong with one field's value, or None, by its row of
    :data:`JOB_FIELDS`.  Cross-field rules live in :func:`validate_job`."""
    field = FIELDS_BY_NAME[name]
    if field.limits is not None:
        if value is None and field.default is None:
            return None
        return _check_number(value, *field.limits)
    if field.choices is not None:
        if value not in field.choices:
            return "must be one of " + ", ".join(field.choices)
        return None
    return field.check(value)


def validate_job(data, server_tz: datetime.tzinfo | None = None) -> dict:
    """Check one job definition and return it normalised (only given fields,
    canonical forms).  Raises :class:`InvalidError` naming the first bad field,
    with every problem in ``.errors``.  Pure: safe from any thread."""
    if not isinstance(data, dict):
        raise InvalidError("a job must be a JSON object", None)
    errors = []

    def bad(field, message):
        errors.append({"field": field, "error": f"{field}: {message}"})

    for key in data:
        if key != "name" and key not in JOB_DEFAULTS:
            bad(
                key,
                "unknown field (valid fields: name, {})".format(
                    ", ".join(JOB_DEFAULTS)
                ),
            )
    name = data.get("name")
    rule = (
        "1-64 characters: letters, digits, '_', '.' and '-', starting with a "
        "letter or digit"
    )
    if name is None:
        bad("name", "required (" + rule + ")")
    elif not isinstance(name, str):
        bad("name", "must be a string of " + rule)
    elif not _NAME_RE.fullmatch(name):
        bad("name", f"use {rule} (got {name!r})")
    for key, value in data.items():
        if key in JOB_DEFAULTS:
            # Text first: every other check may assume encodable strings.
            problem = _text_problem(value, nul_ok=key == "body")
            problem = problem or _field_problem(key, value)
            if problem:
                bad(key, problem)
    kind = data.get("kind", "command")
    needs = {"command": "command", "http": "url", "python": "call"}
    if isinstance(kind, str) and kind in needs:
        if data.get(needs[kind]) is None:
            bad(needs[kind], f"required for kind {kind}")
        for other, fields in (
            ("command", ("command",)),
            ("http", HTTP_FIELDS),
            ("python", PYTHON_FIELDS),
        ):
            for key in fields if other != kind else ():
                if key in data and data[key] is not None:
                    bad(key, f"only valid with kind {other} (use {needs[kind]})")
    tz = server_tz or local_zone()
    if isinstance(data.get("timezone"), str):
        try:
            tz = get_zone(data["timezone"])
        except InvalidError as exc:
            bad("timezone", exc.message)
    schedule, expr = None, data.get("schedule")
    if expr is None or isinstance(expr, str):
        try:
            schedule = Schedule(expr, tz)
        except InvalidError as exc:
            bad("schedule", exc.message)
    if isinstance(data.get("after"), list) and name in data["after"]:
        bad("after", "a job cannot depend on itself")
    if errors:
        raise InvalidError(errors[0]["error"], errors[0]["field"], errors)
    return Definition(data, tz, schedule)


class Definition(dict):
    """A validated job definition: the dict, plus its zone and schedule as
    validation parsed them (``parsed``), so :class:`Job` need not parse them
    again.  A copy (``dict(definition)``) is a plain dict and is parsed anew."""

    def __init__(self, data, tz, schedule):
        super().__init__(data)
        self.parsed = (tz, schedule)


def find_cycle(deps: dict) -> list | None:
    """A dependency cycle in ``deps`` (job name -> the names in its ``after``),
    as ``[a, b, ..., a]``, or None.  Names that are not keys are leaves.  The
    one cycle check: the jobs file, import, validation and the API use it."""
    done, on_path = set(), {}
    for root, after in deps.items():
        if root in done:
            continue
        path, stack = [root], [iter(after)]
        on_path[root] = 0
        while stack:
            for name in stack[-1]:
                if name in on_path:
                    return path[on_path[name] :] + [name]
                if name in deps and name not in done:
                    on_path[name] = len(path)
                    path.append(name)
                    stack.append(iter(deps[name]))
                    break
            else:
                stack.pop()
                done.add(path[-1])
                del on_path[path.pop()]
    return None


def _cycle_message(cycle: list) -> str:
    return "depends on itself through a cycle: " + " -> ".join(cycle)


class Job:
    """A validated definition with defaults filled in, plus its parsed schedule.

    Immutable after construction; the scheduler replaces the object on change.
    Every field is a slot (``job.timeout``): read on every run, many times,
    and 45 references a job, where a ``__dict__`` of that many keys (past
    CPython's key sharing) cost 1.5 KB a job.
    """

    __slots__ = (
        "_masked_json",
        "_static",
        "_static_json",
        "created_at",
        "definition",
        "name",
        "schedule_obj",
        "source",
        "tz",
        *JOB_DEFAULTS,
    )

    def __init__(self, definition: dict, server_tz, source="api", created_at=None):
        get = definition.get
        for key, default in JOB_DEFAULTS.items():
            setattr(self, key, get(key, default))
        self.definition = definition
        self.source = source
        self.created_at = created_at if created_at is not None else time.time()
        self.name = definition["name"]
        tz, schedule = getattr(definition, "parsed", (None, None))
        if schedule is not None and (tz is server_tz or self.timezone):
            self.tz, self.schedule_obj = tz, schedule  # parsed by validate_job
        else:
            self.tz = get_zone(self.timezone) if self.timezone else server_tz
            self.schedule_obj = Schedule(self.schedule, self.tz)
        self._static = None
        self._static_json = None
        self._masked_json = None

    def retry_delay_for(self, attempt: int) -> float:
        """Delay before attempt ``attempt`` (2 = first retry)."""
        delay = self.retry_delay * self.retry_backoff ** (attempt - 2)
        return min(delay, self.retry_max_delay)

    def public(self, mask_env=False) -> dict:
        """The definition as the API shows it (``env`` values masked on request)."""
        out = dict(self.definition)
        if mask_env and out.get("env"):
            out["env"] = {key: "***" for key in out["env"]}
        return out

    def static_state(self) -> dict:
        """The parts of the API's job state that never change for this object."""
        if self._static is None:
            self._static = {
                "source": self.source,
                "schedule_description": self.schedule_obj.describe(),
                "created_at": iso_utc(self.created_at),
            }
        return self._static

    def static_json(self) -> str:
        """``static_state()`` as JSON members (no braces), computed once."""
        if self._static_json is None:
            self._static_json = json.dumps(self.static_state())[1:-1]
        return self._static_json

    def masked_json(self) -> str:
        """``public(mask_env=True)`` as JSON without its closing brace, computed
        once: the jobs list splices the changing state after it."""
        if self._masked_json is None:
            self._masked_json = json.dumps(self.public(mask_env=True))[:-1]
        return self._masked_json


###############################################################################
# Storage #####################################################################
###############################################################################

#: Schema migrations; ``PRAGMA user_version`` is how many have been applied.
MIGRATIONS = (
    """
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT 'api',
        file_definition TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        last_slot REAL,
        scheduled_runs INTEGER NOT NULL DEFAULT 0,
        last_run_id INTEGER
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job TEXT NOT NULL,
        status TEXT NOT NULL,
        trigger TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 1,
        slot REAL,
        scheduled_at REAL,
        started_at REAL,
        finished_at REAL,
        duration REAL,
        exit_code INTEGER,
        signal INTEGER,
        error TEXT,
        pid INTEGER,
        pid_create_time REAL,
        cpu_time REAL,
        peak_rss INTEGER,
        output_bytes INTEGER NOT NULL DEFAULT 0,
        output_truncated INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX runs_job_slot ON runs (job, slot) WHERE slot IS NOT NULL;
    CREATE INDEX runs_job_id ON runs (job, id);
    CREATE INDEX runs_status_id ON runs (status, id);
    CREATE TABLE chunks (
        run_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        ts REAL NOT NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);
    """,
    """
    ALTER TABLE runs ADD COLUMN leftovers_stopped INTEGER;
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        token_name TEXT NOT NULL,
        token_check TEXT NOT NULL,
        address TEXT,
        created_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER,
        job TEXT NOT NULL,
        event TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at REAL NOT NULL,
        at REAL,
        next_at REAL
    );
    CREATE INDEX deliveries_run ON deliveries (run_id);
    CREATE INDEX deliveries_pending ON deliveries (next_at) WHERE status = 'pending';
    CREATE TABLE incidents (
        job TEXT PRIMARY KEY,
        opened_at REAL NOT NULL,
        failures INTEGER NOT NULL,
        unsent INTEGER NOT NULL,
        last_sent_at REAL,
        last_run_id INTEGER
    );
    CREATE TABLE run_days (
        job TEXT NOT NULL,
        day INTEGER NOT NULL,
        runs INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        timed_out INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        missed INTEGER NOT NULL DEFAULT 0,
        lost INTEGER NOT NULL DEFAULT 0,
        timed INTEGER NOT NULL DEFAULT 0,
        duration_sum REAL NOT NULL DEFAULT 0,
        duration_max REAL,
        cpu_n INTEGER NOT NULL DEFAULT 0,
        cpu_sum REAL NOT NULL DEFAULT 0,
        rss_max INTEGER,
        last_success REAL,
        last_failure REAL,
        streak INTEGER NOT NULL DEFAULT 0,
        streak_max INTEGER NOT NULL DEFAULT 0,
        hist TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (job, day)
    ) WITHOUT ROWID;
    CREATE INDEX run_days_counts
        ON run_days (job, day, runs, succeeded, failed, timed_out, missed, lost);
    """,
    """
    ALTER TABLE runs ADD COLUMN node TEXT;
    """,
    """
    ALTER TABLE runs ADD COLUMN triggered_by TEXT;
    CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        created_by TEXT,
        last_used REAL,
        expires_at REAL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        who TEXT NOT NULL,
        address TEXT,
        action TEXT NOT NULL,
        job TEXT,
        run_id INTEGER,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_job ON audit (job, id);
    CREATE INDEX audit_who ON audit (who, id);
    """,
)
#: Columns of ``runs`` in API order.
RUN_COLUMNS = (
    "id",
    "job",
    "status",
    "trigger",
    "attempt",
    "slot",
    "scheduled_at",
    "started_at",
    "finished_at",
    "duration",
    "exit_code",
    "signal",
    "error",
    "pid",
    "pid_create_time",
    "cpu_time",
    "peak_rss",
    "output_bytes",
    "output_truncated",
    "leftovers_stopped",
    "node",
    "triggered_by",
)
_WRITE_BATCH = 2000
#: sqlite3 messages of failures that pass (a full disk, an I/O error, a lock
#: held too long): the writer keeps what it could not write and tries again.
_TRANSIENT_DB_ERRORS = (
    "disk is full",
    "disk i/o error",
    "database is locked",
    "unable to open",
    "out of memory",
)
#: While the database cannot be written: seconds between attempts, and how
#: much output the writer keeps in memory (beyond it the oldest output is
#: dropped; run and job records are always kept).
_RETRY_SECONDS = 1.0
_HELD_OUTPUT_BYTES = 32 << 20
#: How long ``close()`` keeps trying to write what is held.
_CLOSE_RETRY_SECONDS = 10.0
#: How long a request waits for its write before answering 503.
WRITE_WAIT = 10.0


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        text in str(exc).lower() for text in _TRANSIENT_DB_ERRORS
    )


#: Idle reader connections kept open.
_READ_POOL = 8


_PUBLIC_RUN_COLUMNS = tuple(
    c for c in RUN_COLUMNS if c not in ("slot", "pid_create_time")
)
_TIME_COLUMNS = ("scheduled_at", "started_at", "finished_at")


def run_public(row: dict) -> dict:
    """A run row as the API shows it: ISO times, booleans, no internals."""
    out = {key: row.get(key) for key in _PUBLIC_RUN_COLUMNS}
    for key in _TIME_COLUMNS:
        out[key] = iso_utc(out[key])
    out["output_truncated"] = bool(out["output_truncated"])
    return out


#: Duration histogram of the run statistics: ``HIST_PER_DECADE`` buckets a
#: decade from 1 ms, so a percentile is known to within about 6 %.
HIST_PER_DECADE = 20


def _sql_list(names) -> str:
    """``('a', 'b')``: a SQL list of status names (constants, never input)."""
    return "({})".format(", ".join(f"'{n}'" for n in names))


_SQL_ACTIVE = _sql_list(ACTIVE_STATUSES)
_SQL_FAILURES = _sql_list(FAILURE_STATUSES)
_SQL_KEPT_APART = _sql_list(KEPT_APART_STATUSES)
_SQL_KEPT = _sql_list(s for s in TERMINAL_STATUSES if s not in KEPT_APART_STATUSES)
#: Statuses counted in ``run_days`` (a column each).
_ROLLUP_STATUSES = TERMINAL_STATUSES


def _hist_bucket(duration: float) -> int:
    return max(
        0, math.floor(HIST_PER_DECADE * math.log10(max(duration, 0.001) / 0.001))
    )


def _hist_value(bucket: int) -> float:
    """The middle (geometric) of a histogram bucket, in seconds."""
    return round(0.001 * 10 ** ((bucket + 0.5) / HIST_PER_DECADE), 3)


#: The columns :func:`_roll_up` reads of a run (and ``job``).
_ROLLUP_COLUMNS = frozenset(
    ("status", "finished_at", "duration", "cpu_time", "peak_rss")
)


def _roll_up(conn, row, dialect) -> None:
    """Count a run that just became terminal in ``run_days``: its job's row
    of that UTC day and the ``*`` row (every job).  Writer thread, inside the
    transaction that recorded the run; every change is one UPSERT, no read
    back but the job's failure streak."""
    status = row["status"]
    if (
        status in ACTIVE_STATUSES
        or not row.get("finished_at")
        or status not in _ROLLUP_STATUSES
    ):
        return
    day = int(row["finished_at"] // 86400)
    duration = row.get("duration") if status not in ("skipped", "missed") else None
    cpu, rss = row.get("cpu_time"), row.get("peak_rss")
    failure, success = status in FAILURE_STATUSES, status == "succeeded"
    bucket = str(_hist_bucket(duration)) if duration is not None else None
    values = {
        "job": row["job"],
        "day": day,
        "timed": int(duration is not None),
        "dsum": duration or 0.0,
        "dmax": duration,
        "cpun": int(cpu is not None),
        "cpu": cpu or 0.0,
        "rss": rss,
        "ok": row["finished_at"] if success else None,
        "bad": row["finished_at"] if failure else None,
        "hist": json.dumps({bucket: 1}) if bucket else "{}",
    }
    g, t = dialect.GREATEST, "run_days."  # qualified: PostgreSQL insists
    previous = (
        "coalesce((SELECT streak FROM run_days WHERE job = :job AND day < :day "
        "ORDER BY day DESC LIMIT 1), 0)"
    )
    if failure:
        insert_streak, update_streak = (
            f"{previous} + 1",
            f"streak = {t}streak + 1, streak_max = {g}({t}streak_max, {t}streak + 1),",
        )
    elif success:
        insert_streak, update_streak = "0", "streak = 0,"
    else:
        insert_streak, update_streak = previous, ""
    hist = dialect._hist_add(bucket) if bucket else ""
    common = f"""
        runs = {t}runs + 1, {status} = {t}{status} + 1,
        timed = {t}timed + :timed, duration_sum = {t}duration_sum + :dsum,
        duration_max = {g}(coalesce({t}duration_max, :dmax), coalesce(:dmax, {t}duration_max)),
        cpu_n = {t}cpu_n + :cpun, cpu_sum = {t}cpu_sum + :cpu,
        rss_max = {g}(coalesce({t}rss_max, :rss), coalesce(:rss, {t}rss_max)),
        last_success = {g}(coalesce({t}last_success, :ok), coalesce(:ok, {t}last_success)),
        last_failure = {g}(coalesce({t}last_failure, :bad), coalesce(:bad, {t}last_failure)),
        {hist}"""
    columns = (
        f"job, day, runs, {status}, timed, duration_sum, duration_max, cpu_n, "
        "cpu_sum, rss_max, last_success, last_failure, hist, streak, streak_max"
    )
    streak = []

    def job_row(conn):
        conn.execute(
            f"INSERT INTO run_days ({columns}) VALUES (:job, :day, 1, 1, :timed, "
            f":dsum, :dmax, :cpun, :cpu, :rss, :ok, :bad, :hist, {insert_streak}, "
            f"{insert_streak}) ON CONFLICT (job, day) DO UPDATE SET {common} "
            f"{update_streak} job = {t}job",
            values,
        )
        streak.append(
            conn.execute(
                "SELECT streak FROM run_days WHERE job = ? AND day = ?",
                (row["job"], day),
            ).fetchone()[0]
        )

    def every_job_row(conn):
        conn.execute(
            f"INSERT INTO run_days ({columns}) VALUES ('*', :day, 1, 1, :timed, :dsum, "
            f":dmax, :cpun, :cpu, :rss, :ok, :bad, :hist, 0, :streak) "
            f"ON CONFLICT (job, day) DO UPDATE SET {common} "
            f"streak_max = {g}({t}streak_max, :streak), job = {t}job",
            dict(values, streak=streak[0]),
        )

    dialect._shared(conn, (1, row["job"], day), job_row)
    dialect._shared(conn, (2, "", day), every_job_row)


class Write:
    """A queued write's outcome, resolved by the writer after commit: the part
    of ``concurrent.futures.Future`` minisched uses (``result``,
    ``exception``, ``add_done_callback``) on one lock instead of a Condition,
    as a burst queues several writes per run.  ``result(timeout)`` raises
    :class:`TimeoutError` when the write is not done in time."""

    __slots__ = ("_callbacks", "_done", "_error", "_value")
    _callbacks_lock = threading.Lock()

    def __init__(self):
        self._done = threading.Lock()
        self._done.acquire()  # released once, when resolved
        self._value = self._error = None
        self._callbacks = []

    def set_result(self, value) -> None:
        self._value = value
        self._resolve()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._resolve()

    def _resolve(self) -> None:
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, None
        self._done.release()
        for callback in callbacks:
            self._call(callback)

    def _call(self, callback) -> None:
        try:
            callback(self)
        except Exception:
            log.exception("a write's callback failed")

    def _wait(self, timeout) -> None:
        if self._callbacks is None:
            return  # resolved (set before the lock is released)
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the write is not committed yet")
        self._done.release()

    def result(self, timeout=None):
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout=None):
        self._wait(timeout)
        return self._error

    def add_done_callback(self, callback) -> None:
        """Call ``callback(self)`` once resolved: at once if it is, else on
        the thread that resolves it (the writer)."""
        with self._callbacks_lock:
            if self._callbacks is not None:
                self._callbacks.append(callback)
                return
        self._call(callback)


class Store(abc.ABC):
    """What the engine needs from a database, and all it may ask.

    An implementation keeps jobs, runs, their output, sessions, deliveries
    and incidents; every SQL statement and dialect choice is inside it.  Write
    methods queue their change and return a :class:`Write`
    resolved once it is committed (``result`` waits for one); reads never wait
    for writes.  ``healthy`` is False while the database cannot be used,
    ``outage`` says why writes cannot be committed now (None when they can)
    and ``server_id`` marks this database's processes.  The contract tests
    (``test_store_*`` in the test suite) are what an implementation must pass;
    :class:`SQLiteStore` is today's.
    """

    healthy = True
    outage = None
    server_id = None

    def data_dir(self) -> str | None:
        """The local directory holding the data (for disk usage), or None."""
        return None

    @abc.abstractmethod
    def open(self, exclusive=True) -> Store:
        """Create or migrate the schema and start the writer thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush queued writes, stop the writer and release the lock."""

    @abc.abstractmethod
    def result(self, future, timeout=None):
        """A write's result, or :class:`UnavailableError` if it is not
        committed within ``timeout`` (default ``WRITE_WAIT``: the database
        cannot be written)."""

    @abc.abstractmethod
    def check_writable(self) -> None:
        """:class:`UnavailableError` (503) while writes cannot be committed."""

    @abc.abstractmethod
    def flush(self, timeout=None) -> None:
        """Wait until every write queued before this call is committed
        (:class:`UnavailableError` after ``timeout``, default ``WRITE_WAIT``)."""

    @abc.abstractmethod
    def allocate_run_id(self) -> int:
        """A fresh run id, handed out in memory so a run is known before commit."""

    @abc.abstractmethod
    def insert_run(self, run: dict, job_update: dict | None = None):
        """Insert a run (and update its job's scheduling state in the same
        transaction).  The future's result is False when the slot already had
        a run: that slot must not run again."""

    @abc.abstractmethod
    def update_run(self, run_id: int, fields: dict, job: str | None = None):
        """Change a run's columns; with ``job``, also make it that job's last run."""

    def begin_starts(self, run_ids: list, now: float) -> set:
        """Before their processes are spawned: record runs ``run_ids`` as
        started, committed, and return the ids refused (a fenced node's: they
        are another node's now, and must not start).  A single server's store
        refuses none and needs no round trip: its startup repair accounts for
        a run whose start was not recorded.  Launcher thread."""
        return set()

    @abc.abstractmethod
    def mark_started(self, rows: list):
        """Runs that started: ``[(started_at, pid, pid_create_time, id, job)]``;
        each also becomes its job's last run.  One operation per batch.  The
        future's result is the ids whose start was refused (their node was
        declared dead since :meth:`begin_starts`: the caller stops them); a
        single server's store refuses none."""

    @abc.abstractmethod
    def add_chunks(self, rows: list):
        """Append output chunks: ``[(run_id, seq, stream, ts, text), ...]``."""

    @abc.abstractmethod
    def save_job(self, name: str, fields: dict):
        """Insert or update a job row; ``fields`` are column values."""

    @abc.abstractmethod
    def delete_job(self, name: str, purge=False):
        """Delete a job row; with ``purge`` its runs and their output too."""

    @abc.abstractmethod
    def add_session(self, row: dict):
        """Record a page session: ``id`` (a hash of the cookie), ``token_name``,
        ``token_check`` (a hash of the token it was opened with), ``address``,
        ``created_at``, ``last_seen``, ``expires_at``.  Expired ones go."""

    @abc.abstractmethod
    def touch_session(self, session_id: str, now: float):
        """Mark a session used at ``now`` (idle expiry counts from it)."""

    @abc.abstractmethod
    def delete_sessions(self, session_id=None, token_name=None):
        """End one session, or every session of a token."""

    @abc.abstractmethod
    def add_token(self, row: dict):
        """Record a named token: ``name``, ``role``, ``hash`` (never the
        secret), ``created_at``, ``created_by``, ``expires_at``.  The
        future's result is False if the name was taken."""

    @abc.abstractmethod
    def change_token(self, name: str, role=None, last_used=None):
        """Set a token's role (ending its sessions) or its last use; the
        future's result is whether the token exists."""

    @abc.abstractmethod
    def delete_token(self, name: str):
        """Revoke a token and end its sessions; the result: whether it existed."""

    @abc.abstractmethod
    def add_audit(self, row: dict, keep: int):
        """Append an audit entry (``at``, ``who``, ``address``, ``action``,
        ``job``, ``run_id``, ``detail`` as JSON text), keeping the newest
        ``keep``."""

    @abc.abstractmethod
    def add_delivery(self, row: dict):
        """Record a hook or alert delivery; the future's result is its id."""

    @abc.abstractmethod
    def update_delivery(self, delivery_id: int, fields: dict):
        """Change a delivery's columns (status, attempts, error, next try)."""

    @abc.abstractmethod
    def save_incident(self, row: dict):
        """Insert or replace a job's open incident."""

    @abc.abstractmethod
    def delete_incident(self, job: str):
        """Forget a job's incident (it recovered)."""

    @abc.abstractmethod
    def prune(self, job: str, keep_runs: int):
        """Retention: keep the newest ``keep_runs`` real runs and the newest
        ``KEEP_NOISE_RUNS`` skipped/missed records of ``job``.  Requests for a
        job already waiting to be pruned are merged (a burst prunes once)."""

    @abc.abstractmethod
    def mark_lost(self, now: float):
        """Startup repair: runs left active by a dead server become ``lost``.
        The future's result is their rows (pid and create time let the caller
        kill leftovers)."""

    @abc.abstractmethod
    def load_jobs(self) -> list:
        """Every stored job: ``name``, ``definition``, ``source``, ``created_at``,
        ``last_slot``, ``paused``, ``scheduled_runs``."""

    @abc.abstractmethod
    def pending_deliveries(self) -> list:
        """Deliveries still to make (status ``pending``), oldest first."""

    @abc.abstractmethod
    def deliveries_for(self, run_ids: list) -> dict:
        """``{run id: [delivery, ...]}`` as the API shows them, oldest first."""

    @abc.abstractmethod
    def stats(self, since: float, job: str | None = None, by_job=False) -> dict:
        """An account of ``job``'s runs (every job's, with None) that ended
        on the UTC days from ``since``'s to today, from ``run_days``: counts by
        status, duration percentiles (from its histogram), CPU and memory, the
        longest run of failures, a per-day series; the last success and
        failure ever; and, for every job, its counts (the dashboard's rates).
        A few hundred rows whatever the number of runs."""

    @abc.abstractmethod
    def last_successes(self) -> dict:
        """Each job's last success (finished_at), from the kept history."""

    @abc.abstractmethod
    def load_incidents(self) -> list:
        """Every open incident."""

    @abc.abstractmethod
    def get_session(self, session_id: str) -> dict | None:
        """A session row by id (a hash of the cookie), or None."""

    @abc.abstractmethod
    def get_token(self, name=None, token_hash=None) -> dict | None:
        """A token row by name or by the hash of its secret, or None."""

    @abc.abstractmethod
    def list_tokens(self) -> list:
        """Every token row (without the hash), by name."""

    @abc.abstractmethod
    def audit_entries(self, job=None, who=None, limit=100, before=None) -> list:
        """Audit entries newest first, ``detail`` decoded; ``before`` is an id."""

    @abc.abstractmethod
    def get_run(self, run_id: int) -> dict | None:
        """A run row by id, or None."""

    @abc.abstractmethod
    def list_runs(
        self, job=None, status=None, before=None, limit=50, offset=0, node=None
    ):
        """Newest first, with the total count of matches (``before`` is a
        cursor, not a filter: it does not change the total)."""

    @abc.abstractmethod
    def last_runs(self) -> dict:
        """Each job's last run (the newest started or ended one), by job name."""

    @abc.abstractmethod
    def get_chunks(self, run_id: int, after_seq: int = 0, limit: int = 100000) -> list:
        """A run's output chunks with ``seq > after_seq``, in order."""

    @abc.abstractmethod
    def writer_alive(self) -> bool:
        """True while the writer runs (health)."""

    @abc.abstractmethod
    def count_failed(self, since: float) -> int:
        """Runs that ended badly (failed, timed out, missed, lost) since ``since``."""


class _BackupRestarted(Exception):
    """The server wrote during a stepwise backup once too often."""


class SQLStore(Store):
    """What the SQLite and the PostgreSQL store share: the batching writer,
    the futures, outages, pooled reads and the SQL both dialects speak.

    Writes go through one writer thread (``minisched-writer``) which batches
    whatever is queued into one transaction; each write method returns a
    :class:`Write` resolved after commit.  Reads run on
    pooled connections from any thread and never wait for the writer.  SQL is
    written once with ``?`` and ``:name`` parameters; a subclass supplies the
    connections and the few dialect differences below.
    """

    #: The dialect: how a write transaction begins, the two-argument maximum,
    #: the errors that pass (retried) and those that are a constraint.
    BEGIN = "BEGIN IMMEDIATE"
    GREATEST = "max"
    #: Columns an inserted run may set.
    RUN_INSERT_COLUMNS = RUN_COLUMNS
    #: Whether several servers share the database (nodes, placement, fencing).
    clustered = False

    def __init__(self):
        self._pool = []  # idle reader connections
        self._prunes = {}  # job -> keep_runs, prunes queued but not yet run
        #: Marks this database's processes (``MINISCHED_SERVER``), set by open().
        self.server_id = None
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self._next_run_id = 0
        self._thread = None
        self._writer_conn = None
        self.healthy = True
        #: Why writes cannot be committed now (None when they can).
        self.outage = None
        self._outage_logged = 0.0

    # -- the dialect (subclasses) --------------------------------------------

    @abc.abstractmethod
    def _connect(self):
        """A new connection whose ``execute`` takes ``?``/``:name`` SQL and
        whose rows are dicts that also index by position."""

    def _transient(self, exc: BaseException) -> bool:
        """True for a failure that passes (the writer keeps the batch)."""
        return _transient(exc)

    def _constraint(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    @staticmethod
    def _in_transaction(conn) -> bool:
        return conn.in_transaction

    def _hist_add(self, bucket: str) -> str:
        """SQL that counts one more duration in histogram bucket ``bucket``."""
        path = f'$."{bucket}"'
        return (
            f"hist = json_set(run_days.hist, '{path}', "
            f"coalesce(json_extract(run_days.hist, '{path}'), 0) + 1),"
        )

    def _insert_id(self, conn, sql, values) -> int:
        """Run an INSERT and return the new row's id."""
        return conn.execute(sql, values).lastrowid

    def _maintain(self, conn, quiet: bool) -> None:
        """Writer thread, between batches (``quiet``: nothing is queued)."""

    def _before_commit(self, conn) -> None:
        """Writer thread, at the end of each write transaction."""

    def _reconnect(self) -> None:
        """Writer thread, after a failure that passes: a new connection if
        the old one is broken (PostgreSQL); SQLite's never is."""

    def _usable(self, conn) -> bool:
        """Whether a reader connection may go back to the pool."""
        return True

    def _run_changed(self, run_ids) -> None:
        """Writer thread: runs changed in this transaction (other nodes hear)."""

    def _output_added(self, run_ids) -> None:
        """Writer thread: output of these runs was added in this transaction."""

    def _jobs_changed(self, conn) -> None:
        """Writer thread: a job was created, changed or deleted."""

    # -- the writer thread -------------------------------------------------

    def _write_loop(self) -> None:
        """Runs in ``minisched-writer``: batch, commit, resolve futures.

        When the database cannot be written (a full disk, an I/O error), the
        operations stay in ``held``, in order, and are retried every
        ``_RETRY_SECONDS`` until they commit: nothing acknowledged is lost.
        Meanwhile ``outage`` says why and the API answers new writes with 503.
        """
        held = []  # (fn, future, kind, size), oldest first, not yet done
        stop_by = None  # set by close(): give up on ``held`` after this
        while True:
            items, stopping = self._take(_RETRY_SECONDS if held else 60.0)
            if stopping and stop_by is None:
                stop_by = time.monotonic() + _CLOSE_RETRY_SECONDS
            held.extend(items)
            while held:
                batch = held[:_WRITE_BATCH]
                done = self._commit(batch)
                del held[:done]
                if done < len(batch):
                    break  # cannot write now; keep the rest
            if held:
                self._limit_held(held)
                self._reconnect()
            if stop_by is not None and (not held or time.monotonic() > stop_by):
                if held:
                    log.error(
                        "%d database writes were never committed (%s): the next "
                        "start marks their runs lost",
                        len(held),
                        self.outage,
                    )
                    for _fn, future, _kind, _size in held:
                        future.set_exception(UnavailableError(str(self.outage)))
                return
            if not held:
                self._maintain(self._writer_conn, not items)

    def _take(self, timeout) -> tuple:
        """Wait up to ``timeout`` for queued operations and take all of them
        (at most ``_WRITE_BATCH``); returns ``(items, close requested)``."""
        items = []
        try:
            item = self._queue.get(timeout=timeout)
            while item is not None:
                items.append(item)
                if len(items) >= _WRITE_BATCH:
                    return items, False
                item = self._queue.get_nowait()
            return items, True
        except queue.Empty:
            return items, False

    def _commit(self, batch) -> int:
        """Commit ``batch`` in one transaction and resolve its futures.
        Returns how many of its operations are done (committed, or failed for
        good), counted from the first: fewer than all means the database
        cannot be written now and the rest must be tried again."""
        try:
            results = self._transaction(batch)
        except Exception as exc:  # noqa: BLE001 - classified below
            if self._transient(exc):
                self._set_outage(exc)
                return 0
            # Replay one by one so one bad operation fails alone.
            for i, item in enumerate(batch):
                try:
                    (result,) = self._transaction([item])
                except Exception as exc:  # noqa: BLE001 - goes to the future
                    if self._transient(exc):
                        self._set_outage(exc)
                        return i
                    log.error("database write failed: %s", exc)
                    if not self._constraint(exc):
                        self.healthy = False
                    item[1].set_exception(exc)
                else:
                    item[1].set_result(result)
            self._set_outage(None)
            return len(batch)
        self._set_outage(None)
        self.healthy = True
        for item, result in zip(batch, results):
            item[1].set_result(result)
        return len(batch)

    def _shared(self, conn, key, write) -> None:
        """Apply ``write(conn)``, a change to a row that other nodes change
        too (a job's row, a day's statistics), ordered by ``key``.  SQLite has
        one writer: at once."""
        write(conn)

    def _set_last_run(self, conn, job, run_id) -> None:
        self._shared(
            conn,
            (0, job, 0),
            lambda conn: conn.execute(
                "UPDATE jobs SET last_run_id = ? WHERE name = ?", (run_id, job)
            ),
        )

    def _transaction(self, batch) -> list:
        """One write transaction of ``batch``'s operations (writer thread)."""
        conn = self._writer_conn
        try:
            conn.execute(self.BEGIN)
            results = [item[0](conn) for item in batch]
            self._before_commit(conn)
            conn.execute("COMMIT")
            return results
        except BaseException:
            with contextlib.suppress(Exception):  # rolled back by the database
                if self._in_transaction(conn):
                    conn.execute("ROLLBACK")
            raise

    def _set_outage(self, exc) -> None:
        """Writer thread: note that writing fails (``exc``) or works again (None)."""
        now = time.monotonic()
        if exc is None:
            if self.outage is not None:
                log.warning("the database can be written again: held writes committed")
                self.outage = None
                self.healthy = True
            return
        if self.outage is None or now - self._outage_logged > 60:
            log.warning(
                "the database cannot be written (%s): keeping writes in memory "
                "and retrying every %gs",
                exc,
                _RETRY_SECONDS,
            )
            self._outage_logged = now
        self.outage = str(exc)
        self.healthy = False

    def _limit_held(self, held) -> None:
        """Bound what an outage keeps: beyond the limit, drop the oldest output
        (run and job records are small and always kept)."""
        output = sum(item[3] for item in held)
        if output <= _HELD_OUTPUT_BYTES:
            return
        dropped = 0
        for i, item in enumerate(held):
            if output <= _HELD_OUTPUT_BYTES // 2:
                break
            if item[2] != "output":
                continue
            output -= item[3]
            item[1].set_exception(UnavailableError("dropped: " + str(self.outage)))
            held[i] = None
            dropped += 1
        held[:] = [item for item in held if item is not None]
        log.warning(
            "database still cannot be written: dropped %d held output writes "
            "to stay within %d MiB",
            dropped,
            _HELD_OUTPUT_BYTES >> 20,
        )

    def _submit(self, fn, kind="state", size=0) -> Write:
        future = Write()
        self._queue.put((fn, future, kind, size))
        return future

    def result(self, future, timeout=None):
        timeout = WRITE_WAIT if timeout is None else timeout
        try:
            return future.result(timeout)
        except TimeoutError:
            raise UnavailableError(
                "the database cannot be written now ({}); try again later".format(
                    self.outage or "it is too slow"
                )
            ) from None

    def check_writable(self) -> None:
        if self.outage is not None:
            raise UnavailableError(
                f"the database cannot be written now ({self.outage}); try again later"
            )

    def flush(self, timeout=None) -> None:
        self.result(self._submit(lambda conn: None), timeout)

    # -- writes (any thread; each returns a Write) --------------------------

    def allocate_run_id(self) -> int:
        with self._lock:
            run_id = self._next_run_id
            self._next_run_id += 1
            return run_id

    def insert_run(self, run: dict, job_update: dict | None = None):
        cols = [key for key in self.RUN_INSERT_COLUMNS if key in run]
        sql = "INSERT INTO runs ({}) VALUES ({}) ON CONFLICT DO NOTHING".format(
            ", ".join(cols),
            ", ".join("?" * len(cols)),
        )
        values = [run[key] for key in cols]

        def op(conn):
            inserted = conn.execute(sql, values).rowcount == 1
            if not inserted and run.get("slot") is not None:
                # A replay after a commit whose answer was lost finds itself.
                inserted = self._slot_holder(conn, run) == run["id"]
            if job_update:
                self._update_job(conn, run["job"], job_update)
            if inserted and run.get("status") not in ACTIVE_STATUSES:
                _roll_up(conn, run, self)  # a record that never ran: skipped, missed
            if inserted:
                self._run_changed([run["id"]])
            return inserted

        return self._submit(op)

    def _slot_holder(self, conn, run) -> int | None:
        """The id of the run that holds ``run``'s slot."""
        row = conn.execute(
            "SELECT id FROM runs WHERE job = ? AND slot = ?", (run["job"], run["slot"])
        ).fetchone()
        return row[0] if row else None

    def update_run(self, run_id: int, fields: dict, job: str | None = None):
        sets = ", ".join(f"{key} = ?" for key in fields)
        values = [*fields.values(), run_id]

        ending = fields.get("status") not in (None, *ACTIVE_STATUSES)

        # The end of a run as the runner records it carries all that the
        # statistics need: one statement instead of a read, a write, a read.
        complete = job is not None and _ROLLUP_COLUMNS <= fields.keys()

        def op(conn):
            ended = False
            if ending:
                ended = conn.execute(
                    f"UPDATE runs SET {sets} WHERE id = ? AND status IN {_SQL_ACTIVE}",
                    values,
                ).rowcount
            if not ended:
                conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", values)
            if job is not None:
                self._set_last_run(conn, job, run_id)
            if ended:
                if complete:
                    row = dict(fields, job=job)
                else:
                    row = conn.execute(
                        "SELECT * FROM runs WHERE id = ?", (run_id,)
                    ).fetchone()
                _roll_up(conn, dict(row), self)
            self._run_changed([run_id])

        return self._submit(op)

    def mark_started(self, rows: list):

        def op(conn):
            conn.executemany(
                "UPDATE runs SET status = 'running', started_at = ?, pid = ?, "
                "pid_create_time = ? WHERE id = ?",
                [row[:4] for row in rows],
            )
            for row in rows:
                self._set_last_run(conn, row[4], row[3])
            return []

        return self._submit(op)

    def add_chunks(self, rows: list):
        def op(conn):
            conn.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, seq) "
                "DO UPDATE SET stream = excluded.stream, ts = excluded.ts, "
                "text = excluded.text",
                rows,
            )
            self._output_added({row[0] for row in rows})

        return self._submit(
            op,
            "output",
            sum(len(row[4]) for row in rows),
        )

    def save_job(self, name: str, fields: dict):
        fields = dict(fields)
        if "definition" in fields:
            fields["definition"] = json.dumps(fields["definition"], sort_keys=True)
        if "file_definition" in fields and fields["file_definition"] is not None:
            fields["file_definition"] = json.dumps(
                fields["file_definition"], sort_keys=True
            )

        def op(conn):
            exists = conn.execute(
                "SELECT 1 FROM jobs WHERE name = ?", (name,)
            ).fetchone()
            if not exists:
                cols = ["name"] + list(fields)
                exists = not conn.execute(
                    "INSERT INTO jobs ({}) VALUES ({}) ON CONFLICT (name) DO NOTHING".format(
                        ", ".join(cols), ", ".join("?" * len(cols))
                    ),
                    [name] + list(fields.values()),
                ).rowcount  # another node created it since the SELECT
            if exists:
                self._update_job(
                    conn, name, {k: v for k, v in fields.items() if k != "created_at"}
                )
            self._jobs_changed(conn)

        return self._submit(op)

    def _update_job(self, conn, name, fields):
        fields = dict(fields)
        if isinstance(fields.get("definition"), dict):
            fields["definition"] = json.dumps(fields["definition"], sort_keys=True)
        sets = ", ".join(f"{key} = ?" for key in fields)
        self._shared(
            conn,
            (0, name, 0),
            lambda conn: conn.execute(
                f"UPDATE jobs SET {sets} WHERE name = ?",
                list(fields.values()) + [name],
            ),
        )

    def delete_job(self, name: str, purge=False):
        def op(conn):
            conn.execute("DELETE FROM jobs WHERE name = ?", (name,))
            if purge:
                conn.execute("DELETE FROM run_days WHERE job = ?", (name,))
                for table in ("chunks", "deliveries"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE run_id IN "
                        "(SELECT id FROM runs WHERE job = ?)",
                        (name,),
                    )
                conn.execute("DELETE FROM runs WHERE job = ?", (name,))
            self._jobs_changed(conn)

        return self._submit(op)

    def add_session(self, row: dict):
        cols = list(row)
        sql = "INSERT INTO sessions ({}) VALUES ({})".format(
            ", ".join(cols), ", ".join("?" * len(cols))
        )

        def op(conn):
            conn.execute(
                "DELETE FROM sessions WHERE expires_at < ?", (row["created_at"],)
            )
            conn.execute(sql, [row[c] for c in cols])

        return self._submit(op)

    def touch_session(self, session_id: str, now: float):
        return self._submit(
            lambda conn: conn.execute(
                "UPDATE sessions SET last_seen = ? WHERE id = ?", (now, session_id)
            )
        )

    def delete_sessions(self, session_id=None, token_name=None):
        column, value = ("id", session_id) if session_id else ("token_name", token_name)
        return self._submit(
            lambda conn: conn.execute(
                f"DELETE FROM sessions WHERE {column} = ?", (value,)
            )
        )

    def add_token(self, row: dict):
        cols = list(row)
        sql = (
            "INSERT INTO tokens ({}) VALUES ({}) ON CONFLICT (name) DO NOTHING".format(
                ", ".join(cols), ", ".join("?" * len(cols))
            )
        )
        return self._submit(
            lambda conn: conn.execute(sql, [row[c] for c in cols]).rowcount > 0
        )

    def change_token(self, name: str, role=None, last_used=None):
        def op(conn):
            if role is not None:
                conn.execute("DELETE FROM sessions WHERE token_name = ?", (name,))
                sql, value = "UPDATE tokens SET role = ? WHERE name = ?", role
            else:
                sql, value = "UPDATE tokens SET last_used = ? WHERE name = ?", last_used
            return conn.execute(sql, (value, name)).rowcount > 0

        return self._submit(op)

    def delete_token(self, name: str):
        def op(conn):
            conn.execute("DELETE FROM sessions WHERE token_name = ?", (name,))
            return (
                conn.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount > 0
            )

        return self._submit(op)

    def add_audit(self, row: dict, keep: int):
        cols = list(row)
        sql = "INSERT INTO audit ({}) VALUES ({})".format(
            ", ".join(cols), ", ".join("?" * len(cols))
        )

        def op(conn):
            entry = self._insert_id(conn, sql, [row[c] for c in cols])
            if entry > keep:  # ids count from 1: before, nothing is that old
                conn.execute("DELETE FROM audit WHERE id <= ?", (entry - keep,))
            return entry

        return self._submit(op)

    def add_delivery(self, row: dict):
        row = dict(row, spec=json.dumps(row["spec"]))
        cols = [c for c in row if c != "id"]
        sql = "INSERT INTO deliveries ({}) VALUES ({})".format(
            ", ".join(cols), ", ".join("?" * len(cols))
        )
        return self._submit(
            lambda conn: self._insert_id(conn, sql, [row[c] for c in cols])
        )

    def update_delivery(self, delivery_id: int, fields: dict):
        fields = dict(fields)
        if "spec" in fields:
            fields["spec"] = json.dumps(fields["spec"])
        sets = ", ".join(f"{key} = ?" for key in fields)
        values = [*fields.values(), delivery_id]
        return self._submit(
            lambda conn: conn.execute(
                f"UPDATE deliveries SET {sets} WHERE id = ?", values
            )
        )

    def save_incident(self, row: dict):
        cols = list(row)
        sql = "INSERT INTO incidents ({}) VALUES ({}) ON CONFLICT (job) DO UPDATE SET {}".format(
            ", ".join(cols),
            ", ".join("?" * len(cols)),
            ", ".join(f"{c} = excluded.{c}" for c in cols if c != "job"),
        )
        return self._submit(lambda conn: conn.execute(sql, [row[c] for c in cols]))

    def delete_incident(self, job: str):
        return self._submit(
            lambda conn: conn.execute("DELETE FROM incidents WHERE job = ?", (job,))
        )

    def prune(self, job: str, keep_runs: int):
        with self._lock:
            if job in self._prunes:
                self._prunes[job] = keep_runs
                return None
            self._prunes[job] = keep_runs

        def op(conn):
            with self._lock:
                # A replay after a failed batch finds it popped already.
                keep_real = self._prunes.pop(job, keep_runs)
            for where, keep in (
                (f"status IN {_SQL_KEPT}", keep_real),
                (f"status IN {_SQL_KEPT_APART}", KEEP_NOISE_RUNS),
            ):
                row = conn.execute(
                    f"SELECT id FROM runs WHERE job = ? AND {where} ORDER BY id DESC "
                    "LIMIT 1 OFFSET ?",
                    (job, keep),
                ).fetchone()
                if row is None:
                    continue
                ids = f"SELECT id FROM runs WHERE job = ? AND {where} AND id <= ?"
                for table in ("chunks", "deliveries"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE run_id IN ({ids})", (job, row[0])
                    )
                conn.execute(f"DELETE FROM runs WHERE id IN ({ids})", (job, row[0]))

        return self._submit(op)

    def mark_lost(self, now: float):

        def op(conn):
            rows = [
                dict(r)
                for r in conn.execute(
                    f"SELECT * FROM runs WHERE status IN {_SQL_ACTIVE}"
                )
            ]
            conn.execute(
                "UPDATE runs SET status = 'lost', finished_at = ?, "
                "error = 'the server stopped while this run was ' || status "
                f"WHERE status IN {_SQL_ACTIVE}",
                (now,),
            )
            for row in rows:
                _roll_up(conn, dict(row, status="lost", finished_at=now), self)
            return rows

        return self._submit(op)

    # -- reads (any thread, pooled connections) ------------------------------

    def _query(self, sql: str, args=(), one=False):
        """One read on a pooled connection (requests come on short-lived
        threads, so connections are lent, not kept per thread).  Rows as dicts."""
        with self._lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self._connect()
        try:
            cursor = conn.execute(sql, args)
            if one:
                row = cursor.fetchone()
                return dict(row) if row else None
            return [dict(row) for row in cursor.fetchall()]
        finally:
            with self._lock:
                keep = len(self._pool) < _READ_POOL and self._usable(conn)
                if keep:
                    self._pool.append(conn)
            if not keep:
                conn.close()

    def load_jobs(self) -> list:
        out = self._query("SELECT * FROM jobs ORDER BY name")
        for item in out:
            item["definition"] = json.loads(item["definition"])
            if item["file_definition"]:
                item["file_definition"] = json.loads(item["file_definition"])
        return out

    def pending_deliveries(self) -> list:
        return self._query(
            "SELECT * FROM deliveries WHERE status = 'pending' ORDER BY id"
        )

    def deliveries_for(self, run_ids: list) -> dict:
        if not run_ids:
            return {}
        marks = ", ".join("?" * len(run_ids))
        rows = self._query(
            "SELECT run_id, event, target, status, attempts, error, at FROM deliveries "
            f"WHERE run_id IN ({marks}) ORDER BY id",
            list(run_ids),
        )
        out = {}
        for row in rows:
            out.setdefault(row.pop("run_id"), []).append(
                dict(row, at=iso_utc(row["at"]))
            )
        return out

    def stats(self, since: float, job: str | None = None, by_job=False) -> dict:
        key = job if job is not None else "*"
        first = int(since // 86400)
        rows = self._query(
            "SELECT * FROM run_days WHERE job = ? AND day >= ? ORDER BY day",
            (key, first),
        )
        totals = collections.Counter()
        hist = collections.Counter()
        for row in rows:
            for column in (
                *_ROLLUP_STATUSES,
                "runs",
                "timed",
                "duration_sum",
                "cpu_n",
                "cpu_sum",
            ):
                totals[column] += row[column]
            for bucket, count in json.loads(row["hist"]).items():
                hist[int(bucket)] += count
        percentiles = {}
        for name, p in (("p50", 0.50), ("p95", 0.95)):
            rank, seen, value = math.floor(p * (totals["timed"] - 1)), 0, None
            for bucket in sorted(hist):
                seen += hist[bucket]
                if seen > rank:
                    value = _hist_value(bucket)
                    break
            percentiles[name] = value
        dmax = max(
            (r["duration_max"] for r in rows if r["duration_max"] is not None),
            default=None,
        )
        if dmax is not None:  # a bucket's middle may lie past the longest run
            percentiles = {
                k: v if v is None else min(v, dmax) for k, v in percentiles.items()
            }
        ever = self._query(
            "SELECT max(last_success) AS ok, max(last_failure) AS bad FROM run_days WHERE job = ?",
            (key,),
            one=True,
        )
        jobs = {}
        if by_job:
            for r in self._query(
                "SELECT job, sum(runs) AS runs, sum(succeeded) AS succeeded, "
                f"sum({' + '.join(FAILURE_STATUSES)}) AS failures FROM run_days "
                "WHERE day >= ? AND job != '*' GROUP BY job",
                (first,),
            ):
                jobs[r.pop("job")] = r
        return {
            "by_status": {s: totals[s] for s in _ROLLUP_STATUSES},
            "runs": totals["runs"],
            "duration": {**percentiles, "max": dmax},
            "mean_cpu": totals["cpu_sum"] / totals["cpu_n"]
            if totals["cpu_n"]
            else None,
            "peak_rss": max(
                (r["rss_max"] for r in rows if r["rss_max"] is not None), default=None
            ),
            "last_success": ever["ok"],
            "last_failure": ever["bad"],
            "longest_failure_streak": max((r["streak_max"] for r in rows), default=0),
            "per_day": {r["day"]: {s: r[s] for s in _ROLLUP_STATUSES} for r in rows},
            "jobs": jobs,
        }

    def last_successes(self) -> dict:
        rows = self._query(
            "SELECT job, max(finished_at) AS at FROM runs WHERE status = 'succeeded' "
            "GROUP BY job"
        )
        return {row["job"]: row["at"] for row in rows}

    def load_incidents(self) -> list:
        return self._query("SELECT * FROM incidents")

    def get_session(self, session_id: str) -> dict | None:
        return self._query(
            "SELECT * FROM sessions WHERE id = ?", (session_id,), one=True
        )

    def get_token(self, name=None, token_hash=None) -> dict | None:
        column, value = ("name", name) if name is not None else ("hash", token_hash)
        return self._query(
            f"SELECT * FROM tokens WHERE {column} = ?", (value,), one=True
        )

    def list_tokens(self) -> list:
        return self._query(
            "SELECT name, role, created_at, created_by, last_used, expires_at "
            "FROM tokens ORDER BY name"
        )

    def audit_entries(self, job=None, who=None, limit=100, before=None) -> list:
        where, args = [], []
        for column, value in (("job", job), ("who", who)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        sql = "SELECT * FROM audit{} ORDER BY id DESC LIMIT ?".format(
            " WHERE " + " AND ".join(where) if where else ""
        )
        rows = self._query(sql, (*args, limit))
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows

    def get_run(self, run_id: int) -> dict | None:
        return self._query("SELECT * FROM runs WHERE id = ?", (run_id,), one=True)

    def list_runs(
        self, job=None, status=None, before=None, limit=50, offset=0, node=None
    ):
        where, args = [], []
        for clause, value in (
            ("job = ?", job),
            ("status = ?", status),
            ("node = ?", node),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        total = self._query(
            "SELECT count(*) AS n FROM runs" + _where(where), args, one=True
        )["n"]
        if before is not None:
            where.append("id < ?")
            args.append(before)
        rows = self._query(
            f"SELECT * FROM runs{_where(where)} ORDER BY id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return rows, total

    def last_runs(self) -> dict:
        rows = self._query(
            "SELECT runs.* FROM jobs JOIN runs ON runs.id = jobs.last_run_id"
        )
        return {row["job"]: row for row in rows}

    def get_chunks(self, run_id: int, after_seq: int = 0, limit: int = 100000) -> list:
        return self._query(
            "SELECT seq, stream, ts, text FROM chunks WHERE run_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (run_id, after_seq, limit),
        )

    def writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- copy-db (one command, no server) ------------------------------------

    #: What ``copy-db`` copies, each with its order: jobs with their pause
    #: state, runs, output, the statistics and open incidents.
    COPY_TABLES = (
        ("jobs", "name"),
        ("runs", "id"),
        ("chunks", "run_id, seq"),
        ("run_days", "job, day"),
        ("incidents", "job"),
        ("tokens", "name"),
        ("audit", "id"),
    )

    def table_rows(self, table, order, page=5000):
        """Every row of ``table`` (one of :data:`COPY_TABLES`), in pages."""
        offset = 0
        while True:
            rows = self._query(
                f"SELECT * FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
                (page, offset),
            )
            yield from rows
            if len(rows) < page:
                return
            offset += page

    def count_rows(self, table) -> int:
        return self._query(f"SELECT count(*) AS n FROM {table}", one=True)["n"]

    def put_rows(self, table, rows):
        """Insert copied rows (the columns both sides have); existing keys stay."""
        if not rows:
            return None
        columns = self._columns(table)
        cols = [c for c in rows[0] if c in columns]
        sql = "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING".format(
            table, ", ".join(cols), ", ".join("?" * len(cols))
        )
        values = [[row[c] for c in cols] for row in rows]
        return self._submit(lambda conn: conn.executemany(sql, values))

    def _columns(self, table) -> set:
        return {r["name"] for r in self._query(f"PRAGMA table_info({table})")}

    def after_copy(self) -> None:
        """Run and audit ids go on after the copied ones."""

    def count_failed(self, since: float) -> int:
        return self._query(
            f"SELECT count(*) AS n FROM runs WHERE status IN {_SQL_FAILURES} "
            "AND finished_at >= ?",
            (since,),
            one=True,
        )["n"]


class SQLiteStore(SQLStore):
    """One SQLite file in WAL mode, for one server.

    Write transactions are ``BEGIN IMMEDIATE`` (a read that later writes
    would fail with "database is locked"); ``open()`` takes an exclusive
    ``flock`` so two servers cannot share one file; the writer keeps the WAL
    small with checkpoints.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._lock_fd = None
        self._checkpointed = time.monotonic()

    def _maintain(self, conn, quiet) -> None:
        """Keep the WAL small, even if readers held it open during bursts."""
        now = time.monotonic()
        if quiet or now - self._checkpointed > 300:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._checkpointed = now

    # -- lifecycle ---------------------------------------------------------

    def data_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def open(self, exclusive=True) -> Store:
        """SQLite: an exclusive ``flock`` on ``PATH.lock`` (one server per
        file), WAL, ``PRAGMA user_version`` counting the applied migrations."""
        if exclusive:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise DatabaseError(
                    f"database {self.path} is in use by another minisched server"
                ) from None
        conn = self._connect()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise DatabaseError(
                f"database {self.path} has schema version {version} but this "
                f"minisched {__version__} knows only up to {len(MIGRATIONS)}: use a "
                "newer minisched.py (the file is left untouched)"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        for number in range(version, len(MIGRATIONS)):
            conn.executescript(
                f"BEGIN IMMEDIATE;{MIGRATIONS[number]};"
                f"PRAGMA user_version={number + 1};COMMIT;"
            )
        row = conn.execute(
            "SELECT value FROM settings WHERE key = 'server_id'"
        ).fetchone()
        self.server_id = json.loads(row[0]) if row else secrets.token_hex(6)
        if not row:
            conn.execute(
                "INSERT INTO settings VALUES ('server_id', ?)",
                (json.dumps(self.server_id),),
            )
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name='runs'"
        ).fetchone()
        self._next_run_id = (row[0] if row else 0) + 1
        self._backfill_run_days(conn)
        conn.execute(
            "DELETE FROM run_days WHERE day < ?", (int(time.time() // 86400) - 400,)
        )
        self._writer_conn = self._connect()
        self._thread = threading.Thread(
            target=self._write_loop, name="minisched-writer", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
            try:
                self._writer_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._writer_conn.close()
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=16777216")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    @staticmethod
    def backup(db: str, target: str, step_pages=1024) -> int:
        """Copy ``db`` to ``target`` with SQLite's online backup API, in steps
        of ``step_pages`` pages: in WAL mode a step only reads, so the server's
        writer is never blocked.  A write by the server restarts the copy; after
        three restarts the rest is copied in one step (one read snapshot, still
        not blocking the writer).  The copy is checked (``PRAGMA
        integrity_check``) and renamed into place.  Returns its page count."""
        tmp = f"{target}.{os.getpid()}.tmp"
        source = sqlite3.connect(db, timeout=30)
        copy = sqlite3.connect(tmp)
        seen = []

        def progress(_status, remaining, _total):
            seen.append(remaining)
            restarts = sum(b > a for a, b in zip(seen, seen[1:]))  # noqa: RUF007
            if restarts > 3:
                raise _BackupRestarted

        try:
            source.execute("PRAGMA busy_timeout=30000")
            try:
                source.backup(copy, pages=step_pages, progress=progress, sleep=0.001)
            except _BackupRestarted:
                source.backup(copy)  # one step: one read snapshot
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            pages = copy.execute("PRAGMA page_count").fetchone()[0]
        finally:
            source.close()
            copy.close()
        if check != "ok":
            os.unlink(tmp)
            raise MinischedError(f"the copy failed its integrity check: {check}")
        os.replace(tmp, target)
        return pages

    def _backfill_run_days(self, conn) -> None:
        """Open: a database from before ``run_days`` (or one filled by other
        means) gets its statistics built once from the kept runs."""
        if conn.execute("SELECT 1 FROM run_days LIMIT 1").fetchone():
            return
        count = conn.execute(
            f"SELECT count(*) FROM runs WHERE status NOT IN {_SQL_ACTIVE}"
        ).fetchone()[0]
        if not count:
            return
        log.info("building run statistics from %d runs (once)", count)
        conn.execute("BEGIN IMMEDIATE")
        for row in conn.execute(
            f"SELECT * FROM runs WHERE status NOT IN {_SQL_ACTIVE} ORDER BY id"
        ).fetchall():
            _roll_up(conn, dict(row), self)
        conn.execute("COMMIT")


#: The PostgreSQL schema, one migration per entry; ``settings.schema_version``
#: counts the applied ones.  Run ids come from a sequence in blocks of
#: ``_ID_BLOCK`` (each node hands out its own block in memory).
PG_MIGRATIONS = (
    """
    CREATE TABLE settings (key text PRIMARY KEY, value text);
    CREATE TABLE jobs (
        name text PRIMARY KEY,
        definition text NOT NULL,
        source text NOT NULL DEFAULT 'api',
        file_definition text,
        file_owner text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        paused integer NOT NULL DEFAULT 0,
        last_slot double precision,
        scheduled_runs integer NOT NULL DEFAULT 0,
        last_run_id bigint
    );
    CREATE SEQUENCE runs_id_seq INCREMENT BY 100;
    CREATE TABLE runs (
        id bigint PRIMARY KEY,
        job text NOT NULL,
        status text NOT NULL,
        trigger text NOT NULL,
        attempt integer NOT NULL DEFAULT 1,
        slot double precision,
        scheduled_at double precision,
        started_at double precision,
        finished_at double precision,
        duration double precision,
        exit_code integer,
        signal integer,
        error text,
        pid integer,
        pid_create_time double precision,
        cpu_time double precision,
        peak_rss bigint,
        output_bytes bigint NOT NULL DEFAULT 0,
        output_truncated integer NOT NULL DEFAULT 0,
        leftovers_stopped integer,
        node text,
        node_id bigint,
        claim text NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX runs_job_slot ON runs (job, slot, claim) WHERE slot IS NOT NULL;
    CREATE INDEX runs_job_id ON runs (job, id);
    CREATE INDEX runs_status_id ON runs (status, id);
    CREATE INDEX runs_node_active ON runs (node_id) WHERE status IN ('queued', 'running');
    CREATE TABLE chunks (
        run_id bigint NOT NULL,
        seq integer NOT NULL,
        stream text NOT NULL,
        ts double precision NOT NULL,
        text text NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE sessions (
        id text PRIMARY KEY,
        token_name text NOT NULL,
        token_check text NOT NULL,
        address text,
        created_at double precision NOT NULL,
        last_seen double precision NOT NULL,
        expires_at double precision NOT NULL
    );
    CREATE TABLE deliveries (
        id bigserial PRIMARY KEY,
        run_id bigint,
        job text NOT NULL,
        event text NOT NULL,
        kind text NOT NULL,
        target text NOT NULL,
        spec text NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        error text,
        created_at double precision NOT NULL,
        at double precision,
        next_at double precision
    );
    CREATE INDEX deliveries_run ON deliveries (run_id);
    CREATE INDEX deliveries_pending ON deliveries (next_at) WHERE status = 'pending';
    CREATE TABLE incidents (
        job text PRIMARY KEY,
        opened_at double precision NOT NULL,
        failures integer NOT NULL,
        unsent integer NOT NULL,
        last_sent_at double precision,
        last_run_id bigint
    );
    CREATE TABLE run_days (
        job text NOT NULL,
        day integer NOT NULL,
        runs integer NOT NULL DEFAULT 0,
        succeeded integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        timed_out integer NOT NULL DEFAULT 0,
        cancelled integer NOT NULL DEFAULT 0,
        skipped integer NOT NULL DEFAULT 0,
        missed integer NOT NULL DEFAULT 0,
        lost integer NOT NULL DEFAULT 0,
        timed integer NOT NULL DEFAULT 0,
        duration_sum double precision NOT NULL DEFAULT 0,
        duration_max double precision,
        cpu_n integer NOT NULL DEFAULT 0,
        cpu_sum double precision NOT NULL DEFAULT 0,
        rss_max bigint,
        last_success double precision,
        last_failure double precision,
        streak integer NOT NULL DEFAULT 0,
        streak_max integer NOT NULL DEFAULT 0,
        hist text NOT NULL DEFAULT '{}',
        PRIMARY KEY (job, day)
    );
    CREATE TABLE nodes (
        id bigserial PRIMARY KEY,
        name text NOT NULL,
        tags text NOT NULL DEFAULT '[]',
        version text NOT NULL,
        address text,
        pid integer,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat timestamptz NOT NULL DEFAULT now(),
        running integer NOT NULL DEFAULT 0,
        clock_skew double precision,
        dead boolean NOT NULL DEFAULT false
    );
    CREATE TABLE commands (
        id bigserial PRIMARY KEY,
        node_id bigint NOT NULL,
        kind text NOT NULL,
        arg text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO settings VALUES ('jobs_version', '0');
    """,
    """
    ALTER TABLE runs ADD COLUMN triggered_by text;
    CREATE TABLE tokens (
        name text PRIMARY KEY,
        role text NOT NULL,
        hash text NOT NULL UNIQUE,
        created_at double precision NOT NULL,
        created_by text,
        last_used double precision,
        expires_at double precision
    );
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        who text NOT NULL,
        address text,
        action text NOT NULL,
        job text,
        run_id bigint,
        detail text NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_job ON audit (job, id);
    CREATE INDEX audit_who ON audit (who, id);
    """,
)
_ID_BLOCK = 100
#: The channel of the cluster's notifications (see :class:`PostgresStore`).
PG_CHANNEL = "minisched"
#: A constant key of the advisory lock that serialises migrations (only).
_PG_MIGRATION_LOCK = 810042
#: Longest wait between two reconnection attempts of the writer.
_RECONNECT_MAX = 8.0
#: Seconds a session may sit in a transaction without a statement before
#: PostgreSQL ends it (a frozen node's; this node's transactions are
#: milliseconds long).
PG_STALLED_AFTER = 3.0
_PG_PARAM = re.compile(r"\?|(?<![:\w]):([a-z_]+)\b|%")


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """``?`` and ``:name`` parameters as psycopg's ``%s`` and ``%(name)s``."""

    def sub(match):
        text = match.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        return f"%({match.group(1)})s"

    return _PG_PARAM.sub(sub, sql)


def _pg_value(value):
    return int(value) if isinstance(value, bool) else value


def _pg_args(args):
    if isinstance(args, dict):
        return {k: _pg_value(v) for k, v in args.items()}
    return tuple(_pg_value(v) for v in args)


class _PgRow(dict):
    """A row as a dict that also indexes by position, like ``sqlite3.Row``."""

    __slots__ = ("_values",)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self._values[key]
        return dict.__getitem__(self, key)


def _pg_row_factory(cursor):
    names = [c.name for c in cursor.description or ()]

    def make(values):
        row = _PgRow(zip(names, values))
        row._values = values
        return row

    return make


class _PgConnection:
    """A psycopg connection that speaks the SQL of :class:`SQLStore`."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql, args=()):
        return self.raw.execute(_pg_sql(sql), _pg_args(args))

    def executemany(self, sql, rows):
        cursor = self.raw.cursor()
        cursor.executemany(_pg_sql(sql), [_pg_args(r) for r in rows])
        return cursor

    def close(self):
        self.raw.close()

    @property
    def usable(self) -> bool:
        return not self.raw.closed and not self.raw.broken


def _psycopg():
    """psycopg 3, imported only for a ``postgresql://`` database."""
    try:
        import psycopg  # optional: imported only for a postgresql:// database
    except ImportError:
        raise UsageError(
            "--db postgresql://...: needs psycopg 3: pip install "
            '"psycopg[binary]" (in the venv) or apt install python3-psycopg'
        ) from None
    if _version_tuple(psycopg.__version__) < (3, 1):
        raise UsageError(
            f"--db postgresql://...: needs psycopg 3.1 or newer, found "
            f'{psycopg.__version__}: pip install -U "psycopg[binary]"'
        )
    return psycopg


def _redacted(url: str) -> str:
    """A database URL without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def open_store(db: str) -> Store:
    """The store ``--db`` names: a ``postgresql://`` URI or a SQLite file."""
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db)
    return SQLiteStore(db)


class PostgresStore(SQLStore):
    """Jobs, runs and output in PostgreSQL, shared by several nodes.

    The same batching writer as SQLite (``minisched-writer``, one
    transaction per batch) on its own connection; reads on a small pool.  A
    lost connection is an outage: writes are held and retried, the writer
    reconnects with backoff, reads answer 503, ``healthy`` is False.

    A slot's run is claimed by the unique index on (job, slot, claim) in the
    transaction that records it; ``claim`` is empty, or the node's name for
    ``placement: all``.  A node may mark a run started only while its row in
    ``nodes`` is alive (fencing, checked in that UPDATE).  Transactions that
    change runs, output or jobs send one notification on :data:`PG_CHANNEL`
    at commit: ``runs NODE ID,...``, ``log NODE ID,...``, ``jobs NODE`` or
    ``cmd NODE``, which other nodes turn into events (:class:`Cluster`).
    """

    BEGIN = "BEGIN"
    GREATEST = "greatest"
    RUN_INSERT_COLUMNS = (*RUN_COLUMNS, "node_id", "claim")
    clustered = True

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.psycopg = _psycopg()
        #: This node's id in ``nodes`` (set by :class:`Cluster` on registering).
        self.node_id = 0
        self._ids = iter(())
        self._id_lock = threading.Lock()
        self._notes = {}  # writer thread: what this transaction changed
        self._deferred = []  # writer thread: its writes to shared rows
        self._reconnect_delay = 0.5
        self._reconnect_at = 0.0

    def __repr__(self) -> str:
        return f"PostgresStore({_redacted(self.url)!r})"

    # -- the dialect ---------------------------------------------------------

    def _connect(self) -> _PgConnection:
        raw = self.psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, row_factory=_pg_row_factory
        )
        # A node frozen inside a transaction (SIGSTOP, a VM pause, a cut
        # network) would hold its row locks, and every other node's writer
        # behind them, until it woke: the server ends such a session instead.
        raw.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
            (f"{PG_STALLED_AFTER * 1000:.0f}",),
        )
        return _PgConnection(raw)

    def _transient(self, exc) -> bool:
        return isinstance(
            exc, (self.psycopg.OperationalError, self.psycopg.InterfaceError)
        )

    def _constraint(self, exc) -> bool:
        return isinstance(exc, self.psycopg.IntegrityError)

    def _in_transaction(self, conn) -> bool:
        idle = self.psycopg.pq.TransactionStatus.IDLE
        return conn.usable and conn.raw.info.transaction_status != idle

    def _hist_add(self, bucket: str) -> str:
        return (
            f"hist = jsonb_set(run_days.hist::jsonb, '{{{bucket}}}', to_jsonb("
            f"coalesce((run_days.hist::jsonb ->> '{bucket}')::int, 0) + 1))::text,"
        )

    def _insert_id(self, conn, sql, values) -> int:
        return conn.execute(sql + " RETURNING id", values).fetchone()[0]

    def _transaction(self, batch) -> list:
        """A deadlock between two nodes' batches is retried at once (one of
        the two was rolled back; the other went through)."""
        for attempt in range(10):
            self._notes, self._deferred = {}, []
            try:
                return super()._transaction(batch)
            except self.psycopg.errors.TransactionRollback:
                if attempt == 9:
                    raise
                time.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
        raise AssertionError("unreachable")

    def _shared(self, conn, key, write) -> None:
        """Deferred to the end of the transaction, where every batch applies
        them in ``key`` order (jobs by name, then each job's statistics, then
        the all-jobs row): two nodes' batches take the locks of rows they
        share in the same order, so they wait for each other but never
        deadlock."""
        self._deferred.append((key, write))

    def _before_commit(self, conn) -> None:
        deferred, self._deferred = self._deferred, []
        for _key, write in sorted(deferred, key=lambda item: item[0]):
            write(conn)
        for kind, ids in self._notes.items():
            ids = sorted(ids)
            for i in range(0, max(1, len(ids)), 500):
                part = ",".join(str(n) for n in ids[i : i + 500])
                payload = f"{kind} {self.node_id} {part}".rstrip()
                conn.execute("SELECT pg_notify(?, ?)", (PG_CHANNEL, payload))
        self._notes = {}

    def _note(self, kind, ids=()) -> None:
        """Writer thread: this transaction changed ``kind`` (ids)."""
        self._notes.setdefault(kind, set()).update(ids)

    def _reconnect(self) -> None:
        conn = self._writer_conn
        if conn is not None and conn.usable:
            return
        now = time.monotonic()
        if now < self._reconnect_at:
            return
        try:
            self._writer_conn = self._connect()
        except self.psycopg.Error as exc:
            self._reconnect_at = now + self._reconnect_delay
            self._reconnect_delay = min(_RECONNECT_MAX, self._reconnect_delay * 2)
            self._set_outage(exc)
            return
        self._reconnect_delay = 0.5
        log.warning("reconnected to the database")

    # -- lifecycle -----------------------------------------------------------

    def open(self, exclusive=True) -> Store:
        """Connect, migrate the schema forward (one node at a time, under an
        advisory lock held only for that), start the writer.  A newer schema
        than this minisched knows is refused, untouched."""
        try:
            conn = self._connect()
        except self.psycopg.Error as exc:
            raise DatabaseError(
                f"cannot connect to {_redacted(self.url)}: {str(exc).strip()}"
            ) from None
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_PG_MIGRATION_LOCK,))
            exists = conn.execute("SELECT to_regclass('settings') AS t").fetchone()[0]
            version = 0
            if exists:
                row = conn.execute(
                    "SELECT value FROM settings WHERE key = 'schema_version'"
                ).fetchone()
                version = int(row[0]) if row else 0
            if version > len(PG_MIGRATIONS):
                raise DatabaseError(
                    f"database {_redacted(self.url)} has schema version {version} "
                    f"but this minisched {__version__} knows only up to "
                    f"{len(PG_MIGRATIONS)}: use a newer minisched.py (the database "
                    "is left untouched)"
                )
            for number in range(version, len(PG_MIGRATIONS)):
                conn.raw.execute(PG_MIGRATIONS[number])
            conn.execute(
                "INSERT INTO settings VALUES ('schema_version', ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value",
                (str(len(PG_MIGRATIONS)),),
            )
            conn.execute(
                "INSERT INTO settings VALUES ('server_id', ?) ON CONFLICT DO NOTHING",
                (json.dumps(secrets.token_hex(6)),),
            )
            row = conn.execute(
                "SELECT value FROM settings WHERE key = 'server_id'"
            ).fetchone()
            self.server_id = json.loads(row[0])
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            conn.close()
            raise
        self._pool.append(conn)
        self._writer_conn = self._connect()
        self._thread = threading.Thread(
            target=self._write_loop, name="minisched-writer", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in [*pool, self._writer_conn]:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    # -- what differs from SQLite ----------------------------------------------

    def allocate_run_id(self) -> int:
        """Ids in blocks of ``_ID_BLOCK`` from ``runs_id_seq``: one round trip
        per block, so a run is known before its insert commits."""
        with self._id_lock:
            run_id = next(self._ids, None)
            if run_id is None:
                start = self._query("SELECT nextval('runs_id_seq') AS n", one=True)["n"]
                self._ids = iter(range(start + 1, start + _ID_BLOCK))
                run_id = start
            return run_id

    def _usable(self, conn) -> bool:
        return conn.usable

    def _query(self, sql: str, args=(), one=False):
        try:
            return super()._query(sql, args, one)
        except self.psycopg.OperationalError as exc:
            self.healthy = False
            raise UnavailableError(
                f"the database is unreachable now ({str(exc).strip()}); try again later"
            ) from None

    def _slot_holder(self, conn, run) -> int | None:
        row = conn.execute(
            "SELECT id FROM runs WHERE job = ? AND slot = ? AND claim = ?",
            (run["job"], run["slot"], run.get("claim") or ""),
        ).fetchone()
        return row[0] if row else None

    def insert_run(self, run: dict, job_update: dict | None = None):
        return super().insert_run(dict(run, node_id=self.node_id), job_update)

    def _run_changed(self, run_ids) -> None:
        self._note("runs", run_ids)

    def _output_added(self, run_ids) -> None:
        self._note("log", run_ids)

    def _jobs_changed(self, conn) -> None:
        conn.execute(
            "UPDATE settings SET value = (value::bigint + 1)::text "
            "WHERE key = 'jobs_version'"
        )
        self._note("jobs")

    def begin_starts(self, run_ids: list, now: float) -> set:
        """Fencing: a run is marked started only by the node that holds it,
        while that node is alive, committed before its process exists (so a
        node that dies a moment later leaves it ``running``, to be marked
        ``lost``, never ``queued``, to be run again).  One statement on a pool
        connection, not behind the writer's batches.  The node's row is
        share-locked: a reaper declaring it dead either waits for this start
        (and then finds the runs running) or is waited for (and then none
        starts)."""
        if not run_ids:
            return set()
        rows = self._query(
            "UPDATE runs SET status = 'running', started_at = ? "
            "WHERE id = ANY(?) AND node_id = ? AND status = 'queued' AND EXISTS "
            "(SELECT 1 FROM nodes WHERE id = ? AND NOT dead FOR SHARE) "
            "RETURNING id",
            (now, list(run_ids), self.node_id, self.node_id),
        )
        return set(run_ids) - {row["id"] for row in rows}

    def mark_started(self, rows: list):
        """The pids of runs :meth:`begin_starts` recorded; the ids refused
        (their node was declared dead since: they are ``lost``) are the
        result."""

        def op(conn):
            started = conn.execute(
                "UPDATE runs SET started_at = v.started, "
                "pid = v.pid, pid_create_time = v.created FROM unnest("
                "?::bigint[], ?::float8[], ?::int[], ?::float8[]) "
                "AS v(id, started, pid, created) WHERE runs.id = v.id "
                "AND runs.node_id = ? AND runs.status = 'running' AND EXISTS "
                "(SELECT 1 FROM nodes WHERE nodes.id = ? AND NOT nodes.dead) "
                "RETURNING runs.id",
                (
                    [r[3] for r in rows],
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                    self.node_id,
                    self.node_id,
                ),
            ).fetchall()
            done = {row[0] for row in started}
            for r in rows:
                if r[3] in done:
                    self._set_last_run(conn, r[4], r[3])
            self._run_changed(done)
            return [r[3] for r in rows if r[3] not in done]

        return self._submit(op)

    def update_run(self, run_id: int, fields: dict, job: str | None = None):
        """A run's end is recorded only while it is still active: a run that
        another node marked ``lost`` (this node was fenced) stays lost."""
        if fields.get("status") in (None, *ACTIVE_STATUSES):
            return super().update_run(run_id, fields, job)
        sets = ", ".join(f"{key} = ?" for key in fields)

        def op(conn):
            row = conn.execute(
                f"UPDATE runs SET {sets} WHERE id = ? AND status IN {_SQL_ACTIVE} "
                "RETURNING *",
                [*fields.values(), run_id],
            ).fetchone()
            if row is None:
                return
            if job is not None:
                self._set_last_run(conn, job, run_id)
            _roll_up(conn, dict(row), self)
            self._run_changed([run_id])

        return self._submit(op)

    def mark_lost(self, now: float):
        """Startup repair: the active runs of this node's earlier lives (rows
        of ``nodes`` with its name) become ``lost``; those rows are dead."""

        def op(conn):
            dead = [
                row[0]
                for row in conn.execute(
                    "UPDATE nodes SET dead = true WHERE name = ? AND id != ? "
                    "AND NOT dead RETURNING id",
                    (self.node_name, self.node_id),
                )
            ]
            lost, unstarted = self._take_over(conn, dead, now, "the server stopped")
            return lost + [
                dict(r, status="queued") for r in self._lose(conn, unstarted, now)
            ]

        return self._submit(op)

    #: Set by :class:`Cluster` before :meth:`mark_lost`.
    node_name = ""

    def _take_over(self, conn, node_ids, now, why) -> tuple:
        """Writer thread: the running runs of dead nodes ``node_ids`` become
        ``lost``; their queued runs are taken off them (deleted, returned to
        be claimed again).  Returns ``(lost rows, unstarted rows)``, each as
        it was before."""
        if not node_ids:
            return [], []
        rows = [
            dict(r)
            for r in conn.execute(
                "SELECT * FROM runs WHERE node_id = ANY(?) AND status = 'running' "
                "FOR UPDATE",
                (list(node_ids),),
            )
        ]
        conn.execute(
            "UPDATE runs SET status = 'lost', finished_at = ?, error = ? || "
            "' while this run was running' WHERE node_id = ANY(?) "
            "AND status = 'running'",
            (now, why, list(node_ids)),
        )
        for row in rows:
            _roll_up(conn, dict(row, status="lost", finished_at=now), self)
        unstarted = [
            dict(r)
            for r in conn.execute(
                "DELETE FROM runs WHERE node_id = ANY(?) AND status = 'queued' "
                "RETURNING *",
                (list(node_ids),),
            )
        ]
        self._run_changed([r["id"] for r in rows])
        return rows, unstarted

    def _lose(self, conn, rows, now) -> list:
        """Put back ``rows`` (deleted by :meth:`_take_over`) as ``lost``."""
        for row in rows:
            row = dict(row, status="lost", finished_at=now)
            row["error"] = "the server stopped before this run started"
            cols = [c for c in self.RUN_INSERT_COLUMNS if c in row]
            conn.execute(
                "INSERT INTO runs ({}) VALUES ({}) ON CONFLICT DO NOTHING".format(
                    ", ".join(cols), ", ".join("?" * len(cols))
                ),
                [row[c] for c in cols],
            )
            _roll_up(conn, row, self)
        return rows

    # -- nodes (the cluster thread) -----------------------------------------------

    def register(self, name, tags, address) -> tuple:
        """Add this node (a new row: a new lease, an id no fenced life of it
        holds) and become it: ``(node id, the database's clock)``."""
        row = self._query(
            "INSERT INTO nodes (name, tags, version, address, pid) VALUES "
            "(?, ?, ?, ?, ?) RETURNING id, extract(epoch FROM now()) AS now",
            (name, json.dumps(tags), __version__, address, os.getpid()),
            one=True,
        )
        self.node_id, self.node_name = row["id"], name
        return row["id"], float(row["now"])

    def heartbeat(self, running: int, skew: float | None):
        """Renew this node's lease: the database's clock, or None when the
        node was declared dead (fenced) meanwhile."""
        row = self._query(
            "UPDATE nodes SET heartbeat = now(), running = ?, clock_skew = ? "
            "WHERE id = ? AND NOT dead RETURNING extract(epoch FROM now()) AS now",
            (running, skew, self.node_id),
            one=True,
        )
        return float(row["now"]) if row else None

    def db_clock(self) -> float:
        return float(
            self._query("SELECT extract(epoch FROM now()) AS now", one=True)["now"]
        )

    def nodes(self) -> list:
        """Every node row that is alive or died in the last day, by name."""
        rows = self._query(
            "SELECT id, name, tags, version, address, pid, dead, running, clock_skew, "
            "extract(epoch FROM started_at) AS started_at, "
            "extract(epoch FROM heartbeat) AS heartbeat, "
            "extract(epoch FROM now() - heartbeat) AS age FROM nodes "
            "WHERE NOT dead OR heartbeat > now() - interval '1 day' "
            "ORDER BY name, id"
        )
        for row in rows:
            row["tags"] = json.loads(row["tags"])
            for key in ("started_at", "heartbeat", "age"):
                row[key] = float(row[key])
        return rows

    def reap(self, timeout: float, now: float):
        """Declare dead the nodes whose heartbeat is older than ``timeout``
        seconds (the database's clock) and take their runs over.  One node
        gets each dead node (the row lock decides).  The future's result is
        ``(dead nodes, lost rows, unstarted rows)``."""

        def op(conn):
            dead = [
                dict(r)
                for r in conn.execute(
                    "UPDATE nodes SET dead = true WHERE NOT dead AND id != ? "
                    "AND heartbeat < now() - ? * interval '1 second' "
                    "RETURNING id, name",
                    (self.node_id, timeout),
                )
            ]
            if not dead:
                return [], [], []
            names = ", ".join(sorted({d["name"] for d in dead}))
            why = f"node {names} stopped (no heartbeat for {_num(timeout)}s)"
            lost, unstarted = self._take_over(conn, [d["id"] for d in dead], now, why)
            return dead, lost, unstarted

        return self._submit(op)

    def add_command(self, node_id: int, kind: str, arg: str):
        """Ask node ``node_id`` to do something (``stop`` a run, ``stop-job``)."""

        def op(conn):
            conn.execute(
                "INSERT INTO commands (node_id, kind, arg) VALUES (?, ?, ?)",
                (node_id, kind, arg),
            )
            self._note("cmd", [node_id])

        return self._submit(op)

    def take_commands(self) -> list:
        """This node's commands, oldest first (each is handed out once)."""
        return self._query(
            "DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE "
            "node_id = ? ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING kind, arg",
            (self.node_id,),
        )

    def _columns(self, table) -> set:
        rows = self._query(
            "SELECT column_name AS name FROM information_schema.columns "
            "WHERE table_name = ? AND table_schema = current_schema()",
            (table,),
        )
        return {r["name"] for r in rows}

    def after_copy(self) -> None:
        for table in ("runs", "audit"):
            self._query(
                f"SELECT setval('{table}_id_seq', "
                f"coalesce((SELECT max(id) FROM {table}), 0) + 1)"
            )

    def leave(self) -> None:
        """A clean shutdown: this node's row is dead at once (nothing to take over)."""
        self._query(
            "UPDATE nodes SET dead = true WHERE id = ? RETURNING id",
            (self.node_id,),
        )

    def jobs_version(self) -> int:
        row = self._query(
            "SELECT value FROM settings WHERE key = 'jobs_version'", one=True
        )
        return int(row["value"]) if row else 0

    def get_runs(self, run_ids) -> list:
        return self._query("SELECT * FROM runs WHERE id = ANY(?)", (list(run_ids),))

    def claimed(self, pairs) -> set:
        """Which ``(job, slot)`` pairs have a run (any claim)."""
        if not pairs:
            return set()
        rows = self._query(
            "SELECT job, slot FROM runs WHERE (job, slot) IN "
            "(SELECT * FROM unnest(?::text[], ?::float8[]))",
            ([p[0] for p in pairs], [p[1] for p in pairs]),
        )
        return {(r["job"], r["slot"]) for r in rows}

    def listen(self):
        """A new connection listening on :data:`PG_CHANNEL` (the cluster's)."""
        conn = self._connect()
        conn.raw.execute(f"LISTEN {PG_CHANNEL}")
        return conn


def _where(clauses) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


###############################################################################
# Access: tokens, roles, the audit trail ######################################
###############################################################################

#: Roles, each allowed what the one before it is, and more: a ``viewer``
#: reads everything but secrets, an ``operator`` also triggers, stops,
#: pauses and resumes, an ``admin`` also edits jobs and manages tokens.
ROLES = ("viewer", "operator", "admin")
#: Who the bootstrap token (``--token``) acts as, and who acts where no
#: token is needed (loopback without any token).
BOOTSTRAP = {"name": "bootstrap", "role": "admin"}
ANONYMOUS = {"name": "anonymous", "role": "admin"}
#: Who the audit trail names for changes made by the jobs file.
FILE_ACTOR = "file"
#: A new token's secret: this prefix (so secret scanners know it) and 32
#: random bytes.
TOKEN_PREFIX = "msk_"
_TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: How often a token's ``last_used`` is written (not on every request).
TOKEN_TOUCH = 60.0


def role_allows(role: str, needed: str) -> bool:
    """Does ``role`` include what ``needed`` may do?"""
    return ROLES.index(role) >= ROLES.index(needed)


def validate_token(body, now: float) -> dict:
    """A token request (``name``, ``role``, optional ``expires`` such as
    ``90d``) as the row to store, or :class:`InvalidError` naming the field."""
    if not isinstance(body, dict):
        raise InvalidError('the body must be an object: {"name", "role", "expires"}')
    unknown = sorted(set(body) - {"name", "role", "expires"})
    if unknown:
        raise InvalidError(
            f"{unknown[0]}: unknown field (use name, role, expires)", unknown[0]
        )
    name, role, expires = body.get("name"), body.get("role"), body.get("expires")
    if not isinstance(name, str) or not _TOKEN_NAME_RE.fullmatch(name):
        raise InvalidError(
            "name: 1 to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit",
            "name",
        )
    if name in (BOOTSTRAP["name"], ANONYMOUS["name"], FILE_ACTOR):
        raise InvalidError(f"name: {name!r} is reserved", "name")
    if role not in ROLES:
        raise InvalidError("role: must be one of " + ", ".join(ROLES), "role")
    expires_at = None
    if expires is not None:
        try:
            seconds = parse_duration(expires) if isinstance(expires, str) else -1
        except InvalidError:
            seconds = -1
        if not 0 < seconds <= 100 * 365 * 86400:
            raise InvalidError(
                "expires: a duration such as 12h, 90d or 52w (at most 100 years), "
                "or null for never",
                "expires",
            )
        expires_at = now + seconds
    return {"name": name, "role": role, "expires_at": expires_at}


def token_public(row: dict) -> dict:
    """A token row as ``token list`` and the API show it (never the hash)."""
    return {
        "name": row["name"],
        "role": row["role"],
        "created_at": iso_utc(row["created_at"]),
        "created_by": row.get("created_by"),
        "last_used": iso_utc(row.get("last_used")),
        "expires_at": iso_utc(row.get("expires_at")),
    }


def _secret_hash(secret: str) -> str:
    """What is stored of a token or a session cookie: never the secret."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


class Access:
    """Who a request is, what their role lets them do, and the audit trail,
    over a :class:`Store`.  Tokens live in the database (``token add`` works
    with or without a server), so each check reads them: a revocation or a
    role change counts at the next request.  Any thread.

    A *principal* is ``{"name", "role"}``: the bootstrap token's, a named
    token's, or :data:`ANONYMOUS` where no token is needed at all.
    """

    def __init__(self, store, bootstrap=None, keep=10000, clock=time.time):
        self.store = store
        self.bootstrap = bootstrap or None
        self.keep = keep
        self.clock = clock
        self._named = (-1e9, False)  # (monotonic time checked, any token stored)

    def required(self) -> bool:
        """A token is needed: there is a bootstrap token or a named one (the
        latter checked at most once a second)."""
        if self.bootstrap:
            return True
        checked, named = self._named
        if time.monotonic() - checked >= 1.0:
            named = bool(self.store.list_tokens())
            self._named = (time.monotonic(), named)
        return named

    def identify(self, secret: str) -> dict | None:
        """The principal a token's secret belongs to, or None (unknown,
        revoked or expired)."""
        if self.bootstrap and hmac.compare_digest(
            secret.encode(), self.bootstrap.encode()
        ):
            return BOOTSTRAP
        row = self.store.get_token(token_hash=_secret_hash(secret))
        now = self.clock()
        if row is None or (row["expires_at"] is not None and now >= row["expires_at"]):
            return None
        if row["last_used"] is None or now - row["last_used"] >= TOKEN_TOUCH:
            self.store.change_token(row["name"], last_used=now)
        return {"name": row["name"], "role": row["role"]}

    def session_check(self, principal) -> str:
        """What a session records of the token it was opened with: a session
        outlives neither a new bootstrap token nor a revoked, re-created or
        re-roled named one."""
        if principal is BOOTSTRAP:
            return _secret_hash(self.bootstrap or "")
        row = self.store.get_token(name=principal["name"])
        return _secret_hash(
            "{}:{}".format(row["hash"] if row else "", principal["role"])
        )

    def session_principal(self, row: dict) -> dict | None:
        """The principal of a stored session, or None if its token changed."""
        check = row["token_check"]
        if self.bootstrap and hmac.compare_digest(check, _secret_hash(self.bootstrap)):
            return BOOTSTRAP
        token = self.store.get_token(name=row["token_name"])
        if token is None or (
            token["expires_at"] is not None and self.clock() >= token["expires_at"]
        ):
            return None
        principal = {"name": token["name"], "role": token["role"]}
        expected = _secret_hash("{}:{}".format(token["hash"], token["role"]))
        return principal if hmac.compare_digest(check, expected) else None

    # -- managing tokens (API and command line) --------------------------------

    def add(self, body, by: str) -> tuple:
        """Create a token from a request (:func:`validate_token`); returns
        ``(secret, public row)``.  The secret is shown once, never stored."""
        now = self.clock()
        row = validate_token(body, now)
        if self.store.get_token(name=row["name"]) is not None:
            raise ConflictError(f"a token named {row['name']!r} exists", "name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row.update(hash=_secret_hash(secret), created_at=now, created_by=by)
        if not self.store.result(self.store.add_token(row)):  # taken meanwhile
            raise ConflictError(f"a token named {row['name']!r} exists", "name")
        self._named = (-1e9, True)
        return secret, token_public(row)

    def set_role(self, name: str, role) -> dict:
        """Change a token's role; its sessions end."""
        if role not in ROLES:
            raise InvalidError("role: must be one of " + ", ".join(ROLES), "role")
        if not self.store.result(self.store.change_token(name, role=role)):
            raise NotFoundError(f"no token named {name!r}", "name")
        return token_public(self.store.get_token(name=name))

    def revoke(self, name: str) -> None:
        """Delete a token; its sessions end."""
        if not self.store.result(self.store.delete_token(name)):
            raise NotFoundError(f"no token named {name!r}", "name")
        self._named = (-1e9, False)

    def tokens(self) -> list:
        return [token_public(row) for row in self.store.list_tokens()]

    # -- the audit trail -------------------------------------------------------

    def record(self, who, action, *, job=None, run_id=None, detail=None, address=None):
        """Append an audit entry (not waited for: the writer keeps order)."""
        self.store.add_audit(
            {
                "at": self.clock(),
                "who": who,
                "address": address,
                "action": action,
                "job": job,
                "run_id": run_id,
                "detail": json.dumps(detail or {}, sort_keys=True),
            },
            self.keep,
        )

    def entries(self, job=None, who=None, limit=100, before=None) -> list:
        self.store.flush()
        return [
            dict(row, at=iso_utc(row["at"]))
            for row in self.store.audit_entries(job, who, limit, before)
        ]


def changed_fields(old: dict | None, new: dict | None) -> list:
    """Names of the job fields that differ between two definitions (what the
    audit trail records of an edit: names, never values)."""
    old, new = old or {}, new or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


###############################################################################
# Event bus ###################################################################
###############################################################################


class Subscription:
    """One subscriber's bounded queue.  When it overflows the subscriber is
    marked ``lagged`` and receives nothing more; it should reconnect and catch
    up from the database.  Iterating yields ``(kind, data)``."""

    def __init__(self, bus, maxsize, filter_fn):
        self.bus = bus
        self.queue = queue.Queue(maxsize)
        self.filter = filter_fn
        self.lagged = False

    def get(self, timeout=None):
        """Next ``(kind, data)``, or None on timeout."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        self.bus.unsubscribe(self)


class EventBus:
    """Fan-out of ``(kind, data)`` events (``run``, ``job``, ``log``) to
    subscribers.  ``publish`` never blocks: it is called from the runner's
    threads, and a slow subscriber must not slow them down."""

    def __init__(self):
        self._lock = threading.Lock()
        self._subs = ()
        self._listeners = ()

    def listen(self, fn) -> None:
        """Call ``fn(kind, data)`` synchronously on every publish; it must be
        quick and never block (it runs on the publisher's thread)."""
        with self._lock:
            self._listeners = (*self._listeners, fn)

    def subscribe(self, maxsize=10000, filter_fn=None) -> Subscription:
        sub = Subscription(self, maxsize, filter_fn)
        with self._lock:
            self._subs = self._subs + (sub,)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def count(self) -> int:
        return len(self._subs)

    def publish(self, kind: str, data) -> None:
        for fn in self._listeners:
            fn(kind, data)
        for sub in self._subs:  # a tuple: safe to iterate without the lock
            if sub.lagged or (sub.filter is not None and not sub.filter(kind, data)):
                continue
            try:
                sub.queue.put_nowait((kind, data))
            except queue.Full:
                sub.lagged = True
                log.warning("an event subscriber lagged behind and was dropped")


###############################################################################
# Metrics #####################################################################
###############################################################################

#: Bucket bounds (seconds) of the run-duration and scheduling-lag histograms.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 60.0)


class Metrics:
    """Counters and histograms since the server started, for ``/metrics``.
    Updated by the runner and the notifier, read by the API: any thread; one
    lock, held only to add or to copy."""

    def __init__(self):
        self._lock = threading.Lock()
        self.runs = collections.Counter()  # (job, status) -> runs ended
        self.durations = {}  # job -> [count per bucket..., +Inf, sum]
        self.lag = [0] * (len(LAG_BUCKETS) + 1) + [0.0]
        self.output = collections.Counter()  # job -> bytes printed
        self.last_success = {}  # job -> finished_at of its last success
        self.deliveries = collections.Counter()  # (job, "ok" | "failed")

    def ended(self, job, status, duration, output_bytes, finished_at) -> None:
        with self._lock:
            self.runs[(job, status)] += 1
            self.output[job] += output_bytes or 0
            if status == "succeeded" and finished_at:
                self.last_success[job] = finished_at
            if duration is not None:
                buckets = self.durations.get(job)
                if buckets is None:
                    buckets = self.durations[job] = [0] * (
                        len(DURATION_BUCKETS) + 1
                    ) + [0.0]
                _observe(buckets, DURATION_BUCKETS, duration)

    def started(self, lateness: float) -> None:
        """A scheduled run started ``lateness`` seconds after its slot."""
        with self._lock:
            _observe(self.lag, LAG_BUCKETS, max(0.0, lateness))

    def delivered(self, job, result) -> None:
        with self._lock:
            self.deliveries[(job, result)] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "runs": dict(self.runs),
                "durations": {k: list(v) for k, v in self.durations.items()},
                "lag": list(self.lag),
                "output": dict(self.output),
                "last_success": dict(self.last_success),
                "deliveries": dict(self.deliveries),
            }


def _observe(buckets, bounds, value) -> None:
    """Count ``value`` in the first bucket whose bound holds it (the last one is
    +Inf); the final slot keeps the sum.  Caller holds the lock."""
    buckets[bisect.bisect_left(bounds, value)] += 1
    buckets[-1] += value


def prometheus_histogram(name, labels, buckets, bounds) -> list:
    """The text lines of one histogram: cumulative ``_bucket``s, ``_sum``, ``_count``."""
    lines, total = [], 0
    prefix = labels + "," if labels else ""
    for bound, count in zip((*bounds, math.inf), buckets):
        total += count
        le = "+Inf" if bound == math.inf else repr(float(bound))
        lines.append(f'{name}_bucket{{{prefix}le="{le}"}} {total}')
    braces = f"{{{labels}}}" if labels else ""
    lines.append(f"{name}_sum{braces} {buckets[-1]:.6f}")
    lines.append(f"{name}_count{braces} {total}")
    return lines


###############################################################################
# Process control #############################################################
###############################################################################


def find_marked_pids(run_ids, exclude=(), server=None, by_run=False):
    """Pids of processes whose environment has ``MINISCHED_RUN_ID`` in ``run_ids``
    (a set of str) and, when ``server`` is given, ``MINISCHED_SERVER == server``
    (run ids restart at 1 in every database; this keeps two servers on one
    host apart).  This finds descendants that left the process group with
    ``setsid``.  With ``by_run``: a dict run id (str) -> pids.  Reads ``/proc``
    directly; also runs inside the guard process."""
    found = {} if by_run else []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if b"MINISCHED_RUN_ID=" not in env:
            continue
        marks = {}
        for item in env.split(b"\0"):
            if item.startswith((b"MINISCHED_RUN_ID=", b"MINISCHED_SERVER=")):
                key, _, value = item.partition(b"=")
                marks[key] = value.decode("ascii", "replace")
        run_id = marks.get(b"MINISCHED_RUN_ID")
        if run_id in run_ids and (
            server is None or marks.get(b"MINISCHED_SERVER") == server
        ):
            if by_run:
                found.setdefault(run_id, []).append(int(name))
            else:
                found.append(int(name))
    return found


#: The guard process, a POSIX shell script (about 1 MB of memory, against 9 MB
#: for a Python interpreter): it reads ``+ RUN_ID PGID`` and ``- RUN_ID``
#: lines from a pipe held by the server; at EOF (the server died, even by
#: SIGKILL) it SIGKILLs every registered process group, then every process
#: whose environment carries a registered run's ``MINISCHED_RUN_ID`` (and the
#: server's ``MINISCHED_SERVER``, ``$1``; one ``grep`` reads every environment).
GUARD_SCRIPT = r"""
trap '' INT TERM HUP
while read -r op id pg; do
  case "$id" in ''|*[!0-9]*) continue ;; esac
  case "$op" in
    +) case "$pg" in ''|*[!0-9]*) continue ;; esac; eval "run_$id=$pg" ;;
    \?) eval "run_$id=spawning" ;;
    -) unset "run_$id" ;;
  esac
done
for var in $(set | sed -n 's/^\(run_[0-9]*\)=.*/\1/p'); do
  eval "pg=\$$var"
  case "$pg" in ''|*[!0-9]*) continue ;; esac
  kill -KILL -- "-$pg" 2>/dev/null
done
mark="MINISCHED_SERVER=$1"
[ -n "$1" ] || mark='MINISCHED_RUN_ID=.*'
for f in $(grep -lzx -- "$mark" /proc/[0-9]*/environ 2>/dev/null); do
  id=$(tr '\000' '\n' < "$f" 2>/dev/null | sed -n 's/^MINISCHED_RUN_ID=\([0-9]*\)$/\1/p')
  [ -n "$id" ] || continue
  eval "[ -n \"\${run_$id:-}\" ]" || continue
  pid=${f#/proc/}
  kill -KILL "${pid%/environ}" 2>/dev/null
done
"""


class ProcessGuard:
    """Kills the server's jobs when the server dies.

    ``PR_SET_PDEATHSIG`` per child costs a ``preexec_fn`` (3x slower spawning)
    and only reaches the direct child; the guard is one helper process
    (:data:`GUARD_SCRIPT`, shown by ``ps`` as ``minisched-guard``) that reads
    a pipe from the server and, at EOF, kills every registered group and
    marked process.  Started from the launcher thread; ``register`` and
    ``unregister`` may be called from any thread.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self.server = None  # this database's MINISCHED_SERVER mark

    def start(self) -> None:
        script_r, script_w = os.pipe()  # the script, read by sh as a file
        try:
            os.write(script_w, GUARD_SCRIPT.encode())
            os.close(script_w)
            self._proc = subprocess.Popen(
                ["minisched-guard", f"/dev/fd/{script_r}", self.server or ""],
                executable="/bin/sh",
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(script_r,),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                bufsize=0,
            )
        except OSError as exc:
            log.warning(
                "cannot start the guard process (%s): jobs may outlive a crash", exc
            )
        finally:
            os.close(script_r)

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    def _send(self, lines: str) -> None:
        # An os.write of at most PIPE_BUF bytes is atomic on a pipe: no lock
        # is held across the writes, and lines from two threads never
        # interleave.  A batch's lines go in as few writes as that allows.
        with self._lock:
            proc = self._proc
        if proc is None or not lines:
            return
        data = lines.encode()
        try:
            while data:
                cut = len(data)
                if cut > select.PIPE_BUF:
                    cut = data.rindex(b"\n", 0, select.PIPE_BUF) + 1
                os.write(proc.stdin.fileno(), data[:cut])
                data = data[cut:]
        except (OSError, ValueError):
            log.warning("the guard process is gone: jobs may outlive a crash")
            with self._lock:
                if self._proc is proc:
                    self._proc = None

    def expect(self, *run_ids: int) -> None:
        """Runs are about to be spawned: from now on, their marked processes
        die with the server, before their groups are known (``register``)."""
        self._send("".join(f"? {run_id} -\n" for run_id in run_ids))

    def register(self, *groups: tuple) -> None:
        """``(run id, pgid)`` of spawned runs."""
        self._send("".join(f"+ {run_id} {pgid}\n" for run_id, pgid in groups))

    def unregister(self, run_id: int) -> None:
        self._send(f"- {run_id}\n")

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def signal_run(pgid: int | None, run_ids, sig: int, exclude=(), server=None) -> int:
    """Send ``sig`` to a run's process group and to every process carrying one
    of ``run_ids`` (of ``server``) as its marker.  Returns how many marked
    processes were hit."""
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    hit = 0
    for pid in find_marked_pids(
        {str(r) for r in run_ids}, (os.getpid(), *exclude), server
    ):
        try:
            os.kill(pid, sig)
            hit += 1
        except (ProcessLookupError, PermissionError):
            pass
    return hit


def kill_leftover(
    pid: int | None, create_time: float | None, run_id: int, server=None
) -> bool:
    """Startup repair: SIGKILL the group of a dead server's run, only if ``pid``
    is still the same process (same create time), plus processes with its marker.
    True if anything was killed."""
    killed = False
    if pid and create_time:
        try:
            same = abs(psutil.Process(pid).create_time() - create_time) < 0.05
        except psutil.Error:
            same = False
        if same:
            try:
                os.killpg(pid, signal.SIGKILL)
                killed = True
            except OSError:
                pass
    return signal_run(None, [run_id], signal.SIGKILL, (), server) > 0 or killed


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@functools.lru_cache(maxsize=1)
def _boot_time() -> float:
    return psutil.boot_time()  # reads /proc/stat: once is enough


def _create_time(pid: int) -> float | None:
    """A process's start time as psutil computes it (boot time + field 22 of
    ``/proc/PID/stat``), read directly: this is on the spawn path."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        ticks = int(data[data.rfind(b")") + 2 :].split()[19])
        return _boot_time() + ticks / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None


#: Signals the server ignores (Python ignores SIGPIPE) that a job must get at
#: their defaults, as ``Popen(restore_signals=True)`` does.
_RESTORED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)
)


#: What ``kind: python`` runs in its child interpreter: import ``call``,
#: call it with the JSON ``args`` and ``kwargs``, write the return value as
#: JSON to ``$MINISCHED_RESULT_FILE`` (the server logs it).  An exception
#: propagates: Python prints its traceback and exits 1, so the run fails.
PYTHON_CALL = """\
import importlib, json, os, sys
target, args, kwargs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.argv = [target]
module, _, path = target.partition(":")
func = importlib.import_module(module)
for part in path.split("."):
    func = getattr(func, part)
result = func(*args, **kwargs)
try:
    text = json.dumps(result)
except (TypeError, ValueError):
    text = "a %s (not JSON-serialisable)" % type(result).__name__
with open(os.environ.pop("MINISCHED_RESULT_FILE"), "w", encoding="utf-8") as out:
    out.write(text)
"""
#: The most of a return value that is logged.
PYTHON_RESULT_MAX = 64 << 10


def python_call_argv(job) -> list:
    """The argv of a ``kind: python`` run."""
    return [
        job.python or sys.executable,
        "-c",
        PYTHON_CALL,
        job.call,
        json.dumps(job.args),
        json.dumps(job.kwargs),
    ]


def _result_file(run) -> str:
    """A new empty file the run's child may write its return value to (owned
    by the job's user, if it has one).  Launcher thread."""
    fd, path = tempfile.mkstemp(prefix=f"minisched-result-{run.id}-")
    try:
        if run.job.user:
            with contextlib.suppress(KeyError, OSError):
                pw = pwd.getpwnam(run.job.user)
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
    finally:
        os.close(fd)
    return path


def spawn_session(argv, env, stdin, stdout, stderr, cwd=None, ids=None) -> tuple:
    """Start ``argv`` in a new session with the given descriptors as its
    stdin, stdout and stderr; returns ``(pid, popen)``.  The caller reaps
    ``pid`` (``os.wait4``) and keeps ``popen`` (None or a ``Popen``) until
    then: its finalizer would reap the pid itself.  ``ids`` is
    ``(uid, gid, groups)`` to run as another user.

    ``os.posix_spawn`` costs the calling thread less than half of what
    ``Popen`` does (no Python-level environment and argument handling), which
    is most of a burst's spawning; it has no ``cwd`` or user switch, and looks
    a bare program name up in the server's PATH, so those cases use ``Popen``.
    Every descriptor the server opens is close-on-exec (PEP 446, SQLite,
    sockets), and ``close_inherited_fds`` covers those it inherited; before
    Python 3.13 (no ``POSIX_SPAWN_CLOSEFROM``) a descriptor that code embedding
    the engine makes inheritable later would reach jobs.  Raises ``OSError``
    (``FileNotFoundError``, ``PermissionError``, ...)."""
    path_differs = b"PATH" in env and env[b"PATH"] != os.environb.get(b"PATH")
    if cwd or ids or (path_differs and b"/" not in os.fsencode(argv[0])):
        extra = {}
        if ids:
            extra = {"user": ids[0], "group": ids[1], "extra_groups": ids[2]}
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            start_new_session=True,
            **extra,
        )
        return popen.pid, popen
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    if hasattr(os, "POSIX_SPAWN_CLOSEFROM"):  # Python 3.13+
        actions.append((os.POSIX_SPAWN_CLOSEFROM, 3))
    pid = os.posix_spawnp(
        argv[0],
        argv,
        env,
        file_actions=actions,
        setsid=True,
        setsigdef=_RESTORED_SIGNALS,
    )
    return pid, None


def close_inherited_fds() -> None:
    """Mark every descriptor above 2 close-on-exec, so that none the server
    inherited from whoever started it reaches a job.  This changes the flags
    of the whole process's descriptors: ``Runner.start`` calls it."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _tree_pids(pid: int) -> list:
    """``pid`` and its descendants, from ``/proc/PID/task/TID/children``."""
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", "rb") as f:
                    stack.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def _proc_usage(pid: int):
    """``(cpu seconds, rss bytes)`` of one process from ``/proc/PID/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rfind(b")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        return cpu, int(fields[21]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _exit_description(code: int | None, sig: int | None) -> str | None:
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if code == 127:
        return "exit code 127 (command not found)"
    if code == 126:
        return "exit code 126 (command not executable)"
    if code:
        return f"exit code {code}"
    return None


###############################################################################
# Runner ######################################################################
###############################################################################


class Run:
    """One queued or running run, in memory.  Fields named like ``RUN_COLUMNS``
    mirror the database row.

    One writer at a time, handed on: :class:`Admission`'s lock guards
    ``status`` while the run waits; the launcher owns the run from
    ``starting`` until it hands it to the io thread; the io thread owns it
    (output, process, usage, outcome) until it sets ``finished_at`` and puts
    it to :class:`Completion`, which only reads it.  Other threads send the
    owner messages: a stop, a sample, an http result."""

    def __init__(self, run_id, job, trigger, attempt=1, slot=None, scheduled_at=None):
        self.id = run_id
        self.job = job
        self.status = "queued"
        self.trigger = trigger
        self.attempt = attempt
        self.slot = slot
        self.scheduled_at = scheduled_at
        self.started_at = self.finished_at = self.duration = None
        self.exit_code = self.signal = self.error = self.pid = None
        self.pid_create_time = None
        self.cpu_time = self.peak_rss = None
        self.output_bytes = 0
        self.output_truncated = False
        self.leftovers_stopped = None
        self.node = None  # the node it runs on (a cluster's)
        self.triggered_by = None  # who asked for a manual run (a token's name)
        self.result_file = None  # kind python: where the child writes its result
        self.claim = ""  # "" or, for ``placement: all``, the node's own claim
        self.epoch = None  # the node registration it was claimed under
        self.force = False  # a forced manual trigger ignores the job's concurrency
        self.deadline_armed = False
        self.counted = False  # counted in the Runner's live/busy totals
        self.persisted = None  # Write of the insert; launch waits on it
        self.not_before = None
        self.due = 0.0  # monotonic time the launcher may spawn it
        self.kill_reason = None  # ("cancelled" | "timed_out", message)
        self.proc = None  # a Popen to keep until reaped (see spawn_session)
        self.pipes = ()  # read ends of stdout and stderr, from the launcher
        # -- io thread only --
        self.watched = False  # handed over to the io thread
        self.pidfd = None
        self.fds = {}  # open pipe -> "stdout" | "stderr"
        self.decoders = {}
        self.seq = 0
        self.head_left = job.max_output // 2
        self.tail = collections.deque()
        self.tail_bytes = 0
        self.marker_seq = None
        self.head_newline = True  # the stored head ends a line
        self.exited = False
        self.exited_at = 0.0  # monotonic, once waiting for the leftover scan
        self.guard_held = False  # leftovers being killed: stay registered
        self.rusage = None
        self.timers = []

    def row(self) -> dict:
        out = {key: getattr(self, key) for key in RUN_COLUMNS if key != "job"}
        out["job"] = self.job.name
        if self.status == "starting":  # an internal step of queued
            out["status"] = "queued"
        if self.claim:
            out["claim"] = self.claim
        return out

    def public(self) -> dict:
        """As :func:`run_public` makes of :meth:`row`, without the row: runs
        are announced several times each, from the hot path."""
        out = {key: getattr(self, key) for key in _PUBLIC_RUN_COLUMNS}
        out["job"] = self.job.name
        if self.status == "starting":
            out["status"] = "queued"
        for key in _TIME_COLUMNS:
            out[key] = iso_utc(out[key])
        out["output_truncated"] = bool(out["output_truncated"])
        return out


class Admission:
    """Which runs may start, and when: ``concurrency`` policies, per-job
    queues and ``--max-concurrent``.  Pure bookkeeping behind its own lock,
    with no processes, I/O or timers: it hands back what the caller must do
    (runs ready to spawn, runs past their deadline, runs whose deadline
    must be armed), and the caller does it after the lock is released.
    ``clock`` is the wall clock deadlines are measured on.  Any thread.

    A run is *registered* from its submission until it ends; *live* from
    the moment it may spawn (status ``starting``) until it ends.  A job
    that is not ``allow`` has at most one live run unless one was forced.
    """

    def __init__(self, max_concurrent=0, clock=time.time):
        self.max_concurrent = max_concurrent
        self.clock = clock
        self._lock = threading.Lock()
        #: Notified whenever a run starts or ends (shutdown, the sampler wait).
        self.changed = threading.Condition(self._lock)
        self._runs = {}  # id -> Run, every registered run
        self._by_job = {}  # job name -> {id: Run}, the same runs by job
        self._waiting = []  # runs eligible to start, in order
        self._live = 0  # runs starting or running
        self._busy = collections.Counter()  # job -> its live runs (not "allow")
        self.closing = False

    @staticmethod
    def policy(job, active, trigger, force) -> tuple:
        """What ``concurrency`` makes of a new run while ``active`` runs of its
        job exist: ``(reason to skip it or None, runs to stop first)``."""
        if not active or trigger in ("retry", "catch_up"):
            return None, []
        policy = job.concurrency
        if policy == "forbid" and not force:
            return (
                f"run {active[0].id} of this job is still active (concurrency forbid)",
                [],
            )
        if policy == "queue":
            waiting = [r for r in active if r.status == "queued"]
            if len(waiting) >= job.queue_max:
                return f"the queue of this job is full (queue_max {job.queue_max})", []
        if policy == "replace":
            return None, active
        return None, []

    @staticmethod
    def deadline(run):
        """The latest start of a scheduled run (``starting_deadline``, else
        ``LATE_AFTER`` for a slot handled on time), or None for other runs."""
        if run.slot is None or run.scheduled_at is None:
            return None
        limit = run.job.starting_deadline
        if limit is None:
            if run.trigger != "schedule":
                return None  # catch-up runs follow catch_up, not lateness
            limit = LATE_AFTER
        return run.scheduled_at + limit

    def add(self, job, trigger, force, not_before, now, make_run) -> tuple:
        """Decide a new run of ``job``: ``(run, runs to stop first, later)``.
        ``make_run()`` creates it (under the lock, so two submissions of a
        ``forbid`` job cannot both pass).  A run to skip comes back
        ``skipped`` and unregistered; ``later`` means another run is active
        and the policy is applied when the run comes due (:meth:`admit`).  A
        manual trigger that would be skipped raises :class:`ConflictError`;
        a closing admission :class:`UnavailableError`."""
        with self._lock:
            if self.closing:
                raise UnavailableError("the server is shutting down")
            active = list(self._by_job.get(job.name, {}).values())
            later = bool(active) and not_before is not None and not_before > now
            reason, to_stop = (
                (None, []) if later else self.policy(job, active, trigger, force)
            )
            if reason and trigger == "manual":
                raise ConflictError(reason + "; use ?force=1 to run anyway", None)
            run = make_run()
            if reason:
                run.status, run.error, run.finished_at = "skipped", reason, now
            else:
                run.force = force
                run.not_before = not_before
                self._runs[run.id] = run
                self._by_job.setdefault(job.name, {})[run.id] = run
        return run, to_stop, later

    def admit(self, run):
        """When a run decided ``later`` comes due: ``(reason to skip or None,
        runs to stop)`` against the runs of its job active now, or None if it
        is no longer waiting."""
        with self._lock:
            if run.status != "queued" or run.id not in self._runs:
                return None
            active = [
                r for r in self._by_job.get(run.job.name, {}).values() if r is not run
            ]
            return self.policy(run.job, active, run.trigger, run.force)

    def queue(self, run) -> tuple:
        """Make a registered, queued run eligible to start; what
        :meth:`_pump` hands back."""
        with self._lock:
            if run.status != "queued" or run.id not in self._runs:
                return [], [], []
            self._waiting.append(run)
            return self._pump()

    def _pump(self) -> tuple:
        """Let every waiting run start that may: ``(ready, late, to_arm)``:
        runs now ``starting`` (to spawn, in order), runs past their deadline
        (to record ``missed``), and runs that must wait whose deadline timer
        is not armed yet.  Lock held."""
        keep, ready, late, to_arm, now = [], [], [], [], None
        for run in self._waiting:
            deadline = self.deadline(run)
            if deadline is not None:
                now = self.clock() if now is None else now
                if now > deadline:
                    keep.append(run)
                    late.append(run)
                    continue
            name, exclusive = run.job.name, run.job.concurrency != "allow"
            ok = self.max_concurrent <= 0 or self._live < self.max_concurrent
            if ok and exclusive and not run.force:
                ok = not self._busy[name]
            if not ok:
                keep.append(run)
                if deadline is not None and not run.deadline_armed:
                    run.deadline_armed = True
                    to_arm.append(run)
                continue
            run.status = "starting"
            run.counted = True
            self._live += 1
            if exclusive:
                self._busy[name] += 1
            ready.append(run)
        self._waiting = keep
        return ready, late, to_arm

    def take(self, run, wanted, status) -> bool:
        """End a registered run that is still ``wanted`` (``queued``, or
        ``starting`` for the launcher) as ``status``: False if it moved on."""
        with self._lock:
            if run.status != wanted or run.id not in self._runs:
                return False
            self._forget(run)
            if run in self._waiting:
                self._waiting.remove(run)
            run.status = status
        return True

    def started(self, runs) -> None:
        """Runs that were spawned are ``running``."""
        with self._lock:
            for run in runs:
                run.status = "running"
            self.changed.notify_all()  # wakes an idle sampler to measure early

    def ended(self, run) -> tuple:
        """A run ended: it leaves, and what may start now does (:meth:`_pump`)."""
        with self._lock:
            self._forget(run)
            return self._pump()

    def _forget(self, run) -> None:
        self._runs.pop(run.id, None)
        runs = self._by_job.get(run.job.name)
        if runs is not None:
            runs.pop(run.id, None)
            if not runs:
                del self._by_job[run.job.name]
        if run.counted:
            run.counted = False
            self._live -= 1
            if run.job.concurrency != "allow":
                self._busy[run.job.name] -= 1
        self.changed.notify_all()

    def close(self) -> list:
        """Refuse new runs from now; returns the queued ones (to cancel)."""
        with self._lock:
            self.closing = True
            return [r for r in self._runs.values() if r.status == "queued"]

    def full(self) -> bool:
        """Every one of ``--max-concurrent`` is busy."""
        with self._lock:
            return 0 < self.max_concurrent <= self._live

    def wait_quiet(self, deadline, everything=False) -> list:
        """Wait until no run is live (with ``everything``: none is registered)
        or the monotonic ``deadline`` passes; returns the registered runs.
        Shutdown."""
        with self._lock:
            while (self._runs if everything else self._live) and (
                time.monotonic() < deadline
            ):
                self.changed.wait(min(0.5, max(0.01, deadline - time.monotonic())))
            return list(self._runs.values())

    def running(self, stopping, timeout=5.0) -> list:
        """Sampler: wait (while nothing is live and not ``stopping``) and
        return the running runs with a process."""
        with self._lock:
            while not self._live and not stopping.is_set():
                self.changed.wait(timeout)
            return [r for r in self._runs.values() if r.status == "running" and r.pid]

    def wake(self) -> None:
        with self._lock:
            self.changed.notify_all()

    def active(self, name: str | None = None) -> list:
        with self._lock:
            if name is None:
                return list(self._runs.values())
            return list(self._by_job.get(name, {}).values())

    def counts(self) -> dict:
        with self._lock:
            return {"running": self._live, "queued": len(self._runs) - self._live}

    def get(self, run_id: int):
        with self._lock:
            return self._runs.get(run_id)


#: Seconds a run runs before the sampler first reads its process tree.
SAMPLE_AFTER = 0.5

#: The columns a run's end changes.
_END_COLUMNS = (
    "status",
    "finished_at",
    "duration",
    "exit_code",
    "signal",
    "error",
    "cpu_time",
    "peak_rss",
    "output_bytes",
    "output_truncated",
    "leftovers_stopped",
)


class Completion:
    """The end of a run once its outcome is known: record it, release its
    place in :class:`Admission`, announce and log it, retry it, fire its
    hooks, prune its job's history and start what runs ``after`` it.

    ``minisched-completion`` does this for one run at a time, in the order
    outcomes arrive (``put``), so the io thread never waits on the database,
    listeners, hooks or logging.  Runs that never started are announced on
    the caller's thread (``announce``).  ``resubmit`` is the Runner's
    ``submit`` (for retries) and ``release`` carries out what admission
    decides once a run has left it."""

    def __init__(
        self,
        store,
        bus,
        metrics,
        admission,
        *,
        release,
        resubmit,
        clock=time.time,
        job_lookup=None,
        on_finished=None,
        on_hook=None,
    ):
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.admission = admission
        self.release = release
        self.resubmit = resubmit
        self.clock = clock
        self.job_lookup = job_lookup or (lambda name: None)
        self.on_finished = on_finished or (lambda run, job: None)
        self.on_hook = on_hook or (lambda event, run, job: None)
        self._queue = queue.SimpleQueue()
        self._thread = None

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(
            target=self._loop, name="minisched-completion", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Finish what was put, then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def put(self, run) -> None:
        """A started run's outcome is final (its status set): complete it.
        Any thread (the io thread)."""
        self._queue.put(run)

    def _loop(self) -> None:
        while True:
            run = self._queue.get()
            if run is None:
                return
            try:
                self._complete(run)
            except Exception:
                log.exception("completing run %d failed", run.id)

    def _count(self, run) -> None:
        """Update the counters ``/metrics`` reports (since server start)."""
        self.metrics.ended(
            run.job.name, run.status, run.duration, run.output_bytes, run.finished_at
        )

    def _complete(self, run) -> None:
        # Queued for the writer, then released: whoever sees the end (API,
        # events) may start the job again at once, and a flush of the store
        # after that (``wait_idle`` in tests, a shutdown) includes the end.
        self.store.update_run(
            run.id, {key: getattr(run, key) for key in _END_COLUMNS}, job=run.job.name
        )
        self.release(self.admission.ended(run))
        self._count(run)
        current = self.job_lookup(run.job.name)  # None once the job is deleted
        job = current or run.job
        public = run.public()
        self.bus.publish("run", public)
        status = run.status
        log.log(
            logging.WARNING if status in FAILURE_STATUSES else logging.INFO,
            "run %d of %s %s in %.3fs (%s)%s",
            run.id,
            job.name,
            status,
            run.duration,
            _outcome(run),
            (": " + run.error) if run.error else "",
        )
        retry = status in ("failed", "timed_out") and run.attempt <= job.retries
        if retry and current is not None and not self.admission.closing:
            delay = job.retry_delay_for(run.attempt + 1)
            try:
                self.resubmit(
                    job,
                    "retry",
                    attempt=run.attempt + 1,
                    scheduled_at=self.clock() + delay,
                    not_before=self.clock() + delay,
                )
            except MinischedError as exc:
                log.warning("no retry of run %d: %s", run.id, exc)
        elif status == "succeeded":
            self.on_hook("on_success", public, job)
        elif status in ("failed", "timed_out"):
            self.on_hook("on_failure", public, job)
        self.store.prune(job.name, job.keep_runs)
        self.on_finished(run, job)

    def announce(self, run, job) -> None:
        """A run that never started is recorded terminal (``skipped``,
        ``missed``, ``cancelled``): count, announce, hooks, prune.  The
        caller's thread."""
        self._count(run)
        public = run.public()
        self.bus.publish("run", public)
        log.log(
            logging.WARNING if run.status in FAILURE_STATUSES else logging.INFO,
            "run %d of %s %s%s",
            run.id,
            job.name,
            run.status,
            (": " + run.error) if run.error else "",
        )
        if run.status in ("missed", "lost"):
            self.on_hook("on_failure", public, job)
        self.store.prune(job.name, job.keep_runs)


def _spawns(run) -> bool:
    """Whether launching ``run`` spawns a process (not an http run's request,
    not a run stopped while it waited)."""
    return run.kill_reason is None and run.job.kind != "http"


class Launcher:
    """The launcher part of a :class:`Runner`, owned by ``minisched-launcher``:
    the only thread that spawns jobs (so the parent of every child and of the
    guard process outlives them).  It takes the runs admission let start
    from ``queue``, holds each until its instant, spawns a slot's runs back
    to back as one batch, then records and announces the batch and hands
    every run to the io thread (or to an http thread)."""

    def __init__(self, runner):
        self.runner = runner
        #: Runs to spawn (``starting``), callables to call, None to stop.
        self.queue = queue.SimpleQueue()
        self.launching = False  # a batch is being spawned (the io thread reads it)
        self._devnull = os.open(os.devnull, os.O_RDONLY)  # every job's stdin
        self._base_env = dict(os.environb)  # what every job's environment starts from

    def loop(self) -> None:
        """``minisched-launcher``: spawn runs, in batches.  Every run queued at
        once is spawned back to back (each only after its insert committed);
        the bookkeeping follows, so a burst starts as fast as a bare loop."""
        held = []  # runs queued ahead of their time, by due time
        while True:
            try:
                if not self._launch_round(held):
                    return
            except Exception:
                log.exception("the launcher failed in a batch; it goes on")

    def _launch_round(self, held) -> bool:
        """Wait for due runs and spawn them as one batch; False at the stop
        sentinel.  Launcher thread."""
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        batch = self._take_due(held, timeout)
        self.launching = True
        try:
            return self._spawn_batch(batch, held)
        finally:
            self.launching = False

    def _spawn_batch(self, batch, held) -> bool:
        """Spawn ``batch`` and the runs that join it; False at the stop sentinel."""
        join_until = time.monotonic() + LAUNCH_JOIN_SECONDS
        started = []
        while batch:
            runs = []
            for item in batch:
                if item is None:
                    started += self._launch(runs)
                    self._after_launch(started)
                    return False
                if callable(item):
                    self.runner.guard.server = self.runner.store.server_id
                    self.runner.guard.start()
                    item()
                    continue
                runs.append(item)
            started += self._launch(runs)
            # Runs that came due while this batch spawned join it, for a while.
            joining = time.monotonic() < join_until
            batch = self._take_due(held, 0) if joining else []
        self._after_launch(started)
        return True

    def _launch(self, runs) -> list:
        """Spawn those of ``runs`` that may start, after their inserts
        committed and their start is recorded (one round trip for them all,
        in a cluster); return the runs started, those that could not spawn
        included (they fail)."""
        ready = []
        for run in runs:
            try:
                if self._may_start(run):
                    ready.append(run)
            except Exception as exc:
                log.exception("launching run %d failed", run.id)
                run.error = f"cannot start: {exc}"
                ready.append(run)
        ready = self._begin(ready)
        # Before the spawns: a server killed while a batch spawns (before
        # ``_after_launch`` registers the groups) takes these processes along.
        self.runner.guard.expect(*(run.id for run in ready if _spawns(run)))
        for run in ready:
            try:
                self._spawn_run(run)
            except Exception as exc:
                log.exception("launching run %d failed", run.id)
                run.error = f"cannot start: {exc}"
        return ready

    def _unrecordable(self, run, why: str) -> None:
        # Its writes are held until the database can be written again, and so
        # is this record of why it never ran: the slot is accounted for.
        self.runner._end_unstarted(
            run,
            "missed" if run.slot is not None else "failed",
            f"not started: the database cannot record it ({why})",
            starting=True,
        )

    def _begin(self, runs) -> list:
        """Record ``runs`` started before they spawn (a cluster's fence);
        return those that may go on."""
        try:
            refused = self.runner.store.begin_starts(
                [run.id for run in runs], self.runner.clock()
            )
        except UnavailableError as exc:
            for run in runs:
                self._unrecordable(run, exc.message)
            return []
        for run in runs:
            if run.id in refused:
                # Declared dead a moment ago: another node takes this run over.
                log.warning("run %d not started: this node was fenced", run.id)
                self.runner._start(*self.runner.admission.ended(run))
        return [run for run in runs if run.id not in refused]

    def _take_due(self, held, timeout) -> list:
        """Wait up to ``timeout`` (None: forever) for the launch queue; file
        runs not yet due in ``held``; return what is due: runs, the stop
        sentinel None and callables.  Launcher thread."""
        items = []
        try:
            items.append(self.queue.get(timeout=timeout))
            while items[-1] is not None and not callable(items[-1]):
                items.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        batch = []
        for item in items:
            if item is not None and not callable(item) and item.due > now:
                heapq.heappush(held, (item.due, item.id, item))
            else:
                batch.append(item)
        # Runs of one slot are due within microseconds of each other: take
        # them as one batch, and wait (at most 1 ms) until the last is due.
        latest = 0.0
        while held and held[0][0] <= now + 0.001:
            latest, _, run = heapq.heappop(held)
            batch.append(run)
        if latest > now:
            time.sleep(latest - now)
        return batch

    def _may_start(self, run) -> bool:
        """Whether ``run`` may start: its insert committed (waited for), its
        slot had no run, this node's lease holds.  Launcher thread."""
        inserted = self._committed(run)
        if isinstance(inserted, UnavailableError):
            self._unrecordable(run, inserted.message)
            return False
        if inserted is not True:
            self.runner._start(*self.runner.admission.ended(run))
            if inserted is not False:
                log.error("run %d not started: cannot record it: %s", run.id, inserted)
            return False
        if not self.runner.lease(run):
            # Fenced (or about to be): another node takes this run over.
            log.warning("run %d not started: this node's lease ran out", run.id)
            self.runner._start(*self.runner.admission.ended(run))
            return False
        return True

    def _spawn_run(self, run) -> None:
        """Start ``run``: spawn its process (an http run's request, and the
        end of a run stopped while it waited, are left to :meth:`_hand_over`)."""
        run.started_at = self.runner.clock()
        if run.kill_reason is not None:  # stopped while it waited to start
            run.error = run.kill_reason[1]
        if not _spawns(run):
            return
        try:
            self._spawn(run)
        except _SpawnError as exc:
            run.error = str(exc)
            self.runner.guard.unregister(run.id)

    def _committed(self, run):
        """The result of a run's insert: True, False (its slot had a run),
        the exception, or an :class:`UnavailableError` while the database
        cannot be written (then it is not waited for)."""
        while True:
            try:
                return run.persisted.result(timeout=0.5)
            except TimeoutError:
                if self.runner.store.outage is not None:
                    return UnavailableError(self.runner.store.outage)
            except Exception as exc:  # noqa: BLE001 - the caller reports it
                return exc

    def _after_launch(self, runs) -> None:
        """Record and announce a batch of started runs; hand them to the io
        thread (or to an http thread).  Launcher thread."""
        if not runs:
            return
        self.runner.guard.register(*((run.id, run.pid) for run in runs if run.pid))
        for run in runs:
            if run.pid:
                # Read after the whole batch: /proc of a process in mid-exec is
                # slow to read.  Not reaped yet (the io thread has not seen it).
                run.pid_create_time = _create_time(run.pid)
                cpu = self.runner.limits(run.job)[1]
                if cpu:  # the kernel holds the main process to it too
                    _limit_cpu(run.pid, cpu, run.job.kill_grace)
            if run.slot is not None and run.started_at is not None:
                self.runner.metrics.started(run.started_at - run.scheduled_at)
        self.runner.admission.started(runs)
        recorded = self.runner.store.mark_started(
            [(r.started_at, r.pid, r.pid_create_time, r.id, r.job.name) for r in runs]
        )
        recorded.add_done_callback(self._check_fenced)
        for run in runs:
            # Each run on its own: one failure here must neither end this
            # thread nor leave a started run unwatched.
            try:
                public = run.public()
                self.runner.bus.publish("run", public)
                log.info("run %d of %s started (%s)", run.id, run.job.name, run.trigger)
                self.runner.on_hook("on_start", public, run.job)
            except Exception:
                log.exception("announcing the start of run %d failed", run.id)
            try:
                self._hand_over(run)
            except Exception as exc:
                log.exception("handing run %d over failed", run.id)
                self.runner.watcher.command(("fail", run, f"internal error: {exc!r}"))

    def _check_fenced(self, future) -> None:
        """Writer thread: runs whose start the database refused (this node
        was fenced: they are another node's now) are stopped at once."""
        if future.exception() is not None:
            return
        for run_id in future.result() or ():
            self.runner.stop_run(run_id, "stopped: this node was fenced")

    def _hand_over(self, run) -> None:
        """Give a started run to the io thread, which owns it from now on (an
        http run's request goes to a thread of its own).  Launcher thread."""
        if run.job.kind == "http" and run.error is None:
            self.runner.watcher.command(("add", run))
            threading.Thread(
                target=self._http_run,
                args=(run,),
                name="minisched-http-run",
                daemon=True,
            ).start()
        elif run.pid is None:
            self.runner.watcher.command(("fail", run, run.error))
        else:
            self.runner.watcher.command(("add", run))

    def _spawn(self, run) -> None:
        """Start the job's process in its own session; sets ``run.pid``,
        ``run.proc`` and ``run.pipes`` (the read ends of its stdout and
        stderr).  Raises ``_SpawnError``.  Launcher thread only."""
        job = run.job
        # Bytes, from a snapshot taken once: nothing to encode per spawn.
        env = dict(self._base_env)
        enc = os.fsencode
        env.update((enc(k), enc(v)) for k, v in job.env.items())
        env[b"MINISCHED_RUN_ID"] = b"%d" % run.id
        env[b"MINISCHED_SERVER"] = enc(self.runner.store.server_id or "")
        env[b"MINISCHED_JOB"] = enc(job.name)
        env[b"PYTHONUNBUFFERED"] = b"1"
        if job.kind == "python":
            argv = python_call_argv(job)
            if job.pythonpath:
                paths = [*job.pythonpath, os.environ.get("PYTHONPATH", "")]
                env[b"PYTHONPATH"] = enc(os.pathsep.join(p for p in paths if p))
        elif isinstance(job.command, str):
            argv = ["/bin/sh", "-c", job.command]
        else:
            argv = job.command
        ids = None
        if job.user:
            try:
                pw = pwd.getpwnam(job.user)
            except KeyError:
                raise _SpawnError(
                    f"cannot start: user {job.user!r} does not exist"
                ) from None
            if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
                raise _SpawnError(
                    f"cannot start: running as user {job.user!r} needs the server to run as root"
                )
            ids = (pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid))
            env.update(
                {
                    b"HOME": enc(pw.pw_dir),
                    b"USER": enc(pw.pw_name),
                    b"LOGNAME": enc(pw.pw_name),
                }
            )
        if job.cwd and not os.path.isdir(job.cwd):
            raise _SpawnError(f"cannot start: cwd {job.cwd!r} is not a directory")
        opened = []
        try:
            if job.kind == "python":
                run.result_file = _result_file(run)
                env[b"MINISCHED_RESULT_FILE"] = enc(run.result_file)
            opened.extend(os.pipe())
            opened.extend(os.pipe())
            out_r, out_w, err_r, err_w = opened
            run.pid, run.proc = spawn_session(
                argv, env, self._devnull, out_w, err_w, job.cwd or None, ids
            )
            run.pipes = (out_r, err_r)
        except FileNotFoundError as exc:
            what = exc.filename if exc.filename is not None else argv[0]
            raise _SpawnError(f"cannot start: {what!r} not found") from None
        except PermissionError as exc:
            raise _SpawnError(f"cannot start: permission denied: {exc}") from None
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise _SpawnError(f"cannot start: {exc}") from None
        finally:
            for fd in opened:  # the write ends; everything if it failed
                if fd not in run.pipes:
                    os.close(fd)
            if run.pid is None and run.result_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(run.result_file)
                run.result_file = None

    def _http_run(self, run) -> None:
        """``minisched-http-run``: one request; the result goes to the io
        thread, whatever happens (a run must never stay ``running``)."""
        job = run.job
        status, text, error = None, "", None
        try:
            body = job.body
            headers = dict(job.headers)
            if body is not None and not isinstance(body, str):
                body = json.dumps(body)
                headers.setdefault("Content-Type", "application/json")
            request = urllib.request.Request(
                job.url,
                data=body.encode() if body is not None else None,
                method=job.method,
                headers=headers,
            )
            timeout = job.timeout + 1 if job.timeout else 30
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = response.status
                text = response.read(job.max_output).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                text = exc.read(job.max_output).decode("utf-8", "replace")
            except (OSError, ValueError):
                text = ""
        except (urllib.error.URLError, OSError) as exc:
            error = f"request failed: {getattr(exc, 'reason', exc)}"
        except Exception as exc:  # noqa: BLE001 - any failure ends the run
            error = f"request failed: {type(exc).__name__}: {exc}"
        if status is not None:
            ok = (
                status in job.expect_status
                if job.expect_status
                else 200 <= status < 300
            )
            if not ok:
                error = f"HTTP status {status} not expected"
        self.runner.watcher.command(("http_done", run, status, text, error))


class Watcher:
    """The watcher part of a :class:`Runner`, owned by ``minisched-io``: every
    started run's process and output (pipes, pidfd, head and tail capture,
    usage), the job timers (timeouts, kill escalation, retries, jitter,
    deadlines) and each run's outcome, which it hands to :class:`Completion`.
    Other threads reach it only through :meth:`command`.  Job timers run on
    the runner's ``monotonic`` clock, so tests move them with a fake one."""

    def __init__(self, runner):
        self.runner = runner
        self._io_q = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def command(self, command) -> None:
        """Send the io thread a command (``(name, *args)``: ``_io_NAME``
        handles it).  Any thread."""
        self._io_q.put(command)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def loop(self) -> None:
        """``minisched-io``: pipes, exits, timers.  Owns every started run's
        process and output state.  Each event, command and timer is handled
        on its own: one that fails is logged and the loop goes on."""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        #: Job timers (timeouts, kill grace, retries, jitter, deadlines) on
        #: ``self.runner.monotonic``; the loop's own short waits (exit polls, pipe
        #: drains) on ``time.monotonic``.  ``(when, seq, fn)`` heaps.
        self._timers = []
        self._waits = []
        self._timer_seq = itertools.count()
        self._leftover_checks = []  # exited runs waiting for the next scan
        self._last_scan = 0.0
        while True:
            try:
                if not self._io_round():
                    return
            except Exception:
                log.exception("the io thread failed in a round; it goes on")

    def _io_round(self) -> bool:
        """One wait for pipes, exits, commands and timers; False on stop."""
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - self.runner.monotonic())
        if self._waits:
            wait = max(0.0, self._waits[0][0] - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        if self._leftover_checks:
            scan_in = self._scan_at() - time.monotonic()
            if (
                self.runner.launcher.launching
            ):  # the batch's end wakes this thread anyway
                scan_in = max(scan_in, LEFTOVER_SCAN_DELAY)
            scan_in = max(0.0, min(scan_in, LEFTOVER_SCAN_INTERVAL))
            timeout = scan_in if timeout is None else min(timeout, scan_in)
        for key, _mask in self._sel.select(timeout):
            if self._sel.get_map().get(key.fd) is not key:
                continue  # closed by an earlier event of this round
            if key.data is None:
                os.read(self._wake_r, 4096)
            else:
                try:
                    self._on_ready(*key.data, key.fd)
                except Exception:
                    log.exception("error handling a run's pipe")
        while True:
            try:
                command = self._io_q.get_nowait()
            except queue.Empty:
                break
            if command[0] == "stop":
                return False
            try:
                getattr(self, "_io_" + command[0])(*command[1:])
            except Exception:
                log.exception("error handling %s", command[0])
        for heap, now in (
            (self._timers, self.runner.monotonic()),
            (self._waits, time.monotonic()),
        ):
            while heap and heap[0][0] <= now:
                _when, _seq, fn = heapq.heappop(heap)
                try:
                    fn()
                except Exception:
                    log.exception("error in a runner timer")
        now = time.monotonic()
        if (
            self._leftover_checks
            and now >= self._scan_at()
            and not self.runner.launcher.launching
        ):
            self._check_leftovers()
        return True

    def _scan_at(self) -> float:
        """When the runs waiting for a leftover scan get it (monotonic)."""
        first = self._leftover_checks[0].exited_at
        return max(
            first + LEFTOVER_SCAN_DELAY, self._last_scan + LEFTOVER_SCAN_INTERVAL
        )

    def _io_timer(self, delay, fn) -> None:
        self._add_timer(delay, fn)

    def _add_timer(self, delay, fn) -> None:
        """Call ``fn`` on the io thread ``delay`` seconds of ``self.runner.monotonic``
        from now: a job's timer (a fake clock in tests moves it)."""
        heapq.heappush(
            self._timers, (self.runner.monotonic() + delay, next(self._timer_seq), fn)
        )

    def _add_wait(self, delay, fn) -> None:
        """Call ``fn`` on the io thread after ``delay`` real seconds: the
        loop's own mechanics, not a job's time."""
        heapq.heappush(
            self._waits, (time.monotonic() + delay, next(self._timer_seq), fn)
        )

    def poke(self) -> None:
        """Make the io thread look at its timers now (after a fake
        ``monotonic`` clock moved).  Any thread."""
        self.command(("poke",))

    def _io_poke(self) -> None:
        pass

    def _io_add(self, run) -> None:
        """Take over a started run: its pipes and exit (an http run: its
        timeout only; the request thread reports the result)."""
        run.watched = True
        if run.job.timeout:
            # A weak reference: a run that ends early must not stay in memory
            # until its (possibly hours-long) timeout comes due.
            ref = weakref.ref(run)
            self._add_timer(run.job.timeout, lambda: self._on_timeout(ref()))
        if run.job.kind == "http":
            if run.kill_reason is not None:
                self._end_http(run, run.kill_reason[1])
            return
        for stream, fd in zip(("stdout", "stderr"), run.pipes):
            os.set_blocking(fd, False)
            run.fds[fd] = stream
            run.decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
            self._sel.register(fd, selectors.EVENT_READ, (run, stream))
        try:
            run.pidfd = os.pidfd_open(run.pid)
            self._sel.register(run.pidfd, selectors.EVENT_READ, (run, "exit"))
        except (AttributeError, OSError):
            self._poll_exit(run)  # no pidfd (macOS, old kernels): poll
        if run.kill_reason is not None:  # stopped while it was being spawned
            self._system_line(run, run.kill_reason[1])
            self._signal_escalate(run, run.job.kill_grace)

    def _poll_exit(self, run) -> None:
        if not run.exited and self._reap(run, os.WNOHANG):
            self._on_exit(run)
        elif not run.exited:
            self._add_wait(0.05, lambda: self._poll_exit(run))

    def _reap(self, run, flags=0) -> bool:
        try:
            pid, status, rusage = os.wait4(run.pid, flags)
        except ChildProcessError:
            pid, status, rusage = run.pid, 0, None
        if pid == 0:
            return False
        run.rusage = rusage
        if os.WIFSIGNALED(status):
            run.signal = os.WTERMSIG(status)
        else:
            run.exit_code = os.WEXITSTATUS(status)
        if run.proc is not None:
            run.proc.returncode = os.waitstatus_to_exitcode(status)
        return True

    def _on_ready(self, run, stream, fd) -> None:
        if stream == "exit":
            self._sel.unregister(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None
            self._reap(run)
            self._on_exit(run)
            return
        self._read_once(run, stream, fd)

    def _read_once(self, run, stream, fd) -> bool:
        """One read of a pipe; False when there is nothing to read right now."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data:
            self._on_output(run, stream, data)
        else:
            self._close_fd(run, fd)
        return True

    def _drain(self, run) -> None:
        """Read every pipe of an exited run until it is empty or at EOF."""
        for fd, stream in list(run.fds.items()):
            while fd in run.fds and self._read_once(run, stream, fd):
                pass

    def _close_fd(self, run, fd) -> None:
        if run.fds.pop(fd, None) is None:
            return
        self._sel.unregister(fd)
        os.close(fd)
        if run.exited and not run.fds:
            self._exited(run)

    def _on_exit(self, run) -> None:
        run.exited = True
        self._drain(run)  # usually reaches EOF on both pipes
        if not run.fds:
            self._exited(run)
        else:
            # Pipes still open: wait a moment for the last output, then
            # whatever still holds them is a leftover of this run.
            self._add_wait(DRAIN_SECONDS, lambda: self._reap_leftovers(run))

    def _reap_leftovers(self, run) -> None:
        """The job exited ``DRAIN_SECONDS`` ago and something still holds its
        output: stop it (``leftovers: kill``), or let it be (``keep``)."""
        if run.finished_at is not None:
            return
        self._drain(run)
        if not run.fds:
            self._exited(run)
            return
        if run.job.leftovers == "keep":
            self._system_line(
                run,
                "the job exited; processes still holding its output keep running "
                "(leftovers: keep) and its output is no longer read",
            )
            for fd in list(run.fds):
                self._close_fd(run, fd)
            return
        if run.kill_reason is None:
            self._system_line(
                run,
                "the job exited but left processes holding its output; stopping them",
            )
        hits = self._signal_escalate(run, run.job.kill_grace)
        run.leftovers_stopped = max(hits, run.leftovers_stopped or 0) or None

    def _exited(self, run) -> None:
        """The main process has exited and its output is closed.  With
        ``leftovers: kill`` whatever of the run is still alive is stopped
        first (one ``/proc`` scan serves every run that ended meanwhile)."""
        if (
            run.job.leftovers == "keep"
            or run.leftovers_stopped is not None
            or run.pid is None
        ):
            self._finish(run)
        else:
            run.exited_at = time.monotonic()
            self._leftover_checks.append(run)

    def _check_leftovers(self) -> None:
        """Find the processes left by runs that just exited (in their group or
        carrying their marker), SIGTERM them and SIGKILL them after
        ``kill_grace``, as systemd does with a service's cgroup; then finish
        the runs.  Io thread."""
        runs, self._leftover_checks = self._leftover_checks, []
        self._last_scan = time.monotonic()
        exclude = (os.getpid(), self.runner.guard.pid or 0)
        found = find_marked_pids(
            {str(run.id) for run in runs},
            exclude,
            self.runner.store.server_id,
            by_run=True,
        )
        for run in runs:
            if run.finished_at is not None:
                continue
            pids = found.get(str(run.id), [])
            try:
                os.killpg(run.pid, signal.SIGTERM)
                group = True
            except OSError:
                group = False
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            if (pids or group) and run.kill_reason is None:
                count = len(pids) or 1
                run.leftovers_stopped = count
                self._system_line(
                    run,
                    f"the job exited and left {count} process"
                    f"{'' if count == 1 else 'es'} running: stopped "
                    "(leftovers: kill)",
                )
            if pids or group:
                run.guard_held = True
                self._add_timer(run.job.kill_grace, lambda r=run: self._kill_hard(r))
            self._finish(run)

    def _kill_hard(self, run) -> None:
        """SIGKILL whatever of a finished run is left; release the guard."""
        signal_run(
            run.pid,
            [run.id],
            signal.SIGKILL,
            (self.runner.guard.pid or 0,),
            self.runner.store.server_id,
        )
        self.runner.guard.unregister(run.id)

    def _signal_escalate(self, run, grace) -> int:
        """SIGTERM the run's group and marked processes, SIGKILL them after
        ``grace``; returns how many marked processes the SIGTERM reached."""
        server = self.runner.store.server_id
        hits = signal_run(
            run.pid, [run.id], signal.SIGTERM, (self.runner.guard.pid or 0,), server
        )

        def hard_kill():
            if run.finished_at is None:
                signal_run(
                    run.pid,
                    [run.id],
                    signal.SIGKILL,
                    (self.runner.guard.pid or 0,),
                    server,
                )
                self._add_wait(1.0, force_close)

        def force_close():
            for fd in list(run.fds):
                self._close_fd(run, fd)
            if run.exited and run.finished_at is None:
                self._finish(run)

        self._add_timer(grace, hard_kill)
        return hits

    def _io_kill(self, run, status, message, grace=None) -> None:
        if run.finished_at is not None or run.kill_reason is not None:
            return
        run.kill_reason = (status, message)
        if not run.watched:
            return  # not spawned or not handed over yet: _io_add kills it
        if run.job.kind == "http":
            self._end_http(run, message)
            return
        self._system_line(run, message)
        self._signal_escalate(
            run, run.job.kill_grace if grace is None else min(grace, run.job.kill_grace)
        )

    def _end_http(self, run, message) -> None:
        """Stop an http run now: its request cannot be aborted, but its
        thread's late answer is ignored (``http_done`` finds it finished)."""
        self._system_line(run, message)
        run.exited = True
        self._finish(run)

    def _on_timeout(self, run) -> None:
        if run is not None and run.finished_at is None and not run.exited:
            self._io_kill(
                run, "timed_out", f"killed after timeout of {_num(run.job.timeout)}s"
            )

    def _io_fail(self, run, message) -> None:
        """End a run as ``failed``: it could not start, or the launcher could
        not hand it over (then its process, if any, is watched and stopped)."""
        if run.finished_at is not None:
            return
        if run.pid is not None and not run.exited:
            if not run.watched:
                self._io_add(run)
            self._io_kill(run, "failed", message)
            return
        run.error = message
        self._system_line(run, message)
        run.exited = True
        self._finish(run, "failed")

    def _io_http_done(self, run, status, text, error) -> None:
        if run.finished_at is not None:
            return
        if status is not None:
            self._on_output(run, "stdout", f"HTTP {status}\n".encode())
        if text:
            self._on_output(run, "stdout", text.encode())
        run.exit_code = status
        run.exited = True
        if error:
            run.error = error
            self._system_line(run, error)
        self._finish(run, "failed" if error else "succeeded")

    # -- output ------------------------------------------------------------

    def _on_output(self, run, stream, data: bytes) -> None:
        run.output_bytes += len(data)
        decoder = run.decoders.get(stream)
        if decoder is None:
            decoder = run.decoders[stream] = codecs.getincrementaldecoder("utf-8")(
                "replace"
            )
        if run.head_left > 0:
            head, data = data[: run.head_left], data[run.head_left :]
            run.head_left -= len(head)
            text = decoder.decode(head)
            if text:
                run.head_newline = text.endswith("\n")
            self._emit(run, stream, text, store=True)
        if data:
            if run.marker_seq is None:
                run.output_truncated = True
                run.seq += 1
                run.marker_seq = run.seq
            self._emit(run, stream, decoder.decode(data), store=False)

    def _emit(self, run, stream, text, store) -> None:
        """Number a decoded chunk, store it (head) or keep it in the bounded
        tail, and publish it live.  Io thread."""
        if not text:
            return
        run.seq += 1
        chunk = {
            "seq": run.seq,
            "stream": stream,
            "ts": self.runner.clock(),
            "text": text,
        }
        if store:
            # Queued for the writer before it is published: a stream that
            # subscribes, flushes and replays can never miss it.
            self.runner.store.add_chunks(
                [(run.id, chunk["seq"], stream, chunk["ts"], text)]
            )
        self.runner.bus.publish("log", dict(chunk, run_id=run.id))
        if store:
            return
        size = len(text.encode())
        run.tail.append([chunk, size])
        run.tail_bytes += size
        limit = run.job.max_output - run.job.max_output // 2
        while run.tail_bytes > limit:
            first = run.tail[0]
            excess = run.tail_bytes - limit
            if first[1] <= excess:
                run.tail.popleft()
                run.tail_bytes -= first[1]
                continue
            kept = first[0]["text"].encode()[excess:].decode("utf-8", "ignore")
            run.tail_bytes -= first[1] - len(kept.encode())
            first[0]["text"], first[1] = kept, len(kept.encode())

    def _python_result(self, run) -> None:
        """Kind python: the call's return value, as a system line.  Io thread."""
        path, run.result_file = run.result_file, None
        try:
            with open(path, "rb") as f:
                data = f.read(PYTHON_RESULT_MAX + 1)
            os.unlink(path)
        except OSError:
            return
        if not data:
            return  # the call raised or the process was killed: nothing returned
        text = data[:PYTHON_RESULT_MAX].decode("utf-8", "replace")
        if len(data) > PYTHON_RESULT_MAX:
            text += f" [cut at {PYTHON_RESULT_MAX} bytes]"
        self._system_line(run, "returned: " + text)

    def _system_line(self, run, text) -> None:
        """A line of minisched's own (stream ``system``), always stored."""
        run.seq += 1
        chunk = {
            "seq": run.seq,
            "stream": "system",
            "ts": self.runner.clock(),
            "text": text + "\n",
        }
        self.runner.store.add_chunks(
            [(run.id, chunk["seq"], "system", chunk["ts"], chunk["text"])]
        )
        self.runner.bus.publish("log", dict(chunk, run_id=run.id))

    # -- the end of a run --------------------------------------------------

    def _finish(self, run, status=None) -> None:
        """Settle a run's outcome (its last output, pipes, status) and hand it
        to completion.  Io thread."""
        if run.finished_at is not None:
            return
        for stream, decoder in run.decoders.items():
            self._emit(
                run, stream, decoder.decode(b"", final=True), store=run.head_left > 0
            )
        if run.result_file is not None:
            self._python_result(run)
        for fd in list(run.fds):
            self._close_fd(run, fd)
        if run.pidfd is not None:
            self._sel.unregister(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None
        if run.pid is not None and not run.exited:
            self._reap(run)
        run.finished_at = self.runner.clock()
        run.duration = round(run.finished_at - (run.started_at or run.finished_at), 3)
        if run.marker_seq is not None:
            head = run.job.max_output // 2 - run.head_left
            dropped = max(0, run.output_bytes - head - run.tail_bytes)
            rows = [
                (
                    run.id,
                    run.marker_seq,
                    "system",
                    run.finished_at,
                    (
                        ("" if run.head_newline else "\n")
                        + f"[minisched: {dropped} bytes of output dropped here "
                        f"(max_output {run.job.max_output})]\n"
                    ),
                ),
            ]
            rows += [
                (run.id, c["seq"], c["stream"], c["ts"], c["text"]) for c, _ in run.tail
            ]
            self.runner.store.add_chunks(rows)
            run.tail.clear()
        if run.rusage is not None:
            cpu = run.rusage.ru_utime + run.rusage.ru_stime
            run.cpu_time = round(max(run.cpu_time or 0, cpu), 3)
            # Not ru_maxrss: it includes the server's own RSS from before exec.
        if run.kill_reason:
            status, run.error = run.kill_reason
        elif status is None:
            run.error = _exit_description(run.exit_code, run.signal)
            status = "failed" if run.error else "succeeded"
            if run.signal == getattr(signal, "SIGXCPU", None):
                limit = self.runner.limits(run.job)[1]
                run.error = f"max_cpu: the main process used its {_num(limit)}s of CPU (killed by SIGXCPU)"
        run.status = status
        if run.pid and not run.guard_held:
            self.runner.guard.unregister(run.id)
        self.runner.completion.put(run)

    def _io_usage(self, samples) -> None:
        """Io thread: the sampler's measurements ``[(run, cpu, rss)]`` go on
        their runs (the highest kept); a run whose tree is over ``max_rss`` or
        ``max_cpu`` is stopped as a timeout is (SIGTERM, ``kill_grace``,
        SIGKILL) and ends ``failed``, its error naming the limit and what was
        measured."""
        for run, cpu_used, rss_used in samples:
            if run.finished_at is not None:
                continue
            _note_usage(run, cpu_used, rss_used)
            rss, cpu = self.runner.limits(run.job)
            if rss and run.peak_rss and run.peak_rss > rss:
                message = (
                    f"max_rss: its processes used {_bytes(run.peak_rss)} of memory, "
                    f"over the limit of {_bytes(rss)}"
                )
            elif cpu and run.cpu_time and run.cpu_time > cpu:
                message = (
                    f"max_cpu: its processes used {run.cpu_time:.1f}s of CPU, over "
                    f"the limit of {_num(cpu)}s"
                )
            else:
                continue
            self._io_kill(run, "failed", "stopped: " + message)


class Runner:
    """Starts, watches and stops runs: the facade over its parts.

    ``submit``/``stop_*`` and the queries are called from the scheduler and
    request threads; :class:`Admission` decides when a run may start, the
    :class:`Launcher` spawns it (``minisched-launcher``), the
    :class:`Watcher` owns it while it runs (``minisched-io``) and
    :class:`Completion` ends it (``minisched-completion``).  The sampler
    thread (``minisched-sampler``) is the Runner's own.

    What it needs from the rest comes as constructor arguments:
    ``job_lookup(name)`` gives a job's current definition (None once
    deleted); ``on_finished(run, job)`` is called from the completion thread
    after a run is recorded terminal (the scheduler starts dependents there);
    ``on_hook(event, public_run, job)`` hands a hook event to the notifier;
    ``monotonic`` is the clock of job timers.  In a cluster, ``node`` is this
    node's name (each run records it) and ``lease()`` is False while this
    node may not start ``run`` (its lease ran out, or the run was claimed
    under an earlier registration of this node: it may be fenced).
    """

    def __init__(
        self,
        store,
        bus,
        max_concurrent=0,
        clock=time.time,
        job_lookup=None,
        limits=(None, None),
        metrics=None,
        on_finished=None,
        on_hook=None,
        monotonic=time.monotonic,
        node=None,
        lease=None,
    ):
        self.store = store
        self.bus = bus
        self.node = node
        self.lease = lease or (lambda run: True)
        #: Server-wide ``max_rss`` and ``max_cpu`` for jobs without their own.
        self.default_rss, self.default_cpu = limits
        self.clock = clock
        #: The clock of job timers (timeouts, kill grace, retries, jitter).
        self.monotonic = monotonic
        self.on_hook = on_hook or (lambda event, run, job: None)
        self.guard = ProcessGuard()
        self.metrics = metrics or Metrics()
        self.admission = Admission(max_concurrent, clock)
        self.launcher = Launcher(self)
        self.completion = Completion(
            store,
            bus,
            self.metrics,
            self.admission,
            release=lambda decided: self._start(*decided),
            resubmit=self.submit,
            clock=clock,
            job_lookup=job_lookup,
            on_finished=on_finished,
            on_hook=on_hook,
        )
        self.watcher = Watcher(self)
        self._threads = []
        self.stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------

    def threads_alive(self) -> dict:
        """``{"launcher": bool, "io": bool, "sampler": bool, "completion":
        bool}``: alive or not."""
        return {t.name.split("-", 1)[1]: t.is_alive() for t in self._threads}

    def start(self) -> None:
        close_inherited_fds()  # jobs get only stdin, stdout and stderr
        for name, target in (
            ("minisched-launcher", self.launcher.loop),
            ("minisched-io", self.watcher.loop),
            ("minisched-sampler", self._sample_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._threads.append(self.completion.start())
        started = threading.Event()
        self.launcher.queue.put(started.set)  # the guard's parent is the launcher
        started.wait(10)

    def shutdown(self, grace: float) -> None:
        """Stop accepting runs, let running ones finish for most of ``grace``,
        then stop them (``cancelled``) and wait for the rest.  Main thread."""
        deadline = time.monotonic() + grace
        for run in self.admission.close():
            self._end_unstarted(run, "cancelled", "the server is shutting down")
        soft = deadline - min(2.0, grace / 2)
        left = [
            r
            for r in self.admission.wait_quiet(soft)
            if r.status in ("running", "starting")
        ]
        for run in left:
            self._kill(
                run,
                "cancelled",
                "stopped: the server is shutting down",
                grace=max(0.0, deadline - time.monotonic() - 0.5),
            )
        self.admission.wait_quiet(deadline + 2, everything=True)
        self.stopping.set()
        self.admission.wake()
        self.launcher.queue.put(None)
        self.watcher.command(("stop",))
        for thread in self._threads:
            if thread.name != "minisched-completion":
                thread.join(timeout=5)
        self.completion.stop()  # after the io thread: it hands over the last
        self.guard.close()

    @property
    def max_concurrent(self) -> int:
        return self.admission.max_concurrent

    # -- submitting (scheduler and request threads) --------------------------

    def submit(
        self,
        job,
        trigger,
        *,
        slot=None,
        scheduled_at=None,
        attempt=1,
        force=False,
        not_before=None,
        job_update=None,
        triggered_by=None,
    ) -> dict:
        """Create a run of ``job`` and start it when the job's ``concurrency`` and
        the global limit allow.  Returns the run's public dict (status
        ``queued``, or ``skipped``).  A manual trigger that would be skipped
        raises :class:`ConflictError` instead (``force`` overrides ``forbid``).
        ``triggered_by`` names who asked for it.

        ``concurrency`` is decided at the run's start time: a slot handled
        ahead (``LOOKAHEAD``, jitter) while another run of the job is active
        is decided again when it comes due, so a run that ends just before
        the next slot never causes a skip or a replacement."""
        now = self.clock()

        def make_run():
            at = scheduled_at if scheduled_at is not None else now
            run = self._new_run(job, trigger, attempt, slot, at)
            run.triggered_by = triggered_by
            return run

        run, to_stop, later = self.admission.add(
            job, trigger, force, not_before, now, make_run
        )
        run.persisted = self.store.insert_run(run.row(), job_update)
        if run.status == "skipped":
            self.completion.announce(run, job)
            return run.public()
        self._replace(run, to_stop)
        public = run.public()
        self.bus.publish("run", public)
        # Read the clock again: the runs of one slot must get the same ``due``.
        delay = (not_before - self.clock()) if not_before is not None else 0.0
        if later:  # decide when it is due: the active run may be over by then
            self.watcher.command(("timer", max(0.0, delay), lambda: self._admit(run)))
        elif delay > 2 * LOOKAHEAD:  # a retry or jitter: wait without a slot
            self.watcher.command(("timer", delay, lambda: self._enqueue(run)))
        else:
            # Due now or in a moment: queue it; the launcher holds it until then.
            run.due = time.monotonic() + max(0.0, delay)
            self._enqueue(run)
        if run.status in ("queued", "starting"):
            return dict(public)  # the caller's own copy of what was announced
        return run.public()  # already started, or missed

    def _arm_deadline(self, run) -> None:
        """A scheduled run has to wait (``--max-concurrent``, a queue): at its
        deadline, if it still waits, it is ``missed``."""
        deadline = Admission.deadline(run)
        ref = weakref.ref(run)
        left = max(0.0, deadline - self.clock())
        self.watcher.command(("timer", left, lambda: self._expire(ref())))

    def _replace(self, run, to_stop) -> None:
        for old in to_stop:
            self.stop_run(old.id, f"replaced by run {run.id} (concurrency replace)")

    def _admit(self, run) -> None:
        """Io thread, when a run handled ahead comes due: apply ``concurrency``
        now, against the runs of its job active at this moment."""
        decision = self.admission.admit(run)
        if decision is None:
            return
        reason, to_stop = decision
        if reason:
            self._end_unstarted(run, "skipped", reason)
            return
        self._replace(run, to_stop)
        run.due = time.monotonic()
        self._enqueue(run)

    def _expire(self, run) -> None:
        """Io thread, at a run's deadline: if it is still waiting, it is missed."""
        if run is None or run.status != "queued":
            return
        why = (
            f"every one of --max-concurrent {self.max_concurrent} was busy"
            if self.admission.full()
            else "an earlier run of this job was still active"
        )
        limit = run.job.starting_deadline
        within = (
            f"starting_deadline {_num(limit)}s"
            if limit is not None
            else f"{_num(LATE_AFTER)}s of its time"
        )
        self._end_unstarted(run, "missed", f"not started within {within}: {why}")

    def record(
        self,
        job,
        status,
        trigger,
        *,
        slot=None,
        scheduled_at=None,
        error=None,
        job_update=None,
    ) -> dict:
        """Record a run that never starts (``missed``, ``skipped``)."""
        now = self.clock()
        run = self._new_run(job, trigger, 1, slot, scheduled_at)
        run.status, run.error, run.finished_at = status, error, now
        if status == "missed":
            job_update = dict(job_update or {}, last_run_id=run.id)
        run.persisted = self.store.insert_run(run.row(), job_update)
        self.completion.announce(run, job)
        return run.public()

    def _new_run(self, job, trigger, attempt, slot, scheduled_at) -> Run:
        run = Run(
            self.store.allocate_run_id(), job, trigger, attempt, slot, scheduled_at
        )
        run.node = self.node
        run.epoch = getattr(self.store, "node_id", None)
        if slot is not None and job.placement == "all":
            run.claim = self.node or ""  # one run of the slot per node
        return run

    def _enqueue(self, run) -> None:
        self._start(*self.admission.queue(run))

    def _start(self, ready, late, to_arm) -> None:
        """Carry out what admission decided: spawn the ready runs, arm the
        deadlines of those that wait, record the late ones ``missed``."""
        for run in ready:
            self.launcher.queue.put(run)
        for run in to_arm:
            self._arm_deadline(run)
        for run in late:
            self._expire(run)

    # -- stopping (any thread) ---------------------------------------------

    def stop_run(self, run_id: int, message="stopped by request") -> bool:
        """Stop one active run (``cancelled``).  False if it is not active."""
        run = self.admission.get(run_id)
        status = run.status if run else None
        if status is None:
            return False
        if status != "queued" or not self._end_unstarted(run, "cancelled", message):
            self._kill(run, "cancelled", message)  # started meanwhile: kill it
        return True

    def stop_job(self, name: str, message="stopped by request") -> int:
        """Stop every active run of a job; returns how many."""
        ids = [r.id for r in self.active_runs(name)]
        return sum(self.stop_run(run_id, message) for run_id in ids)

    def _end_unstarted(self, run, status, message, starting=False) -> bool:
        """End a run that never started (``cancelled``, ``missed``, ``failed``):
        False if it started meanwhile.  ``starting``: the launcher ends a run
        it had taken."""
        if not self.admission.take(run, "starting" if starting else "queued", status):
            return False
        run.error = message
        run.finished_at = self.clock()
        self.store.update_run(
            run.id,
            {"status": status, "error": message, "finished_at": run.finished_at},
            job=None if status == "skipped" else run.job.name,
        )
        self.completion.announce(run, run.job)
        return True

    def _kill(self, run, status, message, grace=None) -> None:
        """Ask the io thread to stop a started run: SIGTERM, then SIGKILL."""
        self.watcher.command(("kill", run, status, message, grace))

    # -- queries -------------------------------------------------------------

    def active_runs(self, name: str | None = None) -> list:
        return self.admission.active(name)

    def counts(self) -> dict:
        return self.admission.counts()

    def get_active(self, run_id: int):
        return self.admission.get(run_id)

    # -- the sampler thread ------------------------------------------------

    def _sample_loop(self) -> None:
        """``minisched-sampler``: whole-tree CPU and RSS of running runs, once a
        second, only while some run is running (a run's CPU time at its end
        comes from its rusage; a run shorter than ``SAMPLE_AFTER`` may keep a
        null ``peak_rss``)."""
        while not self.stopping.is_set():
            # A run's first half second is left out: it says little (the
            # process has barely exec'd), and a burst's runs are mostly over
            # by the next round, so the burst is not slowed by reading them.
            born = self.clock() - SAMPLE_AFTER
            runs = [
                r for r in self.admission.running(self.stopping) if r.started_at <= born
            ]
            if runs:
                try:
                    self.watcher.command(("usage", self._sample(runs)))
                except Exception:
                    log.exception("sampling process trees failed")
            self.stopping.wait(1.0)

    def limits(self, job) -> tuple:
        """``(max_rss, max_cpu)`` that apply to ``job`` (None: no limit)."""
        rss = job.max_rss if job.max_rss is not None else self.default_rss
        cpu = job.max_cpu if job.max_cpu is not None else self.default_cpu
        return rss, cpu

    @staticmethod
    def _sample(runs) -> list:
        """Whole-tree CPU and RSS of each run, ``[(run, cpu, rss)]``, from
        ``/proc`` (children files and ``stat``) when the kernel has them,
        else one psutil scan.  Reads the runs' pids only."""
        samples = []
        if _PROC_CHILDREN:
            for run in runs:
                rss = cpu = 0.0
                for pid in _tree_pids(run.pid):
                    usage = _proc_usage(pid)
                    if usage:
                        cpu += usage[0]
                        rss += usage[1]
                samples.append((run, cpu, rss))
            return samples
        children = collections.defaultdict(list)
        info = {}
        for proc in psutil.process_iter(["ppid", "memory_info", "cpu_times"]):
            children[proc.info["ppid"]].append(proc.pid)
            info[proc.pid] = proc.info
        for run in runs:
            rss = cpu = 0.0
            stack = [run.pid]
            while stack:
                pid = stack.pop()
                item = info.get(pid)
                if (
                    item
                    and item["memory_info"] is not None
                    and item["cpu_times"] is not None
                ):
                    rss += item["memory_info"].rss
                    cpu += item["cpu_times"].user + item["cpu_times"].system
                stack.extend(children.get(pid, ()))
            samples.append((run, cpu, rss))
        return samples


def _limit_cpu(pid: int, seconds: float, grace: float) -> None:
    """``RLIMIT_CPU`` on a running process (Linux ``prlimit``): SIGXCPU at
    ``seconds``, SIGKILL ``grace`` later.  Quietly nothing where unsupported."""
    soft = max(1, math.ceil(seconds))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        resource.prlimit(
            pid, resource.RLIMIT_CPU, (soft, soft + max(1, math.ceil(grace)))
        )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _note_usage(run, cpu, rss) -> None:
    """Keep the highest sample.  A process that is exiting reads as 0 bytes:
    such a sample says nothing (``peak_rss`` stays null, never 0)."""
    if rss > 0:
        run.peak_rss = int(max(run.peak_rss or 0, rss))
        run.cpu_time = round(max(run.cpu_time or 0, cpu), 3)


class _SpawnError(Exception):
    """A job's process could not be started; the message says why."""


def _outcome(run) -> str:
    """How a run's process ended, for the log: ``exit code 3``, ``HTTP 200``,
    ``killed by SIGTERM``, ``stopped``."""
    if run.job.kind == "http":
        return f"HTTP {run.exit_code}" if run.exit_code is not None else "no response"
    if run.signal:
        return _exit_description(None, run.signal)
    if run.exit_code is None:
        return "stopped" if run.kill_reason else "not started"
    return f"exit code {run.exit_code}"


def _num(value) -> str:
    return (f"{value:g}") if isinstance(value, float) else str(value)


###############################################################################
# Scheduler ###################################################################
###############################################################################


class _JobState:
    """Scheduling state of one job, persisted in the ``jobs`` table."""

    __slots__ = (
        "job",
        "last_slot",
        "next_at",
        "next_iso",
        "paused",
        "scheduled_runs",
        "version",
    )

    def __init__(self, job, last_slot, paused=False, scheduled_runs=0):
        self.job = job
        self.last_slot = last_slot
        self.paused = paused
        self.scheduled_runs = scheduled_runs
        self.next_at = None
        self.next_iso = None  # next_at formatted once, for the API
        self.version = 0


class Scheduler:
    """Owns the job registry and fires slots, exactly once each.

    A heap holds each job's next slot.  ``tick()`` handles every due slot and
    returns how long to sleep; ``run()`` loops on it in ``minisched-scheduler``
    and sleeps with ``wait(seconds)`` until then or until a change.  ``clock``
    (wall time) and ``wait`` are injectable, so tests drive a day in
    milliseconds by calling ``tick()`` with a fake clock.

    A slot's run insert and the job's ``last_slot`` are written in one
    transaction, and the runner spawns only after that commit: a restart
    neither repeats a slot nor forgets one.  Slots that passed while the
    server was down are handled by ``catch_up``.

    Public methods may be called from any thread.
    """

    def __init__(
        self,
        store,
        runner,
        bus,
        server_tz,
        *,
        clock=time.time,
        wait=None,
        rand=random.random,
        place=None,
    ):
        self.store = store
        self.runner = runner
        #: In a cluster, :meth:`Cluster.place`: which slots this node claims.
        self.place = place
        self.bus = bus
        self.server_tz = server_tz
        self.clock = clock
        self.rand = rand
        self._wake = threading.Event()
        self._wait = wait or self._default_wait
        self._lock = threading.Lock()
        self._states = {}
        self._heap = []
        self._dependents = None  # job name -> jobs with it in ``after`` (lazy)
        self._edits = 0  # changes queued for the store, counted (for sync)
        self._edit_marks = {}  # job name -> the count at its last change
        self.started_at = clock()
        self.last_tick = None
        self.lag = 0.0
        self.stopping = threading.Event()
        self._thread = None

    def _default_wait(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    # -- lifecycle ---------------------------------------------------------

    def load(self) -> None:
        """Read jobs and their state from the store."""
        for row in self.store.load_jobs():
            try:
                # Validated again: a definition stored by an older minisched
                # may hold what this one refuses (a surrogate, a bad URL).
                definition = validate_job(row["definition"], self.server_tz)
                job = Job(definition, self.server_tz, row["source"], row["created_at"])
            except MinischedError as exc:
                log.error(
                    "job %s in the database is invalid, skipped: %s", row["name"], exc
                )
                continue
            state = _JobState(
                job, row["last_slot"], bool(row["paused"]), row["scheduled_runs"]
            )
            with self._lock:
                self._states[job.name] = state
                self._reschedule(state)

    def load_reboot(self) -> None:
        """Fire every enabled, unpaused ``@reboot`` job once (server start only)."""
        calls = []
        with self._lock:
            for state in self._states.values():
                job = state.job
                if (
                    job.schedule_obj.kind == "reboot"
                    and job.enabled
                    and not state.paused
                ):
                    self._fire(state, "reboot", None, self.started_at, calls)
        self._call_runner(calls)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name="minisched-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_time(self) -> bool:
        """False when the scheduler handles slots more than ``LATE_AFTER``
        late, or has not ticked for that long beyond its longest sleep."""
        if self.lag > LATE_AFTER:
            return False
        return (
            self.last_tick is None
            or self.clock() - self.last_tick < MAX_SLEEP + LATE_AFTER
        )

    def run(self) -> None:
        """The scheduler loop: tick, sleep until the next slot or a change."""
        while not self.stopping.is_set():
            try:
                delay = self.tick()
            except Exception:
                log.exception("scheduler tick failed")
                delay = 1.0
            self._wait(min(delay, MAX_SLEEP))

    # -- the registry (any thread) -------------------------------------------

    def get_job(self, name: str):
        state = self._states.get(name)
        return state.job if state else None

    def jobs(self) -> list:
        with self._lock:
            return [
                s.job for s in sorted(self._states.values(), key=lambda s: s.job.name)
            ]

    def state(self, name: str) -> dict:
        """``paused`` and ``next_run_at`` (epoch or None) of a job."""
        with self._lock:
            state = self._states.get(name)
            if state is None:
                raise NotFoundError(f"no job named {name!r}", "name")
            return {
                "paused": state.paused,
                "next_run_at": state.next_at,
                "next_run_iso": state.next_iso,
            }

    def put_job(
        self,
        definition: dict,
        source="api",
        file_definition=None,
        create_only=False,
        file_owner=None,
    ) -> Job:
        """Create or replace a job.  A changed schedule never fires the slots
        between its old last slot and now.  ``file_owner`` (a cluster node's
        name) records which node's jobs file the definition came from."""
        with self._lock:
            staged = self._stage_job(
                definition, source, file_definition, create_only, file_owner
            )
        jobs, error = self._committed([staged])
        if error is not None:
            raise error
        return jobs[0]

    def put_file_jobs(self, definitions, file_owner=None) -> tuple:
        """:meth:`put_job` for definitions read from a jobs file (in the order
        given: dependencies first), committed together: one round trip to the
        writer for all of them (see :data:`FILE_BATCH`).  Returns (the jobs
        committed, in order; the exception that stopped the rest, or None):
        what was applied before a failure is still committed and announced."""
        staged, error = [], None
        with self._lock:
            for definition in definitions:
                try:
                    staged.append(
                        self._stage_job(
                            definition, "file", definition, False, file_owner
                        )
                    )
                except MinischedError as exc:
                    error = exc
                    break
        jobs, failed = self._committed(staged)
        return jobs, error or failed

    def _stage_job(
        self, definition, source, file_definition, create_only, file_owner
    ) -> tuple:
        """Apply a definition in memory and queue its row for the store;
        returns (job, created, future).  Lock held."""
        now = self.clock()
        old = self._states.get(definition["name"])
        if old is not None and create_only:
            raise ConflictError(
                "job {!r} already exists".format(definition["name"]), "name"
            )
        self._check_after(definition)
        created = old.job.created_at if old else now
        job = Job(definition, self.server_tz, source, created)
        if old is None:
            state = self._states[job.name] = _JobState(job, now)
        else:
            state = old
            same_times = (old.job.schedule, old.job.tz) == (job.schedule, job.tz)
            state.job = job
            state.scheduled_runs = 0
            if not same_times:  # a new schedule starts now, never in the past
                state.last_slot = max(state.last_slot or now, now)
        self._reschedule(state)
        fields = {
            "definition": definition,
            "source": source,
            "file_definition": file_definition,
            "updated_at": now,
            "last_slot": state.last_slot,
            "scheduled_runs": 0,
        }
        if old is None:
            fields["created_at"] = created
        if file_owner is not None:
            fields["file_owner"] = file_owner
        future = self.store.save_job(job.name, fields)
        self._edited(job.name)
        return job, old is None, future

    def _committed(self, staged) -> tuple:
        """Wait for staged jobs' rows, then wake the loop and announce them;
        returns (the jobs whose rows committed, the first error or None).  No
        lock held."""
        jobs, error = [], None
        for job, created, future in staged:
            try:
                self.store.result(future)
            except MinischedError as exc:
                error = error or exc
                continue
            jobs.append(job)
            self.bus.publish(
                "job", {"action": "created" if created else "updated", "name": job.name}
            )
        self._wake.set()
        return jobs, error

    def _check_after(self, definition) -> None:
        """``after`` must name existing jobs and not form a cycle.  Lock held."""
        name = definition["name"]
        if not definition.get("after"):
            return  # a cycle through it needs an edge out of it
        deps = {n: s.job.after for n, s in self._states.items()}
        deps[name] = definition.get("after", [])
        for dep in deps[name]:
            if dep not in deps:
                raise InvalidError(f"after: no job named {dep!r}", "after")
        cycle = find_cycle(deps)
        if cycle:
            raise InvalidError("after: " + _cycle_message(cycle), "after")

    def check_after(self, definition) -> None:
        """Raise :class:`InvalidError` if ``definition``'s ``after`` names a
        job that does not exist or closes a cycle."""
        with self._lock:
            self._check_after(definition)

    def remove_job(self, name: str, purge=False, force=False) -> None:
        """Delete a job.  Jobs that run ``after`` it make this a conflict,
        unless ``force``: then the name is removed from their ``after`` first,
        so a later job of the same name never triggers them."""
        with self._lock:
            if name not in self._states:
                raise NotFoundError(f"no job named {name!r}", "name")
            dependents = sorted(
                (s.job for s in self._states.values() if name in s.job.after),
                key=lambda job: job.name,
            )
        if dependents and not force:
            listed = ", ".join(repr(j.name) for j in dependents)
            raise ConflictError(
                f"{listed} run{'s' if len(dependents) == 1 else ''} after {name!r}: "
                "remove it from their after first, or delete with force "
                "(?force=1), which does that",
                "name",
            )
        for job in dependents:
            definition = dict(job.definition)
            definition["after"] = [n for n in job.after if n != name]
            if not definition["after"]:
                del definition["after"]
            file_definition = definition if job.source == "file" else None
            self.put_job(definition, job.source, file_definition=file_definition)
            log.info("job %s no longer runs after %s (deleted)", job.name, name)
        with self._lock:
            if self._states.pop(name, None) is None:
                raise NotFoundError(f"no job named {name!r}", "name")
            self._dependents = None
            future = self.store.delete_job(name, purge)
            self._edited(name)
        self.runner.stop_job(name, "stopped: the job was deleted")
        self.store.result(future)
        self.bus.publish("job", {"action": "deleted", "name": name})

    def set_paused(self, name: str, paused: bool) -> None:
        """Pause or resume.  Resuming does not fire slots passed while paused."""
        now = self.clock()
        with self._lock:
            state = self._states.get(name)
            if state is None:
                raise NotFoundError(f"no job named {name!r}", "name")
            state.paused = paused
            if not paused:
                state.last_slot = max(state.last_slot or now, now)
            self._reschedule(state)
            future = self.store.save_job(
                name, {"paused": int(paused), "last_slot": state.last_slot}
            )
            self._edited(name)
        self.store.result(future)
        self._wake.set()
        self.bus.publish(
            "job", {"action": "paused" if paused else "resumed", "name": name}
        )

    def skip_past(self) -> None:
        """A node joining a live cluster: the slots that passed were the
        other nodes' to run, not this one's to catch up."""
        now = self.clock()
        with self._lock:
            for state in self._states.values():
                state.last_slot = max(state.last_slot or now, now)
                self._reschedule(state)

    def _edited(self, name) -> None:
        """A job's change was just queued for the store.  Lock held."""
        self._edits += 1
        self._edit_marks[name] = self._edits

    def edit_mark(self) -> int:
        """For :meth:`sync`: take it, flush the store, then read the jobs."""
        with self._lock:
            return self._edits

    def sync(self, rows, mark) -> None:
        """Another node changed jobs: make the registry match ``rows`` (every
        stored job, from :meth:`Store.load_jobs`, read after taking
        :meth:`edit_mark` ``mark`` and flushing) without writing anything.
        Jobs changed here since ``mark`` are newer than ``rows`` and kept."""
        now = self.clock()
        jobs = {}
        for row in rows:
            try:
                definition = validate_job(row["definition"], self.server_tz)
                jobs[row["name"]] = (row, definition)
            except MinischedError as exc:
                log.error(
                    "job %s in the database is invalid, skipped: %s", row["name"], exc
                )
        events, removed = [], []
        with self._lock:
            newer = {n for n, m in self._edit_marks.items() if m > mark}
            for name, (row, definition) in jobs.items():
                if name in newer:
                    continue
                state = self._states.get(name)
                paused = bool(row["paused"])
                if state is not None and state.job.definition == definition:
                    if state.paused != paused:
                        state.paused = paused
                        if not paused:
                            state.last_slot = max(state.last_slot or now, now)
                        self._reschedule(state)
                        events.append(("paused" if paused else "resumed", name))
                    continue
                job = Job(definition, self.server_tz, row["source"], row["created_at"])
                if state is None:
                    last = max(row["last_slot"] or now, now)
                    state = self._states[name] = _JobState(job, last, paused)
                    events.append(("created", name))
                else:
                    same = (state.job.schedule, state.job.tz) == (job.schedule, job.tz)
                    state.job, state.paused = job, paused
                    if not same:
                        state.last_slot = max(state.last_slot or now, now)
                    events.append(("updated", name))
                self._reschedule(state)
            for name in [n for n in self._states if n not in jobs and n not in newer]:
                del self._states[name]
                self._dependents = None
                removed.append(name)
                events.append(("deleted", name))
        for name in removed:
            self.runner.stop_job(name, "stopped: the job was deleted")
        if events:
            self._wake.set()
        for action, name in events:
            self.bus.publish("job", {"action": action, "name": name})

    def trigger(self, name: str, force=False, trigger="manual", by=None) -> dict:
        """Run a job now; ``by`` names who asked (the run's ``triggered_by``)."""
        job = self.get_job(name)
        if job is None:
            raise NotFoundError(f"no job named {name!r}", "name")
        return self.runner.submit(job, trigger, force=force, triggered_by=by)

    def upcoming(self, until: float, limit: int = 10000) -> tuple:
        """Every scheduled fire of every enabled, unpaused job from now until
        ``until``, in time order: ``([(instant, job), ...], truncated)``.
        Uses a copy of each schedule (the scheduler thread owns the
        originals).  Any thread."""
        with self._lock:
            starts = [
                (s.job, s.next_at)
                for s in self._states.values()
                if s.next_at is not None and s.next_at <= until
            ]
        fires = []
        for job, first in starts:
            schedule, t = Schedule(job.schedule, job.tz), first
            while t is not None and t <= until and len(fires) <= limit:
                fires.append((t, job))
                t = schedule.next_after(t, anchor=job.created_at)
        fires.sort(key=lambda item: (item[0], item[1].name))
        return fires[:limit], len(fires) > limit

    # -- firing --------------------------------------------------------------

    def _reschedule(self, state) -> None:
        """Compute the next slot and push it on the heap.  Lock held."""
        state.version += 1
        self._dependents = None  # jobs changed: rebuild the ``after`` index
        job = state.job
        state.next_at = None
        if (
            job.enabled
            and not state.paused
            and not (job.max_runs and state.scheduled_runs >= job.max_runs)
        ):
            base = state.last_slot if state.last_slot is not None else job.created_at
            state.next_at = job.schedule_obj.next_after(base, anchor=job.created_at)
        state.next_iso = iso_utc(state.next_at)
        if state.next_at is not None:
            heapq.heappush(self._heap, (state.next_at, job.name, state.version))

    def tick(self) -> float:
        """Handle every due slot; return seconds until the next one.  What to
        do is decided under the lock; the runner is called after it is
        released (it reaches the store, listeners, hooks and logging)."""
        now = self.clock()
        self.last_tick = now
        due, calls = [], []
        with self._lock:
            while self._heap and self._heap[0][0] <= now + LOOKAHEAD:
                slot, name, version = heapq.heappop(self._heap)
                state = self._states.get(name)
                if state is None or state.version != version:
                    continue
                due.append((state, slot))
            lag = 0.0
            for state, slot in due:
                lag = max(lag, now - slot)
                self._handle_due(state, slot, now, calls)
            self.lag = lag
        self._call_runner(calls)
        with self._lock:
            # Measured after the work: the next sleep must not be late by it.
            if self._heap:
                delay = self._heap[0][0] - LOOKAHEAD - self.clock()
            else:
                delay = MAX_SLEEP
        return max(0.0, delay)

    @staticmethod
    def _call_runner(calls) -> None:
        """Make the calls decided under the lock (``(job name, call)``), lock
        released; one that fails is logged and the rest still happen."""
        for name, call in calls:
            try:
                call()
            except MinischedError as exc:
                log.warning("job %s not started: %s", name, exc)
            except Exception:
                log.exception("job %s not started", name)

    def _handle_due(self, state, first, now, calls) -> None:
        """Decide what each due slot of a job becomes, appending the runner
        calls that make it so to ``calls``.  Lock held.

        One slot due after the server started: it runs.  Several due at once,
        or slots that passed while the server was down: ``catch_up`` decides
        (``all`` runs the newest 100, ``latest`` the newest; ``none`` runs the
        newest only if it came due while up).  The rest become one ``missed``
        record.  ``starting_deadline`` turns too-late slots into ``missed``.
        """
        job = state.job
        sched = job.schedule_obj
        slots, count, slot, jumped = [first], 1, first, False
        dropped = None  # the newest slot that fell out of ``slots``
        while True:
            nxt = sched.next_after(slot, anchor=job.created_at)
            if nxt is None or nxt > now + LOOKAHEAD:
                break
            count += 1
            if len(slots) >= CATCH_UP_CAP:
                dropped = slots[-CATCH_UP_CAP]
            slots = slots[-(CATCH_UP_CAP - 1) :] + [nxt]
            slot = nxt
            if count == 10000 and not jumped:
                # A long outage of a frequent job: count the bulk, enumerate the end.
                jumped = True
                period = (slot - first) / (count - 1)
                skip_to = now - 2 * CATCH_UP_CAP * period
                if skip_to > slot:
                    count += int((skip_to - slot) / period)
                    slot = skip_to
        latest = slots[-1]

        def kind(s):
            return "catch_up" if s <= self.started_at else "schedule"

        if count == 1 and first > self.started_at:
            fire = [first]
        elif job.catch_up == "all":
            fire = slots
        elif job.catch_up == "latest" or latest > self.started_at:
            fire = [latest]
        else:
            fire = []
        deadline = job.starting_deadline
        if deadline is not None:
            fire = [s for s in fire if now - s <= deadline]
        else:  # a slot that came due while up is late past LATE_AFTER
            fire = [s for s in fire if s <= self.started_at or now - s <= LATE_AFTER]
        missed = count - len(fire)
        state.last_slot = latest
        update = {"last_slot": latest}
        if missed:
            if first <= self.started_at:
                why = "the server was down"
            elif count == 1:
                limit = (
                    f"starting_deadline {_num(deadline)}s"
                    if deadline is not None
                    else f"{_num(LATE_AFTER)}s of its time"
                )
                why = f"it could not start within {limit}"
            else:
                why = "the scheduler was late (clock jump, suspend or overload)"
            plural = "" if missed == 1 else "s"
            last_missed = max((s for s in slots if s not in fire), default=dropped)
            error = (
                f"{missed} slot{plural} missed between {iso_utc(first)} and "
                f"{iso_utc(last_missed)}: {why}"
            )
            record = functools.partial(
                self.runner.record,
                job,
                "missed",
                "schedule",
                scheduled_at=first,
                error=error,
                job_update=None if fire else update,
            )
            if self.place is not None:
                record = self.place(job, first, record, record=True)
            if record is not None:
                calls.append((job.name, record))
        for i, s in enumerate(fire):
            last = i == len(fire) - 1
            self._fire(state, kind(s), s, s, calls, update if last else None)
        self._reschedule(state)

    def _fire(self, state, trigger, slot, scheduled_at, calls, update=None) -> None:
        """Append the submission of one run of ``state``'s job to ``calls``
        (counting it against ``max_runs``).  Lock held."""
        job = state.job
        update = dict(update or {})
        if slot is not None:
            state.scheduled_runs += 1
            update["scheduled_runs"] = state.scheduled_runs
            if job.max_runs and state.scheduled_runs >= job.max_runs:
                definition = dict(job.definition, enabled=False)
                state.job = Job(definition, self.server_tz, job.source, job.created_at)
                update["definition"] = definition
                message = "job %s reached max_runs %d and is now disabled"
                calls.append(
                    (
                        job.name,
                        functools.partial(log.info, message, job.name, job.max_runs),
                    )
                )
        # A slot handled a little ahead (LOOKAHEAD) starts at its time, not before.
        not_before = slot if slot is not None and slot > self.clock() else None
        if job.jitter and slot is not None:
            not_before = scheduled_at + self.rand() * job.jitter
            scheduled_at = not_before
        submit = functools.partial(
            self.runner.submit,
            job,
            trigger,
            slot=slot,
            scheduled_at=scheduled_at,
            not_before=not_before,
            job_update=update or None,
        )
        if self.place is not None and slot is not None:
            submit = self.place(job, slot, submit)
        if submit is not None:
            calls.append((job.name, submit))

    def run_finished(self, run, job) -> None:
        """Io thread: a run ended; start the jobs that run ``after`` it."""
        if run.status != "succeeded":
            return
        dependents = self._dependents
        if dependents is None:
            with self._lock:
                dependents = collections.defaultdict(list)
                for state in self._states.values():
                    for name in state.job.after:
                        dependents[name].append(state.job)
                self._dependents = dependents
        for dependent in dependents.get(job.name, ()):
            with self._lock:
                state = self._states.get(dependent.name)
                if state is None or state.paused:
                    continue  # deleted or paused since
                dependent = state.job
            try:
                self.runner.submit(dependent, "dependency")
            except MinischedError as exc:
                log.warning("dependent job %s not started: %s", dependent.name, exc)


###############################################################################
# Jobs file ###################################################################
###############################################################################


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text):
    """Strict JSON (no NaN/Infinity); InvalidError with line and column."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidError(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidError(f"invalid JSON: {exc}") from None


def parse_jobs_document(doc, server_tz) -> list:
    """``{"defaults": {...}, "jobs": [...]}`` or a bare list -> validated
    definitions (defaults merged, ``env`` merged key by key).  Errors name the
    place: ``jobs[2].schedule: ...``; every problem is in ``.errors``."""
    if isinstance(doc, list):
        doc = {"jobs": doc}
    if not isinstance(doc, dict):
        raise InvalidError(
            'a jobs document must be an object with "jobs" or a list of jobs'
        )
    errors = []
    for key in doc:
        if key not in ("defaults", "jobs"):
            errors.append(
                {"field": key, "error": f"{key}: unknown key (use defaults and jobs)"}
            )
    defaults = doc.get("defaults", {})
    jobs = doc.get("jobs", [])
    if not isinstance(defaults, dict):
        errors.append({"field": "defaults", "error": "defaults: must be an object"})
        defaults = {}
    elif "name" in defaults:
        errors.append(
            {
                "field": "defaults.name",
                "error": "defaults.name: a default name makes no sense",
            }
        )
    if not isinstance(jobs, list):
        errors.append({"field": "jobs", "error": "jobs: must be a list of job objects"})
        jobs = []
    out, seen = [], set()
    for i, item in enumerate(jobs):
        place = f"jobs[{i}]"
        if not isinstance(item, dict):
            errors.append({"field": place, "error": place + ": must be an object"})
            continue
        merged = dict(defaults)
        merged.update(item)
        if isinstance(defaults.get("env"), dict) and isinstance(item.get("env"), dict):
            merged["env"] = dict(defaults["env"], **item["env"])
        try:
            definition = validate_job(merged, server_tz)
        except InvalidError as exc:
            errors += [
                {
                    "field": "{}.{}".format(place, e["field"]),
                    "error": "{}.{}".format(place, e["error"]),
                }
                for e in exc.errors
            ]
            continue
        if definition["name"] in seen:
            errors.append(
                {
                    "field": place + ".name",
                    "error": "{}.name: duplicate job name {!r}".format(
                        place, definition["name"]
                    ),
                }
            )
        seen.add(definition["name"])
        out.append(definition)
    names = {d["name"]: i for i, d in enumerate(out)}
    for i, definition in enumerate(out):
        for dep in definition.get("after", []):
            if dep not in names:
                errors.append(
                    {
                        "field": f"jobs[{i}].after",
                        "error": f"jobs[{i}].after: no job named {dep!r} in this file",
                    }
                )
    cycle = find_cycle({d["name"]: d.get("after", []) for d in out})
    if cycle:
        place = f"jobs[{names[cycle[0]]}].after"
        errors.append({"field": place, "error": f"{place}: {_cycle_message(cycle)}"})
    if errors:
        raise InvalidError(errors[0]["error"], errors[0]["field"], errors)
    return out


def dependency_order(definitions: list) -> list:
    """The definitions reordered so that each comes after the jobs of the same
    list it names in ``after`` (so saving them in order always works).  The
    list must be free of cycles (:func:`parse_jobs_document` checks)."""
    names = {d["name"] for d in definitions}
    done, ordered, pending = set(), [], list(definitions)
    while pending:
        ready = [
            d
            for d in pending
            if all(a in done or a not in names for a in d.get("after", []))
        ] or pending  # a cycle: cannot happen after validation
        for definition in ready:
            ordered.append(definition)
            done.add(definition["name"])
            pending.remove(definition)
    return ordered


def load_jobs_file(path, server_tz) -> list:
    """Read and validate a jobs file; InvalidError says where it is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidError(f"cannot read jobs file {path}: {exc}") from None
    try:
        return parse_jobs_document(parse_json(text), server_tz)
    except InvalidError as exc:
        raise InvalidError(f"{path}: {exc.message}", exc.field, exc.errors) from None


#: Jobs-file definitions committed per write batch on a (re)load: one batch
#: per definition made a 1000-job file cost 1000 round trips to the writer;
#: one batch for all held every temporary at once (2-3 MB more RSS after).
FILE_BATCH = 50


class JobsFile:
    """Keeps the file-owned jobs equal to the jobs file.

    ``minisched-jobsfile`` checks the file's stat every ``JOBS_FILE_POLL``
    seconds and reloads on change or when ``reload_event`` is set (SIGHUP).
    An invalid file is reported in ``error`` and the running definitions stay.

    In a cluster (``node`` is this node's name, ``live_nodes()`` the names of
    the live nodes) every file job belongs to the node that recorded it
    first.  While that node lives, another node's file can neither change
    nor remove it: the difference is reported in ``conflicts`` (and checked
    again every poll and whenever another node changes jobs).  A dead
    owner's job goes to the next node whose file differs.  Nodes loading
    the same file write nothing, whoever owns the jobs.
    """

    def __init__(self, path, scheduler, bus, audit=None, node=None, live_nodes=None):
        self.path = path
        self.scheduler = scheduler
        self.bus = bus
        self.audit = audit or (lambda *args, **kwargs: None)
        self.node = node
        self.live_nodes = live_nodes
        self.loaded_at = None
        self.error = None
        self.errors = []  # every problem of the last failed load
        self.conflicts = []  # [{"job", "owner", "problem"}] of the last load
        self.reload_event = threading.Event()
        self.stopping = threading.Event()
        self._stat = None
        self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        return {
            "path": self.path,
            "loaded_at": iso_utc(self.loaded_at),
            "error": self.error,
            "conflicts": list(self.conflicts),
        }

    def _file_stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> bool:
        """Apply the file now.  Returns False (and sets ``error``) if invalid."""
        self._stat = self._file_stat()
        sched = self.scheduler
        try:
            definitions = load_jobs_file(self.path, sched.server_tz)
            ordered = dependency_order(definitions)
            for definition in definitions:
                current = sched.get_job(definition["name"])
                if current is not None and current.source != "file":
                    raise InvalidError(
                        "{}: job {!r} already exists (created through the API); rename "
                        "it in the file or delete the API job".format(
                            self.path, definition["name"]
                        ),
                        "name",
                    )
        except InvalidError as exc:
            kept = any(job.source == "file" for job in sched.jobs())
            if exc.message != self.error:
                log.warning(
                    "jobs file not loaded, %s: %s",
                    "its previous definitions keep running"
                    if kept
                    else "no jobs from it",
                    exc.message,
                )
            self.error = exc.message
            self.errors = [e["error"] for e in exc.errors]
            self.bus.publish("job", {"action": "file_error", "error": self.error})
            return False
        stored = {
            row["name"]: row
            for row in sched.store.load_jobs()
            if row["source"] == "file"
        }
        live = self.live_nodes() if self.live_nodes else ()
        conflicts = []

        def ours(row, problem) -> bool:
            owner = row.get("file_owner")
            if self.node is None or owner in (None, self.node) or owner not in live:
                return True
            conflicts.append({"job": row["name"], "owner": owner, "problem": problem})
            return False

        wanted = {d["name"] for d in definitions}
        for name, row in stored.items():
            if (
                name not in wanted
                and sched.get_job(name) is not None
                and ours(row, "not in this node's file")
            ):
                sched.remove_job(name, force=True)
                self.audit(FILE_ACTOR, "job.delete", job=name)
        changed = [
            d
            for d in ordered
            if (row := stored.get(d["name"])) is None
            or (
                row["file_definition"] != d
                and ours(row, "defined differently in this node's file")
            )
        ]
        for at in range(0, len(changed), FILE_BATCH):
            batch = changed[at : at + FILE_BATCH]
            jobs, error = sched.put_file_jobs(batch, file_owner=self.node)
            for job in jobs:
                row = stored.get(job.name)
                self.audit(
                    FILE_ACTOR,
                    "job.update" if row else "job.create",
                    job=job.name,
                    detail={
                        "fields": changed_fields(
                            row and row["file_definition"], job.definition
                        )
                    },
                )
            if error is not None:
                raise error
        if conflicts != self.conflicts:
            for item in conflicts:
                if item not in self.conflicts:
                    log.warning(
                        "jobs file: job %s is %s; node %s loaded it first and keeps it",
                        item["job"],
                        item["problem"],
                        item["owner"],
                    )
            self.conflicts = conflicts
            self.bus.publish(
                "job", {"action": "file_conflicts", "count": len(conflicts)}
            )
        if self.error:
            log.info("jobs file %s loaded again", self.path)
        self.error = None
        self.loaded_at = time.time()
        return True

    def recheck(self) -> None:
        """Another node changed jobs: compare them with the file again (any
        thread)."""
        self.reload_event.set()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._watch, name="minisched-jobsfile", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            self.reload_event.wait(JOBS_FILE_POLL)
            if self.stopping.is_set():
                return
            forced = self.reload_event.is_set()
            self.reload_event.clear()
            if forced or self.conflicts or self._file_stat() != self._stat:
                try:
                    self.load()
                except Exception:
                    log.exception("reloading the jobs file failed")


###############################################################################
# Crontab import ##############################################################
###############################################################################

#: Environment cron gives every job unless the crontab sets it (Debian cron).
CRON_DEFAULT_PATH = "/usr/bin:/bin"
_CRON_MACROS = ("@reboot", *_MACROS)
_CRON_ENV_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_CRON_FIVE_RE = re.compile(r"\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.*)$")
#: The variable a converted job's standard input (cron's ``%`` text) travels in.
CRON_INPUT_VARIABLE = "MINISCHED_CRON_INPUT"


def split_cron_command(text: str) -> tuple:
    """Cron's ``%`` rule: ``(command, standard input or None)``.  The first
    unescaped ``%`` ends the command and the rest is its standard input, with
    every further unescaped ``%`` a newline; ``\\%`` is a literal ``%``
    (other backslashes stay as they are)."""
    parts, current, i = [], [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] == "%":
            current.append("%")
            i += 2
            continue
        if char == "%":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    if len(parts) == 1:
        return parts[0], None
    return parts[0], "\n".join(parts[1:])


#: Words skipped when a job is named after its command.
_CRON_NAME_SKIP = frozenset(
    (
        "&&",
        "||",
        ";",
        "|",
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        "test",
        "exec",
        "env",
        "nice",
        "ionice",
        "sudo",
        "timeout",
        "flock",
        "chronic",
        "true",
    )
)
#: Programs whose first argument says more than they do.
_CRON_RUNNERS = frozenset(
    (
        "run-parts",
        "sh",
        "bash",
        "dash",
        "python",
        "python3",
        "perl",
        "php",
        "ruby",
        "node",
        "java",
        "make",
    )
)


def _cron_name(command: str) -> str:
    """A readable job name from a command: ``run-parts-cron.daily``,
    ``backup.sh``, ``python3-report.py``; the caller makes it unique."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    if "run-parts" in words:  # the directory is the name: run-parts-cron.daily
        dirs = [
            w for w in words[words.index("run-parts") + 1 :] if not w.startswith("-")
        ]
        words = ["run-parts", dirs[0].strip(";&|}") if dirs else ""]
    picked, skip_next = [], False
    for word in words:
        word = word.strip(";&|")
        if skip_next or not word:
            skip_next = False
            continue
        if word == "cd":
            skip_next = True  # its directory says little
            continue
        if word in _CRON_NAME_SKIP or word.startswith("-") or "=" in word:
            continue
        picked.append(os.path.basename(word.rstrip("/")) or word)
        if picked[0] not in _CRON_RUNNERS or len(picked) == 2:
            break
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(picked)).strip("-._")[:48]
    return name if name else "cron-job"


def parse_crontab(text: str, system=False, user=None, source="crontab") -> tuple:
    """Convert a crontab to job definitions keeping cron's meaning; returns
    ``(definitions, problems)`` where problems are ``(line number, reason)``
    for the lines that could not be converted (the rest still are).

    ``system``: the ``/etc/crontab`` and ``/etc/cron.d`` format, with a user
    column (it becomes the job's ``user``).  Otherwise ``user`` (default: who
    runs this) owns every line.  What cron gives a job is kept: the shell
    (``SHELL``, default ``/bin/sh``), ``PATH`` (default ``/usr/bin:/bin``),
    ``HOME`` and ``LOGNAME``, the working directory (the user's home), every
    variable the crontab sets (``MAILTO`` included), the zone (``CRON_TZ`` or
    ``TZ``), standard input from ``%``, overlapping runs (``concurrency:
    allow``) and background processes that outlive the job (``leftovers:
    keep``)."""
    env, shell, zone = {}, "/bin/sh", None
    definitions, problems, names = [], [], collections.Counter()
    default_user = _cron_user(user) if not system else None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        setting = _CRON_ENV_RE.fullmatch(line)
        if setting and not line[0].isdigit() and line[0] not in "*@":
            key, value = setting.groups()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            if key == "SHELL":
                shell = value or "/bin/sh"
            if key in ("CRON_TZ", "TZ"):
                try:
                    get_zone(value)
                except InvalidError as exc:
                    problems.append((number, f"{key}: {exc.message}"))
                    continue
                zone = value
            env[key] = value
            continue
        try:
            definition = _cron_entry(line, system, default_user, env, shell, zone)
        except InvalidError as exc:
            problems.append((number, exc.message))
            continue
        base = definition["name"]
        names[base] += 1
        if names[base] > 1:
            definition["name"] = f"{base[:60]}-{names[base]}"
        definition["description"] = f"{source} line {number}: {line}"[:2000]
        try:
            definitions.append(validate_job(definition))
        except InvalidError as exc:
            problems.append((number, exc.message))
    return definitions, problems


def _cron_user(name):
    """``(name, home)`` of a crontab's user (default: who runs this)."""
    try:
        pw = pwd.getpwnam(name) if name else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise InvalidError(f"unknown user {name!r}") from None
    return pw.pw_name, pw.pw_dir


def _cron_entry(line, system, default_user, env, shell, zone) -> dict:
    """One crontab entry (not an environment line) as a job definition."""
    if line.startswith("@"):
        macro, rest = (line.split(None, 1) + [""])[:2]
        macro = macro.lower()
        if macro not in _CRON_MACROS:
            raise InvalidError(
                f"unknown special string {macro!r} (cron knows {', '.join(_CRON_MACROS)})"
            )
        schedule = macro
    else:
        match = _CRON_FIVE_RE.fullmatch(line)
        if not match or (system and len(match.group(6).split(None, 1)) < 2):
            raise InvalidError(
                "too few fields: a line needs minute, hour, day of month, month, "
                "day of week, " + ("user, " if system else "") + "and a command"
            )
        schedule, rest = " ".join(match.groups()[:5]), match.group(6)
    rest = rest.strip()
    if system:
        name, rest = (rest.split(None, 1) + [""])[:2]
        account, home = _cron_user(name)
    else:
        account, home = default_user
    if not rest:
        raise InvalidError("no command")
    try:
        Schedule(schedule, get_zone(zone) if zone else datetime.timezone.utc)
    except InvalidError as exc:
        raise InvalidError(exc.message) from None
    command, stdin = split_cron_command(rest)
    job_env = {"PATH": CRON_DEFAULT_PATH, "HOME": home, "LOGNAME": account}
    job_env.update(env)
    home = job_env["HOME"]  # cron starts the command in $HOME
    if shell != "/bin/sh":
        job_env.setdefault("SHELL", shell)
    script = command
    if stdin is not None:
        # cron writes this text to the command's standard input.
        job_env[CRON_INPUT_VARIABLE] = stdin
        script = f'printf %s "${CRON_INPUT_VARIABLE}" | {{\n{command}\n}}'
    definition = {
        "name": _cron_name(command),
        "command": script if shell == "/bin/sh" else [shell, "-c", script],
        "schedule": schedule,
        "cwd": home,
        "env": job_env,
        "concurrency": "allow",
        "leftovers": "keep",
    }
    if zone:
        definition["timezone"] = zone
    if system or default_user[0] != pwd.getpwuid(os.geteuid()).pw_name:
        definition["user"] = account
    return definition


###############################################################################
# Notifications ###############################################################
###############################################################################

#: Delays before the 2nd, 3rd and 4th attempt of a URL hook, a webhook alert
#: or a mail; after that the delivery is ``failed``.
RETRY_DELAYS = (1.0, 5.0, 30.0)
#: Seconds one HTTP or SMTP attempt may take.
DELIVERY_TIMEOUT = 10.0
#: Seconds a command hook may run before its process group is stopped.
HOOK_COMMAND_TIMEOUT = 60.0
#: Attempts in flight at once, each on a thread of its own, so a slow receiver
#: delays nothing but itself.
MAX_IN_FLIGHT = 32
#: An open incident sends at most one summary this often.
SUMMARY_EVERY = 3600.0
#: Bytes of a run's output a hook or an alert carries (its end).
OUTPUT_TAIL = 4096


class Notifier:
    """Delivers job hooks (``on_start``, ``on_success``, ``on_failure``) and
    server-wide alerts (``--notify-url``, mail to ``--notify-email`` and a
    job's ``notify_email``), records every delivery on its run, retries, and
    resumes pending deliveries after a restart.

    Alerts are per incident, not per run: a job's first failure sends one
    message, further failures at most one summary per ``SUMMARY_EVERY``, and
    the next success one "back to normal".  ``alert_cap`` messages an hour
    at most, whatever happens; what the cap held back is counted and said in
    the next message.

    ``fire`` may be called from any thread and never blocks.  Everything else
    happens on ``minisched-notify`` (the owner of the queue, the retry heap
    and the incidents) and on one ``minisched-deliver`` thread per attempt.
    """

    def __init__(self, store, config, clock=time.time, metrics=None):
        self.store = store
        self.config = config
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.host = socket.gethostname()
        self.base_url = (config.public_url or "").rstrip("/") or _default_url(config)
        self._emails = list(config.notify_email)
        self._urls = list(config.notify_url)
        self._queue = queue.SimpleQueue()
        self._heap = []  # (due, seq, delivery): attempts waiting for their time
        self._seq = itertools.count()
        self._in_flight = 0
        self._incidents = {}  # job -> incident row (dict)
        self._sent = collections.deque()  # times of alert messages in the last hour
        self._held = 0  # alert messages the cap held back
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop, name="minisched-notify", daemon=True
        )

    # -- lifecycle (main thread) ---------------------------------------------

    def start(self) -> None:
        """Resume what a previous server left pending, then start delivering."""
        for row in self.store.load_incidents():
            self._incidents[row["job"]] = row
        for row in self.store.pending_deliveries():
            self._schedule(dict(row, spec=json.loads(row["spec"])), row["next_at"])
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout=5.0) -> None:
        """Stop; attempts in flight get ``timeout``; pending deliveries stay in
        the database for the next start."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    # -- events (any thread) ---------------------------------------------------

    def fire(self, event: str, run: dict, job) -> None:
        """A run started (``on_start``), ended well (``on_success``) or badly
        (``on_failure``, also ``missed`` and ``lost``).  Never blocks."""
        hooks = getattr(job, event, None) or ()
        alerting = event != "on_start" and self._wants_alerts(job)
        if hooks or alerting:
            self._queue.put(("event", event, run, job))

    def _wants_alerts(self, job) -> bool:
        return bool(self._urls or self._emails or job.notify_email)

    # -- the dispatcher thread -------------------------------------------------

    def _loop(self) -> None:
        last_tick = self.clock()
        while True:
            timeout = 60.0
            if self._heap and self._in_flight < MAX_IN_FLIGHT:
                timeout = max(0.0, min(timeout, self._heap[0][0] - self.clock()))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    getattr(self, "_on_" + item[0])(*item[1:])
                self._launch_due()
                if self.clock() - last_tick >= 60:
                    last_tick = self.clock()
                    self._summaries()
            except Exception:
                log.exception("delivering notifications failed; going on")

    def _on_event(self, event, run, job) -> None:
        for hook in getattr(job, event, None) or ():
            kind = "url" if "url" in hook else "command"
            target = hook.get("url") or _command_text(hook["command"])
            self._create(run, job, event, kind, target, {"hook": hook})
        if event == "on_failure" and self._wants_alerts(job):
            self._failure(run, job)
        elif event == "on_success" and job.name in self._incidents:
            self._recovered(run, job)

    def _on_done(self, delivery, error) -> None:
        """Minisched-notify: an attempt ended (``error`` None: delivered)."""
        self._in_flight -= 1
        now = self.clock()
        delivery["attempts"] += 1
        delivery["at"] = now
        retries = RETRY_DELAYS if delivery["kind"] != "command" else ()
        if error is None:
            delivery.update(status="ok", error=None, next_at=None)
        elif delivery["attempts"] <= len(retries):
            delay = retries[delivery["attempts"] - 1]
            delivery.update(status="pending", error=error, next_at=now + delay)
            self._schedule(delivery, now + delay)
        else:
            delivery.update(status="failed", error=error, next_at=None)
            log.warning(
                "%s delivery to %s for run %s of %s failed after %d attempt%s: %s",
                delivery["event"],
                delivery["target"],
                delivery["run_id"],
                delivery["job"],
                delivery["attempts"],
                "" if delivery["attempts"] == 1 else "s",
                error,
            )
        if delivery["status"] != "pending":
            self.metrics.delivered(delivery["job"], delivery["status"])
        self.store.update_delivery(
            delivery["id"],
            {
                k: delivery[k]
                for k in ("status", "attempts", "error", "at", "next_at", "spec")
            },
        )

    def _create(self, run, job, event, kind, target, spec) -> None:
        """Record a new delivery (pending) and queue its first attempt."""
        now = self.clock()
        row = {
            "run_id": run.get("id"),
            "job": job.name,
            "event": event,
            "kind": kind,
            "target": target,
            "spec": dict(spec, run=run),
            "status": "pending",
            "attempts": 0,
            "error": None,
            "created_at": now,
            "at": None,
            "next_at": now,
        }
        try:
            row["id"] = self.store.result(self.store.add_delivery(row))
        except MinischedError as exc:
            log.warning("a %s delivery of %s is not recorded: %s", event, job.name, exc)
            return
        self._schedule(row, now)

    def _schedule(self, delivery, due) -> None:
        heapq.heappush(self._heap, (due or 0.0, next(self._seq), delivery))

    def _launch_due(self) -> None:
        now = self.clock()
        while (
            self._heap and self._heap[0][0] <= now and self._in_flight < MAX_IN_FLIGHT
        ):
            _due, _seq, delivery = heapq.heappop(self._heap)
            self._in_flight += 1
            threading.Thread(
                target=self._attempt,
                args=(delivery,),
                name="minisched-deliver",
                daemon=True,
            ).start()

    # -- one attempt (a minisched-deliver thread) ---------------------------

    def _attempt(self, delivery) -> None:
        try:
            send = {
                "url": self._send_url,
                "command": self._run_command,
                "mail": self._send_mail,
            }
            error = send[delivery["kind"]](delivery)
        except Exception as exc:  # noqa: BLE001 - any failure is the delivery's
            error = f"{type(exc).__name__}: {exc}"
        self._queue.put(("done", delivery, error))

    def _send_url(self, delivery) -> str | None:
        spec = delivery["spec"]
        if "body" not in spec:  # made once, then kept for every retry
            spec["body"] = self._payload(spec["run"], delivery, spec.get("message"))
        hook = spec.get("hook", {})
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"minisched/{__version__}",
        }
        headers.update(hook.get("headers", {}))
        request = urllib.request.Request(
            delivery["target"],
            json.dumps(spec["body"]).encode(),
            headers=headers,
            method=hook.get("method", "POST"),
        )
        try:
            with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT) as response:
                response.read(65536)
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            return f"{getattr(exc, 'reason', exc)}"
        return None

    def _run_command(self, delivery) -> str | None:
        """A command hook, in a session of its own: stopped with its whole
        group (SIGTERM, then SIGKILL) after ``HOOK_COMMAND_TIMEOUT``."""
        run = delivery["spec"]["run"]
        command = delivery["spec"]["hook"]["command"]
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
        env = dict(
            os.environ,
            MINISCHED_JOB=delivery["job"],
            MINISCHED_RUN_ID=str(run.get("id", "")),
            MINISCHED_STATUS=run.get("status") or "",
            MINISCHED_EXIT_CODE=""
            if run.get("exit_code") is None
            else str(run["exit_code"]),
            MINISCHED_DURATION=""
            if run.get("duration") is None
            else str(run["duration"]),
        )
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _out, err = proc.communicate(timeout=HOOK_COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.communicate(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return f"stopped after the hook timeout of {_num(HOOK_COMMAND_TIMEOUT)}s"
        if proc.returncode:
            tail = err[-300:].decode("utf-8", "replace").strip()
            return _exit_description(
                max(proc.returncode, 0), max(-proc.returncode, 0)
            ) + (f": {tail}" if tail else "")
        return None

    def _send_mail(self, delivery) -> str | None:
        import email.message
        import smtplib

        config, spec = self.config, delivery["spec"]
        message = email.message.EmailMessage()
        message["From"] = config.smtp_from or f"minisched@{self.host}"
        message["To"] = ", ".join(spec["to"])
        message["Subject"] = spec["subject"]
        message.set_content(spec["text"])
        try:
            with smtplib.SMTP(
                config.smtp_host, config.smtp_port, timeout=DELIVERY_TIMEOUT
            ) as smtp:
                if config.smtp_starttls:
                    smtp.starttls()
                if config.smtp_user:
                    smtp.login(config.smtp_user, config.smtp_password or "")
                smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    # -- what is sent --------------------------------------------------------

    def _tail(self, run_id) -> str:
        if not run_id:
            return ""
        text = "".join(c["text"] for c in self.store.get_chunks(run_id))
        return text.encode()[-OUTPUT_TAIL:].decode("utf-8", "ignore")

    def _payload(self, run, delivery, message=None) -> dict:
        """The JSON body of a URL hook or webhook alert; ``text`` reads well
        in Slack-compatible receivers."""
        output = self._tail(run.get("id"))
        return {
            "job": delivery["job"],
            "event": delivery["event"],
            "run_id": run.get("id"),
            "run": run,
            "status": run.get("status"),
            "exit_code": run.get("exit_code"),
            "duration": run.get("duration"),
            "output_tail": output,
            "host": self.host,
            "link": self._link(run),
            "text": message
            or self._headline(delivery["job"], run) + f" <{self._link(run)}>",
        }

    def _link(self, run) -> str:
        return f"{self.base_url}/#/run/{run.get('id')}"

    def _headline(self, job, run) -> str:
        return f"[minisched {self.host}] {job} {_what_happened(run)}"

    # -- incidents (minisched-notify) --------------------------------------

    def _failure(self, run, job) -> None:
        now = self.clock()
        incident = self._incidents.get(job.name)
        if incident is None:
            incident = {
                "job": job.name,
                "opened_at": now,
                "failures": 1,
                "unsent": 0,
                "last_sent_at": now,
                "last_run_id": run.get("id"),
            }
            self._incidents[job.name] = incident
            self._alert(job, run, "failure", self._headline(job.name, run))
        else:
            incident["failures"] += 1
            incident["unsent"] += 1
            incident["last_run_id"] = run.get("id")
            if now - incident["last_sent_at"] >= SUMMARY_EVERY:
                self._summary(job, run, incident)
        self.store.save_incident(incident)

    def _summaries(self) -> None:
        """Each minute: open incidents with failures not yet told, due a summary."""
        now = self.clock()
        for incident in list(self._incidents.values()):
            if incident["unsent"] and now - incident["last_sent_at"] >= SUMMARY_EVERY:
                job = _JobRef(incident["job"])
                run = {"id": incident["last_run_id"], "status": "failed"}
                row = self.store.get_run(incident["last_run_id"] or 0)
                self._summary(job, run_public(row) if row else run, incident)
                self.store.save_incident(incident)

    def _summary(self, job, run, incident) -> None:
        since = _clock_time(incident["opened_at"], self.config.zone())
        count = incident["failures"]
        subject = (
            f"[minisched {self.host}] {job.name} failed {count} times since {since}"
        )
        self._alert(job, run, "summary", subject)
        incident["unsent"] = 0
        incident["last_sent_at"] = self.clock()

    def _recovered(self, run, job) -> None:
        incident = self._incidents.pop(job.name)
        since = _clock_time(incident["opened_at"], self.config.zone())
        failures = incident["failures"]
        subject = (
            f"[minisched {self.host}] {job.name} is back to normal "
            f"({failures} failure{'' if failures == 1 else 's'} since {since})"
        )
        self._alert(job, run, "recovered", subject)
        self.store.delete_incident(job.name)

    def _alert(self, job, run, kind, subject) -> None:
        """One alert message to every target, within the cap."""
        now = self.clock()
        while self._sent and now - self._sent[0] >= 3600:
            self._sent.popleft()
        if len(self._sent) >= self.config.alert_cap:
            self._held += 1
            log.warning(
                "alert cap of %d an hour reached: %s held back",
                self.config.alert_cap,
                subject,
            )
            return
        self._sent.append(now)
        held, self._held = self._held, 0
        output = self._tail(run.get("id")) if kind != "recovered" else ""
        lines = [subject, ""]
        if run.get("id"):
            lines += [
                f"run:      #{run['id']} ({run.get('trigger') or 'schedule'})",
                f"status:   {run.get('status')}",
            ]
            for key, label in (
                ("started_at", "started:  "),
                ("finished_at", "finished: "),
            ):
                if run.get(key):
                    lines.append(
                        label
                        + _clock_time(
                            parse_iso(run[key], datetime.timezone.utc),
                            self.config.zone(),
                            full=True,
                        )
                    )
            if run.get("error"):
                lines.append(f"error:    {run['error']}")
            lines.append(f"link:     {self._link(run)}")
        if output:
            last = output.splitlines()[-20:]
            lines += ["", "last output:", *("  " + line for line in last)]
        if held:
            lines += [
                "",
                f"({held} alert message{'' if held == 1 else 's'} held back by the cap of {self.config.alert_cap} an hour)",
            ]
        text = "\n".join(lines) + "\n"
        event = "alert:" + kind
        emails = sorted(set(self._emails) | set(job.notify_email or ()))
        for url in self._urls:
            slack = subject + (f" <{self._link(run)}>" if run.get("id") else "")
            if held:
                slack += f" ({held} held back by the cap)"
            self._create(run, job, event, "url", url, {"message": slack, "alert": kind})
        if emails and self.config.smtp_host:
            spec = {"to": emails, "subject": subject, "text": text}
            self._create(run, job, event, "mail", ", ".join(emails), spec)


class _JobRef:
    """A job known by name only (an incident whose job may be gone)."""

    def __init__(self, name):
        self.name = name
        self.notify_email = ()


def _command_text(command) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _default_url(config) -> str:
    host = config.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def _clock_time(ts, tz, full=False) -> str:
    moment = datetime.datetime.fromtimestamp(ts, tz)
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z" if full else "%H:%M")


def _what_happened(run) -> str:
    """``failed (exit 3)``, ``timed out``, ``missed``, ``succeeded``..."""
    status = run.get("status")
    if status == "failed":
        if run.get("signal"):
            return f"failed ({_exit_description(None, run['signal'])})"
        if run.get("exit_code") is not None:
            return f"failed (exit {run['exit_code']})"
        return "failed" + (f" ({run['error']})" if run.get("error") else "")
    return (status or "ended").replace("_", " ")


###############################################################################
# Cluster #####################################################################
###############################################################################

#: A non-owner node claims a slot its owner has not claimed after this long
#: (the owner died between heartbeats, or is too slow): late, never twice.
FALLBACK_CLAIM = 2.0
#: A node whose clock differs from the database's by more says so.
MAX_CLOCK_SKEW = 1.0


def _matches(job, node) -> bool:
    """Whether ``node`` (a row of ``nodes``) may run ``job`` (its ``nodes``)."""
    wanted = job.nodes
    return not wanted or node["name"] in wanted or bool(set(wanted) & set(node["tags"]))


def _owner(key: str, nodes):
    """The node a key (a job's slot) belongs to: rendezvous hashing, so the
    load spreads and only a dead node's share moves."""
    return max(
        nodes,
        key=lambda n: hashlib.blake2b(
            f"{key}|{n['name']}".encode(), digest_size=8
        ).digest(),
    )


class Cluster:
    """This server as one node of several on one PostgreSQL database.

    ``minisched-node`` renews the node's lease (heartbeat every
    ``timeout / 5`` seconds), declares nodes dead whose heartbeat is older
    than ``timeout`` by the database's clock and takes their runs over, runs
    the claims deferred by :meth:`place`, picks up commands and job changes
    (polling, the fallback) and measures the clock skew.  ``minisched-listen``
    turns other nodes' notifications into local bus events (their runs and
    output), commands and job reloads at once.

    ``lease_ok()`` is read by the launcher before each spawn: False once
    ``timeout`` minus a margin has passed since the last renewal was sent
    (a frozen node wakes up unable to start anything).  The database checks
    the same when the start is recorded.
    """

    def __init__(self, engine, name, tags, timeout):
        self.engine = engine
        self.store = engine.store
        self.name = name
        self.tags = list(tags)
        self.timeout = timeout
        self.interval = max(0.2, timeout / 5)
        self._margin = min(2.0, timeout / 4)
        self._lease_until = 0.0  # monotonic
        self.live = []  # rows of the live nodes, this one included
        self.skew = None
        self._skew_logged = 0.0
        self._deferred = []  # (monotonic due, slot, job name, call)
        self._deferred_lock = threading.Lock()
        self._jobs_version = None
        self._resync = threading.Event()  # the listener heard of job changes
        self._seen_seq = {}  # remote run id -> last output seq published
        self._wake = threading.Event()
        self.stopping = threading.Event()
        self._threads = []

    # -- lifecycle (main thread) ---------------------------------------------

    def join(self) -> None:
        """Register this node (before the startup repair)."""
        sent = time.monotonic()
        _node_id, db_now = self.store.register(self.name, self.tags, None)
        self._renewed(sent, db_now, time.time())
        self.live = [n for n in self.store.nodes() if not n["dead"]]
        log.info(
            "node %s joined the cluster on %s (%d nodes alive)",
            self.name,
            _redacted(self.store.url),
            len(self.live),
        )

    def others_alive(self) -> bool:
        return any(n["id"] != self.store.node_id for n in self.live)

    def live_names(self) -> set:
        """Names of the live nodes, this one included (any thread)."""
        return {n["name"] for n in self.live}

    def start(self) -> None:
        self._jobs_version = self.store.jobs_version()
        for target, name in (
            (self._loop, "minisched-node"),
            (self._listen, "minisched-listen"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # -- the lease (any thread) ------------------------------------------------

    def lease_ok(self, run=None) -> bool:
        """Whether this node may start ``run`` now (or anything, without one)."""
        if run is not None and run.epoch != self.store.node_id:
            return False  # claimed by a life of this node that was fenced
        return time.monotonic() < self._lease_until

    def _renewed(self, sent, db_now, received) -> None:
        self._lease_until = sent + self.timeout - self._margin
        # ``sent`` is monotonic: the skew is the wall clock's at mid-request.
        self.skew = (received - (time.monotonic() - sent) / 2) - db_now
        if abs(self.skew) > MAX_CLOCK_SKEW and received - self._skew_logged > 60:
            self._skew_logged = received
            log.warning(
                "this node's clock differs from the database's by %.1fs: slots "
                "are wall-clock instants, so runs start that much early or late "
                "here; synchronise the clocks (chrony, systemd-timesyncd)",
                self.skew,
            )

    def clock_ok(self) -> bool:
        return self.skew is None or abs(self.skew) <= MAX_CLOCK_SKEW

    # -- placement (the scheduler, its lock held) ------------------------------

    def place(self, job, slot, call, record=False):
        """What this node does about ``job``'s ``slot``: ``call`` itself (it
        claims the slot), a deferred claim (another node owns it), a
        ``missed`` record (no live node matches), or None.  ``record``: the
        call is a record of missed slots, written by the owner only."""
        live = self.live
        me = self.store.node_id
        matching = [n for n in live if _matches(job, n)]
        if job.placement == "all" and not record:
            return call if any(n["id"] == me for n in matching) else None
        key = f"{job.name}|{slot}"
        if not matching:
            if not live or _owner(key, live)["id"] != me:
                return None
            wanted = ", ".join(job.nodes)
            return functools.partial(
                self.engine.runner.record,
                job,
                "missed",
                "schedule",
                slot=slot,
                scheduled_at=slot,
                error=f"no live node matches nodes [{wanted}]",
            )
        if _owner(key, matching)["id"] == me:
            return call
        if record or not any(n["id"] == me for n in matching):
            return None
        return functools.partial(self._defer, slot, job.name, call)

    def _defer(self, slot, name, call) -> None:
        due = time.monotonic() + max(0.0, slot - time.time()) + FALLBACK_CLAIM
        with self._deferred_lock:
            heapq.heappush(self._deferred, (due, slot, name, call))
        self._wake.set()

    def _claim_deferred(self) -> float:
        """Claim the deferred slots that are due and still unclaimed; return
        seconds until the next one.  Node thread."""
        now = time.monotonic()
        due = []
        with self._deferred_lock:
            while self._deferred and self._deferred[0][0] <= now:
                due.append(heapq.heappop(self._deferred))
            left = self._deferred[0][0] - now if self._deferred else self.interval
        if due:
            claimed = self.store.claimed([(name, slot) for _d, slot, name, _c in due])
            for _due, slot, name, call in due:
                if (name, slot) in claimed:
                    continue
                log.warning(
                    "job %s: slot %s claimed late (its owner did not)",
                    name,
                    iso_utc(slot),
                )
                Scheduler._call_runner([(name, call)])
        return left

    # -- the node thread ---------------------------------------------------------

    def _loop(self) -> None:
        next_beat = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    self._beat()
                if self._resync.is_set():
                    self._resync.clear()
                    self._sync_jobs(force=True)
                wait = min(self._claim_deferred(), next_beat - time.monotonic())
            except Exception as exc:  # noqa: BLE001 - the database, mostly
                log.warning("cluster duties failed (retrying): %s", exc)
                wait = self.interval
            self._wake.wait(max(0.01, wait))
            self._wake.clear()

    def _beat(self) -> None:
        """Renew the lease, see who is alive, take over the dead, pick up
        commands and job changes."""
        sent, running = time.monotonic(), self.engine.runner.counts()["running"]
        db_now = self.store.heartbeat(running, self.skew)
        if db_now is None:
            self._fenced()
            return
        self._renewed(sent, db_now, time.time())
        if self.store.outage is None:
            self.store.healthy = True
        self.live = [n for n in self.store.nodes() if not n["dead"]]
        dead, lost, unstarted = self.store.result(
            self.store.reap(self.timeout, time.time())
        )
        for node in dead:
            log.warning(
                "node %s is dead (no heartbeat for %gs): taking over its runs",
                node["name"],
                self.timeout,
            )
        self._take_over(lost, unstarted)
        self._commands()
        self._sync_jobs()

    def _fenced(self) -> None:
        """This node was declared dead while it could not renew its lease
        (frozen, cut off): its runs are another node's business now.  Stop
        them, then join again as a new node."""
        self._lease_until = 0.0
        active = self.engine.runner.active_runs()
        log.error(
            "node %s was declared dead by the cluster (no heartbeat for %gs): "
            "stopping its %d runs (marked lost by the node that took over) "
            "and joining again",
            self.name,
            self.timeout,
            len(active),
        )
        for run in active:
            self.engine.runner.stop_run(run.id, "stopped: this node was fenced")
        self.join()

    def _take_over(self, lost, unstarted) -> None:
        runner, now = self.engine.runner, time.time()
        for row in lost:
            row = dict(row, status="lost", finished_at=now)
            self.engine.announce_lost(row)
            job = self.engine.scheduler.get_job(row["job"])
            if job is not None and job.retry_lost:
                runner.submit(job, "retry", attempt=row["attempt"] + 1)
        for row in unstarted:
            job = self.engine.scheduler.get_job(row["job"])
            if job is None:
                continue
            limit = (
                job.starting_deadline
                if job.starting_deadline is not None
                else LATE_AFTER
            )
            at = row["scheduled_at"] or now
            if row["slot"] is None or now - at <= limit:
                runner.submit(job, row["trigger"], slot=row["slot"], scheduled_at=at)
            else:
                runner.record(
                    job, "missed", row["trigger"], slot=row["slot"], scheduled_at=at,
                    error=f"its node {row['node']} died before starting it and "
                    f"{_num(limit)}s had passed",
                )  # fmt: skip

    def _commands(self) -> None:
        for command in self.store.take_commands():
            kind, arg = command["kind"], command["arg"]
            if kind == "stop":
                self.engine.runner.stop_run(int(arg))
            elif kind == "stop-job":
                self.engine.runner.stop_job(arg)

    def _sync_jobs(self, force=False) -> None:
        """Node thread: load the jobs if another node changed them."""
        version = self.store.jobs_version()
        if force or version != self._jobs_version:
            self._jobs_version = version
            mark = self.engine.scheduler.edit_mark()
            self.store.flush()
            self.engine.scheduler.sync(self.store.load_jobs(), mark)
            if self.engine.jobs_file:
                self.engine.jobs_file.recheck()

    # -- the listener thread -----------------------------------------------------

    def _listen(self) -> None:
        """``minisched-listen``: other nodes' notifications, at once."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                conn = self.store.listen()
            except Exception as exc:  # noqa: BLE001 - retried with backoff
                log.debug("cannot listen for notifications: %s", exc)
                self.stopping.wait(delay)
                delay = min(_RECONNECT_MAX, delay * 2)
                continue
            delay = 0.5
            try:
                self._resync.set()  # what changed while not listening
                self._wake.set()
                while not self.stopping.is_set():
                    ready, _, _ = select.select([conn.raw.fileno()], [], [], 1.0)
                    if not ready:
                        continue
                    conn.raw.pgconn.consume_input()
                    while True:
                        note = conn.raw.pgconn.notifies()
                        if note is None:
                            break
                        self._heard(note.extra.decode())
                    if conn.raw.pgconn.status != self.store.psycopg.pq.ConnStatus.OK:
                        raise OSError("the connection was lost")
            except Exception as exc:  # noqa: BLE001 - reconnect
                log.debug("listening failed: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()

    def _heard(self, payload: str) -> None:
        kind, node, *rest = payload.split(" ")
        if int(node) == self.store.node_id:
            return
        ids = [int(i) for i in rest[0].split(",")] if rest and rest[0] else []
        if kind == "runs":
            for row in self.store.get_runs(ids):
                if row["status"] not in ACTIVE_STATUSES:
                    self._seen_seq.pop(row["id"], None)
                self.engine.bus.publish("run", run_public(row))
        elif kind == "log":
            for run_id in ids:
                after = self._seen_seq.get(run_id, 0)
                for chunk in self.store.get_chunks(run_id, after):
                    after = chunk["seq"]
                    self.engine.bus.publish("log", dict(chunk, run_id=run_id))
                if len(self._seen_seq) > 10000:
                    self._seen_seq.clear()
                self._seen_seq[run_id] = after
        elif kind == "cmd" and self.store.node_id in ids:
            self._commands()
        elif kind == "jobs":
            self._resync.set()
            self._wake.set()

    # -- the API (request threads) ------------------------------------------------

    def nodes(self) -> list:
        """Every node alive or dead in the last day, as ``GET /api/nodes`` shows it."""
        out = []
        for row in self.store.nodes():
            out.append(
                {
                    "name": row["name"],
                    "id": row["id"],
                    "tags": row["tags"],
                    "version": row["version"],
                    "pid": row["pid"],
                    "started_at": iso_utc(row["started_at"]),
                    "heartbeat_at": iso_utc(row["heartbeat"]),
                    "heartbeat_age": round(row["age"], 3),
                    "running": row["running"],
                    "alive": not row["dead"] and row["age"] <= self.timeout,
                    "clock_skew": row["clock_skew"],
                    "self": row["id"] == self.store.node_id,
                }
            )
        return out

    def stop_remote(self, row) -> bool:
        """Ask the node running run ``row`` to stop it: True if it is an
        active run of another live node."""
        node_id = row.get("node_id")
        if (
            row["status"] not in ACTIVE_STATUSES
            or not node_id
            or node_id == self.store.node_id
        ):
            return False
        self.store.result(self.store.add_command(node_id, "stop", str(row["id"])))
        return True

    def stop_job_everywhere(self, name) -> None:
        for node in self.live:
            if node["id"] != self.store.node_id:
                self.store.add_command(node["id"], "stop-job", name)


###############################################################################
# Engine ######################################################################
###############################################################################


class Engine:
    """Everything but HTTP: store, bus, runner, scheduler, jobs file and hooks,
    wired together.  ``start()`` repairs what a crashed server left behind
    first.  Used by ``serve``, by tests, and by programs that embed minisched::

        engine = Engine(db="jobs.db", timezone="UTC").start()
        engine.add_job({"name": "hello", "command": "echo hi", "schedule": "@hourly"})
        run = engine.wait(engine.trigger("hello")["id"])
        engine.shutdown()

    Settings are a :class:`Config` or its fields as keywords.  The methods
    below ``start`` may be called from any thread (each is documented); they
    validate as the API does and raise :class:`InvalidError`,
    :class:`NotFoundError`, :class:`ConflictError` or
    :class:`UnavailableError`.  To serve the API and page, see
    :func:`serve_engine` and :func:`wsgi_app`."""

    def __init__(self, config: Config | None = None, clock=time.time, **settings):
        if config is None:
            config = Config(**settings)
        elif settings:
            raise TypeError("give a Config or settings, not both")
        self.config = config
        self.started_at = clock()
        self.tz = config.zone()
        self.store = open_store(config.db)
        self.access = Access(self.store, config.token, config.audit_keep)
        self.bus = EventBus()
        self.metrics = Metrics()
        #: This server as a node of a cluster (a PostgreSQL database), or None.
        self.cluster = None
        if self.store.clustered:
            self.cluster = Cluster(
                self,
                config.node_name or socket.gethostname(),
                config.node_tag,
                config.node_timeout,
            )
        cluster = self.cluster
        self.runner = Runner(
            self.store,
            self.bus,
            config.max_concurrent,
            clock=clock,
            limits=(config.max_rss_default, config.max_cpu_default),
            metrics=self.metrics,
            job_lookup=lambda name: self.scheduler.get_job(name),
            on_finished=lambda run, job: self.scheduler.run_finished(run, job),
            on_hook=lambda event, run, job: self.notifier.fire(event, run, job),
            node=cluster.name if cluster else None,
            lease=cluster.lease_ok if cluster else None,
        )
        self.scheduler = Scheduler(
            self.store,
            self.runner,
            self.bus,
            self.tz,
            clock=clock,
            place=cluster.place if cluster else None,
        )
        self.jobs_file = None
        if config.jobs:
            self.jobs_file = JobsFile(
                config.jobs,
                self.scheduler,
                self.bus,
                audit=self.access.record,
                node=cluster.name if cluster else None,
                live_nodes=cluster.live_names if cluster else None,
            )
        self.notifier = None
        self._last_lock = threading.Lock()
        self._last_runs = {}  # job -> (run id, public run, its JSON)
        self.bus.listen(self._track_last_run)

    def _track_last_run(self, kind, data) -> None:
        """Bus listener: keep each job's last started-or-ended run in memory
        (as ``jobs.last_run_id`` does in the database)."""
        if kind != "run" or data["status"] in ("queued", "skipped"):
            return
        with self._last_lock:
            current = self._last_runs.get(data["job"])
            if current is None or data["id"] >= current[0]:
                self._last_runs[data["job"]] = (data["id"], data)

    def last_run(self, name):
        """``(run id, public run, its JSON)`` of a job's last run, or None.  The
        JSON is made on first use (runs change far more often than lists are read)."""
        entry = self._last_runs.get(name)
        if entry is not None and len(entry) == 2:
            entry = (*entry, json.dumps(entry[1]))
            with self._last_lock:
                if self._last_runs.get(name, (None, None))[1] is entry[1]:
                    self._last_runs[name] = entry
        return entry

    def threads_alive(self) -> dict:
        """Every engine thread by its short name, True while it runs: one
        that died makes ``/api/health`` answer 503."""
        out = {"scheduler": self.scheduler.alive(), "writer": self.store.writer_alive()}
        out.update(self.runner.threads_alive())
        if self.jobs_file:
            out["jobsfile"] = self.jobs_file.alive()
        if self.notifier:
            out["notify"] = self.notifier.alive()
        if self.cluster:
            out["cluster"] = self.cluster.alive()
        return out

    def start(self) -> Engine:
        self.store.open()
        if self.cluster:
            self.cluster.join()
        for name, row in self.store.last_runs().items():
            self._last_runs[name] = (row["id"], run_public(row))
        self.notifier = Notifier(self.store, self.config, metrics=self.metrics)
        self.metrics.last_success.update(self.store.last_successes())
        self.scheduler.load()
        if self.cluster and self.cluster.others_alive():
            self.scheduler.skip_past()
        loaded = self.jobs_file.load() if self.jobs_file else True
        if not loaded and not any(j.source == "file" for j in self.scheduler.jobs()):
            # Nothing from this file ran before: a service manager user
            # expects a refusal, not a server with no jobs.
            self.notifier.close()
            self.store.close()
            raise UsageError(
                f"--jobs: {self.jobs_file.path} is invalid and no earlier "
                "definitions from it are stored; fix it:\n  "
                + "\n  ".join(self.jobs_file.errors)
            )
        self.repair()
        self.notifier.start()
        self.runner.start()
        self.scheduler.load_reboot()
        self.scheduler.start()
        if self.jobs_file:
            self.jobs_file.start()
        if self.cluster:
            self.cluster.start()
        return self

    def repair(self) -> list:
        """Runs left active by a dead server become ``lost``; kill their leftovers."""
        rows = self.store.mark_lost(time.time()).result()
        for row in rows:
            killed = kill_leftover(
                row["pid"], row["pid_create_time"], row["id"], self.store.server_id
            )
            log.warning(
                "run %d of %s was %s when the server stopped: marked lost%s",
                row["id"],
                row["job"],
                row["status"],
                " (leftover processes killed)" if killed else "",
            )
            row.update(
                status="lost",
                error="the server stopped while this run was " + row["status"],
            )
            self.announce_lost(row)
        return rows

    def announce_lost(self, row) -> None:
        """A run became ``lost`` (a dead server's, or a dead node's): tell
        the listeners and fire its failure hooks and alerts."""
        public = run_public(row)
        self.bus.publish("run", public)
        job = self.scheduler.get_job(row["job"])
        if self.notifier and job:
            self.notifier.fire("on_failure", public, job)

    # -- the embedding surface (any thread) ------------------------------------

    def add_job(self, definition: dict) -> Job:
        """Create a job (validated as ``POST /api/jobs``); ConflictError if
        the name is taken."""
        return self.scheduler.put_job(
            validate_job(definition, self.tz), "api", create_only=True
        )

    def update_job(self, name: str, changes: dict) -> Job:
        """Change some fields of a job (``PATCH``: None resets a field)."""
        job = self.scheduler.get_job(name)
        if job is None:
            raise NotFoundError(f"no job named {name!r}", "name")
        definition = dict(job.definition)
        for key, value in changes.items():
            if value is None:
                definition.pop(key, None)
            else:
                definition[key] = value
        if definition.get("name") != name:
            raise InvalidError("name: cannot be changed", "name")
        return self.scheduler.put_job(validate_job(definition, self.tz), job.source)

    def remove_job(self, name: str, purge=False, force=False) -> None:
        """Delete a job (see :meth:`Scheduler.remove_job`)."""
        self.scheduler.remove_job(name, purge=purge, force=force)

    def trigger(self, name: str, force=False, by=None) -> dict:
        """Run a job now; returns the new run (status ``queued``).  ``by``
        names who asked (the run's ``triggered_by``)."""
        return self.scheduler.trigger(name, force=force, by=by)

    def pause(self, name: str) -> None:
        self.scheduler.set_paused(name, True)

    def resume(self, name: str) -> None:
        self.scheduler.set_paused(name, False)

    def stop(self, name: str) -> int:
        """Stop a job's active runs (``cancelled``); returns how many here
        (in a cluster, the other nodes are asked to stop theirs too)."""
        if self.cluster:
            self.cluster.stop_job_everywhere(name)
        return self.runner.stop_job(name)

    def jobs(self) -> list:
        """Every job's definition, by name."""
        return [job.public() for job in self.scheduler.jobs()]

    def run(self, run_id: int) -> dict | None:
        """One run as the API shows it, or None."""
        self.store.flush()
        row = self.store.get_run(run_id)
        return run_public(row) if row else None

    def runs(self, job=None, status=None, limit=50) -> list:
        """Runs, newest first (``job`` and ``status`` filter)."""
        self.store.flush()
        rows, _total = self.store.list_runs(job=job, status=status, limit=limit)
        return [run_public(row) for row in rows]

    def log(self, run_id: int) -> str:
        """A run's stored output as text."""
        self.store.flush()
        return "".join(c["text"] for c in self.store.get_chunks(run_id))

    def subscribe(self, kinds=("run",), maxsize=10000) -> Subscription:
        """A queue of ``(kind, data)`` events: ``run`` (the run JSON on every
        change), ``job``, ``log`` (output chunks).  Read it with ``.get(timeout)``
        from your own thread; ``.close()`` when done.  One that falls
        ``maxsize`` behind is marked ``lagged`` and gets nothing more."""
        wanted = frozenset(kinds)
        return self.bus.subscribe(maxsize, lambda kind, _data: kind in wanted)

    def wait(self, run_id: int, timeout: float = 60.0) -> dict:
        """Block until run ``run_id`` has ended; returns it (TimeoutError
        after ``timeout``).  Not from an engine thread."""
        sub = self.subscribe(("run",))
        deadline = time.monotonic() + timeout
        try:
            while True:
                run = self.run(run_id)
                if run is not None and run["status"] not in ACTIVE_STATUSES:
                    return run
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"run {run_id} still {run and run['status']}")
                sub.get(min(left, 1.0))
        finally:
            sub.close()

    def shutdown(self, grace=None) -> None:
        """Stop scheduling, give running jobs ``grace`` seconds (default
        ``shutdown_grace``), stop the rest and close the database.  Call it
        once, from the thread that started the engine."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self.jobs_file:
            self.jobs_file.stopping.set()
            self.jobs_file.reload_event.set()
        self.scheduler.stop()
        if self.cluster:
            self.cluster.stop()
        self.runner.shutdown(grace)
        if self.notifier:
            self.notifier.close()
        if self.cluster:
            with contextlib.suppress(MinischedError):
                self.store.leave()
        self.store.close()


###############################################################################
# Web page ####################################################################
###############################################################################

#: The whole page: HTML, CSS and JavaScript, served as is at ``/``.  It holds
#: no data; everything comes from the JSON API and SSE, and data is only ever
#: inserted as text.
INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>minisched</title>
<link rel="icon" href="data:,">
<style>
:root {
  --bg: #ffffff; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --card: #f6f8fa;
  --accent: #0a58ca; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --run: #0a58ca;
  --stderr: #b35900; --sys: #6f42c1; --focus: #0a58ca;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0d1117; --fg: #e6edf3; --muted: #9198a1; --line: #30363d; --card: #161b22;
    --accent: #58a6ff; --ok: #3fb950; --bad: #ff7b72; --warn: #d29922; --run: #58a6ff;
    --stderr: #ffa657; --sys: #d2a8ff; --focus: #58a6ff;
  }
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; overflow-wrap: anywhere; }
a { color: var(--accent); }
:focus-visible { outline: 2px solid var(--focus); outline-offset: 2px; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: center;
  padding: .6rem 1rem; border-bottom: 1px solid var(--line); background: var(--card); }
header .brand { font-weight: 700; font-size: 1.1rem; text-decoration: none; color: var(--fg); }
header .nav { display: flex; flex-wrap: wrap; gap: .8rem; font-size: .95rem; }
.whoami { display: flex; gap: .4rem; align-items: center; font-size: .9rem; }
.whoami .badge { margin-left: .2rem; }
button.link { border: 0; background: none; color: var(--accent); padding: 0; text-decoration: underline; cursor: pointer; font: inherit; }
#new-secret { user-select: all; overflow-wrap: anywhere; }
.new-secret { margin: .6rem 0; padding: .5rem .8rem; border: 1px solid var(--ok); border-radius: 6px; }
.counts, .sys { display: flex; flex-wrap: wrap; gap: .3rem 1rem; color: var(--muted); font-size: .9rem; }
.counts b, .sys b { color: var(--fg); }
.sys { margin-left: auto; }
main { padding: 1rem; max-width: 1400px; margin: 0 auto; }
main:focus { outline: none; }
.filestate { margin: .6rem 1rem 0; padding: .5rem .8rem; border-radius: 6px; font-size: .9rem;
  border: 1px solid var(--line); overflow-wrap: anywhere; }
.filestate.error { border-color: var(--bad); color: var(--bad); }
.filestate.warn { border-color: var(--warn); color: var(--warn); }
.filestate ul { margin: .3rem 0 0; padding-left: 1.2rem; }
.toolbar { display: flex; flex-wrap: wrap; gap: .5rem; margin-bottom: .8rem; align-items: center; }
.toolbar input[type=search] { flex: 1 1 14rem; min-width: 0; }
input, select, textarea, button { font: inherit; color: inherit; }
input, select, textarea { background: var(--bg); border: 1px solid var(--line); border-radius: 6px;
  padding: .35rem .5rem; max-width: 100%; }
textarea { width: 100%; min-height: 4.5rem; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
button, .button { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: .3rem .7rem; cursor: pointer; text-decoration: none; color: var(--fg); display: inline-block; }
button:hover, .button:hover { border-color: var(--muted); }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button.danger { color: var(--bad); }
button:disabled { opacity: .5; cursor: default; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .45rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; color: var(--muted); }
td { overflow-wrap: anywhere; }
.muted { color: var(--muted); }
.small { font-size: .85rem; }
.tag { display: inline-block; font-size: .75rem; padding: 0 .4rem; margin: .1rem .2rem 0 0;
  border: 1px solid var(--line); border-radius: 999px; color: var(--muted); }
.badge { display: inline-block; font-size: .78rem; font-weight: 600; padding: .05rem .45rem;
  border-radius: 4px; border: 1px solid currentColor; white-space: nowrap; }
.c-ok { color: var(--ok); } .c-bad { color: var(--bad); } .c-warn { color: var(--warn); } .c-run { color: var(--run); }
.dot { display: inline-block; width: .6rem; height: .6rem; border-radius: 50%; background: var(--run);
  margin-right: .3rem; animation: pulse 1.2s infinite ease-in-out; }
@keyframes pulse { 50% { opacity: .25; } }
@media (prefers-reduced-motion: reduce) { .dot { animation: none; } }
.actions { display: flex; flex-wrap: wrap; gap: .3rem; }
.actions button, .actions .button { padding: .2rem .5rem; font-size: .85rem; }
h1 { font-size: 1.35rem; margin: .2rem 0 .6rem; overflow-wrap: anywhere; }
h2 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(16rem, 1fr)); gap: 1rem; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: .8rem; background: var(--card); min-width: 0; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, monospace; }
.log { border: 1px solid var(--line); border-radius: 8px; padding: .6rem; background: var(--card);
  height: 60vh; overflow-y: auto; }
.log .stderr { color: var(--stderr); }
.log .system { color: var(--sys); font-style: italic; }
.log .marker { display: block; margin: .3rem 0; padding: .2rem .4rem; border: 1px dashed var(--sys); border-radius: 4px; }
.logbar { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin: .5rem 0; }
.legend span { margin-right: .8rem; font-size: .85rem; }
.hidden { display: none !important; }
ul.hooks { margin: .3rem 0; padding-left: 1.2rem; } .hook-failed { color: var(--bad); } .hook-pending { color: var(--warn); }
form.editor { max-width: 56rem; }
.field { margin-bottom: .8rem; }
.field label { display: block; font-weight: 600; font-size: .9rem; margin-bottom: .2rem; }
.field .help { font-size: .8rem; color: var(--muted); }
.field .err { color: var(--bad); font-size: .85rem; min-height: 0; }
.field input[type=text], .field input[type=number], .field select { width: 100%; }
.field input[type=checkbox] { width: auto; }
.field.invalid input, .field.invalid textarea, .field.invalid select { border-color: var(--bad); }
details { border: 1px solid var(--line); border-radius: 8px; padding: .5rem .8rem; margin: .8rem 0; }
summary { cursor: pointer; font-weight: 600; }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 0 1rem; }
.note { padding: .5rem .8rem; border-left: 3px solid var(--warn); background: var(--card); margin: .5rem 0; }
.error-box { color: var(--bad); margin: .5rem 0; overflow-wrap: anywhere; }
.preview li { font-family: ui-monospace, monospace; font-size: .85rem; }
.chart { width: 100%; height: 120px; display: block; }
.chart .c-ok { fill: var(--ok); } .chart .c-bad { fill: var(--bad); } .chart .c-warn { fill: var(--warn); } .chart .c-run { fill: var(--run); }
#login { position: fixed; inset: 0; background: rgba(0,0,0,.45); display: flex; align-items: center; justify-content: center; padding: 1rem; }
#login form { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; padding: 1.2rem; width: 100%; max-width: 24rem; }
#login input { width: 100%; margin: .4rem 0 .8rem; }
.toast { position: fixed; bottom: 1rem; left: 50%; transform: translateX(-50%); background: var(--fg); color: var(--bg);
  padding: .5rem 1rem; border-radius: 6px; max-width: 90vw; overflow-wrap: anywhere; }
@media (max-width: 720px) {
  main { padding: .6rem; }
  table.cards thead { display: none; }
  table.cards, table.cards tbody, table.cards tr, table.cards td { display: block; width: 100%; }
  table.cards tr { border: 1px solid var(--line); border-radius: 8px; margin-bottom: .6rem; padding: .3rem .5rem; }
  table.cards td { border: 0; padding: .2rem 0; }
  table.cards td[data-label]::before { content: attr(data-label) ": "; color: var(--muted); font-size: .8rem; }
  .sys { margin-left: 0; }
}
</style>
</head>
<body>
<header>
  <a class="brand" href="#/">minisched</a>
  <nav class="nav"><a href="#/">Jobs</a> <a href="#/upcoming">Upcoming</a> <a href="#/system">System</a>
    <a href="#/audit" class="admin-only hidden">Audit</a> <a href="#/settings" class="admin-only hidden">Settings</a>
    <a href="/api/docs">API</a></nav>
  <div class="counts" id="counts" aria-live="polite"></div>
  <div class="sys" id="sys"></div>
  <div class="whoami" id="whoami"></div>
</header>
<div id="filestate" class="filestate hidden" role="status"></div>
<div id="clockstate" class="filestate warn hidden" role="alert"></div>
<main id="main" tabindex="-1"><p class="muted">Loading…</p></main>
<div id="login" class="hidden">
  <form id="login-form">
    <h1>minisched</h1>
    <label for="token">Sign in with your token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required>
    <div class="error-box" id="login-error" role="alert"></div>
    <button class="primary" type="submit">Sign in</button>
  </form>
</div>
<div id="toast" class="toast hidden" role="status" aria-live="polite"></div>
<script>
"use strict";
// Everything on this page comes from the JSON API and SSE; data is put into the
// DOM only as text (textContent / text nodes), never as HTML.
const $ = (sel, root) => (root || document).querySelector(sel);
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}
function fill(el, ...kids) {
  // Like replaceChildren, but skips null/false (replaceChildren would print "null").
  el.replaceChildren();
  for (const kid of kids.flat(Infinity)) if (kid !== null && kid !== undefined && kid !== false) el.append(kid);
  return el;
}
function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const kid of kids) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}
class ApiError extends Error {
  constructor(message, field, status) { super(message); this.field = field; this.status = status; }
}
async function api(method, path, body) {
  const opts = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const type = r.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await r.json() : await r.text();
  if (r.status === 401 && !path.startsWith("/api/login")) showLogin();
  if (!r.ok) throw new ApiError((data && data.error) || r.statusText, data && data.field, r.status);
  return data;
}
// -- who is looking: the role decides which buttons there are ---------------------------
const ROLES = ["viewer", "operator", "admin"];
const NOBODY = { name: "", role: "", token_required: true };
let me = NOBODY;  // until GET /api/me answers: no buttons at all
const can = role => ROLES.indexOf(me.role) >= ROLES.indexOf(role) && me.role !== "";
function drawMe() {
  for (const a of document.querySelectorAll(".admin-only")) a.classList.toggle("hidden", !can("admin"));
  const box = $("#whoami");
  if (!me.token_required || !me.name) { box.textContent = ""; return; }
  fill(box, h("span", { class: "muted" }, "signed in as "), h("b", null, me.name),
    h("span", { class: "badge role-" + me.role }, me.role), " ",
    h("button", { type: "button", class: "link", onclick: async () => { await api("POST", "/api/logout"); showLogin(); } }, "Sign out"));
}
async function refreshMe() {
  try { me = await api("GET", "/api/me"); } catch (e) { me = NOBODY; }
  drawMe();
}
function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.classList.remove("hidden");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.add("hidden"), 4000);
}
async function act(fn, ok) {
  try { const r = await fn(); if (ok) toast(ok); return r; }
  catch (e) { if (e.status !== 401) toast(e.message); return null; }
}

// -- formatting -------------------------------------------------------------------
function rel(iso) {
  if (!iso) return "—";
  const s = Math.round((new Date(iso) - Date.now()) / 1000), a = Math.abs(s);
  if (a < 2) return "just now";
  const t = a < 60 ? a + " s" : a < 3600 ? Math.round(a / 60) + " min"
    : a < 86400 ? Math.round(a / 360) / 10 + " h" : Math.round(a / 8640) / 10 + " d";
  return s >= 0 ? "in " + t : t + " ago";
}
function abs(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
function when(iso) { return iso ? h("time", { datetime: iso, title: abs(iso) }, rel(iso)) : "—"; }
function dur(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return (Math.round(s * 10) / 10) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
// Run statuses and job fields come from the server's tables (GET /api/meta).
let META = null;
async function loadMeta() {
  if (!META) {
    const m = await api("GET", "/api/meta");
    m.status = Object.fromEntries(m.statuses.map(s => [s.name, s]));
    META = m;
  }
  return META;
}
const statusClass = s => "s-" + s + " c-" + ((META && META.status[s]) ? META.status[s].colour : "warn");
const dayStatuses = () => META.statuses.filter(s => s.terminal).map(s => s.name);
function badge(status) { return h("span", { class: "badge " + statusClass(status) }, status.replace("_", " ")); }
function maskEnv(def) {
  const out = Object.assign({}, def);
  if (out.env) { out.env = {}; for (const k of Object.keys(def.env)) out.env[k] = "***"; }
  return out;
}

// -- header: counts, system, jobs file ----------------------------------------------
async function refreshStatus() {
  refreshNodes();
  let st;
  try { st = await api("GET", "/api/status"); } catch (e) { return; }
  const c = st.counts;
  fill($("#counts"), 
    h("span", null, h("b", null, c.jobs), " jobs"),
    h("span", null, h("b", null, c.running), " running"),
    h("span", { class: c.failed_24h ? "s-failed" : "" }, h("b", null, c.failed_24h), " failed in 24 h"));
  const s = st.system;
  fill($("#sys"), 
    h("span", null, "CPU ", h("b", null, Math.round(s.cpu_percent) + "%")),
    h("span", null, "mem ", h("b", null, Math.round(s.memory_percent) + "%")),
    h("span", null, "disk ", h("b", null, Math.round(s.disk_percent) + "%")),
    h("span", null, "load ", h("b", null, s.load.map(x => x.toFixed(2)).join(" "))));
  const fs = $("#filestate");
  if (!st.jobs_file) { fs.classList.add("hidden"); return; }
  fs.classList.remove("hidden");
  const jf = st.jobs_file, clash = jf.conflicts || [];
  fs.classList.toggle("error", !!jf.error);
  fs.classList.toggle("warn", !jf.error && clash.length > 0);
  if (jf.error) fs.textContent = "Jobs file not loaded, previous definitions keep running: " + jf.error;
  else if (clash.length) fill(fs, "Jobs file " + jf.path + " differs from what other nodes loaded first; theirs are kept: ",
    h("ul", { class: "conflicts" }, clash.map(c => h("li", { "data-job": c.job },
      h("b", null, c.job), " is " + c.problem + " (kept from node " + c.owner + ")"))));
  else fs.textContent = "Jobs file " + jf.path + " loaded " + rel(jf.loaded_at);
}

// -- nodes of a cluster: the dashboard's panel, the clock warning ---------------------
const MAX_CLOCK_SKEW = 1;  // seconds, as the server's MAX_CLOCK_SKEW
let nodes = null;  // the last GET /api/nodes
async function refreshNodes() {
  if (nodes && !nodes.clustered) return;  // a server never becomes a cluster
  try { nodes = await api("GET", "/api/nodes"); } catch (e) { return; }
  const me = nodes.nodes.find(n => n.self);
  const skew = nodes.clustered && me ? me.clock_skew : null;
  const cs = $("#clockstate"), off = typeof skew === "number" && Math.abs(skew) > MAX_CLOCK_SKEW;
  cs.classList.toggle("hidden", !off);
  cs.textContent = off ? "The clock of this node (" + me.name + ") is " + Math.abs(skew).toFixed(1) + " s "
    + (skew > 0 ? "ahead of" : "behind") + " the database's: check its time synchronisation (NTP)." : "";
  const box = $("#nodes");
  if (box) drawNodes(box);
}
function ago(s) {
  return s < 60 ? Math.round(s * 10) / 10 + " s ago" : rel(new Date(Date.now() - s * 1000).toISOString());
}
function skewText(s) {
  if (typeof s !== "number") return h("span", { class: "muted" }, "—");
  return h("span", { class: Math.abs(s) > MAX_CLOCK_SKEW ? "c-warn" : "muted" }, (s >= 0 ? "+" : "−") + Math.abs(s).toFixed(3) + " s");
}
function drawNodes(box) {
  if (!nodes || !nodes.clustered) { box.classList.add("hidden"); return box; }
  const alive = nodes.nodes.filter(n => n.alive).length;
  fill(box, h("h2", { id: "nodes-title" }, "Nodes"),
    h("p", { class: "muted small" }, alive + " alive, " + (nodes.nodes.length - alive) + " dead in the last day"),
    h("table", { class: "cards nodes" },
      h("thead", null, h("tr", null, ["Node", "Tags", "Version", "Heartbeat", "Running", "Clock", "State"].map(t => h("th", { scope: "col" }, t)))),
      h("tbody", null, nodes.nodes.map(n => h("tr", { "data-node": n.name },
        h("td", { "data-label": "Node" }, h("b", null, n.name), n.self ? h("span", { class: "muted small" }, " (this node)") : null,
          n.pid ? h("div", { class: "muted small" }, "pid " + n.pid) : null),
        h("td", { "data-label": "Tags" }, n.tags.length ? n.tags.map(t => h("span", { class: "tag" }, t)) : h("span", { class: "muted" }, "—")),
        h("td", { "data-label": "Version" }, n.version),
        h("td", { "data-label": "Heartbeat" }, h("span", { title: abs(n.heartbeat_at) }, ago(n.heartbeat_age))),
        h("td", { "data-label": "Running" }, n.running),
        h("td", { "data-label": "Clock" }, skewText(n.clock_skew)),
        h("td", { "data-label": "State" }, h("span", { class: "badge " + (n.alive ? "c-ok" : "c-bad") }, n.alive ? "alive" : "dead")))))));
  box.classList.remove("hidden");
  return box;
}

// -- live updates ---------------------------------------------------------------------
// Every route() starts a new view; a page checks that its view is still the
// current one after each await, so a late answer never redraws another page.
let view = 0;
let events = null, refreshTimer = null, onChange = null;
function connectEvents() {
  if (events) events.close();
  events = new EventSource("/api/events");
  const changed = () => {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => { if (onChange) onChange(); refreshStatus(); }, 250);
  };
  events.addEventListener("run", changed);
  events.addEventListener("job", changed);
  events.addEventListener("reconnect", () => { connectEvents(); changed(); });
  events.addEventListener("end", (e) => {
    const d = JSON.parse(e.data || "null");
    if (d && d.reason === "signed out") { events.close(); refreshMe(); }
  });
}

// -- dashboard ------------------------------------------------------------------------
const filters = { q: "", tag: "", status: "" };
async function dashboard() {
  const main = $("#main");
  const search = h("input", { type: "search", placeholder: "Search name, description, command",
    "aria-label": "Search jobs", value: filters.q });
  const tagSel = h("select", { "aria-label": "Filter by tag" }, h("option", { value: "" }, "All tags"));
  const statusSel = h("select", { "aria-label": "Filter by status" },
    ["", "running", "paused", ...META.statuses.filter(s => s.terminal && s.name !== "skipped").map(s => s.name)].map(
      s => h("option", { value: s }, s ? s.replace("_", " ") : "Any status")));
  statusSel.value = filters.status;
  const body = h("tbody");
  const table = h("table", { class: "cards jobs" },
    h("thead", null, h("tr", null, ["Job", "Schedule", "Next run", "Last run", "", "Actions"].map(t => h("th", { scope: "col" }, t)))),
    body);
  fill(main, h("h1", null, "Jobs"),
    h("div", { class: "toolbar" }, search, tagSel, statusSel,
      can("admin") ? h("a", { class: "button primary", href: "#/new" }, "New job") : null),
    table,
    drawNodes(h("section", { id: "nodes", class: "hidden", "aria-labelledby": "nodes-title" })));
  let all = [];
  const draw = () => {
    const q = filters.q.toLowerCase();
    const rows = all.filter(j => (!filters.tag || (j.tags || []).includes(filters.tag))
      && (!q || [j.name, j.description, typeof j.command === "string" ? j.command : JSON.stringify(j.command || j.url)]
        .some(v => String(v || "").toLowerCase().includes(q)))
      && (!filters.status || (filters.status === "running" ? j.running > 0
        : filters.status === "paused" ? j.paused : j.last_run && j.last_run.status === filters.status)));
    fill(body, ...rows.map(jobRow));
    if (!rows.length) body.append(h("tr", null, h("td", { colspan: 6, class: "muted" },
      all.length ? "No job matches the filters." : "No jobs yet. Create one with “New job”.")));
  };
  const v = view;
  const load = async () => {
    let data, stats = null;
    try { [data, stats] = await Promise.all([api("GET", "/api/jobs"), api("GET", "/api/stats?days=7&by_job=1").catch(() => null)]); } catch (e) { return; }
    if (v !== view) return;
    rates = stats ? stats.jobs : {};
    all = data.jobs;
    const tags = [...new Set(all.flatMap(j => j.tags || []))].sort();
    const keep = filters.tag;
    fill(tagSel, h("option", { value: "" }, "All tags"), ...tags.map(t => h("option", { value: t }, t)));
    tagSel.value = keep;
    draw();
  };
  search.addEventListener("input", () => { filters.q = search.value; draw(); });
  tagSel.addEventListener("change", () => { filters.tag = tagSel.value; draw(); });
  statusSel.addEventListener("change", () => { filters.status = statusSel.value; draw(); });
  onChange = load;
  await load();
}
function jobActions(j, after) {
  const name = j.name, path = "/api/jobs/" + encodeURIComponent(name);
  const done = () => { if (after) after(); };
  if (!can("operator")) return h("div", { class: "actions muted small" }, "view only");
  const edits = can("admin") && j.source !== "file";
  return h("div", { class: "actions" },
    h("button", { type: "button", "aria-label": "Run " + name + " now",
      onclick: () => act(async () => {
        try { return await api("POST", path + "/run"); }
        catch (e) {
          if (e.status === 409 && confirm(e.message + "\n\nRun anyway?")) return api("POST", path + "/run?force=1");
          throw e;
        }
      }, "Started " + name).then(done) }, "Run"),
    h("button", { type: "button", "aria-label": "Stop " + name, disabled: !j.running,
      onclick: () => act(() => api("POST", path + "/stop"), "Stopping " + name).then(done) }, "Stop"),
    j.paused
      ? h("button", { type: "button", "aria-label": "Resume " + name,
          onclick: () => act(() => api("POST", path + "/resume"), "Resumed " + name).then(done) }, "Resume")
      : h("button", { type: "button", "aria-label": "Pause " + name,
          onclick: () => act(() => api("POST", path + "/pause"), "Paused " + name).then(done) }, "Pause"),
    edits ? h("a", { class: "button", href: "#/edit/" + encodeURIComponent(name),
      "aria-label": "Edit " + name }, "Edit") : null,
    !edits ? null : h("button", { type: "button", class: "danger", "aria-label": "Delete " + name,
      onclick: () => { if (confirm("Delete job " + name + "? Its run history is kept.")) {
        act(() => api("DELETE", path), "Deleted " + name).then(() => { location.hash = "#/"; done(); }); } } }, "Delete"));
}
let rates = {};  // job -> its counts and success rate over 7 days (/api/stats)
function rate(x) { return x === null || x === undefined ? "—" : Math.round(x * 1000) / 10 + "%"; }
function lastRunCell(r, name) {
  const week = rates[name];
  const ok = week && week.success_rate !== null
    ? h("div", { class: "muted small rate" }, rate(week.success_rate) + " ok in 7 d (" + week.runs + " runs)") : null;
  if (!r) return h("span", { class: "muted" }, "never", ok);
  return h("span", null, h("a", { href: "#/run/" + r.id }, badge(r.status)), " ",
    when(r.started_at || r.finished_at), r.duration !== null ? h("span", { class: "muted small" }, " · " + dur(r.duration)) : null, ok);
}
function jobRow(j) {
  return h("tr", { "data-job": j.name },
    h("td", { "data-label": "Job" }, h("a", { href: "#/job/" + encodeURIComponent(j.name) }, h("b", null, j.name)),
      j.source === "file" ? h("span", { class: "muted small" }, " (file)") : null,
      h("div", null, (j.tags || []).map(t => h("span", { class: "tag" }, t))),
      j.description ? h("div", { class: "muted small" }, j.description) : null),
    h("td", { "data-label": "Schedule" }, h("code", null, j.schedule || "—"),
      h("div", { class: "muted small" }, j.schedule_description)),
    h("td", { "data-label": "Next run" }, j.paused ? h("span", { class: "badge s-skipped" }, "paused")
      : j.enabled === false ? h("span", { class: "muted" }, "disabled") : when(j.next_run_at),
      j.next_run_at && !j.paused ? h("div", { class: "muted small" }, abs(j.next_run_at)) : null),
    h("td", { "data-label": "Last run" }, lastRunCell(j.last_run, j.name)),
    h("td", { "data-label": j.running ? "State" : null }, j.running ? h("span", { class: statusClass("running") }, h("span", { class: "dot", "aria-hidden": "true" }), "running") : ""),
    h("td", { "data-label": "Actions" }, jobActions(j)));
}

// -- job page -------------------------------------------------------------------------
async function jobPage(name) {
  const main = $("#main");
  let j;
  const v = view;
  try { j = await api("GET", "/api/jobs/" + encodeURIComponent(name)); }
  catch (e) { if (v === view) fill(main, h("h1", null, "Job"), h("p", { class: "error-box" }, e.message)); return; }
  if (v !== view) return;
  const runsBox = h("div"), chartBox = h("div"), nextBox = h("ol", { class: "preview" }), statsBox = h("div");
  const cursors = [];
  let before = null;
  const loadRuns = async () => {
    const q = "?limit=20" + (before ? "&before=" + before : "");
    const data = await api("GET", "/api/jobs/" + encodeURIComponent(name) + "/runs" + q);
    if (v !== view) return;
    const byNode = data.runs.some(r => r.node);  // a cluster's runs name their node
    const table = h("table", { class: "cards" },
      h("thead", null, h("tr", null, ["Run", "Status", "Trigger", "Attempt", byNode && "Node", "Started", "Duration", "Exit", "CPU", "Peak memory"].filter(Boolean).map(t => h("th", { scope: "col" }, t)))),
      h("tbody", null, data.runs.map(r => h("tr", null,
        h("td", { "data-label": "Run" }, h("a", { href: "#/run/" + r.id }, "#" + r.id)),
        h("td", { "data-label": "Status" }, badge(r.status)),
        h("td", { "data-label": "Trigger" }, r.trigger, r.triggered_by ? h("span", { class: "muted small" }, " by " + r.triggered_by) : null),
        h("td", { "data-label": "Attempt" }, r.attempt),
        byNode ? h("td", { "data-label": "Node", class: "run-node" }, r.node || "—") : null,
        h("td", { "data-label": "Started" }, when(r.started_at || r.scheduled_at)),
        h("td", { "data-label": "Duration" }, dur(r.duration)),
        h("td", { "data-label": "Exit" }, r.signal ? "signal " + r.signal : (r.exit_code ?? "—")),
        h("td", { "data-label": "CPU" }, r.cpu_time === null ? "—" : r.cpu_time.toFixed(2) + " s"),
        h("td", { "data-label": "Peak memory" }, bytes(r.peak_rss))))));
    const last = data.runs.length ? data.runs[data.runs.length - 1].id : null;
    fill(runsBox, 
      data.runs.length ? table : h("p", { class: "muted" }, "No runs yet."),
      h("div", { class: "toolbar" },
        h("button", { type: "button", disabled: !cursors.length, onclick: () => { before = cursors.pop(); loadRuns(); } }, "Newer"),
        h("span", { class: "muted small" }, data.total + " runs in history"),
        h("button", { type: "button", disabled: !last || data.runs.length < 20,
          onclick: () => { cursors.push(before); before = last; loadRuns(); } }, "Older")));
    if (!before) fill(chartBox, durationChart(data.runs.slice().reverse()));
  };
  const loadNext = async () => {
    if (!j.schedule || j.paused || j.enabled === false) { fill(nextBox, h("li", { class: "muted" }, j.paused ? "paused" : "no scheduled runs")); return; }
    const p = new URLSearchParams({ expr: j.schedule, n: 5 });
    if (j.timezone) p.set("timezone", j.timezone);
    if (j.schedule.trim().toLowerCase().startsWith("@every")) p.set("anchor", j.created_at);
    try {
      const data = await api("GET", "/api/cron/next?" + p);
      fill(nextBox, ...data.times.map(t => h("li", null, t.local, h("span", { class: "muted" }, "  (" + rel(t.utc) + ")"))));
      if (!data.times.length) fill(nextBox, h("li", { class: "muted" }, "none"));
    } catch (e) { fill(nextBox, h("li", { class: "error-box" }, e.message)); }
  };
  const reload = async () => { try { j = await api("GET", "/api/jobs/" + encodeURIComponent(name)); } catch (e) { return; } if (v !== view) return; draw(); loadRuns(); };
  const draw = () => fill(main, 
    h("p", { class: "small" }, h("a", { href: "#/" }, "← Jobs")),
    h("h1", null, j.name, " ", j.paused ? h("span", { class: "badge s-skipped" }, "paused") : null,
      j.running ? h("span", { class: "s-running small" }, " ", h("span", { class: "dot", "aria-hidden": "true" }), j.running + " running") : null),
    j.description ? h("p", { class: "muted" }, j.description) : null,
    j.source === "file" ? h("p", { class: "note" }, "Defined in the jobs file: edit the file to change it.") : null,
    jobActions(j, reload),
    h("div", { class: "grid", style: "margin-top:1rem" },
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Schedule"),
        h("p", null, h("code", null, j.schedule || "manual"), " — ", j.schedule_description),
        h("h2", null, "Next five fire times"), nextBox),
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Recent durations"), chartBox,
        h("div", { class: "legend muted" }, h("span", { class: "s-succeeded" }, "■ succeeded"), h("span", { class: "s-failed" }, "■ failed / timed out"), h("span", { class: "s-cancelled" }, "■ cancelled / missed"))),
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Last 14 days"), statsBox),
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Definition"), h("pre", null, JSON.stringify(maskEnv(definitionOf(j)), null, 2)))),
    h("h2", null, "Run history"), runsBox);
  const loadStats = async () => {
    let st;
    try { st = await api("GET", "/api/jobs/" + encodeURIComponent(name) + "/stats?days=14"); } catch (e) { return; }
    if (v !== view) return;
    fill(statsBox,
      h("p", { class: "success-rate" }, h("b", null, rate(st.success_rate)), " succeeded of " + st.runs + " runs"),
      h("p", { class: "muted small" }, "duration p50 " + dur(st.duration.p50) + " · p95 " + dur(st.duration.p95) + " · max " + dur(st.duration.max),
        st.longest_failure_streak ? " · longest failure streak " + st.longest_failure_streak : ""),
      dayChart(st.per_day),
      h("p", { class: "muted small" }, "last success ", when(st.last_success), " · last failure ", when(st.last_failure)));
  };
  draw();
  loadStats();
  loadNext();
  await loadRuns();
  onChange = () => { if (!before) reload(); };
}
const STATE_KEYS = ["source", "paused", "next_run_at", "last_run", "running", "schedule_description", "created_at"];
function definitionOf(j) { const d = Object.assign({}, j); for (const k of STATE_KEYS) delete d[k]; return d; }

function dayChart(days) {
  // One bar per day, stacked by outcome.
  const W = 400, H = 70, bw = W / Math.max(days.length, 1);
  const box = svg("svg", { class: "chart days", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Outcomes per day" });
  const most = Math.max(1, ...days.map(d => dayStatuses().reduce((n, s) => n + d[s], 0)));
  days.forEach((d, i) => {
    let y = H;
    for (const status of dayStatuses()) {
      if (!d[status]) continue;
      const bh = Math.max(2, d[status] / most * (H - 4));
      y -= bh;
      box.append(svg("rect", { x: i * bw + 1, y, width: Math.max(1, bw - 2), height: bh, class: statusClass(status) },
        svg("title", null, d.day + ": " + d[status] + " " + status.replace("_", " "))));
    }
  });
  return box;
}
function durationChart(runs) {
  runs = runs.filter(r => r.duration !== null);
  const W = 400, H = 120;
  const box = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Durations of recent runs" });
  if (!runs.length) { box.append(svg("text", { x: 8, y: 20, fill: "currentColor" }, "no finished runs yet")); return box; }
  const max = Math.max(...runs.map(r => r.duration), 0.001), bw = W / Math.max(runs.length, 10);
  runs.forEach((r, i) => {
    const bh = Math.max(2, (r.duration / max) * (H - 16));
    box.append(svg("rect", { x: i * bw + 1, y: H - bh, width: Math.max(1, bw - 2), height: bh, class: statusClass(r.status) },
      svg("title", null, "#" + r.id + " " + r.status + " " + dur(r.duration))));
  });
  box.append(svg("text", { x: 4, y: 12, fill: "currentColor", "font-size": 11 }, "max " + dur(max)));
  return box;
}

// -- run page: live log ---------------------------------------------------------------
let stream = null;
async function runPage(id) {
  const main = $("#main"), v = view;
  let run;
  try { run = await api("GET", "/api/runs/" + id); }
  catch (e) { if (v === view) fill(main, h("h1", null, "Run"), h("p", { class: "error-box" }, e.message)); return; }
  if (v !== view) return;
  let hooks = run.hooks || [];  // deliveries of its hooks and alerts
  const head = h("div"), log = h("pre", { class: "log", id: "log", tabindex: "0", "aria-label": "Run output" });
  const conn = h("span", { class: "muted small", role: "status" });
  const jump = h("button", { type: "button", class: "hidden", onclick: () => { follow = true; log.scrollTop = log.scrollHeight; jump.classList.add("hidden"); } }, "↓ New output");
  let lastSeq = 0, follow = true;
  log.addEventListener("scroll", () => {
    follow = log.scrollHeight - log.scrollTop - log.clientHeight < 30;
    if (follow) jump.classList.add("hidden");
  });
  const drawHead = () => fill(head, 
    h("p", { class: "small" }, h("a", { href: "#/job/" + encodeURIComponent(run.job) }, "← " + run.job)),
    h("h1", null, "Run #" + run.id + " of " + run.job + " ", badge(run.status)),
    h("p", { class: "muted" }, run.trigger + (run.triggered_by ? " by " + run.triggered_by : "") + ", attempt " + run.attempt,
      run.node ? [" · on node ", h("b", { class: "run-node" }, run.node)] : null,
      " · started ", when(run.started_at), " · ", dur(run.duration),
      run.exit_code !== null ? " · exit code " + run.exit_code : "", run.signal ? " · signal " + run.signal : "",
      run.output_truncated ? " · output truncated" : ""),
    run.error ? h("p", { class: "error-box" }, run.error) : null,
    hooks.length ? h("ul", { class: "hooks small" }, hooks.map(d => h("li", { class: "hook-" + d.status },
      h("b", null, d.event), " → ", h("code", null, d.target), ": ", d.status,
      d.attempts > 1 ? " after " + d.attempts + " attempts" : "", d.error ? " (" + d.error + ")" : ""))) : null,
    h("div", { class: "logbar" },
      !META.status[run.status].terminal && can("operator")
        ? h("button", { type: "button", class: "danger", onclick: () => act(() => api("POST", "/api/runs/" + run.id + "/stop"), "Stopping run " + run.id) }, "Stop")
        : null,
      h("a", { class: "button", href: "/api/runs/" + run.id + "/log", download: "run-" + run.id + ".log" }, "Download log"),
      h("span", { class: "legend" }, h("span", null, "stdout"), h("span", { class: "stderr" }, "stderr"), h("span", { class: "system" }, "minisched")),
      conn, jump));
  drawHead();
  fill(main, head, log);
  const append = (c) => {
    if (c.seq <= lastSeq) return;   // after a reconnect: never twice
    lastSeq = c.seq;
    const marker = c.stream === "system" && /bytes of output dropped/.test(c.text);
    log.append(h("span", { class: c.stream + (marker ? " marker" : ""), "data-seq": c.seq }, c.text));
    if (follow) log.scrollTop = log.scrollHeight; else jump.classList.remove("hidden");
  };
  if (stream) stream.close();
  const es = stream = new EventSource("/api/runs/" + id + "/stream");
  es.addEventListener("log", (e) => append(JSON.parse(e.data)));
  const refreshHooks = async () => {
    try { const r = await api("GET", "/api/runs/" + id); if (v === view) { hooks = r.hooks || []; drawHead(); } } catch (e) { /* keep */ }
  };
  es.addEventListener("status", (e) => { run = JSON.parse(e.data); drawHead(); });
  es.addEventListener("end", (e) => {
    const d = JSON.parse(e.data);
    if (d && d.status) { run = d; drawHead(); es.close(); conn.textContent = ""; setTimeout(refreshHooks, 1500); }
    else if (d && d.reason === "signed out") { es.close(); refreshMe(); }
  });
  es.onopen = () => { conn.textContent = ""; };
  es.onerror = () => { if (es.readyState !== EventSource.CLOSED) conn.textContent = "reconnecting…"; };
  onChange = null;
}

// -- upcoming: every fire of every job in the next hours ------------------------------
async function upcomingPage() {
  const main = $("#main"), v = view;
  const hoursSel = h("select", { "aria-label": "How far ahead" },
    [6, 24, 72, 168].map(n => h("option", { value: n }, "next " + (n < 48 ? n + " hours" : n / 24 + " days"))));
  hoursSel.value = "24";
  const body = h("tbody");
  const note = h("p", { class: "muted small" });
  fill(main, h("h1", null, "Upcoming"), h("div", { class: "toolbar" }, hoursSel), note,
    h("table", { class: "cards upcoming" },
      h("thead", null, h("tr", null, ["When", "", "Job", "Zone"].map(t => h("th", { scope: "col" }, t)))), body));
  const load = async () => {
    let data;
    try { data = await api("GET", "/api/upcoming?hours=" + hoursSel.value); } catch (e) { return; }
    if (v !== view) return;
    fill(body, ...data.fires.map(f => h("tr", null,
      h("td", { "data-label": "When" }, abs(f.at)),
      h("td", { "data-label": "In" }, when(f.at)),
      h("td", { "data-label": "Job" }, h("a", { href: "#/job/" + encodeURIComponent(f.job) }, f.job)),
      h("td", { "data-label": "Zone", class: "muted small" }, f.local.slice(0, 16).replace("T", " ") + " " + f.timezone))));
    if (!data.fires.length) body.append(h("tr", null, h("td", { colspan: 4, class: "muted" }, "Nothing is due in this time.")));
    note.textContent = data.fires.length + " fires" + (data.truncated ? " (only the first 10000)" : "");
  };
  hoursSel.addEventListener("change", load);
  onChange = load;
  await load();
}

// -- system: the host's busiest processes, and the runs they belong to ---------------
// -- the audit trail and the settings (admins) -------------------------------------------
async function auditPage() {
  const main = $("#main"), v = view;
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const jobIn = h("input", { type: "search", placeholder: "job", value: q.get("job") || "", "aria-label": "Only this job" });
  const whoIn = h("input", { type: "search", placeholder: "who", value: q.get("who") || "", "aria-label": "Only this token" });
  const body = h("tbody");
  const more = h("button", { type: "button", class: "hidden" }, "Older entries");
  let before = null;
  const load = async (append) => {
    const p = new URLSearchParams({ limit: 100 });
    if (jobIn.value.trim()) p.set("job", jobIn.value.trim());
    if (whoIn.value.trim()) p.set("who", whoIn.value.trim());
    if (append && before) p.set("before", before);
    let data;
    try { data = await api("GET", "/api/audit?" + p); }
    catch (e) { if (v === view) fill(main, h("h1", null, "Audit"), h("p", { class: "error-box" }, e.message)); return; }
    if (v !== view) return;
    const rows = data.entries.map(e => h("tr", { "data-action": e.action },
      h("td", { "data-label": "When" }, h("time", { datetime: e.at, title: abs(e.at) }, rel(e.at))),
      h("td", { "data-label": "Who" }, h("b", null, e.who)),
      h("td", { "data-label": "From" }, e.address || h("span", { class: "muted" }, "—")),
      h("td", { "data-label": "Action" }, h("code", null, e.action)),
      h("td", { "data-label": "Job" }, e.job ? h("a", { href: "#/job/" + encodeURIComponent(e.job) }, e.job) : h("span", { class: "muted" }, "—")),
      h("td", { "data-label": "Change" }, e.run_id ? h("a", { href: "#/run/" + e.run_id }, "run #" + e.run_id) : null, e.run_id ? " " : null,
        Object.keys(e.detail).length ? h("code", { class: "small" }, JSON.stringify(e.detail)) : null)));
    if (!append && !rows.length) rows.push(h("tr", null, h("td", { colspan: 6, class: "muted" }, "No entries match.")));
    if (append) body.append(...rows); else fill(body, rows);
    before = data.entries.length ? data.entries[data.entries.length - 1].id : null;
    more.classList.toggle("hidden", data.entries.length < 100);
  };
  more.addEventListener("click", () => load(true));
  let t = null;
  for (const el of [jobIn, whoIn]) el.addEventListener("input", () => { clearTimeout(t); t = setTimeout(() => load(false), 250); });
  fill(main, h("h1", null, "Audit"),
    h("p", { class: "muted" }, "Who changed what: job edits, runs started and stopped, pauses, imports, tokens and sign-ins, newest first."),
    h("div", { class: "toolbar" }, jobIn, whoIn),
    h("table", { class: "cards audit" },
      h("thead", null, h("tr", null, ["When", "Who", "From", "Action", "Job", "Change"].map(x => h("th", { scope: "col" }, x)))), body),
    more);
  onChange = () => load(false);
  await load(false);
}
async function settingsPage() {
  const main = $("#main"), v = view;
  let data, tokens;
  try { [data, tokens] = await Promise.all([api("GET", "/api/settings"), api("GET", "/api/tokens")]); }
  catch (e) { if (v === view) fill(main, h("h1", null, "Settings"), h("p", { class: "error-box" }, e.message)); return; }
  if (v !== view) return;
  const show = x => Array.isArray(x) ? (x.length ? x.join(", ") : "—") : x === null || x === undefined ? "—" : String(x);
  const jf = data.jobs_file;
  const secret = h("div", { class: "hidden", role: "status" });
  const name = h("input", { id: "tok-name", required: true, autocomplete: "off" });
  const role = h("select", { id: "tok-role" }, ROLES.map(r => h("option", { value: r }, r)));
  const expires = h("input", { id: "tok-expires", placeholder: "never (or 90d, 12h)", autocomplete: "off" });
  const err = h("div", { class: "error-box", role: "alert" });
  const form = h("form", { class: "toolbar", id: "token-form" },
    h("label", { for: "tok-name" }, "Name "), name, h("label", { for: "tok-role" }, " Role "), role,
    h("label", { for: "tok-expires" }, " Expires "), expires, h("button", { class: "primary", type: "submit" }, "Add token"));
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    err.textContent = "";
    try {
      const made = await api("POST", "/api/tokens", { name: name.value.trim(), role: role.value, expires: expires.value.trim() || null });
      fill(secret, "Token ", h("b", null, made.name), " (" + made.role + "): ", h("code", { id: "new-secret" }, made.token),
        h("div", { class: "muted small" }, "Copy it now: it is shown only once; the server keeps only its hash."));
      secret.className = "new-secret";
      name.value = ""; expires.value = ""; role.value = ROLES[0];
      drawTokens((await api("GET", "/api/tokens")).tokens);
    } catch (e) { err.textContent = e.message; }
  });
  const tokBody = h("tbody");
  const drawTokens = list => fill(tokBody, list.length ? list.map(t => h("tr", { "data-token": t.name },
    h("td", { "data-label": "Name" }, h("b", null, t.name)),
    h("td", { "data-label": "Role" }, t.role),
    h("td", { "data-label": "Created" }, rel(t.created_at), t.created_by ? " by " + t.created_by : ""),
    h("td", { "data-label": "Last used" }, t.last_used ? rel(t.last_used) : "never"),
    h("td", { "data-label": "Expires" }, t.expires_at ? rel(t.expires_at) : "never"),
    h("td", { "data-label": "Actions" }, h("button", { type: "button", class: "danger", "aria-label": "Revoke " + t.name,
      onclick: () => { if (confirm("Revoke token " + t.name + "? Its sessions end at once.")) act(() => api("DELETE", "/api/tokens/" + encodeURIComponent(t.name)), "Revoked " + t.name).then(settingsPage); } }, "Revoke"))))
    : [h("tr", null, h("td", { colspan: 6, class: "muted" }, "No named tokens yet: only the server's --token (if any) signs in."))]);
  drawTokens(tokens.tokens);
  fill(main, h("h1", null, "Settings"),
    h("p", { class: "muted" }, "minisched " + data.version + " on " + data.database.kind + " (" + data.database.url + "). Secrets are never shown."),
    h("h2", null, "Tokens"), form, err, secret,
    h("table", { class: "cards tokens" }, h("thead", null, h("tr", null, ["Name", "Role", "Created", "Last used", "Expires", ""].map(x => h("th", { scope: "col" }, x)))), tokBody),
    h("h2", null, "Jobs file"),
    jf ? h("p", null, h("code", null, jf.path), jf.error ? h("span", { class: "s-failed" }, " not loaded: " + jf.error) : " loaded " + rel(jf.loaded_at),
      jf.conflicts && jf.conflicts.length ? " · " + jf.conflicts.length + " conflicts with other nodes" : "")
      : h("p", { class: "muted" }, "No jobs file (--jobs)."),
    h("h2", null, "Configuration"),
    h("table", { class: "cards settings" },
      h("thead", null, h("tr", null, ["Setting", "Value", "From"].map(x => h("th", { scope: "col" }, x)))),
      h("tbody", null, data.settings.map(st => h("tr", { "data-setting": st.name },
        h("td", { "data-label": "Setting" }, h("code", null, st.flag)),
        h("td", { "data-label": "Value" }, show(st.value)),
        h("td", { "data-label": "From" }, h("span", { class: st.source === "default" ? "muted" : "" }, st.source)))))));
}
async function systemPage() {
  const main = $("#main"), v = view;
  const sortSel = h("select", { "aria-label": "Sort processes by" },
    h("option", { value: "cpu" }, "by CPU"), h("option", { value: "mem" }, "by memory"));
  const body = h("tbody");
  fill(main, h("h1", null, "Busiest processes"), h("div", { class: "toolbar" }, sortSel),
    h("table", { class: "cards processes" },
      h("thead", null, h("tr", null, ["PID", "CPU", "Memory", "User", "Command", "Run"].map(t => h("th", { scope: "col" }, t)))), body));
  const load = async () => {
    let data;
    try { data = await api("GET", "/api/system/processes?limit=20&sort=" + sortSel.value); } catch (e) { return; }
    if (v !== view) return;
    fill(body, ...data.processes.map(p => h("tr", { "data-pid": p.pid },
      h("td", { "data-label": "PID" }, p.pid),
      h("td", { "data-label": "CPU" }, p.cpu_percent + "%"),
      h("td", { "data-label": "Memory" }, bytes(p.rss)),
      h("td", { "data-label": "User" }, p.user || "—"),
      h("td", { "data-label": "Command" }, h("code", null, p.command || p.name)),
      h("td", { "data-label": "Run" }, p.run ? h("a", { href: "#/run/" + p.run.id }, p.run.job + " #" + p.run.id) : h("span", { class: "muted" }, "—")))));
  };
  sortSel.addEventListener("change", load);
  onChange = load;
  await load();
}

// -- editor ---------------------------------------------------------------------------
// [key, form (or the choices of a select), label, help, basic, kind], from GET /api/meta.
const editorFields = () => META.fields.map(f => [f.name,
  f.form === "select" ? (f.basic ? f.choices : ["", ...f.choices]) : f.form, f.label, f.help, f.basic, f.kind]);
function fieldValue(type, v) {
  if (v === undefined || v === null) return type === "checkbox" ? true : "";
  if (type === "json") return JSON.stringify(v, null, 2);
  if (type === "list" || type === "ints") return v.join(", ");
  if (type === "env") return Object.entries(v).map(([k, x]) => k + "=" + x).join("\n");
  if (type === "textarea" && typeof v !== "string") return JSON.stringify(v);
  return String(v);
}
function readField(type, el) {
  const raw = type === "checkbox" ? el.checked : el.value;
  if (type === "checkbox") return raw;
  if (raw.trim() === "") return undefined;
  if (type === "number") { const n = Number(raw); return Number.isFinite(n) ? n : raw; }
  if (type === "json") { try { return JSON.parse(raw); } catch (e) { return raw; } }
  if (type === "list") return raw.split(",").map(s => s.trim()).filter(Boolean);
  if (type === "ints") return raw.split(",").map(s => s.trim()).filter(Boolean).map(s => Number.isFinite(Number(s)) ? Number(s) : s);
  if (type === "env") {
    const env = {};
    for (const line of raw.split("\n")) { if (!line.trim()) continue; const i = line.indexOf("="); env[i < 0 ? line.trim() : line.slice(0, i).trim()] = i < 0 ? "" : line.slice(i + 1); }
    return env;
  }
  if (type === "textarea" && raw.trim().startsWith("[")) { try { return JSON.parse(raw); } catch (e) { return raw; } }
  return raw;
}
async function editor(name) {
  const main = $("#main"), v = view;
  let job = { kind: "command", enabled: true };
  if (name) {
    try { job = await api("GET", "/api/jobs/" + encodeURIComponent(name)); }
    catch (e) { if (v === view) fill(main, h("h1", null, "Edit"), h("p", { class: "error-box" }, e.message)); return; }
    if (v !== view) return;
  }
  const readOnly = job.source === "file" || !can("admin");
  const inputs = {}, errs = {}, wraps = {};
  const general = h("div", { class: "error-box", role: "alert" });
  const preview = h("ol", { class: "preview", "aria-live": "polite" });
  const mk = ([key, type, label, help, basic, kind]) => {
    const id = "f-" + key;
    let input;
    if (Array.isArray(type)) input = h("select", { id, name: key }, type.map(o => h("option", { value: o }, o || "(default)")));
    else if (type === "textarea" || type === "json" || type === "env") input = h("textarea", { id, name: key, rows: type === "textarea" ? 3 : 4 });
    else if (type === "checkbox") input = h("input", { id, name: key, type: "checkbox" });
    else input = h("input", { id, name: key, type: type === "number" ? "text" : "text", inputmode: type === "number" ? "decimal" : null, autocomplete: "off" });
    const t = Array.isArray(type) ? "select" : type;
    if (t === "checkbox") input.checked = job[key] !== false;
    else input.value = fieldValue(t, job[key] ?? (t === "select" ? type[0] : undefined));
    if (key === "name" && name) input.readOnly = true;
    if (readOnly) input.disabled = true;
    inputs[key] = [t, input];
    errs[key] = h("div", { class: "err", id: id + "-err", role: "alert" });
    input.setAttribute("aria-describedby", id + "-help " + id + "-err");
    const w = wraps[key] = h("div", { class: "field", "data-kind": kind || "" },
      t === "checkbox" ? h("label", { for: id }, input, " ", label) : h("label", { for: id }, label),
      t === "checkbox" ? null : input,
      h("div", { class: "help", id: id + "-help" }, help), errs[key]);
    return w;
  };
  const fields = editorFields();
  const lead = f => (f[0] === "name" ? 2 : f[0] === "kind" ? 1 : 0);  // what the rest depends on
  const basic = fields.filter(f => f[4]).sort((a, b) => lead(b) - lead(a)).map(mk), adv = fields.filter(f => !f[4]).map(mk);
  const schedWrap = wraps.schedule;
  schedWrap.append(h("div", { class: "help" }, "Next fire times:"), preview);
  const form = h("form", { class: "editor", novalidate: true },
    h("div", { class: "two" }, basic),
    h("details", null, h("summary", null, "Advanced: timeouts, retries, concurrency, environment, hooks"), h("div", { class: "two" }, adv)),
    general,
    readOnly ? null : h("div", { class: "toolbar" }, h("button", { class: "primary", type: "submit" }, name ? "Save" : "Create job"),
      h("a", { class: "button", href: name ? "#/job/" + encodeURIComponent(name) : "#/" }, "Cancel")));
  const kindSel = inputs.kind[1];
  const showKind = () => { for (const [k, w] of Object.entries(wraps)) { const kd = w.getAttribute("data-kind"); w.classList.toggle("hidden", !!kd && !kd.split(" ").includes(kindSel.value)); } };
  kindSel.addEventListener("change", showKind);
  showKind();
  const collect = () => {
    const def = {};
    for (const [key, [t, el]] of Object.entries(inputs)) {
      const w = wraps[key];
      if (w.classList.contains("hidden")) continue;
      const v = readField(t, el);
      if (t === "checkbox") { if (v === false) def[key] = false; continue; }
      if (v !== undefined) def[key] = v;
    }
    if (def.kind === "command") delete def.kind;
    return def;
  };
  const showErrors = (list) => {
    for (const k of Object.keys(errs)) { errs[k].textContent = ""; wraps[k].classList.remove("invalid"); }
    general.textContent = "";
    let first = null;
    for (const e of list) {
      const key = (e.field || "").split(/[.\[]/)[0];
      if (errs[key]) { errs[key].textContent = e.error; wraps[key].classList.add("invalid"); first = first || inputs[key][1]; }
      else general.append(h("div", null, e.error));
    }
    if (first) { if (first.closest("details")) first.closest("details").open = true; first.focus(); }
  };
  let pt = null;
  const doPreview = () => {
    clearTimeout(pt);
    pt = setTimeout(async () => {
      const expr = inputs.schedule[1].value.trim();
      errs.schedule.textContent = ""; wraps.schedule.classList.remove("invalid");
      if (!expr) { fill(preview, h("li", { class: "muted" }, "manual only")); return; }
      const p = new URLSearchParams({ expr, n: 5 });
      const tz = inputs.timezone[1].value.trim();
      if (tz) p.set("timezone", tz);
      try {
        const data = await api("GET", "/api/cron/next?" + p);
        fill(preview, ...(data.times.length ? data.times.map(t => h("li", null, t.local)) : [h("li", { class: "muted" }, "never fires")]));
        if (data.description) preview.prepend(h("li", { class: "muted", style: "list-style:none" }, data.description));
      } catch (e) {
        fill(preview, );
        const key = e.field === "timezone" ? "timezone" : "schedule";
        errs[key].textContent = e.message; wraps[key].classList.add("invalid");
      }
    }, 250);
  };
  inputs.schedule[1].addEventListener("input", doPreview);
  inputs.timezone[1].addEventListener("input", doPreview);
  doPreview();
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const def = collect();
    try {
      const saved = name ? await api("PUT", "/api/jobs/" + encodeURIComponent(name), def) : await api("POST", "/api/jobs", def);
      toast((name ? "Saved " : "Created ") + saved.name);
      location.hash = "#/job/" + encodeURIComponent(saved.name);
    } catch (e) {
      if (e.status === 401) return;
      let list = [{ field: e.field, error: e.message }];
      if (e.status === 400) { try { const v = await api("POST", "/api/validate", def); if (v.errors.length) list = v.errors; } catch (x) { /* keep the first */ } }
      showErrors(list);
    }
  });
  fill(main, 
    h("p", { class: "small" }, h("a", { href: name ? "#/job/" + encodeURIComponent(name) : "#/" }, "← Back")),
    h("h1", null, name ? "Edit " + name : "New job"),
    readOnly ? h("p", { class: "note" }, job.source === "file"
      ? "This job is defined in the jobs file and is read-only here: edit the file (it is reloaded within 2 seconds)."
      : "Your role (" + me.role + ") may only view jobs; an admin can edit them.") : null,
    form);
  onChange = null;
  if (!name) inputs.name[1].focus();
}

// -- login and routing -------------------------------------------------------------------
function showLogin() {
  me = NOBODY;
  drawMe();
  $("#login").classList.remove("hidden");
  $("#token").focus();
}
$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("POST", "/api/login", { token: $("#token").value });
    $("#login").classList.add("hidden");
    $("#token").value = "";
    $("#login-error").textContent = "";
    await refreshMe();
    connectEvents();
    refreshStatus();
    route();
  } catch (e) { $("#login-error").textContent = e.message; }
});
async function route() {
  view++;  // answers still on their way to an earlier view are dropped
  try { await loadMeta(); } catch (e) {
    fill($("#main"), h("h1", null, "minisched"), h("p", { class: "error-box" }, "The server cannot be reached: " + e.message));
    return;
  }
  if (stream && !location.hash.startsWith("#/run/")) { stream.close(); stream = null; }
  const parts = location.hash.replace(/^#\/?/, "").split("?")[0].split("/").map(decodeURIComponent);
  onChange = null;
  if (parts[0] === "job" && parts[1]) await jobPage(parts[1]);
  else if (parts[0] === "run" && parts[1]) await runPage(parts[1]);
  else if (parts[0] === "new") await editor(null);
  else if (parts[0] === "upcoming") await upcomingPage();
  else if (parts[0] === "system") await systemPage();
  else if (parts[0] === "edit" && parts[1]) await editor(parts[1]);
  else if (parts[0] === "audit") await auditPage();
  else if (parts[0] === "settings") await settingsPage();
  else await dashboard();
  document.title = "minisched" + (parts[1] ? " · " + parts[1] : "");
}
window.addEventListener("hashchange", () => { route(); $("#main").focus({ preventScroll: true }); });
setInterval(() => { refreshStatus(); for (const t of document.querySelectorAll("time[datetime]")) t.textContent = rel(t.getAttribute("datetime")); }, 10000);
connectEvents();
refreshStatus();
refreshMe().then(route);
</script>
</body>
</html>
"""
#: Content-Security-Policy of the page: only its own inline script (by hash) and
#: same-origin requests; no frames.
PAGE_CSP = "default-src 'self'; script-src 'sha256-{}'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'".format(
    base64.b64encode(
        hashlib.sha256(
            INDEX_HTML.split("<script>", 1)[1].split("</script>", 1)[0].encode()
        ).digest()
    ).decode()
)


def page():
    """``GET /``: the page shell (open even with a token; it holds no data)."""
    response = bottle.HTTPResponse(INDEX_HTML)
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Content-Security-Policy", PAGE_CSP)
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Referrer-Policy", "no-referrer")
    response.set_header("Cache-Control", "no-cache")
    return response


###############################################################################
# HTTP API ####################################################################
###############################################################################

#: Largest request body accepted.
MAX_BODY = 1 << 20
#: Seconds between SSE heartbeat comments.
SSE_HEARTBEAT = 15.0
#: Name of the page's session cookie.
SESSION_COOKIE = "minisched_session"
#: Failed logins allowed per client address per minute.
LOGIN_ATTEMPTS = 10
#: A page session ends after this long without a request, and at the latest
#: this long after the login.
SESSION_IDLE = 12 * 3600
SESSION_MAX_AGE = 7 * 86400
#: How often a session's ``last_seen`` is written (not on every request).
SESSION_TOUCH = 300
#: How often an open live stream checks that its token or session is still
#: valid (a revocation ends it within this).
ACCESS_RECHECK = 2.0

#: Largest id or count accepted in a URL (SQLite's integer range).
MAX_INT = 2**63 - 1


def _int_schema(low, high=MAX_INT, default=None) -> dict:
    out = {"type": "integer", "minimum": low, "maximum": high}
    if default is not None:
        out["default"] = default
    return out


_FLAG = {"type": "boolean", "default": False}
#: What ``POST /api/batch`` can do to several jobs at once.
BATCH_ACTIONS = ("run", "stop", "pause", "resume", "delete")
#: Every query parameter: key -> (name in the URL, OpenAPI schema, meaning).
#: ``Api.int_param`` takes an integer's range and default from here and
#: ``/api/openapi.json`` describes them from here: the two cannot drift.
QUERY_PARAMS = {
    "tag": ("tag", {"type": "string"}, "only jobs with this tag"),
    "q": ("q", {"type": "string"}, "text in the name, description or command"),
    "job_status": (
        "status",
        {"type": "string", "enum": [*RUN_STATUSES, "paused"]},
        "the last run's status, or running, or paused",
    ),
    "run_status": ("status", {"type": "string", "enum": list(RUN_STATUSES)}, ""),
    "job_limit": ("limit", _int_schema(1, 10000, 1000), "at most this many"),
    "run_limit": ("limit", _int_schema(1, 1000, 50), "at most this many"),
    "offset": ("offset", _int_schema(0, default=0), "skip this many"),
    "before": ("before", _int_schema(1), "only runs with a smaller id (a cursor)"),
    "job": ("job", {"type": "string"}, "only runs of this job"),
    "node": ("node", {"type": "string"}, "only runs on this node (a cluster's)"),
    "purge": ("purge", _FLAG, "also delete the job's run history"),
    "force": (
        "force",
        _FLAG,
        "run a busy forbid job anyway; delete a job others run after",
    ),
    "dry_run": ("dry_run", _FLAG, "report what would change, change nothing"),
    "by_job": ("by_job", _FLAG, "also each job's counts and success rate"),
    "log_format": ("format", {"type": "string", "enum": ["text", "json"]}, ""),
    "export_format": ("format", {"type": "string", "enum": ["json", "csv"]}, ""),
    "import_format": ("format", {"type": "string", "enum": ["json", "csv"]}, ""),
    "last_event_id": ("last_event_id", _int_schema(0), "resume after this seq"),
    "expr": ("expr", {"type": "string"}, "a schedule, e.g. */5 * * * *"),
    "n": ("n", _int_schema(1, 100, 5), "how many fire times"),
    "hours": ("hours", _int_schema(1, 24 * 31, 24), "how far ahead"),
    "days": ("days", _int_schema(1, 366, 7), "how far back"),
    "proc_sort": ("sort", {"type": "string", "enum": ["cpu", "mem"]}, "busiest by"),
    "proc_limit": ("limit", _int_schema(1, 200, 15), "at most this many"),
    "timezone": ("timezone", {"type": "string"}, "an IANA zone"),
    "after": ("after", {"type": "string"}, "ISO 8601 time (default: now)"),
    "anchor": ("anchor", {"type": "string"}, "where @every counts from"),
    "audit_job": ("job", {"type": "string"}, "only entries about this job"),
    "who": ("who", {"type": "string"}, "only entries by this token name (or file)"),
    "audit_limit": ("limit", _int_schema(1, 1000, 100), "at most this many"),
    "audit_before": ("before", _int_schema(1), "only older entries (an id, a cursor)"),
}

#: One API route: method, OpenAPI path, ``Api`` handler name, summary, query
#: parameter keys (:data:`QUERY_PARAMS`), the least role that may call it
#: (one of :data:`ROLES`, or ``public``: no token needed), request body
#: schema (a component name or None), success status, response schema (a
#: component name, or a media type for text), and error statuses it
#: answers beyond the common ones.
Route = collections.namedtuple(
    "Route", "method path handler summary params role body ok response errors"
)


def _route(
    method,
    path,
    handler,
    summary,
    params=(),
    *,
    role,
    body=None,
    ok=200,
    response=None,
    errors=(),
):
    if role not in ("public", *ROLES):
        raise ValueError(f"{method} {path}: role {role!r}")
    return Route(
        method, path, handler, summary, params, role, body, ok, response, errors
    )


#: Every route.  ``make_app`` registers routes from this table and
#: ``/api/openapi.json`` describes it, so the two cannot drift apart.
API_ROUTES = (
    _route(
        "GET",
        "/api/health",
        "health",
        "Liveness of the engine's threads and database",
        response="Health",
        role="public",
    ),
    _route(
        "GET",
        "/api/meta",
        "meta",
        "Run statuses and job fields with their rules (what the page's "
        "editor and colours are built from)",
        response="Meta",
        role="public",
    ),
    _route(
        "GET",
        "/api/nodes",
        "nodes",
        "The cluster's nodes: alive or dead, heartbeat age, running runs "
        "(one node on SQLite: this server)",
        response="Nodes",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/status",
        "status",
        "Version, uptime, counts, jobs file state",
        response="Status",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/jobs",
        "list_jobs",
        "List jobs",
        ("tag", "q", "job_status", "job_limit", "offset"),
        response="JobList",
        role="viewer",
    ),
    _route(
        "POST",
        "/api/jobs",
        "create_job",
        "Create a job",
        body="JobDefinition",
        ok=201,
        response="Job",
        errors=(409,),
        role="admin",
    ),
    _route(
        "GET",
        "/api/jobs/{name}",
        "get_job",
        "A job's definition and state",
        response="Job",
        role="viewer",
    ),
    _route(
        "PUT",
        "/api/jobs/{name}",
        "put_job",
        "Replace a job's definition",
        body="JobDefinition",
        response="Job",
        errors=(409,),
        role="admin",
    ),
    _route(
        "PATCH",
        "/api/jobs/{name}",
        "patch_job",
        "Change some fields of a job",
        body="JobChanges",
        response="Job",
        errors=(409,),
        role="admin",
    ),
    _route(
        "DELETE",
        "/api/jobs/{name}",
        "delete_job",
        "Delete a job",
        ("purge", "force"),
        response="Deleted",
        errors=(409,),
        role="admin",
    ),
    _route(
        "POST",
        "/api/jobs/{name}/run",
        "run_job",
        "Trigger a run now",
        ("force",),
        ok=202,
        response="Run",
        errors=(409,),
        role="operator",
    ),
    _route(
        "POST",
        "/api/jobs/{name}/stop",
        "stop_job",
        "Stop the job's active runs",
        response="Stopped",
        role="operator",
    ),
    _route(
        "POST",
        "/api/jobs/{name}/pause",
        "pause_job",
        "Pause the schedule",
        response="Job",
        role="operator",
    ),
    _route(
        "POST",
        "/api/jobs/{name}/resume",
        "resume_job",
        "Resume the schedule",
        response="Job",
        role="operator",
    ),
    _route(
        "GET",
        "/api/jobs/{name}/runs",
        "job_runs",
        "A job's runs, newest first",
        ("run_limit", "before", "run_status", "offset"),
        response="RunList",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/runs",
        "list_runs",
        "All runs, newest first",
        ("run_limit", "before", "run_status", "offset", "job", "node"),
        response="RunList",
        role="viewer",
    ),
    _route(
        "GET", "/api/runs/{id}", "get_run", "One run", response="Run", role="viewer"
    ),
    _route(
        "POST",
        "/api/runs/{id}/stop",
        "stop_run",
        "Stop one run",
        response="Stopped",
        errors=(409,),
        role="operator",
    ),
    _route(
        "GET",
        "/api/runs/{id}/log",
        "run_log",
        "A run's stored output",
        ("log_format",),
        response="text/plain+Chunks",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/runs/{id}/stream",
        "run_stream",
        "A run's output live (SSE)",
        ("last_event_id",),
        response="text/event-stream",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/events",
        "events",
        "Run and job changes (SSE)",
        response="text/event-stream",
        role="viewer",
    ),
    _route(
        "POST",
        "/api/batch",
        "batch",
        "One action on several jobs",
        body="Batch",
        response="BatchResults",
        role="operator",
    ),
    _route(
        "POST",
        "/api/validate",
        "validate",
        "Validate a job or jobs document",
        body="JobOrDocument",
        response="Validation",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/cron/next",
        "cron_next",
        "Next fire times of a schedule",
        ("expr", "n", "timezone", "after", "anchor"),
        response="FireTimes",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/export",
        "export",
        "All jobs as a jobs document",
        ("export_format",),
        response="text/csv+JobsDocument",
        role="viewer",
    ),
    _route(
        "POST",
        "/api/import",
        "import_jobs",
        "Load a jobs document",
        ("dry_run", "import_format"),
        body="JobsDocument",
        response="ImportReport",
        errors=(409,),
        role="admin",
    ),
    _route(
        "GET",
        "/api/jobs/{name}/stats",
        "job_stats",
        "An account of a job's runs over the last days",
        ("days",),
        response="Stats",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/stats",
        "all_stats",
        "The same across all jobs (by_job: with each job's counts)",
        ("days", "by_job"),
        response="Stats",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/upcoming",
        "upcoming",
        "Every fire of every job in the next hours, in time order",
        ("hours",),
        response="Upcoming",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/system",
        "system",
        "Host and server metrics",
        response="System",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/system/processes",
        "processes",
        "The host's busiest processes, with the runs they belong to",
        ("proc_sort", "proc_limit"),
        response="Processes",
        role="viewer",
    ),
    _route(
        "POST",
        "/api/login",
        "login",
        "Exchange the token for a session cookie",
        body="Login",
        response="LoginResult",
        errors=(429,),
        role="public",
    ),
    _route(
        "POST",
        "/api/logout",
        "logout",
        "End the session",
        response="LoginResult",
        role="public",
    ),
    _route(
        "GET",
        "/api/me",
        "me",
        "Who this request is: token name and role",
        response="Me",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/tokens",
        "list_tokens",
        "Named tokens (never their secrets)",
        response="TokenList",
        role="admin",
    ),
    _route(
        "POST",
        "/api/tokens",
        "add_token",
        "Create a named token; its secret is in this answer only",
        body="TokenRequest",
        ok=201,
        response="NewToken",
        errors=(409,),
        role="admin",
    ),
    _route(
        "PATCH",
        "/api/tokens/{name}",
        "change_token",
        "Change a token's role (its sessions end)",
        body="TokenRole",
        response="Token",
        role="admin",
    ),
    _route(
        "DELETE",
        "/api/tokens/{name}",
        "delete_token",
        "Revoke a token (its sessions end)",
        response="Revoked",
        role="admin",
    ),
    _route(
        "GET",
        "/api/audit",
        "audit_log",
        "Who changed what, newest first",
        ("audit_job", "who", "audit_limit", "audit_before"),
        response="AuditList",
        role="admin",
    ),
    _route(
        "GET",
        "/api/settings",
        "settings",
        "The effective configuration, where each value came from (no secrets)",
        response="Settings",
        role="admin",
    ),
    _route(
        "GET",
        "/api/openapi.json",
        "openapi",
        "This description",
        response="Object",
        role="viewer",
    ),
    _route(
        "GET",
        "/api/docs",
        "docs",
        "This reference as a page (every route with its role)",
        response="text/html",
        role="viewer",
    ),
    _route(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics",
        response="text/plain",
        role="viewer",
    ),
)
_OPEN_PATHS = ("/api/health", "/api/login", "/api/logout", "/api/meta")
#: State-changing routes that write nothing to the database.
_WRITE_FREE_PATHS = ("/api/validate", "/api/logout")
_STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
#: Fields of a job shown in CSV exports, in order.
CSV_FIELDS = tuple(f.name for f in JOB_FIELDS)


def _rate(good: int, bad: int):
    """``good / (good + bad)`` rounded, or None when there is neither."""
    return round(good / (good + bad), 4) if good + bad else None


def _error_body(exc: MinischedError) -> str:
    """The one rendering of an error: ``{"error", "field"}``."""
    return json.dumps({"error": exc.message, "field": exc.field})


def _error_response(exc: MinischedError) -> bottle.HTTPResponse:
    """An error as the response it deserves: its body, status and headers."""
    response = bottle.HTTPResponse(_error_body(exc), exc.status, dict(exc.headers))
    response.content_type = "application/json"
    return response


def _json(data, status=200) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(json.dumps(data), status)
    response.content_type = "application/json"
    return response


def _sse(event: str, data, event_id=None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def _parse_int(text: str):
    """ASCII digits (optionally signed) -> int, else None."""
    text = text.strip()
    body = text[1:] if text[:1] in "+-" else text
    if not body.isascii() or not body.isdigit() or len(body) > 30:
        return None
    return int(text)


def _prom_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _host_name(host: str) -> str:
    """``Host`` header -> bare lowercase name (no port, no brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _allowed_hosts(config) -> set:
    """Names the ``Host`` header may carry: loopback names, the bound address
    (every local address when bound to a wildcard) and ``--public-host``."""
    names = {"localhost", "localhost.localdomain", "127.0.0.1", "::1"}
    bound = _host_name(config.host)
    names.add(bound)
    if bound in ("0.0.0.0", "::", ""):
        for addresses in psutil.net_if_addrs().values():
            names.update(
                a.address.split("%")[0].lower()
                for a in addresses
                if a.family in (socket.AF_INET, socket.AF_INET6)
            )
    names.update(_host_name(h) for h in config.public_host)
    return names


class Api:
    """The JSON API over an :class:`Engine`.  One instance per app; handlers
    run on the HTTP server's request threads."""

    def __init__(self, engine, config, heartbeat=SSE_HEARTBEAT):
        self.engine = engine
        self.config = config
        self.heartbeat = heartbeat
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._streams = 0
        self._logins = {}
        self._hosts = _allowed_hosts(config)
        self._sampler = _ProcessTable()
        self._networks = config.networks("allow_ip")
        self._denied = config.networks("deny_ip")
        #: Tokens and roles for this app's bootstrap token (``serve_engine``
        #: may serve an engine with another one).
        self.access = Access(engine.store, config.token, engine.config.audit_keep)

    # -- request checks (before every route) -----------------------------------

    def check_request(self) -> None:
        """Security rules of SPEC §9; raises a :class:`MinischedError` to refuse."""
        request = bottle.request
        path = request.path
        if self._networks:
            try:
                client = ipaddress.ip_address(request.remote_addr or "")
            except ValueError:
                client = None
            if client is None or not any(client in net for net in self._networks):
                raise ForbiddenError("your address is not allowed (--allow-ip)")
        if self._denied:
            try:
                client = ipaddress.ip_address(request.remote_addr or "")
            except ValueError:
                client = None
            if client is None or any(client in net for net in self._denied):
                raise ForbiddenError("your address is denied (--deny-ip)")
        host = _host_name(request.get_header("Host", ""))
        if host not in self._hosts:
            raise ForbiddenError(
                "unknown Host header: add the name with --public-host", "Host"
            )
        origin = request.get_header("Origin")
        if request.method in _STATE_CHANGING and origin is not None:
            expected = request.get_header("Host", "").lower()
            netloc = origin.lower().split("://", 1)[-1].rstrip("/")
            if origin == "null" or netloc != expected:
                raise ForbiddenError("cross-origin request refused", "Origin")
        protected = (path.startswith("/api/") or path == "/metrics") and (
            path not in _OPEN_PATHS
        )
        who = self._principal()
        request.environ["minisched.who"] = who
        if protected and who is None:
            raise UnauthorizedError(
                "missing or wrong token (or it expired, or was revoked)"
            )
        if (
            request.method in _STATE_CHANGING
            and path not in _WRITE_FREE_PATHS
            and not path.endswith("/stop")
            and self.engine.store.outage is not None
        ):
            # Stopping stays possible: the kill happens now, its record later.
            raise UnavailableError(
                f"the database cannot be written now ({self.engine.store.outage}); "
                "try again later",
            )
        if request.method in _STATE_CHANGING:
            try:
                length = request.content_length
            except ValueError:
                raise InvalidError("invalid Content-Length", "Content-Length") from None
            if length > MAX_BODY:
                raise TooLargeError(f"request body larger than {MAX_BODY} bytes")
            ctype = (request.content_type or "").split(";")[0].strip().lower()
            allowed = ("application/json",)
            if path == "/api/import":
                allowed += ("text/csv",)
            chunked = "chunked" in request.get_header("Transfer-Encoding", "").lower()
            if (length > 0 or chunked) and ctype not in allowed:
                raise UnsupportedMediaError(
                    "request bodies must be application/json", "Content-Type"
                )

    def _principal(self) -> dict | None:
        """Who the request is (``{"name", "role"}``): by its bearer token or
        its session cookie; :data:`ANONYMOUS` where no token is needed; None
        when one is and the request has none that is valid."""
        request = bottle.request
        return self._principal_of(
            request.get_header("Authorization", ""), request.get_cookie(SESSION_COOKIE)
        )

    def _principal_of(self, header: str, cookie) -> dict | None:
        if not self.access.required():
            return ANONYMOUS
        if header.startswith("Bearer "):
            return self.access.identify(header[7:].strip())
        session = self._session(cookie)
        return self.access.session_principal(session) if session else None

    def _signed_out(self):
        """For a stream: a function that says (checking at most every
        ``ACCESS_RECHECK`` seconds) whether the token or session that opened
        it no longer admits it: revoked, expired, another role, logged out."""
        header = bottle.request.get_header("Authorization", "")
        cookie = bottle.request.get_cookie(SESSION_COOKIE)
        checked = [time.monotonic()]

        def signed_out() -> bool:
            now = time.monotonic()
            if now - checked[0] < ACCESS_RECHECK:
                return False
            checked[0] = now
            return self._principal_of(header, cookie) is None

        return signed_out

    def _wait(self) -> float:
        """How long a stream waits for an event before a heartbeat: at most
        ``ACCESS_RECHECK`` while tokens are needed, so a revocation ends it."""
        if self.access.required():
            return min(self.heartbeat, ACCESS_RECHECK)
        return self.heartbeat

    def _session(self, cookie) -> dict | None:
        """The live session ``cookie`` names, or None.  Sessions are kept in
        the database: a logout, a revoked token or a new role ends them at
        once (see :meth:`Access.session_principal`)."""
        if not cookie:
            return None
        session_id = _secret_hash(cookie)
        row = self.engine.store.get_session(session_id)
        now = time.time()
        if (
            row is None
            or now >= row["expires_at"]
            or now - row["last_seen"] >= SESSION_IDLE
        ):
            return None
        if now - row["last_seen"] >= SESSION_TOUCH:
            self.engine.store.touch_session(session_id, now)
        return row

    @staticmethod
    def who() -> dict:
        """The request's principal (``check_request`` found it)."""
        return bottle.request.environ.get("minisched.who") or ANONYMOUS

    def require(self, role: str) -> None:
        """:class:`ForbiddenError` (403, naming the role) unless the request's
        principal has ``role``."""
        if role == "public":
            return
        who = self.who()
        if not role_allows(who["role"], role):
            raise ForbiddenError(
                f"this needs the {role} role; token {who['name']!r} has the "
                f"{who['role']} role",
                "role",
            )

    def guarded(self, route):
        """``route``'s handler behind its role check."""
        handler = getattr(self, route.handler)

        @functools.wraps(handler)
        def call(*args, **kwargs):
            self.require(route.role)
            return handler(*args, **kwargs)

        return call

    def audit(self, action, job=None, run_id=None, detail=None, who=None) -> None:
        """Record a state change made by this request in the audit trail."""
        self.access.record(
            who or self.who()["name"],
            action,
            job=job,
            run_id=run_id,
            detail=detail,
            address=bottle.request.remote_addr,
        )

    def secrets_visible(self) -> bool:
        """Env values are shown to admins only (others see ``***``)."""
        return role_allows(self.who()["role"], "admin")

    # -- helpers -----------------------------------------------------------------

    @staticmethod
    def body():
        """The request's JSON body (400 if malformed; None if empty)."""
        raw = bottle.request.body.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise TooLargeError(f"request body larger than {MAX_BODY} bytes")
        if not raw.strip():
            return None
        try:
            return parse_json(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidError("request body is not UTF-8") from None

    @staticmethod
    def int_param(key):
        """An integer query parameter, range and default from :data:`QUERY_PARAMS`."""
        name, schema, _meaning = QUERY_PARAMS[key]
        raw = bottle.request.query.get(name)
        if raw is None or raw == "":
            return schema.get("default")
        value = _parse_int(raw)
        low, high = schema["minimum"], schema["maximum"]
        if value is None:
            raise InvalidError(f"{name}: must be an integer", name)
        if not low <= value <= high:
            raise InvalidError(f"{name}: must be between {low} and {high}", name)
        return value

    @staticmethod
    def flag(name) -> bool:
        """A boolean query parameter: ``1``, ``true`` or ``yes`` mean true."""
        return bottle.request.query.get(name, "").lower() in ("1", "true", "yes")

    def job_or_404(self, name):
        job = self.engine.scheduler.get_job(name)
        if job is None:
            raise NotFoundError(f"no job named {name!r}", "name")
        return job

    @staticmethod
    def run_id(value) -> int:
        run_id = _parse_int(value)
        if run_id is None or not 0 < run_id <= MAX_INT:
            raise NotFoundError(f"no run with id {value!r}", "id")
        return run_id

    def run_or_404(self, value) -> dict:
        """A run's row; an active run as the runner knows it now (its last
        change may not be committed yet, e.g. while the disk is full)."""
        run_id = self.run_id(value)
        row = self.engine.store.get_run(run_id)
        if row is None:
            raise NotFoundError(f"no run with id {value}", "id")
        active = self.engine.runner.get_active(run_id)
        if active is not None and active.finished_at is None:
            row.update(active.row())
        return row

    def _running(self) -> collections.Counter:
        return collections.Counter(
            r.job.name for r in self.engine.runner.active_runs() if r.status != "queued"
        )

    def _state(self, job, running) -> dict:
        """A job's changing state, without ``last_run``."""
        state = self.engine.scheduler.state(job.name)
        out = dict(job.static_state())
        out.update(
            paused=state["paused"],
            next_run_at=state["next_run_iso"],
            running=running.get(job.name, 0),
        )
        return out

    def job_json(self, job) -> dict:
        """A job as the API shows it: definition plus state (``env`` values
        masked for those below admin)."""
        out = job.public(mask_env=not self.secrets_visible())
        out.update(self._state(job, self._running()))
        last = self.engine.last_run(job.name)
        out["last_run"] = last[1] if last else None
        return out

    def editable(self, job) -> None:
        if job.source == "file":
            raise ConflictError(
                f"job {job.name!r} is defined in the jobs file {self.config.jobs}: "
                "edit the file instead",
                "name",
            )

    def save(self, definition, create=False):
        definition = validate_job(definition, self.engine.tz)
        old = self.engine.scheduler.get_job(definition["name"])
        job = self.engine.scheduler.put_job(definition, "api", create_only=create)
        self.audit(
            "job.update" if old else "job.create",
            job.name,
            detail={"fields": changed_fields(old and old.definition, definition)},
        )
        return self.job_json(job)

    # -- jobs --------------------------------------------------------------------

    @staticmethod
    def meta():
        """The tables other code derives from: run statuses, job fields."""
        fields = []
        for field in JOB_FIELDS:
            out = {
                k: getattr(field, k)
                for k in ("name", "form", "label", "help", "basic", "kind", "masked")
            }
            out["default"] = field.default
            out["choices"] = list(field.choices) if field.choices else None
            out["schema"] = (
                {"type": "string"}
                if field.name == "name"
                else _job_field_schema(field.name)
            )
            fields.append(out)
        return {
            "statuses": [dict(s._asdict()) for s in RUN_STATUS_TABLE],
            "fields": fields,
            "triggers": list(TRIGGERS),
        }

    def nodes(self):
        cluster = self.engine.cluster
        if cluster is None:
            counts = self.engine.runner.counts()
            only = {
                "name": socket.gethostname(),
                "tags": [],
                "version": __version__,
                "heartbeat_age": 0.0,
                "running": counts["running"],
                "alive": True,
                "self": True,
            }
            return {"clustered": False, "nodes": [only]}
        return {"clustered": True, "nodes": cluster.nodes()}

    def health(self):
        engine = self.engine
        checks = {"database": engine.store.healthy}
        checks.update(engine.threads_alive())
        checks["scheduler_lag"] = engine.scheduler.on_time()
        if engine.cluster:
            checks["node_lease"] = engine.cluster.lease_ok()
            checks["clock"] = engine.cluster.clock_ok()
        ok = all(checks.values()) and not self.closing.is_set()
        return _json(
            {
                "status": "ok" if ok else "unhealthy",
                "checks": checks,
                "version": __version__,
            },
            200 if ok else 503,
        )

    def status(self):
        engine = self.engine
        counts = engine.runner.counts()
        jobs = engine.scheduler.jobs()
        return {
            "version": __version__,
            "started_at": iso_utc(engine.started_at),
            "uptime": round(time.time() - engine.started_at, 3),
            "counts": {
                "jobs": len(jobs),
                "paused": sum(engine.scheduler.state(j.name)["paused"] for j in jobs),
                "running": counts["running"],
                "queued": counts["queued"],
                "failed_24h": engine.store.count_failed(time.time() - 86400),
            },
            "jobs_file": engine.jobs_file.status() if engine.jobs_file else None,
            "scheduler": {
                "lag": round(engine.scheduler.lag, 6),
                "last_tick": iso_utc(engine.scheduler.last_tick),
            },
            "streams": self._streams,
            "system": _system_summary(engine.store.data_dir()),
        }

    def list_jobs(self):
        query = bottle.request.query
        tag, text, status = (
            query.get("tag"),
            query.get("q", "").lower(),
            query.get("status"),
        )
        if status is not None and status not in (*RUN_STATUSES, "paused"):
            raise InvalidError(
                "status: must be one of " + ", ".join((*RUN_STATUSES, "paused")),
                "status",
            )
        limit = self.int_param("job_limit")
        offset = self.int_param("offset")
        running = self._running()
        items = []
        # Built as text: each job's definition JSON is cached on the Job, so a
        # long list costs little more than its changing state.
        for job in self.engine.scheduler.jobs():
            if tag and tag not in job.tags:
                continue
            if text and not any(
                text in str(v).lower()
                for v in (job.name, job.description, job.command or job.url or job.call)
            ):
                continue
            state = self._state(job, running)
            last = self.engine.last_run(job.name)
            if status == "paused" and not state["paused"]:
                continue
            if status == "running" and not state["running"]:
                continue
            if status not in (None, "paused", "running") and (
                not last or last[1]["status"] != status
            ):
                continue
            # ISO times need no JSON escaping.
            next_run = f'"{state["next_run_at"]}"' if state["next_run_at"] else "null"
            paused = "true" if state["paused"] else "false"
            items.append(
                f"{job.masked_json()}, {job.static_json()}, "
                f'"paused": {paused}, "next_run_at": {next_run}, '
                f'"running": {state["running"]}, '
                f'"last_run": {last[2] if last else "null"}}}'
            )
        page = ",".join(items[offset : offset + limit])
        response = bottle.HTTPResponse(f'{{"jobs": [{page}], "total": {len(items)}}}')
        response.content_type = "application/json"
        return response

    def create_job(self):
        definition = self.body()
        if not isinstance(definition, dict):
            raise InvalidError("the body must be a job object")
        return self.save(definition, create=True)

    def get_job(self, name):
        return self.job_json(self.job_or_404(name))

    def put_job(self, name):
        job = self.job_or_404(name)
        self.editable(job)
        definition = self.body()
        if not isinstance(definition, dict):
            raise InvalidError("the body must be a job object")
        if definition.setdefault("name", name) != name:
            raise InvalidError(
                "name: cannot be changed (delete and create instead)", "name"
            )
        return self.save(definition)

    def patch_job(self, name):
        job = self.job_or_404(name)
        self.editable(job)
        changes = self.body()
        if not isinstance(changes, dict):
            raise InvalidError("the body must be an object of fields to change")
        if changes.get("name", name) != name:
            raise InvalidError(
                "name: cannot be changed (delete and create instead)", "name"
            )
        definition = dict(job.definition)
        for key, value in changes.items():
            if value is None and key != "name":
                definition.pop(key, None)  # null resets a field to its default
            else:
                definition[key] = value
        return self.save(definition)

    def delete_job(self, name):
        job = self.job_or_404(name)
        self.editable(job)
        self.engine.scheduler.remove_job(
            name, purge=self.flag("purge"), force=self.flag("force")
        )
        self.audit("job.delete", name, detail={"purge": self.flag("purge")})
        return {"deleted": name, "purged": self.flag("purge")}

    def run_job(self, name):
        self.job_or_404(name)
        run = self.engine.scheduler.trigger(
            name, force=self.flag("force"), by=self.who()["name"]
        )
        self.audit("job.trigger", name, run["id"], {"force": self.flag("force")})
        self.engine.store.flush()  # so GET /api/runs/{id} finds it at once
        return run

    def stop_job(self, name):
        self.job_or_404(name)
        stopped = self.engine.stop(name)
        self.audit("job.stop", name, detail={"stopped": stopped})
        return {"stopped": stopped}

    def pause_job(self, name):
        self.job_or_404(name)
        self.engine.scheduler.set_paused(name, True)
        self.audit("job.pause", name)
        return self.get_job(name)

    def resume_job(self, name):
        self.job_or_404(name)
        self.engine.scheduler.set_paused(name, False)
        self.audit("job.resume", name)
        return self.get_job(name)

    # -- runs --------------------------------------------------------------------

    def _runs(self, job=None):
        query = bottle.request.query
        status = query.get("status")
        if status is not None and status not in RUN_STATUSES:
            raise InvalidError(
                "status: must be one of " + ", ".join(RUN_STATUSES), "status"
            )
        rows, total = self.engine.store.list_runs(
            job=job,
            status=status,
            node=query.get("node") or None,
            before=self.int_param("before"),
            limit=self.int_param("run_limit"),
            offset=self.int_param("offset"),
        )
        return {"runs": self._with_hooks(rows), "total": total}

    def job_runs(self, name):
        if (
            self.engine.scheduler.get_job(name) is None
            and not self.engine.store.list_runs(job=name, limit=1)[1]
        ):
            raise NotFoundError(f"no job named {name!r}", "name")
        return self._runs(name)

    def list_runs(self):
        return self._runs(bottle.request.query.get("job") or None)

    def get_run(self, id):
        return self._with_hooks([self.run_or_404(id)])[0]

    def _with_hooks(self, rows) -> list:
        """Public runs, each with the deliveries of its hooks and alerts."""
        hooks = self.engine.store.deliveries_for([r["id"] for r in rows])
        return [dict(run_public(r), hooks=hooks.get(r["id"], [])) for r in rows]

    def stop_run(self, id):
        row = self.run_or_404(id)
        cluster = self.engine.cluster
        if not self.engine.runner.stop_run(row["id"]) and not (
            cluster and cluster.stop_remote(self.engine.store.get_run(row["id"]) or row)
        ):
            raise ConflictError(
                f"run {row['id']} is not active (it is {row['status']})", "id"
            )
        self.audit("run.stop", row["job"], row["id"])
        return {"stopped": 1}

    def run_log(self, id):
        row = self.run_or_404(id)
        fmt = bottle.request.query.get("format", "text")
        if fmt not in ("text", "json"):
            raise InvalidError("format: must be text or json", "format")
        chunks = self.engine.store.get_chunks(row["id"])
        if fmt == "json":
            for chunk in chunks:
                chunk["ts"] = iso_utc(chunk["ts"])
            return {"chunks": chunks}
        response = bottle.HTTPResponse("".join(c["text"] for c in chunks))
        response.content_type = "text/plain; charset=utf-8"
        response.set_header(
            "Content-Disposition", f'inline; filename="run-{row["id"]}.log"'
        )
        return response

    # -- server-sent events -------------------------------------------------------

    def _open_stream(self):
        with self._lock:
            if self._streams >= self.config.max_streams:
                raise UnavailableError(
                    f"too many live streams (--max-streams "
                    f"{self.config.max_streams}); try again later",
                )
            self._streams += 1
        bottle.response.content_type = "text/event-stream"
        bottle.response.set_header("Cache-Control", "no-cache")
        bottle.response.set_header("X-Accel-Buffering", "no")

    def _close_stream(self, sub):
        sub.close()
        with self._lock:
            self._streams -= 1

    def run_stream(self, id):
        row = self.run_or_404(id)
        run_id = row["id"]
        header = (
            bottle.request.get_header("Last-Event-ID")
            or bottle.request.query.get("last_event_id")
            or "0"
        )
        try:
            last_seq = _parse_int(header)
            if last_seq is None or not 0 <= last_seq <= MAX_INT:
                raise ValueError(header)
        except ValueError:
            raise InvalidError(
                "Last-Event-ID: must be an integer", "Last-Event-ID"
            ) from None
        self._open_stream()
        bus, store = self.engine.bus, self.engine.store

        def wanted(kind, data):
            return (
                (kind == "log" and data["run_id"] == run_id)
                or (kind == "run" and data["id"] == run_id)
                or kind == "shutdown"
            )

        sub = bus.subscribe(maxsize=2000, filter_fn=wanted)
        signed_out, wait = self._signed_out(), self._wait()

        def replay():
            """The stored output after ``last_seq``, in writes of ~64 KiB
            rather than one per chunk (100 clients replaying at once)."""
            nonlocal last_seq
            parts, size = [], 0
            for chunk in store.get_chunks(run_id, last_seq):
                last_seq = chunk["seq"]
                parts.append(
                    _sse("log", dict(chunk, ts=iso_utc(chunk["ts"])), last_seq)
                )
                size += len(parts[-1])
                if size >= READ_SIZE:
                    yield "".join(parts)
                    parts, size = [], 0
            if parts:
                yield "".join(parts)

        def stream():
            nonlocal sub, last_seq
            try:
                yield f"retry: 2000\n: stream of run {run_id}\n\n"
                while True:
                    # Replay what is stored, then follow live.  For an active run,
                    # flush first so nothing published before we subscribed is
                    # missing; a finished run's output is all committed already.
                    current = store.get_run(run_id)
                    if current is not None and current["status"] in ACTIVE_STATUSES:
                        store.flush()
                        current = store.get_run(run_id)
                    yield from replay()
                    if current is None:
                        yield _sse("end", None)
                        return
                    yield _sse("status", run_public(current))
                    if current["status"] not in ACTIVE_STATUSES:
                        yield _sse("end", run_public(current))
                        return
                    while not sub.lagged:
                        if signed_out():
                            yield _sse("end", {"reason": "signed out"})
                            return
                        item = sub.get(wait)
                        if item is None:
                            yield ": heartbeat\n\n"
                            continue
                        kind, data = item
                        if kind == "shutdown":
                            yield "retry: 5000\n" + _sse("end", {"reason": "shutdown"})
                            return
                        if kind == "log":
                            if data["seq"] > last_seq:
                                last_seq = data["seq"]
                                chunk = {k: data[k] for k in ("seq", "stream", "text")}
                                chunk["ts"] = iso_utc(data["ts"])
                                yield _sse("log", chunk, last_seq)
                            continue
                        yield _sse("status", data)
                        if data["status"] not in ACTIVE_STATUSES:
                            store.flush()
                            final = store.get_run(run_id)
                            # Output published while we were away is stored now.
                            yield from replay()
                            yield _sse("end", run_public(final) if final else data)
                            return
                    # Lagged: resubscribe and resume from the database.
                    sub.close()
                    sub = bus.subscribe(maxsize=2000, filter_fn=wanted)
            finally:
                self._close_stream(sub)

        return stream()

    def events(self):
        self._open_stream()
        sub = self.engine.bus.subscribe(
            maxsize=5000,
            filter_fn=lambda kind, _data: kind in ("run", "job", "shutdown"),
        )

        signed_out, wait = self._signed_out(), self._wait()

        def stream():
            try:
                yield "retry: 2000\n: minisched events\n\n"
                while True:
                    if sub.lagged:
                        yield _sse(
                            "reconnect", {"reason": "too slow; reload the state"}
                        )
                        return
                    if signed_out():
                        yield _sse("end", {"reason": "signed out"})
                        return
                    item = sub.get(wait)
                    if item is None:
                        yield ": heartbeat\n\n"
                    elif item[0] == "shutdown":
                        yield "retry: 5000\n" + _sse("end", {"reason": "shutdown"})
                        return
                    else:
                        yield _sse(*item)
            finally:
                self._close_stream(sub)

        return stream()

    # -- batch, validation, preview, import/export ----------------------------

    def batch(self):
        body = self.body()
        actions = BATCH_ACTIONS
        if not isinstance(body, dict):
            raise InvalidError('the body must be {"action": ..., "jobs": [...]}')
        action, names = body.get("action"), body.get("jobs")
        if action not in actions:
            raise InvalidError("action: must be one of " + ", ".join(actions), "action")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidError("jobs: must be a list of job names", "jobs")
        if action == "delete":
            self.require("admin")
        handlers = {
            "run": self.run_job,
            "stop": self.stop_job,
            "pause": self.pause_job,
            "resume": self.resume_job,
            "delete": self.delete_job,
        }
        results = []
        for name in names:
            try:
                out = handlers[action](name)
            except MinischedError as exc:
                results.append({"job": name, "ok": False, "error": exc.message})
                continue
            item = {"job": name, "ok": True}
            if action == "run":
                item["run"] = out
            results.append(item)
        self.audit(
            "batch",
            detail={
                "action": action,
                "jobs": names,
                "failed": [r["job"] for r in results if not r["ok"]],
            },
        )
        return {"results": results}

    def validate(self):
        body = self.body()
        if body is None:
            raise InvalidError(
                "the body must be a job or a jobs document (it is empty)"
            )
        try:
            if isinstance(body, list) or (isinstance(body, dict) and "jobs" in body):
                parse_jobs_document(body, self.engine.tz)
            else:
                self.engine.scheduler.check_after(validate_job(body, self.engine.tz))
        except InvalidError as exc:
            return {"valid": False, "errors": exc.errors}
        return {"valid": True, "errors": []}

    def job_stats(self, name):
        if (
            self.engine.scheduler.get_job(name) is None
            and not self.engine.store.list_runs(job=name, limit=1)[1]
        ):
            raise NotFoundError(f"no job named {name!r}", "name")
        return self._stats(name)

    def all_stats(self):
        return self._stats(None, self.flag("by_job"))

    def _stats(self, job, by_job=False):
        days = self.int_param("days")
        since = time.time() - days * 86400
        raw = self.engine.store.stats(since, job, by_job)
        out = {"job": job, "days": days, "since": iso_utc(since)}
        counts = raw["by_status"]
        out["runs"] = raw["runs"]
        out["by_status"] = {
            status: counts.get(status, 0)
            for status in RUN_STATUSES
            if status not in ACTIVE_STATUSES
        }
        out["success_rate"] = _rate(
            counts.get("succeeded", 0), sum(counts.get(s, 0) for s in FAILURE_STATUSES)
        )
        out["duration"] = raw["duration"]
        out["mean_cpu"] = None if raw["mean_cpu"] is None else round(raw["mean_cpu"], 3)
        out["peak_rss"] = raw["peak_rss"]
        out["last_success"] = iso_utc(raw["last_success"])
        out["last_failure"] = iso_utc(raw["last_failure"])
        out["longest_failure_streak"] = raw["longest_failure_streak"]
        first = math.floor(since / 86400)
        out["per_day"] = [
            dict(
                {s: raw["per_day"].get(day, {}).get(s, 0) for s in out["by_status"]},
                day=time.strftime("%Y-%m-%d", time.gmtime(day * 86400)),
            )
            for day in range(first, math.floor(time.time() / 86400) + 1)
        ]
        if by_job:
            out["jobs"] = {
                name: dict(c, success_rate=_rate(c["succeeded"], c["failures"]))
                for name, c in sorted(raw["jobs"].items())
            }
        return out

    def upcoming(self):
        hours = self.int_param("hours")
        fires, truncated = self.engine.scheduler.upcoming(time.time() + hours * 3600)
        return {
            "hours": hours,
            "fires": [
                {
                    "job": job.name,
                    "at": iso_utc(t),
                    "local": iso_local(t, job.tz),
                    "timezone": _zone_name(job.tz),
                }
                for t, job in fires
            ],
            "truncated": truncated,
        }

    def cron_next(self):
        query = bottle.request.query
        expr = query.get("expr")
        if not expr:
            raise InvalidError(
                "expr: required (a schedule such as */5 * * * *)", "expr"
            )
        tz = (
            get_zone(query.get("timezone")) if query.get("timezone") else self.engine.tz
        )
        n = self.int_param("n")
        after, anchor = time.time(), None
        for name in ("after", "anchor"):
            if query.get(name):
                try:
                    value = parse_iso(query[name], tz)
                except InvalidError as exc:
                    raise InvalidError(f"{name}: {exc.message}", name) from None
                after, anchor = (value, anchor) if name == "after" else (after, value)
        schedule = Schedule(expr, tz)
        try:
            times = next_fire_times(expr, n, tz, after, anchor)
        except (OverflowError, ValueError):
            raise InvalidError("after: too far in the future", "after") from None
        return {
            "times": [{"local": iso_local(t, tz), "utc": iso_utc(t)} for t in times],
            "description": schedule.describe(),
        }

    def export(self):
        fmt = bottle.request.query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidError("format: must be json or csv", "format")
        mask = not self.secrets_visible()
        jobs = [
            job.public(mask_env=mask)
            for job in self.engine.scheduler.jobs()
            if job.source == "api"
        ]
        if fmt == "json":
            response = _json({"defaults": {}, "jobs": jobs})
        else:
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(CSV_FIELDS)
            for definition in jobs:
                writer.writerow(
                    [
                        _csv_cell(key, definition.get(key)) if key in definition else ""
                        for key in CSV_FIELDS
                    ]
                )
            response = bottle.HTTPResponse(out.getvalue())
            response.content_type = "text/csv; charset=utf-8"
        response.set_header(
            "Content-Disposition", f'attachment; filename="minisched-jobs.{fmt}"'
        )
        return response

    def import_jobs(self):
        ctype = (bottle.request.content_type or "").split(";")[0].strip().lower()
        if ctype == "text/csv" or bottle.request.query.get("format") == "csv":
            try:
                raw = bottle.request.body.read(MAX_BODY + 1).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidError("the CSV body is not UTF-8 text") from None
            doc = {"jobs": _parse_csv_jobs(raw)}
        else:
            doc = self.body()
            if doc is None:
                raise InvalidError("the body must be a jobs document (it is empty)")
        definitions = parse_jobs_document(doc, self.engine.tz)
        sched = self.engine.scheduler
        report = {
            "created": [],
            "updated": [],
            "unchanged": [],
            "dry_run": self.flag("dry_run"),
        }
        for definition in definitions:
            current = sched.get_job(definition["name"])
            if current is not None:
                self.editable(current)
            key = (
                "created"
                if current is None
                else "unchanged"
                if current.definition == definition
                else "updated"
            )
            report[key].append(definition["name"])
        if not report["dry_run"]:
            for definition in dependency_order(definitions):
                if definition["name"] not in report["unchanged"]:
                    sched.put_job(definition, "api")
            self.audit(
                "import",
                detail={k: report[k] for k in ("created", "updated", "unchanged")},
            )
        return report

    # -- system, metrics, login, openapi -------------------------------------------

    def system(self):
        return _system_details(self.engine.store.data_dir())

    def processes(self):
        sort = bottle.request.query.get("sort") or "cpu"
        if sort not in ("cpu", "mem"):
            raise InvalidError("sort: must be cpu or mem", "sort")
        runs = {}  # pid -> run, for every process of every running run
        for run in self.engine.runner.active_runs():
            if run.pid:
                for pid in _tree_pids(run.pid):
                    runs[pid] = {"id": run.id, "job": run.job.name}
        rows = self._sampler.sample()
        key = "cpu_percent" if sort == "cpu" else "rss"
        rows.sort(key=lambda row: row[key] or 0, reverse=True)
        limit = self.int_param("proc_limit")
        for row in rows[:limit]:
            row["run"] = runs.get(row["pid"])
        return {"sort": sort, "total": len(rows), "processes": rows[:limit]}

    def metrics(self):
        engine = self.engine
        snap = engine.metrics.snapshot()
        counts = engine.runner.counts()
        up = all(engine.threads_alive().values()) and engine.store.healthy

        def family(name, kind, text):
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

        def job_label(job):
            return f'job="{_prom_label(job)}"'

        # Each node of a cluster counts the runs it ran: their metrics carry
        # the node's name (a lone server's carry none).
        node = f'node="{_prom_label(engine.cluster.name)}"' if engine.cluster else ""

        def run_labels(job, extra=""):
            return ",".join(filter(None, (job_label(job), extra, node)))

        lines = family(
            "minisched_up",
            "gauge",
            "1 while every engine thread and the database are healthy.",
        )
        lines.append(f"minisched_up {int(up)}")
        lines += family("minisched_jobs", "gauge", "Jobs defined.")
        lines.append(f"minisched_jobs {len(engine.scheduler.jobs())}")
        lines += family(
            "minisched_runs_total",
            "counter",
            "Runs ended since the server started, by job and status.",
        )
        for (job, status), count in sorted(snap["runs"].items()):
            labels = run_labels(job, f'status="{status}"')
            lines.append(f"minisched_runs_total{{{labels}}} {count}")
        lines += family(
            "minisched_run_duration_seconds", "histogram", "Duration of ended runs."
        )
        for job, buckets in sorted(snap["durations"].items()):
            lines += prometheus_histogram(
                "minisched_run_duration_seconds",
                run_labels(job),
                buckets,
                DURATION_BUCKETS,
            )
        lines += family(
            "minisched_job_last_success_timestamp_seconds",
            "gauge",
            "When each job last succeeded (Unix time).",
        )
        for job, at in sorted(snap["last_success"].items()):
            lines.append(
                f"minisched_job_last_success_timestamp_seconds{{{job_label(job)}}} {at:.3f}"
            )
        lines += family(
            "minisched_schedule_lag_seconds",
            "histogram",
            "How late scheduled runs started after their slot.",
        )
        lines += prometheus_histogram(
            "minisched_schedule_lag_seconds", "", snap["lag"], LAG_BUCKETS
        )
        lines += family(
            "minisched_output_bytes_total",
            "counter",
            "Bytes of output runs printed, by job.",
        )
        for job, size in sorted(snap["output"].items()):
            lines.append(f"minisched_output_bytes_total{{{run_labels(job)}}} {size}")
        lines += family(
            "minisched_hook_deliveries_total",
            "counter",
            "Hook and alert deliveries ended, by job and result.",
        )
        for (job, result), count in sorted(snap["deliveries"].items()):
            lines.append(
                f'minisched_hook_deliveries_total{{{job_label(job)},result="{result}"}} {count}'
            )
        lines += family("minisched_running", "gauge", "Runs running now.")
        here = f"{{{node}}}" if node else ""  # this node's runs, as above
        lines.append(f"minisched_running{here} {counts['running']}")
        lines += family(
            "minisched_queued", "gauge", "Runs waiting to start (the queue)."
        )
        lines.append(f"minisched_queued{here} {counts['queued']}")
        lines += family(
            "minisched_scheduler_lag_seconds",
            "gauge",
            "How late the scheduler handled its last slots.",
        )
        lines.append(f"minisched_scheduler_lag_seconds {engine.scheduler.lag:.6f}")
        response = bottle.HTTPResponse("\n".join(lines) + "\n")
        response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return response

    def login(self):
        if not self.access.required():
            return {"ok": True, "token_required": False, **ANONYMOUS}
        client = bottle.request.remote_addr or ""
        now = time.monotonic()
        with self._lock:
            if len(self._logins) > 1000:  # forget addresses quiet for a minute
                self._logins = {
                    k: v for k, v in self._logins.items() if v and now - v[-1] < 60
                }
            recent = [t for t in self._logins.get(client, []) if now - t < 60]
            self._logins[client] = recent
            if len(recent) >= LOGIN_ATTEMPTS:
                raise TooManyRequestsError("too many failed logins; wait a minute")
        body = self.body()
        token = body.get("token") if isinstance(body, dict) else None
        who = self.access.identify(token) if isinstance(token, str) else None
        if who is None:
            with self._lock:
                self._logins[client].append(now)
            self.audit("login.failed", detail={"reason": "wrong token"}, who="-")
            raise UnauthorizedError(
                "wrong token (or it expired, or was revoked)", "token"
            )
        cookie = secrets.token_urlsafe(32)
        created = time.time()
        store = self.engine.store
        store.result(
            store.add_session(
                {
                    "id": _secret_hash(cookie),
                    "token_name": who["name"],
                    "token_check": self.access.session_check(who),
                    "address": client,
                    "created_at": created,
                    "last_seen": created,
                    "expires_at": created + SESSION_MAX_AGE,
                }
            )
        )
        self.audit("login", who=who["name"])
        bottle.response.set_cookie(
            SESSION_COOKIE,
            cookie,
            httponly=True,
            samesite="strict",
            path="/",
            max_age=SESSION_MAX_AGE,
        )
        return {"ok": True, "token_required": True, **who}

    def logout(self):
        """End the request's session (on the server, not only the cookie)."""
        cookie = bottle.request.get_cookie(SESSION_COOKIE)
        if cookie:
            store = self.engine.store
            store.result(store.delete_sessions(_secret_hash(cookie)))
            if bottle.request.environ.get("minisched.who"):
                self.audit("logout")
        bottle.response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    def me(self):
        """Who the request is: what the page shows and hides by."""
        return dict(self.who(), token_required=self.access.required())

    # -- tokens, audit, settings (admins) ------------------------------------------

    def list_tokens(self):
        return {"tokens": self.access.tokens()}

    def add_token(self):
        secret, row = self.access.add(self.body(), by=self.who()["name"])
        self.audit(
            "token.add",
            detail={
                "name": row["name"],
                "role": row["role"],
                "expires_at": row["expires_at"],
            },
        )
        return dict(row, token=secret)

    def change_token(self, name):
        if self.engine.store.get_token(name=name) is None:
            raise NotFoundError(f"no token named {name!r}", "name")
        body = self.body()
        if not isinstance(body, dict) or set(body) != {"role"}:
            raise InvalidError('the body must be {"role": ...}', "role")
        row = self.access.set_role(name, body["role"])
        self.audit("token.role", detail={"name": name, "role": row["role"]})
        return row

    def delete_token(self, name):
        self.access.revoke(name)
        self.audit("token.revoke", detail={"name": name})
        return {"revoked": name}

    def audit_log(self):
        query = bottle.request.query
        entries = self.access.entries(
            job=query.get("job") or None,
            who=query.get("who") or None,
            limit=self.int_param("audit_limit"),
            before=self.int_param("audit_before"),
        )
        return {"entries": entries}

    def settings(self):
        """The effective configuration and where each value came from."""
        engine = self.engine
        return {
            "settings": engine.config.effective(),
            "jobs_file": engine.jobs_file.status() if engine.jobs_file else None,
            "database": {
                "url": _redacted(engine.config.db),
                "kind": "postgresql" if engine.store.clustered else "sqlite",
            },
            "version": __version__,
        }

    def openapi(self):
        return openapi_document()

    def docs(self):
        response = bottle.HTTPResponse(api_docs_html(openapi_document()))
        response.content_type = "text/html; charset=utf-8"
        return response


def _csv_cell(key, value) -> str:
    if FIELDS_BY_NAME[key].csv_text and isinstance(value, str):
        return value
    return json.dumps(value)


def _parse_csv_jobs(text) -> list:
    """CSV (as ``/api/export?format=csv`` writes it) -> job objects."""
    csv.field_size_limit(MAX_BODY)
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as exc:
        raise InvalidError(f"invalid CSV: {exc}") from None
    unknown = [h for h in header if h not in CSV_FIELDS]
    if "name" not in header or unknown:
        raise InvalidError(
            "invalid CSV: the first line must name its columns, among: "
            + ", ".join(CSV_FIELDS)
            + (f" (unknown: {unknown[0]!r})" if unknown else " (name is required)")
        )
    jobs = []
    for i, row in enumerate(rows):
        job = {}
        for key, cell in row.items():
            if key is None or cell in (None, ""):
                continue
            if key == "command" and cell.startswith("["):
                try:  # an argv list; else a shell command such as "[ -d x ] && ..."
                    job[key] = json.loads(cell)
                    continue
                except ValueError:
                    pass
            if FIELDS_BY_NAME[key].csv_text:
                job[key] = cell
                continue
            try:
                job[key] = json.loads(cell)
            except ValueError:
                raise InvalidError(
                    f"jobs[{i}].{key}: invalid value {cell!r}", f"jobs[{i}].{key}"
                ) from None
        jobs.append(job)
    return jobs


class _ProcessTable:
    """The host's processes with CPU use since the previous call (psutil keeps
    per-process state for that); the first call measures over 0.2 s.  Request
    threads; one lock, held for the sample."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs = {}  # pid -> psutil.Process, kept between calls
        self._last = 0.0

    def sample(self) -> list:
        with self._lock:
            seen = {}
            for proc in psutil.process_iter():
                seen[proc.pid] = self._procs.get(proc.pid, proc)
            self._procs = seen
            if time.monotonic() - self._last > 60:  # nothing to compare with
                for proc in seen.values():
                    with contextlib.suppress(psutil.Error):
                        proc.cpu_percent(None)
                time.sleep(0.2)
            self._last = time.monotonic()
            total = psutil.virtual_memory().total
            rows = []
            for proc in seen.values():
                try:
                    with proc.oneshot():
                        rss = proc.memory_info().rss
                        rows.append(
                            {
                                "pid": proc.pid,
                                "name": proc.name(),
                                "user": _safe(proc.username),
                                "cpu_percent": round(proc.cpu_percent(None), 1),
                                "rss": rss,
                                "memory_percent": round(rss * 100 / total, 2),
                                "command": " ".join(_safe(proc.cmdline) or [])[:300],
                            }
                        )
                except psutil.Error:
                    continue
            return rows


def _safe(method):
    try:
        return method()
    except psutil.Error:
        return None


def _system_summary(data_dir) -> dict:
    """The host at a glance; ``disk_percent`` is of the disk holding
    ``data_dir`` (None without one)."""
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage(data_dir) if data_dir else None
    return {
        "cpu_percent": psutil.cpu_percent(None),
        "load": list(os.getloadavg()),
        "memory_percent": vm.percent,
        "disk_percent": disk.percent if disk else None,
    }


def _system_details(data_dir) -> dict:
    me = psutil.Process()
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage(data_dir) if data_dir else None
    try:
        fds = me.num_fds()
    except (AttributeError, psutil.Error):
        fds = None
    return {
        "host": {
            "cpu_count": psutil.cpu_count(),
            "cpu_percent": psutil.cpu_percent(None),
            "load": list(os.getloadavg()),
            "memory": {
                "total": vm.total,
                "available": vm.available,
                "percent": vm.percent,
            },
            "disk": disk
            and {
                "path": data_dir,
                "total": disk.total,
                "free": disk.free,
                "percent": disk.percent,
            },
            "boot_time": iso_utc(psutil.boot_time()),
        },
        "server": {
            "pid": me.pid,
            "rss": me.memory_info().rss,
            "threads": me.num_threads(),
            "fds": fds,
            "cpu_times": me.cpu_times().user + me.cpu_times().system,
        },
    }


def _nullable(schema: dict) -> dict:
    return dict(schema, nullable=True)


_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_TIME = _nullable({"type": "string", "format": "date-time"})


def _job_field_schema(name: str) -> dict:
    """The OpenAPI schema of one job field, from its row of :data:`JOB_FIELDS`."""
    field = FIELDS_BY_NAME[name]
    if field.limits is not None:
        low, high, integer = field.limits
        schema = {"type": "integer" if integer else "number", "minimum": low}
        if high is not None:
            schema["maximum"] = high
    elif field.choices is not None:
        schema = {"type": "string", "enum": list(field.choices)}
    else:
        schema = dict(field.schema)
    if field.default is None:
        schema["nullable"] = True
    else:
        schema["default"] = field.default
    return schema


def _object(properties: dict, required=(), extra=False) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": extra,
    }


def _schemas() -> dict:
    """The components of ``/api/openapi.json``: every body and response."""
    fields = {name: _job_field_schema(name) for name in JOB_DEFAULTS}
    name = {"type": "string", "pattern": "^" + _NAME_RE.pattern + "$"}
    definition = _object(dict(name=name, **fields), ["name"])
    # Which fields each kind needs (validate_job checks the same).
    definition["anyOf"] = [
        {"required": ["command"], "properties": {"kind": {"enum": ["command"]}}},
        {"required": ["kind", "url"], "properties": {"kind": {"enum": ["http"]}}},
        {"required": ["kind", "call"], "properties": {"kind": {"enum": ["python"]}}},
    ]
    run_types = {
        "id": {"type": "integer"},
        "job": _STR,
        "status": {"type": "string", "enum": list(RUN_STATUSES)},
        "trigger": {"type": "string", "enum": list(TRIGGERS)},
        "attempt": {"type": "integer", "minimum": 1},
        "scheduled_at": _TIME,
        "started_at": _TIME,
        "finished_at": _TIME,
        "duration": _nullable({"type": "number"}),
        "exit_code": _nullable({"type": "integer"}),
        "signal": _nullable({"type": "integer"}),
        "error": _nullable(_STR),
        "pid": _nullable({"type": "integer"}),
        "cpu_time": _nullable({"type": "number"}),
        "peak_rss": _nullable({"type": "integer"}),
        "output_bytes": {"type": "integer"},
        "output_truncated": {"type": "boolean"},
        "leftovers_stopped": _nullable({"type": "integer"}),
        "node": _nullable(_STR),
        "triggered_by": _nullable(_STR),
    }
    run = _object(run_types, run_types)
    role = {"type": "string", "enum": list(ROLES)}
    token_types = {
        "name": _STR,
        "role": role,
        "created_at": _TIME,
        "created_by": _nullable(_STR),
        "last_used": _TIME,
        "expires_at": _TIME,
    }
    token = _object(token_types, token_types)
    delivery = _object(
        {
            "event": _STR,
            "target": _STR,
            "status": {"type": "string", "enum": ["ok", "failed", "pending"]},
            "attempts": {"type": "integer"},
            "error": _nullable(_STR),
            "at": _TIME,
        },
        ["event", "target", "status", "attempts", "error", "at"],
    )
    run["properties"]["hooks"] = {"type": "array", "items": delivery}
    state = {
        "source": {"type": "string", "enum": ["api", "file"]},
        "schedule_description": _STR,
        "created_at": _TIME,
        "paused": {"type": "boolean"},
        "next_run_at": _TIME,
        "running": {"type": "integer", "minimum": 0},
        "last_run": {"allOf": [{"$ref": "#/components/schemas/Run"}], "nullable": True},
    }
    job = _object(dict(name=name, **fields, **state), ["name", *state])
    ref = {k: {"$ref": f"#/components/schemas/{k}"} for k in ("Job", "Run")}
    document = {
        "oneOf": [
            _object(
                {
                    "defaults": {"type": "object"},
                    "jobs": {"type": "array", "items": {"type": "object"}},
                }
            ),
            {"type": "array", "items": {"type": "object"}},
        ]
    }
    problem = _object({"field": _nullable(_STR), "error": _STR}, ["field", "error"])
    counts = {
        k: {"type": "integer"}
        for k in ("jobs", "paused", "running", "queued", "failed_24h")
    }
    number = {"type": "number"}
    return {
        "Error": problem,
        "Hook": _object(
            {
                "url": {"type": "string", "format": "uri"},
                "method": {"type": "string", "enum": list(_HTTP_METHODS)},
                "headers": _STR_MAP,
                "command": _job_field_schema("command"),
            }
        ),
        "JobDefinition": definition,
        "JobChanges": _object(dict(name=name, **fields)),
        "Job": job,
        "JobList": _object(
            {
                "jobs": {"type": "array", "items": ref["Job"]},
                "total": {"type": "integer"},
            },
            ["jobs", "total"],
        ),
        "Run": run,
        "RunList": _object(
            {
                "runs": {"type": "array", "items": ref["Run"]},
                "total": {"type": "integer"},
            },
            ["runs", "total"],
        ),
        "Chunks": _object(
            {
                "chunks": {
                    "type": "array",
                    "items": _object(
                        {
                            "seq": {"type": "integer"},
                            "stream": {
                                "type": "string",
                                "enum": ["stdout", "stderr", "system"],
                            },
                            "ts": _TIME,
                            "text": _STR,
                        },
                        ["seq", "stream", "ts", "text"],
                    ),
                }
            },
            ["chunks"],
        ),
        "Deleted": _object(
            {"deleted": _STR, "purged": {"type": "boolean"}}, ["deleted", "purged"]
        ),
        "Stopped": _object({"stopped": {"type": "integer"}}, ["stopped"]),
        "Batch": _object(
            {
                "action": {"type": "string", "enum": list(BATCH_ACTIONS)},
                "jobs": _STRINGS,
            },
            ["action", "jobs"],
        ),
        "BatchResults": _object(
            {
                "results": {
                    "type": "array",
                    "items": _object(
                        {
                            "job": _STR,
                            "ok": {"type": "boolean"},
                            "error": _STR,
                            "run": ref["Run"],
                        },
                        ["job", "ok"],
                    ),
                }
            },
            ["results"],
        ),
        "JobOrDocument": {"oneOf": [definition, *document["oneOf"]]},
        "JobsDocument": document,
        "Validation": _object(
            {
                "valid": {"type": "boolean"},
                "errors": {"type": "array", "items": problem},
            },
            ["valid", "errors"],
        ),
        "ImportReport": _object(
            {
                "created": _STRINGS,
                "updated": _STRINGS,
                "unchanged": _STRINGS,
                "dry_run": {"type": "boolean"},
            },
            ["created", "updated", "unchanged", "dry_run"],
        ),
        "FireTimes": _object(
            {
                "times": {
                    "type": "array",
                    "items": _object({"local": _STR, "utc": _STR}, ["local", "utc"]),
                },
                "description": _STR,
            },
            ["times", "description"],
        ),
        "Meta": _object(
            {
                "statuses": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": _STR,
                            "terminal": {"type": "boolean"},
                            "failure": {"type": "boolean"},
                            "kept_apart": {"type": "boolean"},
                            "colour": _STR,
                            "meaning": _STR,
                        },
                        ["name", "terminal", "failure", "kept_apart", "colour"],
                    ),
                },
                "fields": {
                    "type": "array",
                    "items": _object({"name": _STR}, ["name"], extra=True),
                },
                "triggers": {"type": "array", "items": _STR},
            },
            ["statuses", "fields", "triggers"],
        ),
        "Nodes": _object(
            {
                "clustered": {"type": "boolean"},
                "nodes": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": _STR,
                            "tags": {"type": "array", "items": _STR},
                            "version": _STR,
                            "heartbeat_age": {"type": "number"},
                            "running": {"type": "integer"},
                            "alive": {"type": "boolean"},
                            "self": {"type": "boolean"},
                        },
                        ["name", "alive"],
                        extra=True,
                    ),
                },
            },
            ["clustered", "nodes"],
        ),
        "Health": _object(
            {
                "status": {"type": "string", "enum": ["ok", "unhealthy"]},
                "checks": {
                    "type": "object",
                    "additionalProperties": {"type": "boolean"},
                },
                "version": _STR,
            },
            ["status", "checks", "version"],
        ),
        "Status": _object(
            {
                "version": _STR,
                "started_at": _TIME,
                "uptime": number,
                "counts": _object(counts, counts),
                "jobs_file": _nullable(
                    _object(
                        {
                            "path": _STR,
                            "loaded_at": _TIME,
                            "error": _nullable(_STR),
                            "conflicts": {
                                "type": "array",
                                "items": _object(
                                    {"job": _STR, "owner": _STR, "problem": _STR},
                                    ["job", "owner", "problem"],
                                ),
                            },
                        },
                        ["path", "loaded_at", "error", "conflicts"],
                        extra=True,
                    )
                ),
                "scheduler": _object(
                    {"lag": number, "last_tick": _TIME}, ["lag", "last_tick"]
                ),
                "streams": {"type": "integer"},
                "system": {"type": "object"},
            },
            ["version", "started_at", "uptime", "counts", "jobs_file", "scheduler"],
            extra=True,
        ),
        "System": _object(
            {"host": {"type": "object"}, "server": {"type": "object"}},
            ["host", "server"],
            extra=True,
        ),
        "Login": _object({"token": _STR}, ["token"]),
        "LoginResult": _object(
            {
                "ok": {"type": "boolean"},
                "token_required": {"type": "boolean"},
                "name": _STR,
                "role": role,
            },
            ["ok"],
        ),
        "Me": _object(
            {"name": _STR, "role": role, "token_required": {"type": "boolean"}},
            ["name", "role", "token_required"],
        ),
        "Token": token,
        "NewToken": _object(dict(token_types, token=_STR), [*token_types, "token"]),
        "TokenList": _object({"tokens": {"type": "array", "items": token}}, ["tokens"]),
        "TokenRequest": _object(
            {
                "name": {
                    "type": "string",
                    "pattern": "^" + _TOKEN_NAME_RE.pattern + "$",
                },
                "role": role,
                "expires": _nullable(_STR),
            },
            ["name", "role"],
        ),
        "TokenRole": _object({"role": role}, ["role"]),
        "Revoked": _object({"revoked": _STR}, ["revoked"]),
        "AuditList": _object(
            {
                "entries": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": {"type": "integer"},
                            "at": _TIME,
                            "who": _STR,
                            "address": _nullable(_STR),
                            "action": _STR,
                            "job": _nullable(_STR),
                            "run_id": _nullable({"type": "integer"}),
                            "detail": {"type": "object"},
                        },
                        [
                            "id",
                            "at",
                            "who",
                            "address",
                            "action",
                            "job",
                            "run_id",
                            "detail",
                        ],
                    ),
                }
            },
            ["entries"],
        ),
        "Settings": _object(
            {
                "settings": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": _STR,
                            "flag": _STR,
                            "value": {},
                            "source": {
                                "type": "string",
                                "enum": ["flag", "environment", "file", "default"],
                            },
                        },
                        ["name", "flag", "value", "source"],
                    ),
                },
                "jobs_file": {"type": "object", "nullable": True},
                "database": {"type": "object"},
                "version": _STR,
            },
            ["settings", "jobs_file", "database", "version"],
        ),
        "Object": {"type": "object"},
        "Processes": _object(
            {
                "sort": {"type": "string", "enum": ["cpu", "mem"]},
                "total": {"type": "integer"},
                "processes": {
                    "type": "array",
                    "items": _object(
                        {
                            "pid": {"type": "integer"},
                            "name": _STR,
                            "user": _nullable(_STR),
                            "cpu_percent": {"type": "number"},
                            "rss": {"type": "integer"},
                            "memory_percent": {"type": "number"},
                            "command": _STR,
                            "run": _nullable(
                                _object(
                                    {"id": {"type": "integer"}, "job": _STR},
                                    ["id", "job"],
                                )
                            ),
                        },
                        ["pid", "name", "cpu_percent", "rss", "run"],
                    ),
                },
            },
            ["sort", "total", "processes"],
        ),
        "Stats": _object(
            {
                "job": _nullable(_STR),
                "days": {"type": "integer"},
                "since": _TIME,
                "runs": {"type": "integer"},
                "by_status": {
                    "type": "object",
                    "additionalProperties": {"type": "integer"},
                },
                "success_rate": _nullable({"type": "number"}),
                "duration": _object(
                    {k: _nullable({"type": "number"}) for k in ("p50", "p95", "max")},
                    ["p50", "p95", "max"],
                ),
                "mean_cpu": _nullable({"type": "number"}),
                "peak_rss": _nullable({"type": "integer"}),
                "last_success": _TIME,
                "last_failure": _TIME,
                "longest_failure_streak": {"type": "integer"},
                "per_day": {"type": "array", "items": {"type": "object"}},
                "jobs": {"type": "object"},
            },
            ["job", "days", "runs", "by_status", "success_rate", "duration", "per_day"],
        ),
        "Upcoming": _object(
            {
                "hours": {"type": "integer"},
                "fires": {
                    "type": "array",
                    "items": _object(
                        {"job": _STR, "at": _TIME, "local": _STR, "timezone": _STR},
                        ["job", "at", "local", "timezone"],
                    ),
                },
                "truncated": {"type": "boolean"},
            },
            ["hours", "fires", "truncated"],
        ),
        # One event of a text/event-stream response (OpenAPI 3.0: the schema
        # describes each event); ``data`` is JSON: a chunk, a run or null.
        "ServerSentEvent": _object(
            {
                "event": {
                    "type": "string",
                    "enum": ["log", "status", "end", "reconnect", "run", "job"],
                },
                "data": _STR,
                "id": _STR,
                "retry": {"type": "integer"},
            },
            ["event", "data"],
        ),
    }


def _content(response: str) -> dict:
    """``Name`` -> JSON of that schema; ``text/x`` -> text; ``text/x+Name`` -> both."""
    out = {}
    for part in response.split("+"):
        if part == "text/event-stream":
            out[part] = {"schema": {"$ref": "#/components/schemas/ServerSentEvent"}}
        elif "/" in part:
            out[part] = {"schema": {"type": "string"}}
        else:
            out["application/json"] = {
                "schema": {"$ref": f"#/components/schemas/{part}"}
            }
    return out


_ERROR_TEXT = {
    400: "invalid input (a field, a query parameter, malformed JSON)",
    401: "no token or a wrong one",
    403: "forbidden host, origin or client address, or a role too low",
    404: "no such job or run",
    408: "the request was not received in time",
    409: "conflicts with the current state",
    413: "body larger than 1 MiB",
    415: "body not application/json",
    429: "too many failed logins",
    503: "overloaded, shutting down, or the database cannot be written",
}


def openapi_document() -> dict:
    """OpenAPI 3 description built from :data:`API_ROUTES`, :data:`QUERY_PARAMS`
    and the job field tables: every parameter, body, response and status."""
    paths = {}
    for route in API_ROUTES:
        parameters = [
            {
                "name": p,
                "in": "path",
                "required": True,
                "schema": _int_schema(1) if p == "id" else dict(_STR, minLength=1),
            }
            for p in re.findall(r"{(\w+)}", route.path)
        ]
        for key in route.params:
            name, schema, meaning = QUERY_PARAMS[key]
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": key == "expr",
                    "schema": schema,
                    "description": meaning,
                }
            )
        codes = {403, 503}
        if route.path not in _OPEN_PATHS and route.path != "/":
            codes.add(401)
        if parameters or route.body:
            codes.add(400)
        if "{" in route.path:
            codes.add(404)
        if route.body or route.method in _STATE_CHANGING:
            codes.update((400, 408, 413, 415))
        codes.update(route.errors)
        responses = {
            str(route.ok): {"description": "ok", "content": _content(route.response)}
        }
        for code in sorted(codes):
            schema = "Health" if route.handler == "health" and code == 503 else "Error"
            responses[str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": _content(schema),
            }
        op = {
            "operationId": route.handler,
            "summary": route.summary,
            "description": (
                "No token needed."
                if route.role == "public"
                else f"Needs the {route.role} role."
            ),
            "x-minisched-role": route.role,
            "parameters": parameters,
            "responses": responses,
        }
        if route.role == "public":
            op["security"] = []
        if route.body:
            content = {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{route.body}"}
                }
            }
            if route.handler == "import_jobs":
                content["text/csv"] = {"schema": {"type": "string"}}
            op["requestBody"] = {"required": True, "content": content}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "minisched", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _schema_text(schema: dict) -> str:
    """A schema in a few words: ``string``, ``Job``, ``array of Run``..."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array":
        return "array of " + _schema_text(schema.get("items", {}))
    if "enum" in schema:
        kind = " | ".join(map(str, schema["enum"]))
    return kind + (" or null" if schema.get("nullable") else "")


def api_docs_html(doc: dict) -> str:
    """``/api/docs``: the OpenAPI document as one page of plain HTML (no
    script, no CDN), each route with the role it needs."""
    esc = html.escape
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>minisched API</title><style>",
        (
            "body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;"
            "padding:1rem;color:#1b1f24}code,pre{font-family:ui-monospace,monospace}"
            "h2{margin-top:2rem;border-bottom:1px solid #d0d7de}"
            "section{border:1px solid #d0d7de;border-radius:8px;padding:.6rem 1rem;margin:.8rem 0}"
            ".m{display:inline-block;min-width:4.5rem;font-weight:700}"
            ".role{float:right;border-radius:1rem;padding:0 .6rem;font-size:.85rem;"
            "border:1px solid #57606a}.r-admin{color:#cf222e;border-color:#cf222e}"
            ".r-operator{color:#9a6700;border-color:#9a6700}.r-public{color:#1a7f37;"
            "border-color:#1a7f37}table{border-collapse:collapse;width:100%;margin:.4rem 0}"
            "td,th{text-align:left;padding:.2rem .5rem;border-bottom:1px solid #eaeef2;"
            "vertical-align:top;overflow-wrap:anywhere}.muted{color:#57606a}"
            "@media (prefers-color-scheme: dark){body{background:#0d1117;color:#e6edf3}"
            ".muted{color:#9198a1}}</style></head><body>"
        ),
        f"<h1>minisched {esc(doc['info']['version'])} API</h1>",
        (
            "<p>JSON in and out. Send a token as <code>Authorization: Bearer TOKEN</code> "
            "(or log in on the page). Roles: <b>viewer</b> reads everything but secrets, "
            "<b>operator</b> also triggers, stops, pauses and resumes, <b>admin</b> also "
            "edits jobs and manages tokens. A role too low answers 403 naming the role "
            'needed. The machine-readable form is <a href="/api/openapi.json">'
            "/api/openapi.json</a>.</p><h2>Routes</h2>"
        ),
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            role = op["x-minisched-role"]
            out.append(
                f'<section id="{esc(op["operationId"])}" data-role="{esc(role)}">'
                f'<span class="role r-{esc(role)}">{esc(role)}</span>'
                f'<span class="m">{esc(method.upper())}</span> <code>{esc(path)}</code>'
                f"<div>{esc(op['summary'])}</div>"
            )
            if op["parameters"]:
                out.append(
                    "<table><tr><th>parameter</th><th>in</th><th>type</th>"
                    "<th>meaning</th></tr>"
                )
                for p in op["parameters"]:
                    need = " (required)" if p.get("required") else ""
                    out.append(
                        f"<tr><td><code>{esc(p['name'])}</code>{need}</td>"
                        f"<td>{esc(p['in'])}</td><td>{esc(_schema_text(p['schema']))}</td>"
                        f"<td>{esc(p.get('description', ''))}</td></tr>"
                    )
                out.append("</table>")
            body = op.get("requestBody")
            if body:
                kinds = ", ".join(
                    f"{esc(t)}: {esc(_schema_text(c['schema']))}"
                    for t, c in body["content"].items()
                )
                out.append(f"<div>Body: {kinds}</div>")
            codes = ", ".join(
                f"<b>{esc(code)}</b> {esc(r['description'])}"
                for code, r in op["responses"].items()
            )
            out.append(f'<div class="muted">Answers: {codes}</div></section>')
    out.append("<h2>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f'<section id="schema-{esc(name)}"><b>{esc(name)}</b>')
        props = schema.get("properties") or {}
        if props:
            required = set(schema.get("required", ()))
            out.append("<table>")
            for prop, sub in props.items():
                mark = (
                    "" if prop in required else ' <span class="muted">optional</span>'
                )
                out.append(
                    f"<tr><td><code>{esc(prop)}</code>{mark}</td>"
                    f"<td>{esc(_schema_text(sub))}</td></tr>"
                )
            out.append("</table>")
        else:
            out.append(f" <span class=muted>{esc(_schema_text(schema))}</span>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


#: The answer to a failure not even Bottle could turn into a response.
_INTERNAL_ERROR = b'{"error": "internal error", "field": null}'


class _App(bottle.Bottle):
    """Bottle answering every error with JSON ``{"error", "field"}``: never an
    HTML page, whatever fails."""

    def default_error_handler(self, res):
        """Bottle's own refusals (no such route, a method it does not have)."""
        if res.status_code == 404:
            error = NotFoundError("not found")
        elif res.status_code == 405:
            error = MethodNotAllowedError("method not allowed")
        else:
            error = MinischedError(str(res.body or res.status_line))
        bottle.response.content_type = "application/json"
        return _error_body(error)

    def wsgi(self, environ, start_response):
        request_read = environ.get("minisched.request_read")
        failed = []

        def start(status, headers, exc_info=None):
            if request_read is not None:
                request_read()  # the server's deadline for the request ends
            if (
                status.startswith("500")
                and ("Content-Type", "text/html; charset=UTF-8") in headers
            ):
                # Bottle's last resort ("Critical error"): answer JSON instead.
                log.error("internal error serving %s", environ.get("PATH_INFO"))
                failed.append(True)
                headers = [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(_INTERNAL_ERROR))),
                ]
                exc_info = None
            return start_response(status, headers, exc_info)

        out = super().wsgi(environ, start)
        return [_INTERNAL_ERROR] if failed else out


def _answering_errors(fn):
    """``fn`` with every failure turned into the JSON response it deserves:
    a :class:`MinischedError` into its status, a client too slow into 408,
    anything else (a bug) into a logged 500.  Used for routes and the request
    checks alike, so an error is rendered in one place."""

    @functools.wraps(fn)
    def answering(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MinischedError as exc:
            raise _error_response(exc) from None
        except bottle.HTTPResponse:
            raise
        except (TimeoutError, socket.timeout):  # noqa: UP041 - 3.9 differs
            exc = RequestTimeoutError("the request was not received in time")
            raise _error_response(exc) from None
        except Exception as exc:
            log.exception("error in %s %s", bottle.request.method, bottle.request.path)
            error = MinischedError(f"internal error: {type(exc).__name__}")
            raise _error_response(error) from None

    return answering


class _JsonPlugin:
    """The Bottle plugin every API route goes through: a route returns data (a
    dict or list) and gets JSON with the status of its :data:`API_ROUTES` row
    (``ok``), or an ``HTTPResponse`` for text, CSV, streams and a status that
    depends on the answer; whatever it raises is rendered by
    :func:`_answering_errors`."""

    name = "minisched-json"
    api = 2

    def apply(self, callback, route):
        ok = route.config.get("ok", 200)
        callback = _answering_errors(callback)

        def json_route(*args, **kwargs):
            result = callback(*args, **kwargs)
            if not isinstance(result, (dict, list)):
                return result
            bottle.response.status = ok
            bottle.response.content_type = "application/json"
            return json.dumps(result)

        return json_route


def make_app(engine, config=None, heartbeat=SSE_HEARTBEAT) -> bottle.Bottle:
    """A fresh Bottle app serving the API (and the page) over ``engine``."""
    config = config or engine.config
    api = Api(engine, config, heartbeat)
    app = _App()
    app.config["json.enable"] = False
    app.config["minisched.api"] = api
    app.add_hook("before_request", _answering_errors(api.check_request))
    app.install(_JsonPlugin())
    for route in API_ROUTES:
        rule = re.sub(r"{(\w+)}", r"<\1>", route.path)
        app.route(rule, route.method, api.guarded(route), ok=route.ok)

    app.route("/", "GET", page)
    return app


###############################################################################
# Server ######################################################################
###############################################################################


_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
)


class _ThreadingWSGIServer(
    socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer
):
    """wsgiref with a daemon thread per connection: an SSE client holds its
    thread, never the server.  At most ``max_connections`` are served at once,
    and each gets ``request_timeout`` seconds to send its request: the accept
    loop (``service_actions``, twice a second) shuts the socket of one that
    has not by then."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops bursts (pages reconnecting)
    request_timeout = REQUEST_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def server_activate(self):
        super().server_activate()
        self._conn_lock = threading.Lock()
        self._open = 0
        self._reading = {}  # socket -> deadline (monotonic) to send the request

    def process_request(self, request, client_address):
        """As ThreadingMixIn's, with a named thread per connection."""
        with self._conn_lock:
            busy = self._open >= self.max_connections
            if not busy:
                self._open += 1
                self._reading[request] = time.monotonic() + self.request_timeout
        if busy:
            body = json.dumps(
                {"error": "too many open connections; try again", "field": None}
            ).encode()
            with contextlib.suppress(OSError):
                request.settimeout(0)
                request.send(_BUSY_RESPONSE % (len(body), body))
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._serve_one,
            args=(request, client_address),
            name="minisched-http-request",
            daemon=True,
        )
        thread.start()

    def _serve_one(self, request, client_address):
        try:
            request.settimeout(self.request_timeout)
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._open -= 1
                self._reading.pop(request, None)

    def request_read(self, request) -> None:
        """The request is in (the response starts): no deadline from now on,
        so an SSE stream lives as long as it likes.  Request thread."""
        with self._conn_lock:
            self._reading.pop(request, None)

    def service_actions(self):
        """Accept loop, twice a second: end connections past their deadline."""
        now = time.monotonic()
        with self._conn_lock:
            late = [sock for sock, until in self._reading.items() if until < now]
            for sock in late:
                del self._reading[sock]
        for sock in late:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        if isinstance(
            sys.exc_info()[1], (ConnectionError, TimeoutError, socket.timeout)
        ):
            return  # the client went away or was too slow: normal
        log.exception("error serving %s", client_address[0])


class _RequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    def address_string(self):
        return self.client_address[0]

    def get_environ(self):
        environ = super().get_environ()
        server, request = self.server, self.request
        environ["minisched.request_read"] = lambda: server.request_read(request)
        return environ

    def log_message(self, format, *args):
        # The request line holds no secret: tokens travel in headers only.
        log.debug("%s %s", self.address_string(), format % args)


def make_server(
    app,
    host: str,
    port: int,
    request_timeout=REQUEST_TIMEOUT,
    max_connections=MAX_CONNECTIONS,
):
    """A threaded wsgiref server for ``app``, bound but not yet serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type(
        "Server",
        (_ThreadingWSGIServer,),
        {
            "address_family": family,
            "request_timeout": request_timeout,
            "max_connections": max_connections,
        },
    )
    return wsgiref.simple_server.make_server(
        host, port, app, server_class=server_class, handler_class=_RequestHandler
    )


class HttpServer:
    """The API server on ``minisched-http``; ``close()`` ends SSE streams at once."""

    def __init__(self, engine, config):
        self.app = make_app(engine, config)
        self.api = self.app.config["minisched.api"]
        self.engine = engine
        self.server = make_server(
            self.app,
            config.host,
            config.port,
            config.request_timeout,
            config.max_connections,
        )
        self.port = self.server.server_port
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="minisched-http", daemon=True
        )

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.api.closing.set()
        self.engine.bus.publish("shutdown", None)
        self.server.shutdown()
        self.server.server_close()


def serve_engine(engine, host="127.0.0.1", port=0, **settings) -> HttpServer:
    """Serve ``engine``'s API and page on ``host``:``port`` (0: any free
    port, then see ``.port``) from a thread of its own; ``.close()`` stops
    it.  ``settings`` override the engine's (``token``, ``public_host``...)."""
    values = {name: getattr(engine.config, name) for name, *_rest in Config.FIELDS}
    values.update(settings, host=host, port=port)
    return HttpServer(engine, Config(**values)).start()


def wsgi_app(engine, fallback=None, **settings):
    """A WSGI application serving ``engine``'s API (``/api/...``,
    ``/metrics``) and page (``/``), for a host program's own server; any
    other path goes to ``fallback`` (the host's own WSGI app), else 404."""
    values = {name: getattr(engine.config, name) for name, *_rest in Config.FIELDS}
    values.update(settings)
    app = make_app(engine, Config(**values))

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO", "")
        mine = path == "/" or path.startswith("/api/") or path == "/metrics"
        if mine or fallback is None:
            return app(environ, start_response)
        return fallback(environ, start_response)

    return dispatch


###############################################################################
# Command line ################################################################
###############################################################################


class ClientError(MinischedError):
    """A client command failed; the message is for the user."""


class Client:
    """The client commands' side of the API (``--url``, ``--token``)."""

    def __init__(self, url: str, token: str | None):
        self.url = url.rstrip("/")
        self.token = token

    def _request(self, method, path, body=None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        return urllib.request.Request(self.url + path, data, headers, method=method)

    def call(self, method, path, body=None, text=False):
        """JSON in, JSON out (``text``: the body as text); ClientError with the
        server's message, or saying the server is not minisched."""
        try:
            with urllib.request.urlopen(
                self._request(method, path, body), timeout=30
            ) as r:
                raw, ctype = r.read(), r.headers.get_content_type()
                if text and ctype == "text/plain":
                    return raw.decode("utf-8", "replace")
                if ctype == "application/json":
                    return json.loads(raw)
                raise ValueError(ctype)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError, OSError):
                raise self._not_minisched(f"HTTP {exc.code} {exc.reason}") from None
            if exc.code == 401:
                message += " (pass --token or set MINISCHED_TOKEN)"
            raise ClientError(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach minisched at {self.url} ({reason}): is "
                "'python minisched.py serve' running there?"
            ) from None
        except (ValueError, http.client.HTTPException) as exc:
            raise self._not_minisched(f"{type(exc).__name__}: {exc}") from None

    def _not_minisched(self, what) -> ClientError:
        return ClientError(
            f"the server at {self.url} does not answer like minisched ({what}): "
            "check --url"
        )

    def follow(self, run_id: int, out=None, err=None) -> dict:
        """Print a run's output live until it ends; returns the final run."""
        out, err = out or sys.stdout, err or sys.stderr
        last = 0
        for _attempt in range(100):
            request = self._request("GET", f"/api/runs/{run_id}/stream")
            request.add_header("Accept", "text/event-stream")
            if last:
                request.add_header("Last-Event-ID", str(last))
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    event, data = None, []
                    for raw in response:
                        line = raw.decode("utf-8", "replace").rstrip("\n")
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif line.startswith("id:"):
                            last = int(line[3:].strip() or 0)
                        elif not line and event:
                            payload = json.loads("\n".join(data))
                            if event == "log":
                                stream = err if payload["stream"] != "stdout" else out
                                stream.write(payload["text"])
                                stream.flush()
                            elif event == "end" and payload and "status" in payload:
                                return payload
                            event, data = None, []
            except urllib.error.HTTPError:
                return self.call("GET", f"/api/runs/{run_id}")
            except (urllib.error.URLError, OSError):
                time.sleep(1)  # the server restarts or the network blinked
            except (ValueError, KeyError, TypeError, http.client.HTTPException) as exc:
                raise self._not_minisched(f"{type(exc).__name__}: {exc}") from None
        raise ClientError(f"lost the stream of run {run_id}")


def _print_table(rows, columns) -> None:
    widths = [
        max([len(c)] + [len(str(r.get(c, "") or "")) for r in rows]) for c in columns
    ]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print(
            "  ".join(
                str(row.get(c, "") or "").ljust(w) for c, w in zip(columns, widths)
            )
        )


def _local_time(iso: str | None, tz=None) -> str:
    """``2026-12-02T09:00:00.000Z`` -> ``2026-12-02 10:00:00 CET`` (local)."""
    if not iso:
        return "-"
    moment = datetime.datetime.fromtimestamp(parse_iso(iso, datetime.timezone.utc), tz)
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _relative(iso: str | None, now: float | None = None) -> str:
    """``in 3 h``, ``5 min ago``, ``just now``."""
    if not iso:
        return ""
    delta = parse_iso(iso, datetime.timezone.utc) - (
        time.time() if now is None else now
    )
    size = abs(delta)
    if size < 2:
        return "just now"
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if size >= seconds:
            amount = size / seconds
            text = (
                f"{amount:.0f} {unit}"
                if amount >= 10 or unit == "s"
                else f"{amount:.1f} {unit}".replace(".0 ", " ")
            )
            return f"in {text}" if delta > 0 else f"{text} ago"
    return ""


def _plain_seconds(value) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
    return f"{int(value // 60)} min {int(value % 60)} s"


def _exit_text(run: dict) -> str:
    if run.get("signal"):
        return _exit_description(None, run["signal"]) or "-"
    return "-" if run.get("exit_code") is None else str(run["exit_code"])


def _run_rows(runs) -> list:
    return [
        {
            "id": r["id"],
            "job": r["job"],
            "status": r["status"],
            "trigger": r["trigger"],
            "started": _local_time(r["started_at"] or r["scheduled_at"]),
            "duration": _plain_seconds(r["duration"]),
            "exit": _exit_text(r),
        }
        for r in runs
    ]


def _print_fields(items) -> None:
    """``key  value`` lines, keys aligned."""
    width = max((len(k) for k, _ in items), default=0)
    for key, value in items:
        print(f"{key.ljust(width)}  {value}")


def _client_list(client, ns):
    result = client.call("GET", "/api/jobs")
    if ns.json:
        return result
    rows = []
    for j in result["jobs"]:
        zone = get_zone(j["timezone"]) if j.get("timezone") else None
        nxt = "-"
        if j["next_run_at"]:
            nxt = (
                f"{_local_time(j['next_run_at'], zone)} ({_relative(j['next_run_at'])})"
            )
        rows.append(
            dict(
                j,
                next=nxt,
                last=(j["last_run"] or {}).get("status", "-"),
                state="paused" if j["paused"] else ("running" if j["running"] else ""),
            )
        )
    _print_table(rows, ("name", "schedule", "next", "last", "state"))
    return None


def _client_show(client, ns):
    job = client.call("GET", f"/api/jobs/{urllib.parse.quote(ns.name)}")
    if ns.json:
        return job
    zone = get_zone(job["timezone"]) if job.get("timezone") else None
    last = job["last_run"]
    items = [
        ("name", job["name"]),
        (
            "schedule",
            f"{job.get('schedule') or 'manual'}: {job['schedule_description']}",
        ),
        (
            "state",
            "paused"
            if job["paused"]
            else "active"
            if job.get("enabled", True)
            else "disabled",
        ),
        (
            "next run",
            f"{_local_time(job['next_run_at'], zone)} ({_relative(job['next_run_at'])})"
            if job["next_run_at"]
            else "-",
        ),
        (
            "last run",
            f"#{last['id']} {last['status']} {_local_time(last['started_at'] or last['finished_at'])}"
            if last
            else "never",
        ),
        ("running", str(job["running"])),
        ("source", job["source"]),
    ]
    state = {
        "schedule_description",
        "next_run_at",
        "last_run",
        "running",
        "source",
        "paused",
        "created_at",
        "name",
        "schedule",
    }
    items += [
        (k, json.dumps(v) if not isinstance(v, str) else v)
        for k, v in job.items()
        if k not in state
    ]
    _print_fields(items)
    return None


def _client_status(client, ns):
    status = client.call("GET", "/api/status")
    if ns.json:
        return status
    c = status["counts"]
    items = [
        ("version", status["version"]),
        (
            "up since",
            f"{_local_time(status['started_at'])} ({_relative(status['started_at'])})",
        ),
        ("jobs", f"{c['jobs']} ({c['paused']} paused)"),
        (
            "runs",
            f"{c['running']} running, {c['queued']} queued, {c['failed_24h']} failed in 24 h",
        ),
        ("scheduler lag", f"{status['scheduler']['lag'] * 1000:.1f} ms"),
    ]
    jobs_file = status.get("jobs_file")
    if jobs_file:
        items.append(
            (
                "jobs file",
                f"{jobs_file['path']}: "
                + (
                    f"ERROR {jobs_file['error']}"
                    if jobs_file["error"]
                    else f"loaded {_relative(jobs_file['loaded_at'])}"
                ),
            )
        )
        for item in jobs_file.get("conflicts", ()):
            items.append(
                (
                    "  conflict",
                    f"{item['job']} is {item['problem']}; node {item['owner']} keeps it",
                )
            )
    _print_fields(items)
    return None


def _client_runs(client, ns):
    query = {"limit": ns.limit}
    if ns.status:
        query["status"] = ns.status
    if ns.name:
        path = f"/api/jobs/{urllib.parse.quote(ns.name)}/runs"
    else:
        path = "/api/runs"
    result = client.call("GET", path + "?" + urllib.parse.urlencode(query))
    if ns.json:
        return result
    _print_table(
        _run_rows(result["runs"]),
        ("id", "job", "status", "trigger", "started", "duration", "exit"),
    )
    if result["total"] > len(result["runs"]):
        print(f"({len(result['runs'])} of {result['total']}; --limit N for more)")
    return None


def _client_upcoming(client, ns):
    result = client.call("GET", f"/api/upcoming?hours={ns.hours}")
    if ns.json:
        return result
    rows = [
        {
            "time": f"{f['local'][:19].replace('T', ' ')} {f['timezone']}",
            "in": _relative(f["at"]),
            "job": f["job"],
        }
        for f in result["fires"]
    ]
    _print_table(rows, ("time", "in", "job"))
    if result["truncated"]:
        print("(more than 10000 fires; ask for fewer --hours)")
    return None


def _client_add(client, ns):
    doc = _read_json_file(ns.file)
    report = client.call("POST", "/api/validate", doc)
    if not report["valid"]:
        for error in report["errors"]:
            print(f"{ns.file}: {error['error']}", file=sys.stderr)
        return 1
    if isinstance(doc, dict) and "jobs" not in doc:
        return client.call("POST", "/api/jobs", doc)
    return client.call("POST", "/api/import", doc)


def _client_trigger(client, ns):
    path = f"/api/jobs/{urllib.parse.quote(ns.name)}/run" + (
        "?force=1" if ns.force else ""
    )
    try:
        run = client.call("POST", path)
    except ClientError as exc:
        raise ClientError(exc.message.replace("use ?force=1", "use --force")) from None
    if not ns.follow:
        return run
    return _follow(client, run["id"], ns.json)


def _client_logs(client, ns):
    if ns.follow:
        return _follow(client, ns.run_id, ns.json)
    if ns.json:
        return client.call("GET", f"/api/runs/{ns.run_id}/log?format=json")
    sys.stdout.write(client.call("GET", f"/api/runs/{ns.run_id}/log", text=True))
    return None


def _follow(client, run_id, as_json) -> int:
    """Print a run's output live; the exit status is the run's outcome.
    Ctrl-C stops following, never the run."""
    try:
        final = client.follow(run_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following run {run_id}; it goes on "
            f"(follow it again with: minisched.py logs {run_id} --follow)",
            file=sys.stderr,
        )
        return 130
    if as_json:
        print(json.dumps(final))
    else:
        error = f": {final['error']}" if final.get("error") else ""
        print(f"run {final['id']} {final['status']}{error}", file=sys.stderr)
    return 0 if final["status"] == "succeeded" else 1


def _client_action(client, ns):
    name = urllib.parse.quote(ns.name)
    if ns.command == "remove":
        return client.call(
            "DELETE", f"/api/jobs/{name}" + ("?force=1" if ns.force else "")
        )
    return client.call("POST", f"/api/jobs/{name}/{ns.command}")


_CLIENT_COMMANDS = {
    "list": _client_list,
    "show": _client_show,
    "status": _client_status,
    "runs": _client_runs,
    "upcoming": _client_upcoming,
    "add": _client_add,
    "trigger": _client_trigger,
    "logs": _client_logs,
    "remove": _client_action,
    "pause": _client_action,
    "resume": _client_action,
    "stop": _client_action,
}


def _cmd_client(ns) -> int:
    """The client commands: each prints for humans, or JSON with ``--json``."""
    client = Client(ns.url, ns.token or os.environ.get("MINISCHED_TOKEN"))
    result = _CLIENT_COMMANDS[ns.command](client, ns)
    if isinstance(result, int):
        return result
    if result is not None:
        print(json.dumps(result, indent=None if ns.json else 2))
    return 0


def _read_json_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return parse_json(f.read())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minisched.py",
        description="A cron replacement for small servers: schedules, runs, history, "
        "a JSON API and a web page, in one file.",
    )
    parser.add_argument(
        "--version", action="version", version="minisched " + __version__
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the scheduler and the web server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help=f"TCP port (default {DEFAULT_PORT})")
    serve.add_argument(
        "--db",
        help="SQLite file (default ./minisched.db) or postgresql://user:pass@host/db "
        "(several hosts; or MINISCHED_DB)",
    )
    serve.add_argument("--jobs", help="jobs file to load and watch")
    serve.add_argument("--token", help="API token (or MINISCHED_TOKEN)")
    serve.add_argument(
        "--max-concurrent",
        type=int,
        help="most runs at once; more wait as queued (default 0 = no limit)",
    )
    serve.add_argument(
        "--timezone", help="zone for jobs without one (default: the host's)"
    )
    serve.add_argument(
        "--allow-ip",
        action="append",
        metavar="CIDR",
        help="only these clients (repeatable)",
    )
    serve.add_argument(
        "--deny-ip",
        action="append",
        metavar="CIDR",
        help="never these clients, even if allowed (repeatable)",
    )
    serve.add_argument(
        "--audit-keep",
        type=int,
        metavar="N",
        help="audit entries kept, newest first (default 10000)",
    )
    serve.add_argument(
        "--public-host",
        action="append",
        metavar="NAME",
        help="extra Host names this server answers to (repeatable)",
    )
    serve.add_argument(
        "--max-streams", type=int, help="most SSE subscribers (default 64)"
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        help="seconds running jobs get on shutdown (default 30)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without a token",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the API token from FILE (kept out of ps and the environment)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        help=f"seconds a client has to send its request (default {REQUEST_TIMEOUT:g})",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        help=f"connections served at once; more get 503 (default {MAX_CONNECTIONS})",
    )

    alerts = serve.add_argument_group("alerts (every job's failures)")
    alerts.add_argument(
        "--notify-url",
        action="append",
        metavar="URL",
        help="POST each alert as JSON to URL (Slack-compatible 'text'; repeatable)",
    )
    alerts.add_argument(
        "--notify-email",
        action="append",
        metavar="ADDR",
        help="mail alerts to ADDR (repeatable)",
    )
    alerts.add_argument("--smtp-host", help="mail relay (needed for mail)")
    alerts.add_argument("--smtp-port", type=int, help="default 25")
    alerts.add_argument(
        "--smtp-user",
        help="log in as this user; the password comes from MINISCHED_SMTP_PASSWORD",
    )
    alerts.add_argument(
        "--smtp-starttls", action="store_true", help="STARTTLS before logging in"
    )
    alerts.add_argument("--smtp-from", metavar="ADDR", help="default minisched@HOST")
    alerts.add_argument(
        "--alert-cap", type=int, help="alert messages an hour at most (default 30)"
    )
    serve.add_argument(
        "--public-url",
        metavar="URL",
        help="base of the links in alerts and hooks (default http://HOST:PORT)",
    )
    serve.add_argument(
        "--max-rss-default",
        type=int,
        metavar="BYTES",
        help="max_rss of jobs without one (default: none)",
    )
    serve.add_argument(
        "--max-cpu-default",
        type=float,
        metavar="SECONDS",
        help="max_cpu of jobs without one (default: none)",
    )
    nodes = serve.add_argument_group("several hosts (--db postgresql://...)")
    nodes.add_argument("--node-name", help="this node's name (default: the host name)")
    nodes.add_argument(
        "--node-tag",
        action="append",
        metavar="TAG",
        help="a tag jobs' nodes field can name (repeatable)",
    )
    nodes.add_argument(
        "--node-timeout",
        type=float,
        metavar="SECONDS",
        help="a node is dead after this long without a heartbeat (default 20)",
    )
    serve.add_argument(
        "--daemon",
        action="store_true",
        help="detach (double fork, new session); needs --pidfile",
    )
    serve.add_argument("--pidfile", metavar="FILE", help="write and lock FILE")
    serve.add_argument(
        "--log-file", metavar="FILE", help="log to FILE instead of stderr (rotated)"
    )
    serve.add_argument(
        "--log-max-bytes",
        type=int,
        help=f"rotate the log file at this size (default {LOG_MAX_BYTES})",
    )
    serve.add_argument(
        "--log-backups",
        type=int,
        help=f"rotated log files kept (default {LOG_BACKUPS})",
    )

    validate = sub.add_parser(
        "validate", help="check a jobs file (or a file with one job)"
    )
    validate.add_argument("file")
    validate.add_argument("--timezone")

    nxt = sub.add_parser("next", help="print the next fire times of a schedule")
    nxt.add_argument("expr", nargs="+", help="a schedule, quoted: '*/5 * * * *'")
    nxt.add_argument("-n", type=int, default=5)
    nxt.add_argument("--timezone")
    nxt.add_argument("--after", help="ISO 8601 time (default: now)")
    nxt.add_argument("--json", action="store_true")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=f"http://127.0.0.1:{DEFAULT_PORT}",
        help="the server (default %(default)s)",
    )
    common.add_argument("--token", help="API token (default: $MINISCHED_TOKEN)")
    common.add_argument("--json", action="store_true", help="print JSON")

    cron = sub.add_parser(
        "import-crontab",
        parents=[common],
        help="convert a crontab to a jobs document (or import it: --apply)",
    )
    cron.add_argument("file", help="a crontab file, or - for standard input")
    cron.add_argument(
        "--system",
        action="store_true",
        help="/etc/crontab or /etc/cron.d format (with a user column)",
    )
    cron.add_argument("--user", help="whose crontab it is (default: yours)")
    cron.add_argument(
        "--apply", action="store_true", help="import into a running server"
    )

    unit = sub.add_parser(
        "systemd-unit",
        help="print a systemd unit for serve (serve flags after the options)",
    )
    unit.add_argument("--user", help="run the service as this user")

    stop = sub.add_parser("shutdown", help="stop a server started with --daemon")
    stop.add_argument("--pidfile", required=True, metavar="FILE")
    stop.add_argument(
        "--timeout",
        type=float,
        default=40.0,
        help="seconds to wait for it to exit (default 40)",
    )

    backup = sub.add_parser(
        "backup", help="copy the database consistently, also while serve runs"
    )
    backup.add_argument("file", help="where to write the copy")
    backup.add_argument("--db", default="minisched.db", help="default %(default)s")
    copy = sub.add_parser(
        "copy-db",
        help="copy jobs and history between databases (SQLite <-> PostgreSQL)",
    )
    copy.add_argument(
        "source", metavar="FROM", help="a SQLite file or postgresql:// URI"
    )
    copy.add_argument(
        "target", metavar="TO", help="an empty database (created if a file)"
    )

    token = sub.add_parser(
        "token",
        help="named tokens with roles, in the database (server running or not)",
    )
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION")
    token_sub.required = True
    for action, helptext in (
        ("add", "create a token and print its secret (once)"),
        ("list", "name, role, created, last used, expires"),
        ("revoke", "delete a token; its sessions end"),
        ("role", "change a token's role; its sessions end"),
    ):
        cmd = token_sub.add_parser(action, help=helptext)
        cmd.add_argument(
            "--db",
            default=None,
            help="SQLite file or postgresql:// URI "
            "(default $MINISCHED_DB, else ./minisched.db)",
        )
        if action != "list":
            cmd.add_argument("name")
        if action == "add":
            cmd.add_argument("--role", required=True, choices=ROLES)
            cmd.add_argument(
                "--expires", metavar="DURATION", help="e.g. 90d or 12h (default: never)"
            )
        if action == "role":
            cmd.add_argument("role", choices=ROLES)
        if action == "list":
            cmd.add_argument("--json", action="store_true", help="print JSON")

    for name, helptext, args in (
        ("list", "list jobs", ()),
        ("show", "show a job", ("name",)),
        ("add", "create jobs from a JSON file (a job or a jobs document)", ("file",)),
        ("remove", "delete a job", ("name",)),
        ("trigger", "run a job now", ("name",)),
        ("logs", "print a run's output", ("run_id",)),
        ("runs", "run history, newest first", ()),
        ("upcoming", "every fire of every job in the next hours", ()),
        ("pause", "pause a job's schedule", ("name",)),
        ("resume", "resume a job's schedule", ("name",)),
        ("stop", "stop a job's active runs", ("name",)),
        ("status", "server status", ()),
    ):
        cmd = sub.add_parser(name, help=helptext, parents=[common])
        for arg in args:
            cmd.add_argument(arg, type=int if arg == "run_id" else str)
        if name in ("trigger", "logs"):
            cmd.add_argument(
                "--follow",
                "-f",
                action="store_true",
                help="stream the output until the run ends; exit 0 only "
                "if it succeeded",
            )
        if name == "trigger":
            cmd.add_argument(
                "--force", action="store_true", help="run even if a forbid job is busy"
            )
        if name == "remove":
            cmd.add_argument(
                "--force",
                action="store_true",
                help="also when other jobs run after it (they no longer do)",
            )
        if name == "runs":
            cmd.add_argument("name", nargs="?", help="only this job's runs")
            cmd.add_argument("--status", choices=RUN_STATUSES)
            cmd.add_argument("--limit", type=int, default=20)
        if name == "upcoming":
            cmd.add_argument("--hours", type=int, default=24)
    return parser


def _cmd_validate(ns) -> int:
    """Check a jobs file, or a file holding one job (what ``add`` takes)."""
    tz = get_zone(ns.timezone) if ns.timezone else local_zone()
    try:
        doc = _read_json_file(ns.file)
        if isinstance(doc, dict) and "jobs" not in doc and "defaults" not in doc:
            validate_job(doc, tz)
            count = 1
        else:
            count = len(parse_jobs_document(doc, tz))
    except InvalidError as exc:
        for error in exc.errors:
            print(f"{ns.file}: {error['error']}", file=sys.stderr)
        return 1
    print(f"{ns.file}: {count} job{'' if count == 1 else 's'}, valid")
    return 0


def _cmd_next(ns) -> int:
    if len(ns.expr) > 1:
        raise UsageError(
            "quote the expression, or the shell splits it and expands its *: "
            "next '{}'".format(" ".join(ns.expr))
        )
    expr = ns.expr[0]
    tz = get_zone(ns.timezone) if ns.timezone else local_zone()
    if ns.n < 1 or ns.n > 1000:
        raise UsageError("-n must be between 1 and 1000")
    # A preview of @every counts from a whole second, like a job created then.
    after = parse_iso(ns.after, tz) if ns.after else float(int(time.time()))
    schedule = Schedule(expr, tz)
    times = next_fire_times(expr, ns.n, tz, after)
    if ns.json:
        out = {"times": [{"local": iso_local(t, tz), "utc": iso_utc(t)} for t in times]}
        out["description"] = schedule.describe()
        print(json.dumps(out))
        return 0
    # Stdout stays one fire time per line (SPEC); the words go to stderr.
    print(schedule.describe(), file=sys.stderr)
    if schedule.kind == "reboot":
        print("fires once each time the server starts", file=sys.stderr)
    elif schedule.kind == "manual":
        print("never fires on its own: runs only when triggered", file=sys.stderr)
    elif not times:
        why = "the time has passed" if schedule.kind == "at" else "no time matches"
        print("will not fire: " + why, file=sys.stderr)
    for t in times:
        print(f"{iso_local(t, tz)}  {iso_utc(t)}")
    return 0


def _cmd_import_crontab(ns) -> int:
    """``import-crontab``: print the jobs document, or ``--apply`` it."""
    source = "crontab" if ns.file == "-" else ns.file
    try:
        if ns.file == "-":
            text = sys.stdin.read()
        else:
            with open(ns.file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {ns.file}: {exc}") from None
    if ns.user and ns.system:
        raise UsageError("--user: a system crontab names its user on each line")
    definitions, problems = parse_crontab(
        text, system=ns.system, user=ns.user, source=os.path.basename(source)
    )
    for number, reason in problems:
        print(f"{source}:{number}: not converted: {reason}", file=sys.stderr)
    doc = {"jobs": definitions}
    if not ns.apply:
        print(json.dumps(doc, indent=2))
        return 1 if problems else 0
    client = Client(ns.url, ns.token or os.environ.get("MINISCHED_TOKEN"))
    client.call("POST", "/api/import?dry_run=1", doc)
    report = client.call("POST", "/api/import", doc)
    if ns.json:
        print(json.dumps(report))
    else:
        for key in ("created", "updated", "unchanged"):
            names = ", ".join(report[key]) or "-"
            print(f"{key}: {len(report[key])} ({names})")
    return 1 if problems else 0


def _systemd_quote(arg: str) -> str:
    """One ``ExecStart=`` word: ``%`` and ``$`` escaped, quoted if needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\;]', arg) or not arg:
        arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def systemd_unit(serve_args: list, user: str | None = None) -> str:
    """A systemd unit running ``serve`` with ``serve_args``: absolute paths,
    ``Restart=on-failure``, ``KillMode=mixed`` with ``TimeoutStopSec`` above
    the shutdown grace (so running jobs get their grace on ``systemctl
    stop``), a state directory for the database and the token from an
    ``EnvironmentFile``, never inline."""
    try:
        ns = _build_parser().parse_args(["serve", *serve_args])
    except SystemExit:  # argparse said what is wrong
        raise UsageError(
            "systemd-unit: give serve flags only (see serve --help)"
        ) from None
    if ns.token:
        raise UsageError(
            "--token: a unit file must not hold the token; put MINISCHED_TOKEN=... "
            "in /etc/minisched/env (mode 600), which the unit reads"
        )
    if ns.daemon or ns.pidfile:
        raise UsageError("--daemon, --pidfile: systemd runs the server itself")
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user: no user named {user!r}") from None
    args = list(serve_args)
    if ns.db is None:
        args += ["--db", "/var/lib/minisched/minisched.db"]
    grace = ns.shutdown_grace if ns.shutdown_grace is not None else 30.0
    command = [sys.executable, os.path.abspath(__file__), "serve", *args]
    lines = [
        "[Unit]",
        "Description=minisched, a cron replacement",
        "Documentation=file://"
        + os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"),
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in command),
        "ExecReload=/bin/kill -HUP $MAINPID",
        "EnvironmentFile=-/etc/minisched/env",
        "Environment=PYTHONUNBUFFERED=1",
        "StateDirectory=minisched",
        "WorkingDirectory=/var/lib/minisched",
        "Restart=on-failure",
        "RestartSec=5",
        # SIGTERM to the server only: it gives running jobs their grace, then
        # stops them; systemd kills what is left after TimeoutStopSec.
        "KillMode=mixed",
        f"TimeoutStopSec={math.ceil(grace) + 15}",
    ]
    if user:
        lines.append(f"User={user}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def _cmd_systemd_unit(ns, serve_args) -> int:
    print(systemd_unit(serve_args, ns.user), end="")
    return 0


def _cmd_shutdown(ns) -> int:
    """Stop a ``serve --daemon``: SIGTERM, wait; 0 stopped, 1 still running."""
    pid = _pidfile_owner(ns.pidfile)
    if pid is None:
        print(f"minisched is not running (no live server holds {ns.pidfile})")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ns.timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"minisched (pid {pid}) stopped")
            return 0
        time.sleep(0.1)
    print(
        f"minisched (pid {pid}) is still running after {_num(ns.timeout)}s",
        file=sys.stderr,
    )
    return 1


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pidfile_owner(path: str) -> int | None:
    """The pid in ``path`` if a live process holds the file's lock, else None
    (no file, or a stale one left by a crash)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"--pidfile: cannot read {path}: {exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        return None  # nobody holds it: stale
    finally:
        os.close(fd)


def _hold_pidfile(path: str) -> int:
    """Lock ``path`` (a second daemon on it is refused) and return the open
    descriptor; :func:`_write_pidfile` puts the pid in once known."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        owner = _pidfile_owner(path)
        raise UsageError(
            f"--pidfile: {path} is held by a running minisched (pid {owner})"
        ) from None
    return fd


def _write_pidfile(path: str, held: int) -> int:
    """Write this process's pid to ``path`` atomically (a new file, locked,
    renamed over the old) and keep it locked; returns the new descriptor."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"%d\n" % os.getpid())
    os.fsync(fd)
    os.rename(tmp, path)
    os.close(held)
    return fd


def _daemonize(log_file: str | None) -> int:
    """Detach: fork, new session, fork again; stdin from /dev/null, stdout and
    stderr to ``log_file`` or /dev/null.  Returns (in the daemon) the write end
    of a pipe on which it reports its start: ``ok`` or a message.  The
    original process waits for that and exits with it."""
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:  # the command the user ran: wait for the daemon's word
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as pipe:
            word = pipe.read().decode("utf-8", "replace").strip()
        if word.startswith("ok "):
            print(f"minisched started in the background (pid {word[3:]})", flush=True)
            os._exit(0)
        print(word or "minisched: the daemon exited before it started", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes: the daemon can never get a terminal
    devnull = os.open(os.devnull, os.O_RDWR)
    out = (
        os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        if log_file
        else devnull
    )
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {devnull, out}:
        if fd > 2:
            os.close(fd)
    return ready_w


def _log_to_file(config) -> None:
    """Log to ``--log-file`` (size-rotated) instead of stderr."""
    import logging.handlers

    handler = logging.handlers.RotatingFileHandler(
        config.log_file,
        maxBytes=config.log_max_bytes,
        backupCount=config.log_backups,
        encoding="utf-8",
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def _cmd_backup(ns) -> int:
    """``backup FILE``: a consistent copy of the database, also while a
    server writes it (see :meth:`SQLiteStore.backup`)."""
    if not os.path.exists(ns.db):
        raise UsageError(f"--db: {ns.db} does not exist")
    pages = SQLiteStore.backup(ns.db, ns.file)
    print(f"{ns.db} copied to {ns.file} ({pages} pages, integrity ok)")
    return 0


def _cmd_copy_db(ns) -> int:
    """``copy-db FROM TO``: jobs, pause state, runs, output and statistics
    from one database to another (SQLite to PostgreSQL, or back), with no
    server running on FROM.  TO must hold no jobs or runs yet.  Runs left
    active on FROM arrive ``lost``, as a restart would record them."""
    if ns.source == ns.target:
        raise UsageError("copy-db: FROM and TO are the same database")
    if not ns.source.startswith(
        ("postgresql://", "postgres://")
    ) and not os.path.exists(ns.source):
        raise UsageError(f"copy-db: {ns.source} does not exist")
    source = open_store(ns.source).open()
    try:
        target = open_store(ns.target).open()
    except BaseException:
        source.close()
        raise
    try:
        for table in ("jobs", "runs"):
            held = target.count_rows(table)
            if held:
                raise UsageError(
                    f"copy-db: {_redacted(ns.target)} already holds {held} {table}: "
                    "copy into an empty database"
                )
        now = time.time()
        for table, order in SQLStore.COPY_TABLES:
            copied, batch = 0, []
            for row in source.table_rows(table, order):
                if table == "runs" and row["status"] in ACTIVE_STATUSES:
                    row = dict(
                        row, status="lost", finished_at=row["finished_at"] or now
                    )
                    row["error"] = "the server stopped while this run was active"
                batch.append(row)
                if len(batch) >= 1000:
                    target.result(target.put_rows(table, batch), 60)
                    copied += len(batch)
                    batch = []
            if batch:
                target.result(target.put_rows(table, batch), 60)
                copied += len(batch)
            print(f"{table}: {copied} rows")
        target.flush(60)
        target.after_copy()
    finally:
        source.close()
        target.close()
    print(f"copied {_redacted(ns.source)} to {_redacted(ns.target)}")
    return 0


def _cmd_token(ns) -> int:
    """``token add|list|revoke|role``: named tokens, straight in the database
    (a running server sees the change at its next request)."""
    db = ns.db or os.environ.get("MINISCHED_DB") or "minisched.db"
    if not db.startswith(("postgresql://", "postgres://")) and not os.path.exists(db):
        raise UsageError(f"--db: {db} does not exist (start serve once, or name it)")
    store = open_store(db).open(exclusive=False)  # also while a server runs
    try:
        access = Access(store)
        who = "cli:" + _user_name()
        action = ns.token_command
        if action == "list":
            rows = access.tokens()
            if ns.json:
                print(json.dumps({"tokens": rows}, indent=2))
            else:
                _print_table(
                    [
                        dict(
                            r,
                            created_at=_local_time(r["created_at"]),
                            last_used=_local_time(r["last_used"]),
                            expires_at=_local_time(r["expires_at"])
                            if r["expires_at"]
                            else "never",
                        )
                        for r in rows
                    ],
                    ("name", "role", "created_at", "last_used", "expires_at"),
                )
            return 0
        if action == "add":
            body = {"name": ns.name, "role": ns.role, "expires": ns.expires}
            secret, row = access.add(body, by=who)
            access.record(
                who,
                "token.add",
                detail={k: row[k] for k in ("name", "role", "expires_at")},
            )
            print(secret)
            print(
                f"token {row['name']} ({row['role']}, expires "
                f"{_local_time(row['expires_at']) if row['expires_at'] else 'never'}): "
                "shown only now; only its hash is stored",
                file=sys.stderr,
            )
        elif action == "revoke":
            access.revoke(ns.name)
            access.record(who, "token.revoke", detail={"name": ns.name})
            print(f"token {ns.name} revoked; its sessions ended", file=sys.stderr)
        else:
            access.set_role(ns.name, ns.role)
            access.record(who, "token.role", detail={"name": ns.name, "role": ns.role})
            print(
                f"token {ns.name} is {ns.role} now; its sessions ended", file=sys.stderr
            )
        return 0
    finally:
        store.close()


def _has_named_tokens(db: str) -> bool:
    """Does the database hold a named token (so requests need one)?"""
    if not db.startswith(("postgresql://", "postgres://")) and not os.path.exists(db):
        return False
    try:
        store = open_store(db).open(exclusive=False)
    except MinischedError:
        return False  # serve itself reports what is wrong with the database
    try:
        return bool(store.list_tokens())
    finally:
        store.close()


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _release_startup_memory() -> None:
    """Give the heap pages that starting freed back to the system (glibc
    keeps them otherwise).  No ``gc.collect()``: with the re-execution (see
    :func:`_reexec_serve`) it found a few dozen objects, for 10-20 ms."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _cmd_serve(ns) -> int:
    handed = _received_secrets()
    if ns.token is None:
        ns.token = handed.pop("--token", None)
    environ = dict(os.environ, **handed)
    # Jobs and hooks inherit this environment: no secret may reach them.
    for name in SECRET_VARIABLES:
        os.environ.pop(name, None)
    config = Config.from_args(ns, environ)
    config.check()  # usage errors (exit 2) before anything starts
    logging.getLogger().setLevel(config.log_level.upper())
    if (
        not _is_loopback(config.host)
        and not config.token
        and not config.insecure_no_auth
        and not _has_named_tokens(config.db)
    ):
        print(
            f"minisched: refusing to listen on {config.host} without a token: anyone who can reach "
            "it could run commands. Use --token (or MINISCHED_TOKEN), create one with "
            "'token add NAME --role admin', bind 127.0.0.1, or pass --insecure-no-auth.",
            file=sys.stderr,
        )
        return 2
    held = _hold_pidfile(config.pidfile) if config.pidfile else None
    ready = _daemonize(config.log_file) if config.daemon else None
    if held is not None:
        held = _write_pidfile(config.pidfile, held)
    if config.log_file:
        _log_to_file(config)
    try:
        return _serve(config, ready)
    finally:
        if held is not None:
            _remove_pidfile(config.pidfile, held)


def _serve(config, ready) -> int:
    """Run the server until SIGTERM or SIGINT.  ``ready`` (a daemon's pipe to
    the command that started it) gets ``ok PID`` once it listens, or why not."""

    def refuse(message, code):
        print(message, file=sys.stderr)
        if ready is not None:
            os.write(ready, message.encode())
            os.close(ready)
        return code

    engine = Engine(config)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if signum == signal.SIGHUP:
            if engine.jobs_file:
                engine.jobs_file.reload_event.set()
            return
        log.info(
            "received %s, shutting down (grace %ss)",
            signal.Signals(signum).name,
            _num(config.shutdown_grace),
        )
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGUSR1, _log_stacks)
    try:
        http = HttpServer(engine, config)
    except OSError as exc:
        return refuse(
            f"minisched: cannot listen on {config.host}:{config.port}: {exc}", 1
        )
    try:
        engine.start()
    except MinischedError as exc:
        http.server.server_close()
        return refuse(f"minisched: {exc.message}", 2)
    http.start()
    _release_startup_memory()
    log.info(
        "minisched %s listening on http://%s:%d/ (database %s, %d jobs)",
        __version__,
        config.host if ":" not in config.host else f"[{config.host}]",
        http.port,
        config.db,
        len(engine.scheduler.jobs()),
    )
    if ready is not None:
        os.write(ready, b"ok %d" % os.getpid())
        os.close(ready)
    # The kernel may hand SIGTERM to any thread (one that just unblocked
    # signals after pthread_create or posix_spawn takes it first); CPython
    # then only flags it for the main thread, which an Event.wait would not
    # notice until its timeout.  The wakeup fd is written by the C handler on
    # whichever thread got the signal, so select() returns and the Python
    # handler runs here at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        while not stopping.is_set():
            select.select([wake_r], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
    finally:
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    http.close()
    engine.shutdown()
    log.info("minisched stopped")
    return 0


def _log_stacks(_signum, _frame) -> None:
    """SIGUSR1 (main thread): every thread's stack to the log, for a server
    that seems stuck.  Changes nothing."""
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        log.warning("thread %s:\n%s", names.get(ident, ident), stack.rstrip())


def _remove_pidfile(path: str, fd: int) -> None:
    """At exit: remove the pidfile if it is still this process's."""
    try:
        with open(path, encoding="ascii") as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def main(argv=None) -> int:
    """Entry point: parse ``argv`` and run a command; returns the exit status."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        level=logging.INFO,
        stream=sys.stderr,
    )
    # The format names no source line, thread or process: no record collects
    # them (a frame walk per log line; the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    parser = _build_parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extra and ns.command != "systemd-unit":
        parser.parse_args(argv)  # reports the unknown arguments, exit 2
    handlers = {
        "serve": _cmd_serve,
        "validate": _cmd_validate,
        "next": _cmd_next,
        "import-crontab": _cmd_import_crontab,
        "shutdown": _cmd_shutdown,
        "backup": _cmd_backup,
        "copy-db": _cmd_copy_db,
        "token": _cmd_token,
    }
    try:
        if ns.command == "systemd-unit":
            return _cmd_systemd_unit(ns, extra)
        return handlers.get(ns.command, _cmd_client)(ns)
    except UsageError as exc:
        print(f"minisched: {exc.message}", file=sys.stderr)
        return 2
    except InvalidError as exc:
        print(f"minisched: {exc.message}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"minisched: {exc.message}", file=sys.stderr)
        return 1
    except MinischedError as exc:
        print(f"minisched: {exc.message}", file=sys.stderr)
        return 1


def _received_secrets() -> dict:
    """What :func:`_reexec_serve` handed over: ``{"--token": ..., NAME: ...}``."""
    fd = os.environ.pop("MINISCHED_SECRETS_FD", None)
    if fd is None:
        return {}
    try:
        with os.fdopen(int(fd), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def _show_command_line(args) -> None:
    """Make ``ps`` show ``args`` (``python minisched.py serve ...``) instead of
    the re-executed ``python -c import runpy...``: the original argument
    strings are rewritten in place (Linux; skipped wherever it cannot be
    checked that the memory is what ``/proc/self/cmdline`` shows)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
        fields = data[data.rfind(b")") + 2 :].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end
        with open("/proc/self/cmdline", "rb") as f:
            current = f.read()
        size = end - start
        new = b"\0".join(os.fsencode(a) for a in args) + b"\0"
        if 0 < len(new) <= size and ctypes.string_at(start, size) == current[:size]:
            ctypes.memmove(start, new.ljust(size, b"\0"), size)
    except (OSError, ValueError, IndexError, AttributeError):
        pass


if __name__ == "__main__":
    if _REEXECUTED:
        _show_command_line([sys.executable, *sys.argv])
    sys.exit(main())
