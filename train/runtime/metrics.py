"""Rank-0 logging: ``<out_dir>/metrics.jsonl``, a tqdm progress bar, TensorBoard when installed.

One strict-JSON object per line (RFC 8259: no ``NaN`` / ``Infinity``): training steps
(``{"step", "time", "loss", "lr", "samples_per_s", "tokens_per_s", "grad_norm", "skipped_samples",
"nonfinite_steps", "samples/<dataset>", ...}`` plus the task's scalars, e.g. CLIP's
``logit_scale``, ``i2t_acc``, ``t2i_acc``) and evaluations (``{"step", "time", "eval": {...}}``).
``time`` is an ISO-8601 UTC timestamp. A non-finite number is written as ``null`` and its key
listed in ``"nonfinite"`` (dotted for nested keys: ``"eval.loss"``).
"""

from __future__ import annotations

import datetime
import json
import math
import os


def strict_json(record: dict) -> tuple[dict, list[str]]:
    """``record`` with every non-finite float replaced by None (nested dicts too), and the dotted
    keys that were replaced."""
    bad: list[str] = []

    def clean(value, key: str):
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        return value

    return clean(record, ""), bad


def utc_now() -> str:
    """The current time, ISO-8601 in UTC with milliseconds (``2026-12-02T00:10:00.123+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _step_of(line: str) -> int | None:
    """The ``step`` of a metrics line; None when the line is not a JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def keep_history(path: str, resume_step: int) -> str | None:
    """Rewrite ``path`` (atomically) for a run resumed at ``resume_step``; returns a warning or None.

    Lines of steps after ``resume_step`` (logged after the checkpoint by the interrupted run, logged
    again by the resumed one) are dropped, every earlier line is kept. A torn last line (a kill or a
    full disk during a write: no newline, not JSON) is dropped with a warning; another line that is
    not JSON is kept as it is (its step is unknown), with a warning.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    torn = bool(lines) and not lines[-1].endswith("\n") and _step_of(lines[-1]) is None
    if torn:
        lines.pop()
    unreadable = [i + 1 for i, line in enumerate(lines) if _step_of(line) is None]
    kept = [line for line in lines if (_step_of(line) or 0) <= resume_step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    notes = []
    if torn:
        notes.append("its torn last line (an interrupted write) was dropped")
    if unreadable:
        notes.append(f"line(s) {unreadable[:5]} are not JSON and were kept as they are")
    return f"warning: {path}: " + "; ".join(notes) if notes else None


#: Above this fraction of skipped eval samples, the evaluation is logged with a warning.
EVAL_SKIPPED_WARNING = 0.01


def skipped_eval_warning(step: int, results: dict) -> str | None:
    """A warning when more than :data:`EVAL_SKIPPED_WARNING` of the eval samples were skipped."""
    skipped, usable = results.get("eval_skipped_samples", 0), results.get("eval_usable_samples", 0)
    if not skipped or skipped <= EVAL_SKIPPED_WARNING * (skipped + usable):
        return None
    reasons = ", ".join(f"{n} {key.removeprefix('eval_skipped/')}" for key, n in results.items()
                        if key.startswith("eval_skipped/"))
    return (f"warning: evaluation at step {step} skipped {skipped} of {skipped + usable} eval samples ({reasons}); "
            f"its metrics are over the {usable} usable ones")


class MetricsLogger:
    """Writes metrics on the main rank only; a no-op object on the others.

    ``resume_step``: when resuming, lines of steps after it (logged by the interrupted run after
    its last checkpoint) are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 progress_bar: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._bar = self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        warning = None
        if resume_step is not None and os.path.exists(self.path):
            warning = keep_history(self.path, resume_step)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None
        if warning:
            self.message(warning)

    def _write(self, record: dict) -> None:
        record, bad = strict_json(record)
        if bad:
            record["nonfinite"] = bad
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write(record)
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)  # steps since the last line (log_every)
            loss = record.get("loss")
            self._bar.set_postfix(loss=f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else loss,
                                  lr=f"{record.get('lr', 0):.2e}")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def log_eval(self, step: int, results: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "time": utc_now(), "eval": results})
        warning = skipped_eval_warning(step, results)
        if warning:
            self.message(warning)
        if self._bar is not None:
            self._bar.write(f"[eval step {step}] " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()
                                                                  if isinstance(v, float)))
        if self._tb is not None:
            for key, value in results.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"eval/{key}", value, step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
