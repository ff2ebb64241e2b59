"""Evaluation that counts what it drops: every held-out sample is counted as usable or skipped by reason.

:meth:`EvalTally.wrap` wraps a task's eval encoder; whatever the task's ``evaluate`` reads through it
(whether it splits the eval set over ranks or reads all of it on every rank) is recorded per sample
key, so the counts of all ranks merge without counting a sample twice. :meth:`EvalTally.summary`
returns the counts for the eval record (``eval_usable_samples``, ``eval_skipped_samples``,
``eval_skipped/<reason>``) and raises :class:`EvalDataError` when no sample was usable: a result
computed on nothing (or on the one survivor of a broken shard) must not pass for an evaluation.
"""

from __future__ import annotations

import collections
import json

import torch.distributed as dist
from vlmcore.train.data.pipeline import BadSample

USABLE = "usable"


class EvalDataError(RuntimeError):
    """The held-out data gave no usable sample."""


class CountingEncoder:
    """An eval encoder that records, per sample key, "usable" or the reason it was dropped.

    The sample's ``json`` member is parsed here too (the eval loop reads it as the sample's metadata):
    one that is not JSON is a ``json_error`` drop."""

    def __init__(self, encoder, outcomes: dict, first_message: dict):
        self.encoder, self.outcomes, self.first_message = encoder, outcomes, first_message

    def __call__(self, sample: dict) -> dict:
        key = f"{sample.get('__url__')}#{sample['__key__']}"
        try:
            example = self.encoder(sample)
            if "json" in sample:
                try:
                    json.loads(sample["json"])
                except ValueError as e:
                    raise BadSample(f"{sample['__key__']}.json is not JSON: {e}", "json_error") from None
        except BadSample as e:
            self.outcomes[key] = e.reason
            self.first_message.setdefault(e.reason, str(e))
            raise
        self.outcomes[key] = USABLE
        return example


class EvalTally:
    """The outcome of every eval sample this rank read (see the module docstring)."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.first_message: dict[str, str] = {}

    def wrap(self, encoder) -> CountingEncoder:
        return CountingEncoder(encoder, self.outcomes, self.first_message)

    def _merged(self) -> tuple[dict[str, str], dict[str, str]]:
        """Every rank's outcomes and first messages, merged (collective when there are several ranks)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.outcomes, self.first_message
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.outcomes, self.first_message))
        outcomes, messages = {}, {}
        for rank_outcomes, rank_messages in everyone:
            outcomes.update(rank_outcomes)
            for reason, text in rank_messages.items():
                messages.setdefault(reason, text)
        return outcomes, messages

    def summary(self, shards: list[str]) -> dict:
        """``{"eval_usable_samples", "eval_skipped_samples", "eval_skipped/<reason>": n}`` over all ranks
        (call it on every rank); :class:`EvalDataError` when no sample was usable."""
        outcomes, messages = self._merged()
        counts = collections.Counter(outcomes.values())
        usable = counts.pop(USABLE, 0)
        if not usable:
            shown = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
            why = "; ".join(f"{n} {reason} (first: {messages[reason]})" for reason, n in counts.most_common())
            raise EvalDataError(
                f"evaluation: 0 usable samples in data.eval.shards ({shown}): "
                + (f"all {sum(counts.values())} skipped: {why}" if counts else "the shards hold no sample")
                + ". Fix the eval data or set data.eval: null; an evaluation of nothing is not reported")
        out = {"eval_usable_samples": usable, "eval_skipped_samples": sum(counts.values())}
        out.update({f"eval_skipped/{reason}": n for reason, n in sorted(counts.items())})
        return out


#: Eval samples read before training (from the first local shards) to check the eval data.
CHECKED_SAMPLES = 32


def eval_sample_problems(task, shards: list[str]) -> list[str]:
    """ConfigError lines about the eval data, found before training: the task's own check of the first
    sample (``Task.check_eval_sample``), then the eval encoder on up to :data:`CHECKED_SAMPLES`
    samples; more than half of them unusable is a problem (the first sample alone can be the one
    good sample of a broken shard)."""
    from vlmcore.train.data.pipeline import read_tar

    samples = []
    for shard in shards:
        samples += [s for _, s in zip(range(CHECKED_SAMPLES - len(samples)), read_tar(shard))]
        if len(samples) >= CHECKED_SAMPLES:
            break
    if not samples:
        return []
    problems = task.check_eval_sample(samples[0])
    if problems:
        return problems
    encoder, reasons = task.eval_encoder(), collections.Counter()
    for sample in samples[1:]:
        try:
            encoder(sample)
        except BadSample as e:
            reasons[e.reason] += 1
    if sum(reasons.values()) * 2 > len(samples):
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        problems.append(f"data.eval.shards: {sum(reasons.values())} of the first {len(samples)} eval samples are not "
                        f"usable by task {task.name!r} ({why})")
    return problems
