"""A pool of worker processes, each running attempts in slots, fed over one stream each.

Workers run tenants' tasks, so each one is confined (`WorkerSandbox`): it may only run
``@sdk.task`` functions of the operator's handler packages, it gets a scrubbed environment
(no WEIR_* settings), resource limits, and a fresh random token that every call to it must
present. When the executor-manager runs as root, workers run as the unprivileged worker user
in a mount namespace of their own, where the directories holding secrets are hidden (see
`WorkerSandbox.command`).

`WorkerPool` never blocks its caller: `submit` places attempts on workers with a free slot
(or queues them), and what happens to them comes back through two callbacks, called on the
pool's own thread. Each worker process holds one ``WorkerService.Run`` stream (the worker
protocol, ``protos/weir/worker/v1/worker.proto``) on which attempts go out and starts and ends come
back, both batched. The only way to stop an attempt early is to kill its process: a timeout
or a cancel ends the other attempts of that process WORKER_CRASHED, and the pool starts a
fresh process in its place.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import pwd
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.rpc import code_pb2, status_pb2
from weir.v1 import common_pb2, tasks_pb2
from weir.worker.v1 import worker_pb2, worker_pb2_grpc

from libs import logs
from libs.config import WeirConfig
from libs.healthcheck import is_serving
from libs.sdk.capture import DEFAULT_MAX_BYTES as DEFAULT_LOG_MAX_BYTES, cap_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
# Inside the repository, never shown to a worker: API keys and TLS keys, engine data and logs.
SECRET_DIRS = (".weir", ".var")
PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs as root in the worker's fresh mount namespace (unshare --propagation private: nothing
# leaks back to the host), then execs the rest of its arguments (prlimit, setpriv, python):
# one process from unshare to python, so the worker's parent is the executor-manager itself.
#   $1 the view: a tmpfs on a root-owned empty directory, where the worker user can reach
#      everything it needs even when the checkout or the interpreter (/root/.pyenv) sits in a
#      directory it cannot traverse; bind mounts ignore the permissions of the source's path.
#   $2 the directory to start in; then pairs "source name" bound read-only at $view/name,
#   "--", directories to cover with an empty unreadable tmpfs, "--", the command.
MOUNT_SCRIPT = """set -eu
view=$1 start=$2; shift 2
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev weir-view "$view"
while [ "$1" != -- ]; do
  mkdir -p "$view/$2"
  mount --bind -o ro,nosuid,nodev "$1" "$view/$2"
  shift 2
done
shift
while [ "$1" != -- ]; do
  mount -t tmpfs -o ro,mode=000,size=4k,nosuid,nodev,noexec weir-hidden "$1"
  shift
