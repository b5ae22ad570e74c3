"""`twotower serve --workers N` (N > 1): one small process accepts connections and hands each one to
the worker with the fewest open connections.

Why not uvicorn's own workers: they all accept from one shared listening socket, and whichever wakes
first takes every connection waiting in the backlog. Keep-alive clients open their few connections
in a burst, so the split is left to chance: with 8 connections and 2 workers, ``ss`` showed 8-0,
6-2 and 5-3 about as often as 4-4, and one worker served everything while the other idled (the
2-worker benchmark rounds swung between 9 and 40 ms p99 with it). Here the supervisor counts the
connections it handed to each worker, each worker reports every connection it closes, and a new
connection goes to the ready worker with the fewest.

How: the supervisor owns the listening socket and one ``SOCK_SEQPACKET`` socket pair per worker.
It passes each accepted connection's file descriptor down the pair (``SCM_RIGHTS``); the worker, an
ordinary ``uvicorn.Server`` with no listening socket of its own, adopts it with
``loop.connect_accepted_socket`` and sends back ``r`` once its lifespan startup (bundle load) is
done and ``x`` for every connection it closes. Once accepted, bytes go straight between client and
worker: the supervisor is not on the request path.

Lifecycle: while no worker is ready (at start, or when all have died) nothing is accepted, so new
connections wait in the listen backlog for the next ready worker. A worker that exits is restarted; one that exits before it ever became ready is a startup
failure (bad settings, no bundle loader...), and the supervisor stops everything and exits with its
code rather than restart it forever. SIGTERM/SIGINT: stop accepting, pass SIGTERM to the workers
(each finishes its in-flight requests, ``TT_GRACEFUL_TIMEOUT_S``), kill what is left after that.
A worker whose supervisor disappears shuts itself down.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

_CONN, _READY, _CLOSED = b"c", b"r", b"x"


# --------------------------------------------------------------------------------------------
# the worker side


class HandoffServer(uvicorn.Server):
    """A uvicorn server fed connections over ``chan`` instead of accepting them itself."""

    def __init__(self, config: uvicorn.Config, chan: socket.socket) -> None:
        super().__init__(config)
        self.chan = chan
        self._adopting: set[asyncio.Task[Any]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # lifespan (bundle load) and state; no listening socket
        if self.should_exit:
            return
        loop = asyncio.get_running_loop()
        config, state, app_state, chan = self.config, self.server_state, self.lifespan.state, self.chan
        base: Any = config.http_protocol_class

        class Counted(base):  # type: ignore[misc, valid-type]
            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                _tell(chan, _CLOSED)

        def protocol() -> asyncio.Protocol:
            # called by connect_accepted_socket inside the running loop, which the protocol picks up
            # itself (no private constructor arguments)
            return Counted(config=config, server_state=state, app_state=app_state)  # type: ignore[no-any-return]

        chan.setblocking(False)
        loop.add_reader(chan.fileno(), self._adopt, loop, protocol)
        _tell(chan, _READY)

    def _adopt(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.chan, 64, 32)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        if not msg:  # the supervisor is gone: nobody will hand us work or take our connections' news
            loop.remove_reader(self.chan.fileno())
            self.should_exit = True
            return
        for fd in fds:
            conn = socket.socket(fileno=fd)
            task = loop.create_task(loop.connect_accepted_socket(protocol, conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _tell(self.chan, _CLOSED)  # never became a connection: the supervisor must not count it
            log.warning("could not adopt a connection: %s", task.exception())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.chan.fileno())
        except (ValueError, OSError):
            pass
        await super().shutdown(sockets=sockets)


def _tell(chan: socket.socket, what: bytes) -> None:
    try:
        chan.send(what)
    except OSError:  # the supervisor is gone or momentarily full; counts only steer the balance
        pass


def worker_main(fd: int) -> int:
    """A worker process: the app (which configures logging as it is built) fed over descriptor ``fd``."""
    from service.cli import APP, uvicorn_options
    from service.settings import Settings

    config = uvicorn.Config(APP, **uvicorn_options(Settings().graceful_timeout_s))
    HandoffServer(config, socket.socket(fileno=fd)).run(sockets=[])
    return 0


# --------------------------------------------------------------------------------------------
# the supervisor side


WORKER_CMD = (sys.executable, "-m", "service.balancer")  # + the descriptor number of its end of the pair


class _Worker:
    def __init__(self, slot: int, cmd: tuple[str, ...]) -> None:
        self.slot = slot
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([*cmd, str(child.fileno())], pass_fds=(child.fileno(),))
        child.close()
        parent.setblocking(False)
        self.chan = parent
        self.ready = False  # takes connections now
        self.started = False  # finished its startup at some point (so an exit is a crash, not a failed start)
        self.open = 0  # connections handed over and not reported closed

    def handoff(self, conn: socket.socket) -> bool:
        try:
            socket.send_fds(self.chan, [_CONN], [conn.fileno()])
        except BlockingIOError:  # thousands of handovers it has not read yet: try another worker
            return False
        except OSError:  # its end is closed: it is exiting, and _reap will restart it
            self.ready = False
            return False
        self.open += 1
        return True


class Supervisor:
    def __init__(self, host: str, port: int, workers: int, graceful_timeout_s: float, backlog: int = 2048,
                 worker_cmd: tuple[str, ...] = WORKER_CMD) -> None:
        self.n, self.graceful, self.worker_cmd = workers, graceful_timeout_s, worker_cmd
        self.listener = socket.create_server((host, port), backlog=backlog,
                                             family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.exit_code = 0
        self._accepting = False

    # -- main loop
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        host, port = self.listener.getsockname()[:2]
        log.info("balancing connections over %d workers on %s:%d", self.n, host, port)
        for slot in range(self.n):
            self._spawn(slot)
        try:
            while not self.stopping:
                for key, _ in self.sel.select(timeout=0.2):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._hear(key.data)
                self._reap()
        finally:
            self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True

    def _spawn(self, slot: int) -> None:
        w = _Worker(slot, self.worker_cmd)
        self.workers[slot] = w
        self.sel.register(w.chan, selectors.EVENT_READ, w)
        log.info("worker %d started (pid %d)", slot, w.proc.pid)

    def _accept(self) -> None:
        for _ in range(64):
            # what the workers said since the last turn first (closed connections, an exit): the
            # choice below then goes by their current counts, whatever order select() reported in
            for w in list(self.workers.values()):
                if w.ready:
                    self._hear(w)
            if not any(w.ready for w in self.workers.values()):
                # every worker is gone or (re)starting: leave connections queued in the backlog, to
                # be handed over once one is ready, rather than accept and drop them
                self.sel.unregister(self.listener)
                self._accepting = False
                return
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors and the like: try again on the next turn
                log.warning("accept failed: %s", exc)
                return
            with conn:
                for w in sorted((w for w in self.workers.values() if w.ready), key=lambda w: w.open):
                    if w.handoff(conn):
                        break
                # none took it (each was exiting or full): closing it tells the client at once

    def _hear(self, w: _Worker) -> None:
        """Every message waiting from ``w`` (one byte per SOCK_SEQPACKET message)."""
        while True:
            try:
                data = w.chan.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                try:
                    self.sel.unregister(w.chan)  # its process is exiting; _reap restarts it
                except (KeyError, ValueError):
                    pass
                w.ready = False
                return
            for b in data:
                if b == _READY[0]:
                    w.ready = w.started = True
                    ready = sum(x.ready for x in self.workers.values())
                    log.info("worker %d ready (pid %d); %d of %d ready", w.slot, w.proc.pid, ready, self.n)
                    if not self._accepting:
                        self.sel.register(self.listener, selectors.EVENT_READ)
                        self._accepting = True
                elif b == _CLOSED[0]:
                    w.open = max(0, w.open - 1)

    def _reap(self) -> None:
        for slot, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None:
                continue
            try:
                self.sel.unregister(w.chan)
            except (KeyError, ValueError):
                pass
            w.chan.close()
            del self.workers[slot]
            if self.stopping:
                continue
            if not w.started:
                log.error("worker %d (pid %d) exited with code %d before it was ready; stopping", slot, w.proc.pid, code)
                self.exit_code = code or 1
                self.stopping = True
                continue
            log.warning("worker %d (pid %d) exited with code %d; starting another", slot, w.proc.pid, code)
            self._spawn(slot)

    def _stop(self) -> None:
        if self._accepting:
            self.sel.unregister(self.listener)
        self.listener.close()  # new connections are refused from here on
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful + 5
        for w in self.workers.values():
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time; killing it", w.slot, w.proc.pid)
                w.proc.kill()
                w.proc.wait()
            w.chan.close()
        log.info("all workers stopped")


def serve(host: str, port: int, workers: int, graceful_timeout_s: float) -> int:
    return Supervisor(host, port, workers, graceful_timeout_s).run()


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
