"""Group commit of the files closed on the drive.

A close hands its file's new content to the Committer, which appends it to the repo's close
journal (castore.journal) and returns: from then on the close survives the daemon being
killed. One thread commits what has queued up in one synced LMDB transaction, so a program
that writes many small files pays two fsyncs per group instead of per file; the journal
starts again empty whenever everything queued is committed. Until its group commits, the
file is served from its open state (the vfs keeps it registered). fsync waits for the
commit.

A group waits up to LINGER after its first close for more to queue: nobody waits for it
(closes return once journaled, readers are served from the open files), and every commit
rewrites the B-tree pages it touches and syncs them, which costs about as much CPU for one
file as for twenty. Anyone who does wait for a commit (fsync, a write to a file whose close is
landing, a change to the tree, drain) cuts the wait short: see Landing and hurry().
Imports no FUSE code.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from castore import journal
from castore.errors import CastoreError, StorageFullError
from castore.ids import NodeId
from castore.ops import Attrs
from castore.journal import Intent, Journal
from castore.repo import Repo
from castore.store.lmdb import LmdbEnv, LmdbTxn
from castore.vfs.readcache import DeadlineError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DRIVE = threading.local()      # .on while a thread commits a change made through the drive

GROUP_FILES = 512               # closes committed in one transaction at most
GROUP_BYTES = 64 << 20          # bytes of new chunks in one transaction at most
JOURNAL_MAX = 256 << 20         # past this, closes wait for the journal to empty
LINGER = 0.01                   # seconds a group waits for more closes, unless hurried
RETRY_FULL = 1.0                # seconds between attempts while the disk is full


class Landing:
    """Set once a close has landed (committed or failed): an event for one setter (the
    committer thread), made of a plain lock because one is made for every close (a
    threading.Event costs a Condition and an RLock). Waiting for it tells the committer to
    commit at once instead of letting the group linger."""

    __slots__ = ("_lock", "_set", "_hurry")

    def __init__(self, hurry: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()                # held until set()
        self._set = False
        self._hurry = hurry

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._hurry is not None:
            self._hurry()
        if self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._lock.release()            # the next waiter's turn
            return True
        return self._set


@dataclass(eq=False, slots=True)
class Closing:
    """One close on its way to the store. `result` is (node, version key, content ref)."""

    intent: Intent
    end: int = 0                                 # journal offset after its record
    owner: object = None                         # the open file, for the landing callback
    done: Landing = field(default_factory=Landing)
    seq: int = 0                                 # submission order
    queued: float = 0.0                          # time.monotonic() of the submission
    result: tuple[NodeId, bytes, bytes] | None = None
    error: BaseException | None = None

    def wait(self, timeout: float) -> tuple[NodeId, bytes, bytes]:
        if not self.done.wait(timeout):
            raise DeadlineError(f"a closed file was not committed within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass(slots=True)
class AttrChange:
    """The owner of a journaled attribute change (Intent.of_attrs) of a committed node, or
    (Intent.of_attrs_at) of a file whose create is still landing: node is set when it lands,
    and stays None if it fails."""

    node: NodeId | None
    attrs: Attrs = field(default_factory=dict)


class Committer:
    """Commits closed files in groups, in the order they were closed. on_landed(closing)
    runs on the committer thread after each commit (or failure) of a close."""

    def __init__(self, repo: Repo, on_landed: Callable[[Closing], None]) -> None:
        self._repo = repo
        self._journal: Journal = repo.close_journal()
        self._on_landed = on_landed
        self._cond = threading.Condition()
        self._queue: deque[Closing] = deque()
        self._busy = 0                      # closes queued or being committed
        self._seq = 0                       # closes submitted so far
        self._hurried = 0                   # closes up to this seq are committed at once
        self._lingering = False             # the committer waits for a group to fill
        self._queued_bytes = 0
        self._keep = False                  # a close could not commit for lack of space
        # the LMDB transaction of the newest commit whose open files have started to change
        # (see landing()): a reader whose snapshot is older reads again
        self.landing_txn = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="castore-vfs-commit",
                                        daemon=True)
        self._thread.start()

    def submit(self, intent: Intent, owner: object, timeout: float = 60.0) -> Closing:
        """Journal the close and queue it. Raises StorageFullError (the disk is full: the
        caller commits directly, which reports it) or DeadlineError."""
        closing = Closing(intent, owner=owner, done=Landing(self.hurry))
        size = sum(len(p.stored) for p in intent.prepared)
        with self._cond:
            deadline = time.monotonic() + timeout
            while self._journal_full() and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineError("the close journal did not empty in time")
                self._cond.wait(min(left, 0.5))
            if self._stop:
                raise DeadlineError("the drive is shutting down")
            closing.end = self._journal.append(intent)   # under _cond: journal order = queue
            self._seq += 1
            closing.seq, closing.queued = self._seq, time.monotonic()
            self._queue.append(closing)
            self._busy += 1
            self._queued_bytes += size
            if not self._lingering or self._full():
                self._cond.notify_all()
        return closing

    def hurry(self) -> None:
        """Commit what is queued now, without waiting for the group to fill."""
        with self._cond:
            if self._hurried < self._seq:
                self._hurried = self._seq
                self._cond.notify_all()

    def _full(self) -> bool:
        return len(self._queue) >= GROUP_FILES or self._queued_bytes >= GROUP_BYTES

    def _journal_full(self) -> bool:
        return self._busy > 0 and self._journal.size > JOURNAL_MAX

    def drain(self, timeout: float) -> bool:
        """Wait until every close submitted so far is committed (or failed)."""
        deadline = time.monotonic() + timeout
        self.hurry()
        with self._cond:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def landing(self, txn_id: int) -> None:
        """The commit txn_id is durable and the open files are about to show it. Readers
        look at a snapshot of the store and at the open files, without a lock between the
        two: one whose snapshot predates txn_id may find the open files already past it (a
        new file gone from the files being created, but not in its snapshot yet), so it
        compares its snapshot with landing_txn afterwards and reads again (see
        VfsCore._stable). No reader waits for a commit."""
        if txn_id > self.landing_txn:
            self.landing_txn = txn_id

    @property
    def busy(self) -> int:
        return self._busy

    def close(self, timeout: float = 60.0) -> None:
        if not self.drain(timeout):
            log.error("closed files were still being committed at shutdown; the close "
                      "journal keeps them for the next start")
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5.0)

    # -- the committer thread ---------------------------------------------------------------
    def _take(self) -> list[Closing]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(1.0)
            if self._queue:
                self._linger(self._queue[0].queued + LINGER)
            group: list[Closing] = []
            size = 0
            while self._queue and len(group) < GROUP_FILES and \
                    (not group or size < GROUP_BYTES):
                c = self._queue.popleft()
                group.append(c)
                size += sum(len(p.stored) for p in c.intent.prepared)
            self._queued_bytes = max(0, self._queued_bytes - size)
            return group

    def _linger(self, until: float) -> None:
        """Wait (under _cond) for the group to fill, until `until`, unless someone waits for
        a queued close or the committer stops."""
        self._lingering = True
        try:
            while not self._stop and not self._full() and self._hurried < self._queue[0].seq:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
        finally:
            self._lingering = False

    def _run(self) -> None:
        while True:
            group = self._take()
            if not group:
                if self._stop:
                    return
                continue
            self.landing(self._commit(group))
            for c in group:
                try:
                    self._on_landed(c)
                except Exception:  # the drive's bookkeeping must not stop the committer
                    log.exception("after committing a closed file")
                c.done.set()
            with self._cond:
                self._busy -= len(group)
                if not self._busy and not self._keep:
                    try:
                        self._journal.reset()
                    except CastoreError as exc:
                        log.error("%s", exc)
                self._cond.notify_all()

    def _commit(self, group: list[Closing]) -> int:
        """Commit the group; returns the id of the last LMDB transaction it committed."""
        repo = self._repo
        gen = self._journal.generation
        last = 0

        def run_all(t: LmdbTxn) -> list[tuple[NodeId, bytes, bytes]]:
            nonlocal last
            out = [journal.apply(t, repo.ns, repo.files, repo.store, c.intent) for c in group]
            journal.mark_applied(t, gen, group[-1].end)
            last = t.txn_id()
            return out
        try:
            for c, result in zip(group, self._write(run_all)):
                c.result = result
            return last
        except CastoreError:
            pass                            # one of them cannot commit: one by one
        except Exception as exc:  # a bug must not lose the others
            log.exception("committing closed files")
            for c in group:
                c.error = exc
            return last
        for c in group:
            def run_one(t: LmdbTxn, c: Closing = c) -> tuple[NodeId, bytes, bytes]:
                nonlocal last
                out = journal.apply(t, repo.ns, repo.files, repo.store, c.intent)
                journal.mark_applied(t, gen, c.end)
                last = t.txn_id()
                return out
            try:
                c.result = self._write(run_one)
            except StorageFullError as exc:    # only while stopping: the journal keeps it
                c.error = exc
                self._keep = True
            except CastoreError as exc:
                log.warning("a file closed on the drive could not be committed: %s", exc)
                c.error = exc
                try:
                    self._write(lambda t, c=c: journal.mark_applied(t, gen, c.end))
                except CastoreError:
                    pass
        return last

    def _write(self, fn: Callable[[LmdbTxn], T]) -> T:
        """env.write, waiting while the disk is full: the closes stay in the journal (and
        served from memory) until space returns or the drive stops."""
        while True:
            try:
                return drive_write(self._repo.env, fn)
            except StorageFullError as exc:
                if self._stop:
                    raise
                log.error("%s; closed files wait in the close journal", exc)
                time.sleep(RETRY_FULL)


def drive_write(env: LmdbEnv, fn: Callable[[LmdbTxn], T]) -> T:
    """env.write of a change made through the drive: the repo's listeners, which run inside
    the commit, can tell it from other local changes (drive_commits)."""
    _DRIVE.on = True
    try:
        return env.write(fn)
    finally:
        _DRIVE.on = False


def drive_commits() -> bool:
    """True in a repo listener called for a commit of drive_write: the kernel saw that change
    happen through the mount, so nothing it caches needs dropping."""
    return bool(getattr(_DRIVE, "on", False))
