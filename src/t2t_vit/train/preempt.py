"""Preemption: a scheduler's stop signal becomes a checkpoint at the next step boundary and a known exit code.

Clusters stop jobs with SIGTERM (SLURM can also send SIGUSR1 some time before the time limit). The
handler only records the signal: the training loop asks :meth:`StopRequest.agreed` after every
optimizer step, which under DDP all-reduces the signal number, so every rank stops after the same
step even when the signal reached only some of them. The loop then writes ``checkpoint-last`` (atomic,
as every checkpoint) and raises :class:`Preempted`, whose exit code is 128 + the signal's number — what
a shell reports for a process killed by that signal (143 SIGTERM, 138 SIGUSR1, 130 SIGINT) — so a job
script can tell a preemption (requeue) from a failure (1 or 2). ``--resume auto`` continues exactly.

SIGINT (Ctrl-C) is always handled the same way; a second Ctrl-C quits at once without saving.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Iterable

from t2t_vit.errors import T2TViTError
from t2t_vit.train.distributed import World, all_reduce_max

DEFAULT_SIGNALS = "TERM,USR1"
UNCATCHABLE = {"KILL", "STOP"}


class Preempted(T2TViTError):
    """The run stopped on a signal after saving ``checkpoint-last``; exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def parse_signals(text: str | None) -> tuple[signal.Signals, ...]:
    """``"TERM,USR1"`` (names with or without ``SIG``, or numbers; ``"none"`` for none) → signals."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    found = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name = item.upper().removeprefix("SIG")
        try:
            sig = signal.Signals(int(item)) if item.isdigit() else signal.Signals["SIG" + name]
        except (KeyError, ValueError):
            sig = None
        if sig is None or sig.name[3:] in UNCATCHABLE:
            raise T2TViTError(f"--preempt-signals: {item!r} is not a signal that can be caught; "
                              f"use names such as {DEFAULT_SIGNALS},USR2,HUP (or 'none')")
        found.append(sig)
    return tuple(dict.fromkeys(found))


class StopRequest:
    """Signal handlers for the duration of a ``with`` block, and the ranks' agreement to stop.

    Handlers can only be installed from the main thread; a run started in another thread keeps the
    process's handlers (and so cannot be preempted gracefully).
    """

    def __init__(self, signals: Iterable[signal.Signals], announce: bool = True) -> None:
        self.signals = tuple(dict.fromkeys([*signals, signal.SIGINT]))
        self.announce = announce  # print a line when a signal arrives (rank 0 only)
        self.received = 0  # the first signal this process got, 0 while none; written by the handler only
        self.signum = 0  # the signal every rank agreed to stop for
        self._agreed = False
        self._previous: dict[signal.Signals, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked loader worker inherited this handler: the main process decides
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now, without saving
        if not self.received:
            self.received = signum
            if self.announce:
                extra = " (Ctrl-C again to quit without saving)" if signum == signal.SIGINT else ""
                # os.write: print() from a handler can collide with a print the loop is doing
                os.write(2, f"t2t-vit: got {signal.Signals(signum).name}: stopping after the current step and "
                            f"saving checkpoint-last{extra}\n".encode())

    def agreed(self, world: World) -> bool:
        """True (on every rank) once any rank got a signal. Under DDP a collective: every rank must
        call it at the same points of the loop."""
        if not self._agreed:
            # the handler may run while the collective waits (at the next bytecode): it writes
            # ``received``, never ``signum``, so a signal landing then is seen at the next step
            self.signum = int(all_reduce_max(float(self.received), world))
            self._agreed = self.signum > 0
        return self._agreed

    def error(self, out: str, step: int, world: World) -> Preempted:
        """The exception to raise once ``checkpoint-last`` is saved: it names the resume command."""
        name = signal.Signals(self.signum).name
        launcher = f" (under torchrun with {world.size} processes, as before)" if world.distributed else ""
        command = f"t2t-vit train --config {os.path.join(out, 'config.yaml')} --output {out} --resume auto"
        return Preempted(f"training stopped by {name} after step {step}; checkpoint-last is saved in {out}; "
                         f"resume with: {command}{launcher}", self.signum)


def quiet_worker(worker_id: int) -> None:
    """Loader-worker init: ignore the stop signals a scheduler (or Ctrl-C) sends to the whole process
    group, so workers keep feeding the step the main process finishes before it saves; the main
    process shuts them down itself."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
