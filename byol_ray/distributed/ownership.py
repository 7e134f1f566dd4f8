"""One live owner per run: the claim a driver takes on its run.name before it opens the run.

Two drivers of one run.name (two shells, a retried `ray job submit`, a sweep started twice) would train
into the same checkpoints and MLflow run. So the driver claims the run where its state lives, in
`<run.output_dir>/<run.name>/owner.json` beside the run's config and metric spool (the folder a cluster
shares between its nodes), and, on a tracking server, in tags of the MLflow run (`byol_ray.owner`,
`byol_ray.owner_heartbeat`), which every driver that logs there can read.

A claim names its owner (host, boot id, pid namespace, pid and its start time, wall-clock start, MLflow
run id) and carries a heartbeat that a thread of the owner renews every `ttl/6` seconds. A second driver
refuses to start while the claim is live, and takes over a stale one with one line. Stale means:
- on the same machine (same boot id and pid namespace): the owner's process is gone, or its pid now
  belongs to a younger process. Decided at once, whatever the heartbeat says;
- anywhere else, where a pid means nothing: the heartbeat is older than the lease (`ttl`, 60 s by default,
  `BYOL_RAY_CLAIM_TTL_S`). A lost node's claim lapses one lease after its last heartbeat.

Reading a claim and writing a new one happen under an exclusive `flock` of `owner.lock` (POSIX locks on
NFS), so two drivers racing for one run cannot both win. The MLflow tags have no such lock: they catch a
second driver on another machine with another output folder, with a window of a few seconds in which two
starts can both pass.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from ..config import Config
from ..errors import UserError
from ..tracking.tracker import live_owner_tag, set_owner_tags
from ..tracking.uri import redact

CLAIM_FILE = "owner.json"
LOCK_FILE = "owner.lock"
TTL_ENV = "BYOL_RAY_CLAIM_TTL_S"
DEFAULT_TTL_S = 60.0


class RunOwnedError(UserError):
    """Another live driver owns this run.name."""


def lease_s() -> float:
    return float(os.environ.get(TTL_ENV, DEFAULT_TTL_S))


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def machine() -> tuple[str, str]:
    """(boot id, pid namespace): equal exactly when a pid of the claim names a process here."""
    return _read("/proc/sys/kernel/random/boot_id"), _link("/proc/self/ns/pid")


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The start time of `pid` in clock ticks since boot ('' when there is no such process): a reused pid
    has another."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


@dataclass
class Owner:
    host: str
    boot_id: str
    pid_ns: str
    pid: int
    pid_start: str
    started: float
    heartbeat: float
    token: str
    mlflow_run_id: str = ""

    @classmethod
    def this_process(cls) -> Owner:
        boot, ns = machine()
        now = time.time()
        pid = os.getpid()
        return cls(socket.gethostname(), boot, ns, pid, process_start(pid), now, now, uuid.uuid4().hex)

    def describe(self, now: float | None = None) -> str:
        started = datetime.datetime.fromtimestamp(self.started, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        age = max(0.0, (now or time.time()) - self.heartbeat)
        run = f"MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else "its MLflow run not opened yet"
        return f"host {self.host}, pid {self.pid}, started {started} UTC, {run}, last heartbeat {age:.0f} s ago"

    def stale_because(self, ttl_s: float, now: float | None = None) -> str:
        """Why this claim no longer holds ('' while its owner lives)."""
        if (self.boot_id, self.pid_ns) == machine() and self.boot_id:
            start = process_start(self.pid)
            if not start:
                return f"its process (pid {self.pid} on this machine) is gone"
            if self.pid_start and start != self.pid_start:
                return f"pid {self.pid} on this machine now belongs to another process"
            if self.pid == os.getpid():
                # A claim of this process that is not the one being judged: an earlier driver of the run in
                # this process (a rerun after an error, or a reused Tune actor), which has ended.
                return "it was an earlier driver in this process, which has ended"
            return ""
        age = (now or time.time()) - self.heartbeat
        if age > ttl_s:
            return f"its last heartbeat is {age:.0f} s old, past the {ttl_s:g} s lease"
        return ""

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None  # torn or foreign: no claim


class Claim:
    """This driver's claim on a run, renewed by a heartbeat thread until `release`."""

    def __init__(self, cfg: Config, uri: str, ttl_s: float):
        self.cfg = cfg
        self.uri = uri
        self.ttl_s = ttl_s
        self.folder = cfg.output_dir / cfg.run.name
        self.owner = Owner.this_process()
        self.lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tag_store = uri.startswith(("http://", "https://")) and cfg.tracking.enabled

    # -- the file, under the lock
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_FILE, "a+") as f:
            _lock(f)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _current(self) -> Owner | None:
        try:
            return Owner.parse((self.folder / CLAIM_FILE).read_text())
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        tmp = self.folder / f".{CLAIM_FILE}.{self.owner.token}"
        tmp.write_text(json.dumps(asdict(self.owner)))
        os.replace(tmp, self.folder / CLAIM_FILE)  # atomic: a reader sees the old claim or the new one

    def take(self) -> None:
        """Claim the run, or refuse (RunOwnedError) while another owner lives."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            other = self._current()
            if other is not None and other.token != self.owner.token:
                why = other.stale_because(self.ttl_s)
                if not why:
                    raise self._refusal(other, "its claim in " + str(self.folder / CLAIM_FILE))
                print(
                    f"[driver] run.name={self.cfg.run.name}: taking over the claim of a driver that is gone "
                    f"({other.describe()}): {why}",
                    flush=True,
                )
            if self._tag_store:
                tagged = live_owner_tag(self.cfg, self.ttl_s)
                tag_owner = Owner.parse(tagged) if tagged else None
                # A driver on this machine whose process is gone left a fresh heartbeat behind (say, one
                # that could not end its run while the server was down): its pid decides, as for the file.
                if tag_owner and tag_owner.token != self.owner.token and not tag_owner.stale_because(self.ttl_s):
                    raise self._refusal(tag_owner, f"the MLflow run's owner tags at {redact(self.uri)}")
            self._write()
        self._thread = threading.Thread(target=self._beat, name="byol-ray-claim-heartbeat", daemon=True)
        self._thread.start()

    def _refusal(self, other: Owner, where: str) -> RunOwnedError:
        name = self.cfg.run.name
        return RunOwnedError(
            f"run.name={name!r} (in {self.cfg.output_dir}) is being trained by another driver: {other.describe()} "
            f"(from {where}). Two drivers would train into the same checkpoints and MLflow run, so this one "
            f"started nothing and changed nothing. Wait for that run to end or stop it (kill {other.pid} on "
            f"{other.host}, or `ray job stop`), or give this run its own name, e.g. run.name={name}-2. A claim "
            f"whose process is gone on this machine is taken over at once; one from another machine lapses "
            f"{self.ttl_s:g} s after its last heartbeat."
        )

    def opened(self, run_id: str, tracker=None) -> None:
        """The MLflow run is open: name it in the claim, and on a tracking server put the claim on the run."""
        self.owner.mlflow_run_id = run_id
        self._renew()
        if tracker is not None:
            with contextlib.suppress(*_tag_errors()):
                set_owner_tags(tracker, json.dumps(asdict(self.owner)), self.owner.heartbeat)

    def _renew(self) -> None:
        self.owner.heartbeat = time.time()
        with self._locked():
            current = self._current()
            if current is not None and current.token != self.owner.token:
                if not self.lost:
                    self.lost = current.describe()
                    print(
                        f"byol-ray: warning: the claim on run.name={self.cfg.run.name} was taken over by "
                        f"{self.lost} while this driver lived (its heartbeat stalled past the lease); two drivers "
                        f"may now train this run",
                        file=sys.stderr,
                        flush=True,
                    )
                return
            self._write()

    def _beat(self) -> None:
        tracker = None
        while not self._stop.wait(self.ttl_s / 6):
            with contextlib.suppress(OSError):
                self._renew()
            if self._tag_store and self.owner.mlflow_run_id and not self.lost:
                with contextlib.suppress(*_tag_errors()):
                    if tracker is None:
                        from ..tracking.tracker import Tracker

                        tracker = Tracker(self.uri, self.owner.mlflow_run_id)
                    set_owner_tags(tracker, json.dumps(asdict(self.owner)), self.owner.heartbeat)

    def release(self) -> None:
        """End the heartbeat and remove the claim if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError), self._locked():
            current = self._current()
            if current is not None and current.token == self.owner.token:
                (self.folder / CLAIM_FILE).unlink()


def _lock(f: IO[str]) -> None:
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:  # a filesystem without locks: the heartbeat check still holds, the race window opens
        print(
            f"byol-ray: warning: cannot lock {f.name} ({e.strerror}); the run's claim is taken without it",
            file=sys.stderr,
            flush=True,
        )


def _tag_errors() -> tuple[type[BaseException], ...]:
    from ..tracking.client import delivery_errors

    return delivery_errors()


@contextlib.contextmanager
def claim_run(cfg: Config, uri: str) -> Iterator[Claim]:
    """Hold the claim on cfg.run.name for the block (see the module doc)."""
    claim = Claim(cfg, uri, lease_s())
    claim.take()
    try:
        yield claim
    finally:
        claim.release()
