"""A pool of worker processes, one attempt at a time each (the process is the isolation).

Workers run tenants' tasks, so each one is confined (`WorkerSandbox`): it may only run
``@sdk.task`` functions of the operator's handler packages, it gets a scrubbed environment
(no WEIR_* settings), resource limits, and a fresh random token that every call to it must
present. When the executor-manager runs as root, workers run as the unprivileged worker user
in a mount namespace of their own, where the directories holding secrets are hidden (see
`WorkerSandbox.command`).
"""

from __future__ import annotations

import collections
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from weir.v1 import worker_pb2_grpc

from libs.config import WeirConfig
from libs.healthcheck import is_serving

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

    @classmethod
    def of(cls, config: WeirConfig) -> WorkerSandbox:
        """The sandbox the settings describe; the credentials directory is hidden too."""
        credentials = Path(config.credentials_dir)
        return cls(handler_packages=config.handler_packages, memory_mb=config.worker_memory_mb,
                   cpu_seconds=config.worker_cpu_seconds, open_files=config.worker_open_files,
                   max_processes=config.worker_max_processes, user=config.worker_user,
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
               # of the limit, and a one-attempt process has no malloc contention to speak of.
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


class BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on a channel, so no call to a
    worker can go out without it."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                              client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        details = client_call_details
        return continuation(_CallDetails(
            details.method, details.timeout, [*(details.metadata or ()), self._header],
            details.credentials, details.wait_for_ready, details.compression), request)


class WorkerProcess:
    """One worker process serving the worker protocol on a unix socket."""

    def __init__(self, *, index: int, socket_dir: Path, sandbox: WorkerSandbox) -> None:
        self.index = index
        self.sandbox = sandbox
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
                    self.sandbox.handler_packages, "--parent-pid", str(os.getpid())],
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
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.index} did not start")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(
            grpc.intercept_channel(self.channel, BearerToken(token)))

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
        """Stops the process at once (a lost attempt); the pool replaces the worker when its
        call fails."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def kill(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class WorkerPool:
    """Hands out idle workers; replaces a worker that crashed or had to be stopped."""

    def __init__(self, *, size: int, socket_dir: Path, sandbox: WorkerSandbox) -> None:
        sandbox.prepare(socket_dir)
        self._sandbox = sandbox
        self._workers = [WorkerProcess(index=i, socket_dir=socket_dir, sandbox=sandbox)
                         for i in range(size)]
        self._idle: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._replacing = ThreadPoolExecutor(max_workers=size, thread_name_prefix="replace")

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self._workers)) as starting:
            list(starting.map(lambda w: w.start(), self._workers))
        self._idle = list(self._workers)

    @property
    def capacity(self) -> int:
        return len(self._workers)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._workers) - len(self._idle)

    def acquire(self) -> WorkerProcess | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def release(self, worker: WorkerProcess) -> None:
        """Idles a worker after its attempt, or replaces it once it has used half of its
        CPU-time limit: the kernel kills at the limit, and that must never hit an innocent
        attempt that merely came after many others."""
        if worker.cpu_seconds() > self._sandbox.cpu_seconds / 2:
            log.info("replacing a worker past half of its CPU-time limit",
                     extra={"worker": worker.index})
            self._replacing.submit(self.replace, worker)  # the caller need not wait for it
            return
        with self._lock:
            self._idle.append(worker)

    def replace(self, worker: WorkerProcess) -> None:
        """Kills the worker (stuck or dead) and starts a fresh one in its slot, then idles it."""
        worker.kill()
        try:
            worker.start()
        except RuntimeError:
            log.exception("a worker could not be restarted; its slot stays empty")
            return
        with self._lock:  # not release(): a fresh process is never past its CPU budget
            self._idle.append(worker)

    def close(self) -> None:
        self._replacing.shutdown(wait=True, cancel_futures=True)
        for worker in self._workers:
            worker.kill()
