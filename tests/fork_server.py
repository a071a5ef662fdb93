"""Command-line runs without a new Python's start-up each: a fork server for the tests.

`python -m tce_jax.main` spends seconds importing TensorFlow, JAX, Flax, Orbax and CLU before it
reads a flag (a tiny run: ~10 CPU-seconds, ~4 of them imports), and the suite starts over a
dozen runs that need a process of their own (signals, several processes of one run). Each
pytest worker starts one server (`python fork_server.py serve SOCKET`) that imports those
modules once, never touching a device, and forks a child per run:

* `start` starts a small client (`python fork_server.py run SOCKET ...`) as a `subprocess.Popen`,
  so a test keeps Popen's pipes, exit status and signals. The client hands the server its
  standard streams, arguments, environment and working directory, forwards the signals it
  receives to the child and exits as the child did (the same code, or killed by the same
  signal).
* The child takes those over and runs `tce_jax.main` as `python -m` would: a process of its own,
  with its own devices (JAX reads XLA_FLAGS when it first starts a backend, after the fork).
* A client killed outright (SIGKILL cannot be forwarded) takes its child with it: the server
  kills the child when the client's connection closes. The server ends with the pytest worker
  (end of its standard input), killing any child left.

The child's process id is not the client's: a test that needs the run's own pid (a lock file
names it), or the start-up of a real command, starts a new interpreter instead
(`run_utils.start_main(..., fresh=True)`), as every run does where `AVAILABLE` is false.
"""

import atexit
import importlib
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

# pidfds (a process's exit as a readable file; signals that cannot reach a reused pid): Linux.
AVAILABLE = hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")
# What `python -m tce_jax.main` imports to train, evaluate or predict; never tce_jax.main
# itself, whose module code (its flag definitions) the child runs.
PRELOAD = (
    "tensorflow",
    "tensorflow_datasets",
    "ml_collections.config_flags",
    "absl.app",
    "tce_jax.startup",
    "tce_jax.train",
    "tce_jax.predict",
)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_REQUEST_BYTES = 1 << 20  # a request is the run's argv, environment and working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_server: subprocess.Popen | None = None
_socket_path = ""


def start(args, *, interactive: bool = False, **popen) -> subprocess.Popen:
    """Starts `python -m tce_jax.main ARGS` through this worker's server (started on first use);
    returns the client's Popen. `interactive`: SIGINT interrupts the run, as in a terminal."""
    mode = "interactive" if interactive else "inherit"
    command = [sys.executable, __file__, "run", _server_socket(), mode, *args]
    return subprocess.Popen(command, **popen)


def _server_socket() -> str:
    global _server, _socket_path
    if _server is not None and _server.poll() is None:
        return _socket_path
    directory = tempfile.mkdtemp(prefix="tce_fork_server_")
    _socket_path = os.path.join(directory, "socket")
    log_path = os.path.join(directory, "server.log")
    with open(log_path, "w") as log:
        _server = subprocess.Popen(
            [sys.executable, __file__, "serve", _socket_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
        )
    atexit.register(_stop_server, _server, directory)
    if _server.stdout.readline() != "ready\n":
        with open(log_path) as f:
            raise RuntimeError(f"the tests' fork server did not start:\n{f.read()[-3000:]}")
    return _socket_path


def _stop_server(server: subprocess.Popen, directory: str) -> None:
    server.stdin.close()  # the server kills any child left and exits
    server.stdout.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The client: one per run, the process a test holds.


def run_client(path: str, mode: str, args: list[str]) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # none lost before the child is known
    request = {
        "argv": args,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        # A new Python ignores SIGINT if it started with SIGINT ignored (a child of a
        # non-interactive shell), else turns it into KeyboardInterrupt: so does the child.
        "sigint": mode == "interactive" or signal.getsignal(signal.SIGINT) != signal.SIG_IGN,
    }
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.connect(path)
    socket.send_fds(server, [json.dumps(request).encode()], [0, 1, 2])
    # A pidfd, not the pid: a signal that comes after the child has ended and been reaped
    # cannot reach another process that reuses the number.
    child = os.pidfd_open(int(server.recv(64)))
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, _: _forward(child, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    code = int(server.recv(64))  # the child's exit code, or minus the signal that killed it
    if code < 0:
        if -code in FORWARDED:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _forward(pidfd: int, signum: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:  # the child has ended; its exit status is on its way
        pass


# ---------------------------------------------------------------------------------------------
# The server: one per pytest worker.


def serve(path: str) -> tuple[dict, list[int]]:
    """Imports PRELOAD, then forks a child per request; returns only in a child, with its
    request and standard streams."""
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "request")
    selector.register(sys.stdin, selectors.EVENT_READ, "worker")
    clients = {}  # child pid -> (client connection, the child's pidfd)
    print("ready", flush=True)
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "request":
                    connection, _ = listener.accept()
                    request, fds, _, _ = socket.recv_fds(connection, _REQUEST_BYTES, 3)
                    pid = os.fork()
                    if pid == 0:
                        selector.close()
                        listener.close()
                        for other, pidfd in clients.values():
                            other.close()
                            os.close(pidfd)
                        connection.close()
                        return json.loads(request), fds
                    for fd in fds:
                        os.close(fd)
                    connection.sendall(str(pid).encode())
                    pidfd = os.pidfd_open(pid)
                    clients[pid] = (connection, pidfd)
                    selector.register(connection, selectors.EVENT_READ, ("client", pid))
                    selector.register(pidfd, selectors.EVENT_READ, ("child", pid))
                elif key.data == "worker":
                    if not os.read(sys.stdin.fileno(), 1024):  # the pytest worker has gone
                        sys.exit(0)
                elif key.data[0] == "client":  # its connection closed: the client was killed
                    selector.unregister(key.fileobj)
                    os.kill(key.data[1], signal.SIGKILL)
                else:
                    _report_exit(selector, *clients.pop(key.data[1]), key.data[1])
    except BaseException:
        for pid in clients:  # no run outlives the server
            os.kill(pid, signal.SIGKILL)
        raise


def _report_exit(selector, connection: socket.socket, pidfd: int, pid: int) -> None:
    """The child `pid` has ended: reaps it and tells its client how it ended."""
    _, status = os.waitpid(pid, 0)
    selector.unregister(pidfd)
    os.close(pidfd)
    if selector.get_map().get(connection.fileno()) is not None:  # the client still waits
        selector.unregister(connection)
        try:
            connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())
        except OSError:  # the client was killed meanwhile
            pass
    connection.close()


def become_the_run(request: dict, fds: list[int]) -> None:
    """In the child: the client's streams, environment, directory and SIGINT, then `python -m
    tce_jax.main ARGV` (its exit status is the child's)."""
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # `python -m` puts the working directory first
    handler = signal.default_int_handler if request["sigint"] else signal.SIG_IGN
    signal.signal(signal.SIGINT, handler)
    import numpy as np

    np.random.seed()  # a new process draws its own seed (Python's `random` reseeds at fork)
    sys.argv = ["-m", *request["argv"]]
    runpy.run_module("tce_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run_client(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.path[0] = ROOT  # as for `python -m` from the repository root
        become_the_run(*serve(sys.argv[2]))
