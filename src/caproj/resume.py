"""Long runs that survive faults: periodic atomic state files and a clean stop on SIGTERM/SIGINT.

A loop (CaP optimisation, fine-tuning) owns a `Checkpointer`. Every `every` steps, and when a
stop signal arrives, it writes its whole state (weights, optimisers, schedulers, step, RNG)
through a temp file + rename, so a state file on disk is always complete. `--resume` loads it
and the loop continues from that step; batches are a pure function of (seed, epoch, index)
(see `data.Batches`), so the resumed run ends where an uninterrupted one would (same seed, same
threads). A state file records a fingerprint of the run's settings and is refused by a run
with other settings. It is deleted when the loop finishes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from caproj import dist
from caproj.errors import CaprojError
from caproj.utils import atomic_save

log = logging.getLogger(__name__)


class Interrupted(CaprojError):
    """Stopped by a signal after saving state; the CLI exits 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


_stop: dict[str, int | None] = {"signal": None}


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """While active, SIGTERM/SIGINT only set a flag that loops check at step boundaries."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        _stop["signal"] = signum

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop["signal"] = None


def stop_requested() -> int | None:
    return _stop["signal"]


def raise_if_stopped(where: str) -> None:
    """For stretches without state worth saving (statistics, refit): stop cleanly now."""
    sig = stop_requested()
    if sig is not None:
        raise Interrupted(f"stopped by {signal.Signals(sig).name} during {where}; nothing saved "
                          f"yet, rerun the command to start again", sig)


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    """State file of one loop. `path=None` disables it (library use without resume)."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any], every: int = 50,
                 resume: bool = False) -> None:
        if every < 1:
            raise CaprojError(f"checkpoint interval must be >= 1 step, got {every}")
        self.path = Path(path) if path is not None else None
        self.fingerprint = self.encode(fingerprint)
        self.every, self.resume = every, resume
        self._stopping = False  # set by `due` when any rank got a stop signal

    @staticmethod
    def encode(fingerprint: dict[str, Any]) -> str:
        """The settings a state file must match, as the stable text it is compared by."""
        return json.dumps(fingerprint, sort_keys=True, default=str)

    def load(self) -> dict[str, Any] | None:
        """The saved state if resuming and one exists (checked against this run's settings)."""
        if self.path is None or not self.path.is_file():
            if self.resume and self.path is not None:
                log.info("no state at %s: starting from the beginning", self.path)
            return None
        if not self.resume:
            log.warning("found %s from an interrupted run; starting over (resume=True "
                        "continues it)", self.path)
            return None
        try:
            st = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CaprojError(f"cannot read state file {self.path}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              f"delete it to start over") from None
        if not isinstance(st, dict) or st.get("fingerprint") != self.fingerprint:
            raise CaprojError(f"state file {self.path} was written by a run with other "
                              f"settings; rerun with the same options or delete it")
        log.info("resuming from %s at step %s", self.path, st["step"])
        return st

    def due(self, step: int) -> bool:
        """After `step` steps are done: save now? (every `every` steps, or when any rank got a
        stop signal; `save` then raises Interrupted). Called by every rank at every step."""
        if self.path is None:
            return False
        self._stopping = dist.any_rank(stop_requested() is not None)
        return step % self.every == 0 or self._stopping

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        if dist.is_main():
            atomic_save({**state, "fingerprint": self.fingerprint, "step": step}, self.path)
        if self._stopping or stop_requested() is not None:
            sig = stop_requested() or signal.SIGTERM
            raise Interrupted(f"stopped by {signal.Signals(sig).name} after step {step}; state "
                              f"saved to {self.path}; rerun the same command with resume=True", sig)

    def finish(self) -> None:
        if self.path is not None and dist.is_main() and self.path.exists():
            self.path.unlink()
