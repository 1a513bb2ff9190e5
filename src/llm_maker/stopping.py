"""Graceful stops (SIGINT, SIGTERM, a STOP file) and the exit codes that tell a stop from a failure.

    llm-maker pretrain RECIPE      SIGTERM / Ctrl-C / `touch RUN_DIR/STOP`: a checkpoint, then exit 75
    llm-maker pretrain RECIPE --resume                           goes on from that checkpoint

A training stage asks its `StopRequest` after every optimizer step. When it says stop, the
trainer writes a checkpoint, the STOP file that asked is renamed `STOP.done-<step>` (so the next
`--resume` trains on), and the stage raises `StageStopped`, which the CLI prints on stderr with
the command that continues, exiting with EXIT_STOPPED.

The CLI installs the SIGTERM handler first thing (`install_early_handlers`), so a SIGTERM that
arrives while data loads or the model builds is kept and obeyed at the first step, not a kill
with nothing written. SIGINT keeps Python's KeyboardInterrupt until training starts (Ctrl-C while
a dataset downloads should stop at once); inside training both signals stop at the next step.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

# Exit codes of the `llm-maker` command (the README's "Exit codes" table).
EXIT_OK = 0  # finished (or up to date)
EXIT_ERROR = 2  # bad input or state, with a message naming the file, key or value; argparse's usage errors too
EXIT_STOPPED = 75  # stopped cleanly at a checkpoint (sysexits' EX_TEMPFAIL): run again with --resume
EXIT_INTERRUPTED = 130  # Ctrl-C outside training (128 + SIGINT)

_received: Optional[str] = None  # the signal that asked to stop, until a training run obeys it


def _handler(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def signal_received() -> Optional[str]:
    """The signal that asked to stop ("SIGTERM", "SIGINT"), None if none."""
    return _received


def clear_signal() -> None:
    global _received
    _received = None


def install_early_handlers() -> Callable[[], None]:
    """Keep a SIGTERM for the training loop from now on (main thread only); returns what puts the
    previous handler back."""
    try:
        previous = signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


class StageStopped(Exception):
    """A training stage stopped cleanly at a checkpoint; run it again with --resume to go on."""

    def __init__(self, stage: str, step: Optional[int], reason: str, checkpoint: Optional[Path]):
        """`step` None: stopped before `stage` started (the pipeline, between stages)."""
        self.stage, self.step, self.reason, self.checkpoint = stage, step, reason, checkpoint
        self.results: dict = {}  # run_pipeline's per-stage results up to here
        if step is None:
            super().__init__(f"stopped by {reason} before the {stage} stage")
        else:
            where = f"checkpoint {checkpoint.name}" if checkpoint is not None else "no checkpoint yet"
            super().__init__(f"{stage} stopped at step {step} by {reason} ({where})")


class StopRequest:
    """Set by SIGINT/SIGTERM or by a STOP file; the training loop checkpoints and ends."""

    def __init__(self, stop_files: list[Path]):
        self.stop_files = stop_files

    def __call__(self) -> Optional[str]:
        if _received:
            return _received
        for f in self.stop_files:
            if f.exists():
                return f"STOP file {f}"
        return None

    def present(self) -> list[Path]:
        return [f for f in self.stop_files if f.exists()]

    def consume(self, step: int, rename: bool = True) -> list[Path]:
        """The run obeyed: forget the signal and (`rename`: rank 0) rename each STOP file to
        STOP.done-<step>, so the next --resume goes on. Returns the new names."""
        clear_signal()
        done = []
        for f in self.present() if rename else []:
            target = f.with_name(f"{f.name}.done-{step}")
            try:
                f.replace(target)
                done.append(target)
            except OSError as e:  # read-only or vanished: say so, the next run will stop again
                print(f"warning: could not rename {f} ({e}); delete it before resuming", file=sys.stderr)
        return done

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Both signals stop at the next step while the loop runs; the previous handlers after."""
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread: rely on the STOP file
            pass
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
