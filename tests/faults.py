"""Test-only fault injection for train.py, by wrapping methods of nanorf.stream.Stream: a NaN in
chosen micro-batches, a rank that dies at a chosen step. Used in-process (with pytest's
monkeypatch) and by the helper scripts the DDP / torchrun tests launch (tests/ on sys.path)."""

from __future__ import annotations

import os
import signal


def with_nan(gen_batch, steps, example: int, field: str = "images"):
    """Stream.gen_batch -> the same, except that at each step in `steps` the micro-batch holding
    global example `example` gets NaN in that example's `field`: "images" (the clean image: the
    flow loss, and the rep targets, so the online codebook is poisoned within the step) or
    "eps" (the noise: the flow loss only)."""
    steps = set(steps)

    def patched(self, step, idx, draws, device):
        b = gen_batch(self, step, idx, draws, device)
        if step in steps and example in idx:
            getattr(b, field)[example - idx.start].fill_(float("nan"))
        return b
    return patched


def with_kill(draws, step: int, rank: int):
    """Stream.draws -> the same, except that the process of `rank` SIGKILLs itself when it starts
    step `step`, on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0)."""

    def patched(self, s):
        if (s == step and int(os.environ.get("RANK", "0")) == rank
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            os.kill(os.getpid(), signal.SIGKILL)
        return draws(self, s)
    return patched