done
shift
cd "$start"
unset PWD OLDPWD  # cd exports them; the worker's environment stays what the pool chose
exec "$@"
"""


@dataclass(frozen=True, kw_only=True)
class WorkerSandbox:
    """How worker processes are confined.

    Limits are set with util-linux ``prlimit`` rather than ``preexec_fn``: preexec_fn runs
    Python between fork and exec, which the subprocess docs call unsafe in a threaded program
    (workers are restarted from attempt threads while gRPC threads run; a lock held elsewhere
    at fork time deadlocks the child). prlimit sets them in the child itself and execs on,
    and the limits show on the command line.
    """

    handler_packages: str  # comma-separated, as the setting
    memory_mb: int  # RLIMIT_AS
    cpu_seconds: int  # RLIMIT_CPU; a worker past half of it is replaced after its attempt
    open_files: int  # RLIMIT_NOFILE
    max_processes: int  # RLIMIT_NPROC, processes and threads of the worker user
    user: str  # the worker user, when the executor-manager runs as root
    hidden_dirs: tuple[Path, ...] = ()  # secrets a worker must not see
    # Each attempt's captured output (stdout, stderr, logging), in bytes of UTF-8: the
    # worker's --log-max-bytes, and enforced again on what it sends (`checked_log`).
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES

    @classmethod
    def of(cls, config: WeirConfig) -> WorkerSandbox:
        """The sandbox the settings describe; the credentials directory is hidden too."""
        credentials = Path(config.credentials_dir)
        return cls(handler_packages=config.handler_packages, memory_mb=config.worker_memory_mb,
                   cpu_seconds=config.worker_cpu_seconds, open_files=config.worker_open_files,
                   max_processes=config.worker_max_processes, user=config.worker_user,
                   log_max_bytes=config.attempt_log_max_bytes,
                   hidden_dirs=(*(ROOT / d for d in SECRET_DIRS),
                                credentials if credentials.is_absolute() else ROOT / credentials))

    @property
    def switches_user(self) -> bool:
        """Whether workers run as ``user``: only root can switch, and only root needs to."""
        return os.geteuid() == 0

    def account(self) -> pwd.struct_passwd:
        """The worker user's entry.

        Raises:
            RuntimeError: the user does not exist.
        """
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            raise RuntimeError(
                f"the worker user {self.user!r} does not exist; as root, run "
                "deploy/local/worker-user.sh (or set WEIR_WORKER_USER to an unprivileged "
                "user)") from None

    def limits(self, *, with_processes: bool) -> list[str]:
        """The prlimit command line (soft = hard limit, so a handler cannot raise them).

        RLIMIT_NPROC counts every process and thread of the real user, so it is set only for
        the dedicated worker user: on a developer's own user it would count their engines'
        hundreds of JVM threads and keep the worker from starting its own.
        """
        return ["prlimit", f"--as={self.memory_mb * 1024 * 1024}", f"--cpu={self.cpu_seconds}",
                f"--nofile={self.open_files}",
                *([f"--nproc={self.max_processes}"] if with_processes else []), "--"]

    def command(self, *, worker: list[str], home: Path, view: Path
                ) -> tuple[list[str], dict[str, str], Path]:
        """The command line, environment and working directory that start a worker.

        Args:
            worker: the worker's arguments after ``python -m libs.sdk.worker``.
            home: the worker's own directory (its socket, HOME and TMPDIR), writable by it.
            view: an empty directory for the namespace's view (root only).
        """
        env = {"PATH": PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": str(home),
               # For tempfile: its own directory, emptied for each new process, so what one
               # attempt's handler leaves behind is not found by a later process of the slot.
               "TMPDIR": str(home), "PYTHONNOUSERSITE": "1",
               # RLIMIT_AS counts reserved address space: glibc reserves 64 MiB per thread
               # arena, so an idle worker measured 627 MiB (843 MiB after concurrent calls)
               # against 179 MiB (203 MiB) with two arenas. Two leave a handler nearly all
               # of the limit; a process's slots contend little for them, as handlers hold the
               # GIL while they allocate.
               "MALLOC_ARENA_MAX": "2"}
        if not self.switches_user:
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")])
            return ([*self.limits(with_processes=False), sys.executable, "-s", "-m",
                     "libs.sdk.worker", *worker], env, ROOT)
        account = self.account()
        prefix = Path(sys.base_prefix).resolve()
        try:
            interpreter = Path(os.path.realpath(sys.executable)).relative_to(prefix)
        except ValueError:
            interpreter = Path("bin") / f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = Path(sysconfig.get_paths()["purelib"])
        repo = view / "repo"
        env.update(
            PYTHONPATH=os.pathsep.join([str(repo), str(repo / "gen" / "python"),
                                        str(view / "site")]),
            # The interpreter links libpython from its prefix by an absolute RUNPATH
            # (/root/.pyenv/…/lib), which the worker user cannot traverse.
            LD_LIBRARY_PATH=str(view / "python" / "lib"))
        hidden = [d for d in self.outermost_hidden() if d.is_dir()]
        covered = [*hidden, *(repo / d.relative_to(ROOT) for d in hidden if d.is_relative_to(ROOT))]
        command = [
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", MOUNT_SCRIPT, "weir-worker-mounts", str(view), str(repo),
            str(prefix), "python", str(site), "site", str(ROOT), "repo", "--",
            *map(str, covered), "--",
            *self.limits(with_processes=True),
            "setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
            "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            # -S: no site-packages of the interpreter's own; the venv's come by PYTHONPATH.
            str(view / "python" / interpreter), "-S", "-m", "libs.sdk.worker", *worker]
        return command, env, home

    def outermost_hidden(self) -> list[Path]:
        """The hidden directories, resolved, without those inside another (covering
        ``.weir`` already hides ``.weir/credentials``, and a mount on a path the first
        cover has emptied would fail)."""
        resolved = {d.resolve() for d in self.hidden_dirs}
        return sorted(d for d in resolved
                      if not any(d != other and d.is_relative_to(other) for other in resolved))

    def prepare(self, socket_dir: Path) -> None:
        """Readies the socket directory (and hidden directories) before workers start.

        Raises:
            RuntimeError: the worker user is missing or cannot reach ``socket_dir``.
        """
        socket_dir.mkdir(parents=True, exist_ok=True)
        if not self.switches_user:
            return
        account = self.account()
        # Traversable, not listable: each worker reaches only its own directory.
        socket_dir.chmod(0o711)
        for parent in socket_dir.resolve().parents:
            if not _traversable(parent, account):
                raise RuntimeError(
                    f"the worker user {self.user!r} cannot reach {socket_dir}: {parent} is "
                    "closed to it; start the executor-manager with TMPDIR elsewhere")
        for hidden in self.outermost_hidden():
            if socket_dir.resolve().is_relative_to(hidden):
                raise RuntimeError(f"{socket_dir} is inside {hidden}, which workers must not see")
            # Only an existing directory can be covered: a repository one is made now, so
            # what is written there later is hidden too.
            if hidden.is_relative_to(ROOT):
                hidden.mkdir(mode=0o700, parents=True, exist_ok=True)


def _traversable(directory: Path, account: pwd.struct_passwd) -> bool:
    mode = directory.stat()
    if mode.st_uid == account.pw_uid:
        return bool(mode.st_mode & stat.S_IXUSR)
    if mode.st_gid == account.pw_gid:
        return bool(mode.st_mode & stat.S_IXGRP)
    return bool(mode.st_mode & stat.S_IXOTH)


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on a channel, so no call to a
    worker can go out without it."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                              client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_stream(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                                client_call_details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


# The worker runtime's limits (libs/sdk/worker.py): messages either way, and how much payload
# one message carries before a batch is split.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024


class WorkerProcess:
    """One worker process serving the worker protocol on a unix socket.

    The object stands for a slot of the pool: `start` after `kill` runs a fresh process (new
    token, emptied home) in the same place.
    """

    def __init__(self, *, index: int, socket_dir: Path, sandbox: WorkerSandbox,
                 slots: int = 1) -> None:
        self.index = index
        self.sandbox = sandbox
        self.slots = slots
        self.home = socket_dir / f"worker-{index}"  # owned by the worker: socket, HOME
        # Root's, beside the home rather than in it: a worker could replace a mount point in
        # a directory it owns (with a symlink, say) before its slot's next start.
        self.view = socket_dir / f"view-{index}"
        self.socket = self.home / "worker.sock"
        self.address = f"unix://{self.socket}"
        self.process: subprocess.Popen | None = None
        self.token = ""  # the current process's; only this executor-manager and it know it
        self.channel: grpc.Channel | None = None
        self.stub: worker_pb2_grpc.WorkerServiceStub | None = None

    def start(self, *, timeout_seconds: float = 60.0) -> None:
        """Starts a fresh process and waits until it serves.

        Raises:
            RuntimeError: it exited or did not serve within ``timeout_seconds`` (it is
                killed).
        """
        # A fresh directory each time: nothing a previous handler (another tenant's) left in
        # HOME or TMPDIR is seen by the next. rmtree does not follow symlinks planted there.
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(mode=0o700)
        if self.sandbox.switches_user:
            account = self.sandbox.account()
            os.chown(self.home, account.pw_uid, account.pw_gid)
            self.view.mkdir(mode=0o700, exist_ok=True)
        self.token = token = secrets.token_urlsafe(32)  # 256 random bits, new per process
        # --parent-pid: the worker exits when this process is gone, even after a kill -9.
        command, env, cwd = self.sandbox.command(
            worker=["--address", self.address, "--handler-packages",
                    self.sandbox.handler_packages, "--slots", str(self.slots),
                    "--parent-pid", str(os.getpid()),
                    "--log-max-bytes", str(self.sandbox.log_max_bytes)],
            home=self.home, view=self.view)
        self.process = process = subprocess.Popen(command, env=env, cwd=cwd,
                                                  stdin=subprocess.PIPE)
        assert process.stdin is not None
        # On stdin, never argv or the environment: /proc/<pid>/cmdline and environ are
        # readable by every other process of the worker's user.
        try:
            process.stdin.write(f"{token}\n".encode())
            process.stdin.close()
        except BrokenPipeError:
            pass  # it died already; the wait below says so
        deadline = time.monotonic() + timeout_seconds
        while not is_serving(self.address, timeout_seconds=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker {self.index} did not start")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.stub = worker_pb2_grpc.WorkerServiceStub(
            grpc.intercept_channel(self.channel, BearerToken(token)))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def cpu_seconds(self) -> float:
        """CPU time the process has used (user + system), what RLIMIT_CPU counts."""
        if self.process is None:
            return 0.0
        try:
            stat_line = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return 0.0
        # Fields after the command name, which may hold spaces and parentheses: utime and
        # stime are the 14th and 15th fields of the line.
        fields = stat_line.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def terminate(self) -> None:
        """Kills the process without waiting (an attempt to stop at once); its stream breaks
        and the pool replaces it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def kill(self) -> None:
        """Kills the process, reaps it and closes the channel."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def exit_description(self, wait_seconds: float = 1.0) -> str:
        """How the process ended, e.g. ``killed by SIGSEGV``, after waiting a little for it."""
        if self.process is None:
            return "never started"
        try:
            code = self.process.wait(wait_seconds)
        except subprocess.TimeoutExpired:
            return "still running, its stream broken"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"


Exit = tasks_pb2.ExitReason
HIGH = common_pb2.Priority.PRIORITY_HIGH
ErrorClass = common_pb2.ErrorClass


@dataclass(frozen=True)
class AttemptSpec:
    """An attempt to run: what a worker needs and how the pool treats it."""

    attempt_id: str  # unique among the pool's attempts; the dispatcher's id of this attempt
    tenant_id: str
    task_id: str
    function: str
    handler: str  # Function.handler, "package.module:function"
    payload: bytes
    attempt_number: int  # 1 for the first attempt
    timeout: timedelta  # from its start; past it its worker is killed: TIMED_OUT
    concurrency: int = 1  # attempts of this function (tenant_id, function) one worker runs
    labels: Mapping[str, str] = field(default_factory=dict)
    priority: int = common_pb2.Priority.PRIORITY_NORMAL  # HIGH goes first, into any slot
    trace_context: Mapping[str, str] = field(default_factory=dict)  # traceparent, tracestate


@dataclass(frozen=True)
class AttemptResult:
    """How an attempt ended, as the pool reports it (exactly once per submitted attempt)."""

    attempt_id: str
    start_time: datetime | None  # None: it never started (cancelled while queued, say)
    end_time: datetime
    result: bytes = b""
    status: status_pb2.Status | None = None  # None: success
    error_class: ErrorClass = ErrorClass.ERROR_CLASS_UNSPECIFIED
    exit_reason: Exit = Exit.EXIT_REASON_RETURNED
    retry_delay: timedelta | None = None  # asked for by the handler
    traceback: str = ""  # the handler's, when it raised
    log: worker_pb2.CapturedLog | None = None  # what the handler wrote, within the cap

    @property
    def succeeded(self) -> bool:
        return self.status is None


class PoolClosed(RuntimeError):
    """The pool takes no more attempts: it is draining or closed."""


class LinkState(enum.Enum):
    LIVE = "live"  # takes attempts
    RETIRING = "retiring"  # past half of its CPU time: takes none, replaced once empty
    STOPPING = "stopping"  # killed by the pool; its stream is about to break
    GONE = "gone"  # its stream broke; being replaced


class _PoolState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


class Held:
    """An attempt the pool holds: queued, or sent to a worker."""

    __slots__ = ("spec", "key", "link", "deadline", "start_time", "ending")

    def __init__(self, spec: AttemptSpec) -> None:
        self.spec = spec
        self.key = (spec.tenant_id, spec.function)
        self.link: Link | None = None  # the worker it was sent to
        self.deadline = 0.0  # monotonic; from sending until its start is known, then start
        self.start_time: datetime | None = None
        self.ending: Exit | None = None  # an exit reason the pool decided (TIMED_OUT, CANCELLED)


class Link:
    """One worker process's Run stream and the attempts sent on it."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.held: dict[str, Held] = {}
        self.per_function: dict[tuple[str, str], int] = {}
        self.state = LinkState.LIVE
        self.stopped_for = ""  # why the pool killed it, if it did
        # Batches for grpc's request thread; None ends the request stream.
        self.sending: queue.SimpleQueue[list[Held] | None] = queue.SimpleQueue()
        self.call: Any = None

    @property
    def busy(self) -> int:
        return len(self.held)


