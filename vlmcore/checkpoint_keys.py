"""One report of the keys a checkpoint lacks, has in excess or holds in another shape, shared by the
conversions of every family.

A conversion maps the peer's names to ours, then calls :func:`check_keys` once with everything it
found wrong, so a bad checkpoint is refused with every offending key named in one message instead
of the first one only. Keys a conversion legitimately ignores (frozen parts that come from another
config section, duplicates of a registered module) never reach the report: each conversion lists
them in its own documented allow-list.
"""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointKeysError(ValueError):
    """A checkpoint does not fit the model: :attr:`missing` / :attr:`unexpected` hold the keys,
    :attr:`mismatched` the ``"key: checkpoint shape vs ours"`` lines."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str] = ()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, list(mismatched)


def check_keys(source: str, missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str] = (), *,
               hint: str = "", limit: int = 12) -> None:
    """Raise :class:`CheckpointKeysError` naming the ``missing``, ``unexpected`` and ``mismatched`` keys
    (up to ``limit`` of each, with their counts); nothing when all are empty.

    Args:
        source: what was read (``"model.flamingo.init /path/checkpoint.pt"``), the message's subject.
        missing: our parameter names the checkpoint gives no value.
        unexpected: checkpoint keys that map to nothing and are on no allow-list.
        mismatched: ``"key: checkpoint shape vs ours"`` lines of keys whose tensor has another shape.
        hint: a sentence appended in parentheses (how to let keys through, the likely cause).
    """
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
    if not missing and not unexpected and not mismatched:
        return
    parts = [f"{what} {len(keys)} keys: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
             if keys]
    message = f"{source} does not fit the model: " + "; ".join(parts) + (f" ({hint})" if hint else "")
    raise CheckpointKeysError(message, missing, unexpected, mismatched)
