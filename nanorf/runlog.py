"""Rank 0's account of a run: log.jsonl records, and the console.

A record per logged step (losses, grad norm, lr, time, codebook usage), and always one for a
skipped step (which loss parts went bad, and the items of the micro-batches that made them) and
for an image that does not decode. The console shows tqdm at a terminal; without one (nohup,
`> log`, a job scheduler) it prints one compact line every `log_every` steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .checkpoint import atomic_path
from .guard import LOSS_PARTS, StepVerdict
from .stream import Stream


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunLog:
    """Rank 0's account of the run: records in log.jsonl, and the console: tqdm when stdout and
    stderr are a terminal, otherwise (nohup, `> log`, a job scheduler) one compact line every
    `log_every` steps: step, losses, codebook usage, s/step, ETA. Skipped steps and bad images
    are always written and said."""

    def __init__(self, path: Path, resume_step: int | None, t, codebook_size: int, log=print):
        from tqdm import tqdm
        self.f = self._open(path, resume_step)
        self.t, self.K, self.log = t, codebook_size, log
        tty = sys.stdout.isatty() and sys.stderr.isatty()
        step = resume_step or 0
        self.bar = tqdm(total=t.max_steps, initial=step, dynamic_ncols=True) if tty else None
        self.mark = (step, time.time())  # (step, time) of the last line, for s/step

    @staticmethod
    def _open(path: Path, resume_step: int | None):
        """log.jsonl for appending. On resume, records past the checkpoint's step (written after
        it by a run that then crashed, and about to be written again) are dropped first, so the
        log reads as one run."""
        if resume_step is None or not path.is_file():
            return open(path, "w")
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                kept.append(line + "\n")
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(kept))
        return open(path, "a")

    def say(self, msg: str):
        self.bar.write(msg) if self.bar else self.log(msg)

    def write(self, rec: dict):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def bad_items(self, step: int, found: list[tuple[int, str]], n_bad: int, n: int):
        for j, why in found:
            self.say(f"step {step}: {why}; using the next image that decodes instead ({n_bad} of {n} bad so far)")
            self.write({"step": step, "bad_item": j, "error": why, "bad_items": n_bad})

    def step(self, rec: dict, in_a_row: int):
        step, t = rec["step"], self.t
        if "skipped" in rec:
            self.say(f"step {step}: skipped, non-finite {', '.join(rec['skipped'])} (gen items {rec['gen_items']}, "
                     f"und items {rec['und_items']}); {in_a_row} in a row, {t.max_bad_steps} end the run")
        due = step % t.log_every == 0 or step == t.max_steps
        if due or "skipped" in rec:
            self.write(rec)
        if self.bar:
            self.bar.set_postfix({k: rec[k] for k in LOSS_PARTS[:3]}, refresh=False)
            self.bar.update(1)
        elif due:
            now = time.time()
            sec = (now - self.mark[1]) / max(1, step - self.mark[0])
            self.mark = (step, now)
            losses = " ".join(f"{k} {rec[k]:.3f}" if rec[k] is not None else f"{k} nan" for k in LOSS_PARTS[:3])
            codes = f" | codes {rec['codes_used']}/{self.K}" if "codes_used" in rec else ""
            eta = hms(sec * (t.max_steps - step))
            self.log(f"step {step}/{t.max_steps} | {losses}{codes} | {sec:.2f} s/step | eta {eta}")

    def close(self):
        if self.bar:
            self.bar.close()
        self.f.close()


def step_record(step: int, v: StepVerdict, gnorm, lr: float, t0: float, targets, stream: Stream) -> dict:
    """The log.jsonl record of a step: losses, grad norm, lr, time, codebook usage; for a skipped
    step, which parts went bad and the items of the micro-batches that made them."""
    finite = lambda x: round(float(x), 4) if math.isfinite(float(x)) else None  # noqa: E731 (JSON has no NaN)
    rec = {"step": step, **{k: finite(x) for k, x in zip(LOSS_PARTS[:3], v.losses)},
           "grad_norm": finite(gnorm), "lr": lr, "time": round(time.time() - t0, 1)}
    if v.ok and targets is not None and targets.vq is not None:
        rec.update(codes_used=int(targets.vq.last_usage), code_perplexity=round(float(targets.vq.last_perplexity), 1))
    if stream.bad:
        rec["bad_items"] = len(stream.bad)
    if not v.ok:  # the micro-batches with a non-finite loss, or the whole batch if only the gradient was
        t = stream.cfg.train
        gen, und = (v.bad_gen, v.bad_und) if v.bad_gen else (range(t.batch_size), range(t.und_batch_size))
        rec.update(skipped=v.bad, gen_items=stream.gen_ids(step - 1, gen), und_items=stream.und_ids(step - 1, und))
    return rec