def least_busy(candidates: Iterable[Link], key: tuple[str, str], concurrency: int
               ) -> Link | None:
    """The candidate running the fewest attempts among those running fewer than
    ``concurrency`` of the function ``key``; the first of equals; None when none may take it.

    Candidates are workers with a free slot.
    """
    best: Link | None = None
    for candidate in candidates:
        if candidate.per_function.get(key, 0) >= concurrency:
            continue
        if best is None or candidate.busy < best.busy:
            best = candidate
    return best


def time_of(timestamp: Any) -> datetime:
    """A google.protobuf.Timestamp as an aware datetime (microseconds)."""
    return datetime.fromtimestamp(timestamp.seconds, UTC).replace(
        microsecond=timestamp.nanos // 1000)


def checked_log(log: worker_pb2.CapturedLog, max_bytes: int) -> worker_pb2.CapturedLog | None:
    """A worker's captured log, within ``max_bytes`` whatever the worker sent (it runs tenant
    code): a longer text is cut again, head and tail. None when there is no text."""
    if not log.text:
        return None
    size = len(log.text.encode("utf-8"))
    if size <= max_bytes:
        return worker_pb2.CapturedLog(text=log.text, truncated=log.truncated,
                                      original_bytes=max(log.original_bytes, size))
    cut = cap_text(log.text, max_bytes)
    return worker_pb2.CapturedLog(text=cut.text, truncated=True,
                                  original_bytes=max(log.original_bytes, size))


def outcome_of(attempt_id: str, start_time: datetime | None, update: Any,
               log_max_bytes: int = DEFAULT_LOG_MAX_BYTES) -> AttemptResult:
    """The result of an attempt from the worker's update that reports its end."""
    end_time = time_of(update.end_time)
    log = checked_log(update.log, log_max_bytes) if update.HasField("log") else None
    if not update.HasField("error"):
        return AttemptResult(attempt_id, start_time, end_time, result=update.result, log=log)
    error = update.error
    return AttemptResult(
        attempt_id, start_time, end_time, status=error.status,
        error_class=error.error_class or ErrorClass.ERROR_CLASS_RETRYABLE,
        exit_reason=Exit.EXIT_REASON_RAISED,
        retry_delay=error.retry_delay.ToTimedelta() if error.HasField("retry_delay") else None,
        traceback=error.traceback, log=log)


def stopped_result(spec: AttemptSpec, start_time: datetime | None, *, exit_reason: Exit,
                   detail: str, now: datetime) -> AttemptResult:
    """The result of an attempt the pool ended without an answer from its worker."""
    if exit_reason == Exit.EXIT_REASON_TIMED_OUT:
        status = status_pb2.Status(
            code=code_pb2.DEADLINE_EXCEEDED,
            message=f"ran longer than the timeout of {spec.timeout.total_seconds():g}s")
        error_class = ErrorClass.ERROR_CLASS_RETRYABLE
    elif exit_reason == Exit.EXIT_REASON_CANCELLED:
        status = status_pb2.Status(code=code_pb2.CANCELLED, message=detail)
        error_class = ErrorClass.ERROR_CLASS_NON_RETRYABLE  # nobody wants it any more
    else:
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=detail)
        error_class = ErrorClass.ERROR_CLASS_RETRYABLE
    return AttemptResult(spec.attempt_id, start_time, now, status=status,
                         error_class=error_class, exit_reason=exit_reason)


def tier_rank(priority: int) -> int:
    """0 for HIGH, 1 for NORMAL (or unset), 2 for LOW: the order attempts are placed in."""
    return 0 if priority == HIGH else 2 if priority == common_pb2.Priority.PRIORITY_LOW else 1


def place(waiting: collections.deque[Held], links: Sequence[Link | None], *, slots: int,
          now: float, high_reserve: int = 0) -> dict[Link, list[Held]]:
    """Assigns waiting attempts to live workers, HIGH first, then NORMAL, then LOW, each tier
    in order, and takes them off ``waiting`` (left in that order).

    Each goes to the least busy live worker with a free slot that runs fewer than its
    ``concurrency`` attempts of its function; one that no worker may take stays, in its
    place, and later ones may pass it. NORMAL and LOW attempts never take the last
    ``high_reserve`` free slots: those wait for HIGH ones.

    Args:
        waiting: the queue, oldest first; what is placed is removed.
        links: the workers (None: a slot whose process is starting).
        slots: attempts a worker runs at once.
        now: monotonic time; an attempt's deadline counts from it until its start is known.
        high_reserve: free slots kept for HIGH attempts.

    Returns:
        The attempts to send to each worker, in order.
    """
    free = [link for link in links if link is not None
            and link.state is LinkState.LIVE and len(link.held) < slots]
    spare = sum(slots - len(link.held) for link in free)
    queue = collections.deque(sorted(waiting, key=lambda h: tier_rank(h.spec.priority)))
    waiting.clear()
    skipped: list[Held] = []
    blocked: set[tuple[str, str]] = set()  # functions no free worker may take more of
    batches: dict[Link, list[Held]] = {}
    while queue and free:
        held = queue.popleft()
        if held.spec.priority != HIGH and spare <= high_reserve:
            queue.appendleft(held)  # this one and every later one is below HIGH
            break
        key = held.key
        link = None if key in blocked else least_busy(free, key, held.spec.concurrency)
        if link is None:
            blocked.add(key)
            skipped.append(held)
            continue
        held.link = link
        held.deadline = now + held.spec.timeout.total_seconds()
        link.held[held.spec.attempt_id] = held
        link.per_function[key] = link.per_function.get(key, 0) + 1
        batches.setdefault(link, []).append(held)
        spare -= 1
        if len(link.held) >= slots:
            free.remove(link)
    waiting.extend(skipped)  # they came before what is left in the queue
    waiting.extend(queue)
    return batches


CPU_CHECK_SECONDS = 1.0  # how often workers' CPU time is compared with their budget
# Never the name or ID of the attempt a worker was killed for: it may be another tenant's.
STOPPED_BESIDE = ("its worker process was stopped to end another attempt it was running "
                  "(a timeout or a cancel)")


class WorkerPool:
    """Runs attempts on ``size`` worker processes of ``slots`` slots each, without blocking.

    `submit` places each attempt on a live worker with a free slot that runs fewer than its
    ``concurrency`` attempts of its function, the least busy first; the others wait in a
    queue, HIGH ahead of NORMAL ahead of LOW and in order within a tier (an attempt held back
    by its function's concurrency lets later ones pass). NORMAL and LOW attempts leave the
    last ``high_reserve`` free slots to HIGH ones. Every submitted attempt is reported
    exactly once through ``on_done`` (unless the pool is closed first), after ``on_start``
    if it started. Both are called on the pool's
    notifier thread, in order, never under the pool's lock: they may call `submit`,
    `cancel` and the rest, but must not block for long (the next reports wait).

    A watchdog kills the process of an attempt past its timeout (TIMED_OUT; the others of
    that process end WORKER_CRASHED); a process that dies ends all of its attempts
    WORKER_CRASHED; either way a fresh process takes its place. A process past half of its
    CPU-time limit takes no new attempts and is replaced once it has none.
    """

    def __init__(self, *, size: int, slots: int, socket_dir: Path, sandbox: WorkerSandbox,
                 on_done: Callable[[Sequence[AttemptResult]], None],
                 on_start: Callable[[str, datetime], None] | None = None,
                 start_timeout: timedelta = timedelta(seconds=60), high_reserve: int = 0
                 ) -> None:
        """Prepares the pool; `start` starts its processes.

        Args:
            size: worker processes.
            slots: attempts each process runs at once (threads in it).
            socket_dir: where the processes' directories and sockets go.
            sandbox: how they are confined.
            on_done: called with the results of attempts that ended, in batches.
            on_start: called with an attempt's ID and start time when its worker reports it.
            start_timeout: how long a process may take to serve.
            high_reserve: free slots only HIGH attempts take (NORMAL and LOW wait instead).

        Raises:
            ValueError: no worker or no slot.
            RuntimeError: the sandbox cannot be prepared (e.g. the worker user is missing).
        """
        if size < 1 or slots < 1:
            raise ValueError("a pool needs at least one worker of at least one slot")
        if not 0 <= high_reserve < size * slots:
            raise ValueError("the slots kept for HIGH must leave at least one for the others")
        self.high_reserve = high_reserve
        sandbox.prepare(socket_dir)
        self._sandbox = sandbox
        self._slots = slots
        self._start_timeout = start_timeout.total_seconds()
        self._on_done = on_done
        self._on_start = on_start
        self._processes = [WorkerProcess(index=i, socket_dir=socket_dir, sandbox=sandbox,
                                         slots=slots) for i in range(size)]
        self._links: list[Link | None] = [None] * size
        self._lock = threading.Lock()
        self._watch = threading.Condition(self._lock)  # the watchdog sleeps on it
        self._emptied = threading.Condition(self._lock)  # drain waits on it
        self._state = _PoolState.NEW
        self._held: dict[str, Held] = {}  # every attempt submitted and not yet reported
        self._waiting: collections.deque[Held] = collections.deque()
        self._watch_until = float("inf")  # when the watchdog wakes next (monotonic)
        # To the notifier: (starts, results) in the order they happened; an Event is a marker
        # set once everything before it was delivered; None stops it.
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._replacing = ThreadPoolExecutor(max_workers=size, thread_name_prefix="replace")
        self._threads: list[threading.Thread] = []

    # -- the API -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the processes (in parallel) and the pool's threads.

        Raises:
            RuntimeError: a process did not start.
        """
        with ThreadPoolExecutor(max_workers=len(self._processes)) as starting:
            opening = [starting.submit(self._open, process) for process in self._processes]
        try:
            links = [future.result() for future in opening]
        except Exception:
            for process in self._processes:
                process.kill()
            raise
        self._threads = [threading.Thread(target=self._notify, name="pool-notifier",
                                          daemon=True),
                         threading.Thread(target=self._watchdog, name="pool-watchdog",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        with self._lock:
            self._state = _PoolState.OPEN
            for link in links:
                self._register(link)

    @property
    def capacity(self) -> int:
        """Attempts the pool runs at once: processes × slots."""
        return len(self._processes) * self._slots

    @property
    def in_flight(self) -> int:
        """Attempts submitted and not yet reported, queued ones included."""
        with self._lock:
            return len(self._held)

    @property
    def busy_slots(self) -> int:
        """Slots taken: attempts sent to a worker and not yet reported."""
        with self._lock:
            return len(self._held) - len(self._waiting)

    @property
    def queued(self) -> int:
        """Attempts waiting for a slot."""
        with self._lock:
            return len(self._waiting)

    @property
    def draining(self) -> bool:
        """Whether `drain` or `close` was called: `submit` refuses."""
        with self._lock:
            return self._state in (_PoolState.DRAINING, _PoolState.CLOSED)

    @property
    def workers(self) -> list[WorkerProcess]:
        """The processes that currently serve (for diagnostics and tests)."""
        with self._lock:
            return [link.process for link in self._links
                    if link is not None and link.state is not LinkState.GONE]

    def running(self) -> list[str]:
        """IDs of the attempts submitted and not yet reported (to renew their leases)."""
        with self._lock:
            return list(self._held)

    def submit(self, specs: Sequence[AttemptSpec]) -> None:
        """Takes attempts: each starts on a free slot at once or waits for one. Never blocks.

        Raises:
            PoolClosed: the pool is draining or closed (or not started).
            ValueError: an attempt ID the pool holds already (or twice in ``specs``), a
                concurrency below 1 or a timeout not above 0; nothing of ``specs`` is taken
                then.
        """
        with self._lock:
            if self._state is not _PoolState.OPEN:
                raise PoolClosed(f"the worker pool is {self._state.value}")
            ids = {spec.attempt_id for spec in specs}
            if len(ids) != len(specs) or not ids.isdisjoint(self._held):
                raise ValueError("attempt IDs must be unique among the pool's attempts")
            if any(spec.concurrency < 1 or spec.timeout <= timedelta(0) for spec in specs):
                raise ValueError("an attempt needs a concurrency of at least 1 and a timeout")
            for spec in specs:
                held = Held(spec)
                self._held[spec.attempt_id] = held
                self._waiting.append(held)
            self._place()

    def cancel(self, attempt_id: str) -> bool:
        """Stops an attempt now; it is reported CANCELLED. A running one's process is killed,
        so the other attempts of that process end WORKER_CRASHED.

        Returns:
            False when the pool does not hold the attempt (unknown, or already reported).
        """
        with self._lock:
            held = self._held.get(attempt_id)
            if held is None:
                return False
            if held.ending is not None:
                return True  # being stopped already
            if held.link is None:
                self._waiting.remove(held)
                self._release(held)
                self._events.put(((), [stopped_result(
                    held.spec, None, exit_reason=Exit.EXIT_REASON_CANCELLED,
                    detail="cancelled before it started", now=datetime.now(UTC))]))
                return True
            held.ending = Exit.EXIT_REASON_CANCELLED
            self._stop(held.link, "an attempt was cancelled")
            return True

    def drain(self, timeout: timedelta) -> bool:
        """Takes no more attempts and waits until those held are reported.

        Not to be called from a callback (it waits for the callbacks).

        Returns:
            True when every attempt was reported within ``timeout``.
        """
        deadline = time.monotonic() + timeout.total_seconds()
        with self._lock:
            if self._state is _PoolState.OPEN:
                self._state = _PoolState.DRAINING
            while self._held:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._state is _PoolState.CLOSED:
                    return False
                self._emptied.wait(remaining)
        delivered = threading.Event()
        self._events.put(delivered)
        return delivered.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Kills the processes and stops the pool's threads. Attempts still held are not
        reported: their leases expire and they run elsewhere."""
        with self._lock:
            if self._state is _PoolState.CLOSED:
                return
            self._state = _PoolState.CLOSED
            links = [link for link in self._links if link is not None]
            self._watch.notify_all()
            self._emptied.notify_all()
        self._closing.set()
        for link in links:
            self._hang_up(link)
        for process in self._processes:
            process.terminate()  # a restart under way then fails at once
        self._replacing.shutdown(wait=True, cancel_futures=True)
        for process in self._processes:
            process.kill()
        self._events.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(10)

    # -- placing ---------------------------------------------------------------------------

    def _place(self) -> None:
        """Sends waiting attempts to workers that may take them (under the lock)."""
        if not self._waiting:
            return
        batches = place(self._waiting, self._links, slots=self._slots, now=time.monotonic(),
                        high_reserve=self.high_reserve)
        earliest = self._watch_until
        for link, batch in batches.items():
            link.sending.put(batch)
            earliest = min(earliest, *(held.deadline for held in batch))
        if earliest < self._watch_until:
            self._watch.notify()

    def _release(self, held: Held) -> None:
        """Forgets a reported attempt (under the lock)."""
        del self._held[held.spec.attempt_id]
        link = held.link
        if link is not None:
            del link.held[held.spec.attempt_id]
            left = link.per_function[held.key] - 1
            if left:
                link.per_function[held.key] = left
            else:
                del link.per_function[held.key]
        if not self._held:
            self._emptied.notify_all()

    # -- the streams -----------------------------------------------------------------------

    def _open(self, process: WorkerProcess) -> Link:
        """Starts a process and its Run stream."""
        process.start(timeout_seconds=self._start_timeout)
        assert process.stub is not None
        link = Link(process)
        link.call = process.stub.Run(self._requests(link))
        threading.Thread(target=self._read, args=(link,), name=f"worker-{process.index}",
                         daemon=True).start()
        return link

    def _register(self, link: Link) -> None:
        """Puts a started link in its slot (under the lock)."""
        index = link.process.index
        self._links[index] = link
        if link.state is LinkState.GONE:  # died before it was registered
            self._replacing.submit(self._restart, index)
        else:
            self._place()

    def _requests(self, link: Link) -> Iterator[worker_pb2.RunRequest]:
        """The Run stream's requests: whatever batches were sent since the last message."""
        sending = link.sending
        while (batch := sending.get()) is not None:
            request = worker_pb2.RunRequest()
            add = request.attempts.add
            size = 0
            while batch is not None:
                for held in batch:
                    if size > BATCH_BYTES:
                        yield request
                        request = worker_pb2.RunRequest()
                        add = request.attempts.add
                        size = 0
                    spec = held.spec
                    attempt = add(attempt_id=spec.attempt_id, tenant_id=spec.tenant_id,
                                  task_id=spec.task_id, function=spec.function,
                                  handler=spec.handler, payload=spec.payload,
                                  attempt_number=spec.attempt_number,
                                  max_concurrency=spec.concurrency)
                    attempt.timeout.FromTimedelta(spec.timeout)
                    if spec.labels:
                        attempt.labels.update(spec.labels)
                    if spec.trace_context:
                        attempt.trace_context.update(spec.trace_context)
                    size += len(spec.payload)
                try:
                    batch = sending.get_nowait()
                except queue.Empty:
                    break
            yield request
            if batch is None:
                return

    def _read(self, link: Link) -> None:
        """Follows a Run stream until it breaks (the reader thread of one process)."""
        reason = "it closed its stream"
        try:
            for response in link.call:
                self._updated(link, response.updates)
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # a bug of ours; the attempts must still be reported
            log.exception("reading a worker's stream failed")
            reason = repr(exc)
        if not link.stopped_for:
            reason = f"{link.process.exit_description()} ({reason})"
        self._gone(link, reason)

    def _updated(self, link: Link, updates: Sequence[Any]) -> None:
        starts: list[tuple[str, datetime]] = []
        results: list[AttemptResult] = []
        now = time.monotonic()
        with self._lock:
            held_here = link.held
            for update in updates:
                held = held_here.get(update.attempt_id)
                if held is None or held.ending is not None:
                    continue  # the pool is ending it (its report comes with the kill)
                if held.start_time is None:
                    held.start_time = time_of(update.start_time)
                    held.deadline = now + held.spec.timeout.total_seconds()
                    starts.append((held.spec.attempt_id, held.start_time))
                if update.HasField("end_time"):
                    results.append(outcome_of(held.spec.attempt_id, held.start_time, update,
                                              self._sandbox.log_max_bytes))
                    self._release(held)
            if results:
                if link.state is LinkState.RETIRING and not link.held:
                    self._stop(link, "past half of its CPU-time limit")
                self._place()
            if starts or results:
                self._events.put((starts, results))

    def _gone(self, link: Link, reason: str) -> None:
        """Ends the attempts of a process whose stream broke, and replaces the process."""
        with self._lock:
            link.state = LinkState.GONE
            link.sending.put(None)  # releases grpc's request thread, should it still wait
            if self._state is _PoolState.CLOSED:
                return
            now = datetime.now(UTC)
            detail = STOPPED_BESIDE if link.stopped_for else f"the worker process died: {reason}"
            results = []
            for held in list(link.held.values()):
                exit_reason = held.ending or Exit.EXIT_REASON_WORKER_CRASHED
                results.append(stopped_result(
                    held.spec, held.start_time, exit_reason=exit_reason,
                    detail="cancelled while running"
                    if exit_reason == Exit.EXIT_REASON_CANCELLED else detail, now=now))
                log.info("an attempt ended with its worker process", extra={
                    "attempt_id": held.spec.attempt_id, **logs.task_fields(
                        held.spec.tenant_id, held.spec.task_id, held.spec.trace_context)})
                self._release(held)
            if results:
                log.warning("a worker process ended with attempts on it", extra={
                    "worker": link.process.index, "attempts": len(results), "reason": reason})
                self._events.put(((), results))
            if self._links[link.process.index] is link:
                self._replacing.submit(self._restart, link.process.index)
            self._place()

    def _stop(self, link: Link, why: str) -> None:
        """Kills a worker process at once (under the lock); its reader reports the rest."""
        if link.state in (LinkState.STOPPING, LinkState.GONE):
            return
        link.state = LinkState.STOPPING
        link.stopped_for = why
        log.info("stopping a worker process", extra={"worker": link.process.index,
                                                      "reason": why})
        self._hang_up(link)

    @staticmethod
    def _hang_up(link: Link) -> None:
        link.process.terminate()
        # The reader learns at once, even if the socket is slow to close.
        if link.call is not None:
            link.call.cancel()
        link.sending.put(None)

    def _restart(self, index: int) -> None:
        """Starts a fresh process in a slot whose process ended (a replacer thread)."""
        process = self._processes[index]
        process.kill()
        delay = 1.0
        while not self._closing.is_set():
            try:
                link = self._open(process)
                break
            except (RuntimeError, OSError):
                log.exception("a worker process could not be started; trying again",
                              extra={"worker": index, "delay_seconds": delay})
            if self._closing.wait(delay):
                return
            delay = min(delay * 2, 30.0)
        else:
            return
        with self._lock:
            if self._state is _PoolState.CLOSED:
                self._hang_up(link)
                return
            self._register(link)

    # -- the pool's threads ----------------------------------------------------------------

    def _notify(self) -> None:
        """Delivers starts and results to the callbacks, merging what has piled up."""
        events = self._events
        while True:
            item = events.get()
            starts: list[tuple[str, datetime]] = []
            results: list[AttemptResult] = []
            markers: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    starts.extend(item[0])
                    results.extend(item[1])
                try:
                    item = events.get_nowait()
                except queue.Empty:
                    break
            # Starts first: an attempt's start is never in a later item than its end.
            if self._on_start is not None:
                for attempt_id, at in starts:
                    try:
                        self._on_start(attempt_id, at)
                    except Exception:
                        log.exception("on_start failed", extra={"attempt_id": attempt_id})
            if results:
                try:
                    self._on_done(results)
                except Exception:
                    log.exception("on_done failed", extra={"attempts": len(results)})
            for marker in markers:
                marker.set()
            if stop:
                return

    def _watchdog(self) -> None:
        """Kills the processes of attempts past their timeout; retires processes past half of
        their CPU-time limit."""
        next_check = time.monotonic() + CPU_CHECK_SECONDS
        while True:
            with self._lock:
                while True:
                    if self._state is _PoolState.CLOSED:
                        return
                    now = time.monotonic()
                    earliest = self._expire(now)
                    if now >= next_check:
                        break
                    self._watch_until = min(earliest, next_check)
                    self._watch.wait(self._watch_until - now)
                self._watch_until = float("inf")
                live = [link for link in self._links
                        if link is not None and link.state is LinkState.LIVE]
            next_check = time.monotonic() + CPU_CHECK_SECONDS
            # Reading /proc outside the lock; a handful of small files a second.
            budget = self._sandbox.cpu_seconds / 2
            spent = [link for link in live if link.process.cpu_seconds() > budget]
            if spent:
                self._retire(spent)

    def _expire(self, now: float) -> float:
        """Stops the processes of attempts past their deadline (under the lock).

        Returns:
            The earliest deadline still ahead (monotonic), or infinity.
        """
        earliest = float("inf")
        for link in self._links:
            if link is None or link.state in (LinkState.STOPPING, LinkState.GONE):
                continue
            for held in link.held.values():
                if held.deadline > now:
                    earliest = min(earliest, held.deadline)
                elif held.ending is None:
                    held.ending = Exit.EXIT_REASON_TIMED_OUT
                    self._stop(link, "an attempt ran past its timeout")
                    break
        return earliest

    def _retire(self, links: Sequence[Link]) -> None:
        with self._lock:
            for link in links:
                if link.state is not LinkState.LIVE:
                    continue
                log.info("retiring a worker past half of its CPU-time limit",
                         extra={"worker": link.process.index})
                link.state = LinkState.RETIRING
                if not link.held:
                    self._stop(link, "past half of its CPU-time limit")
