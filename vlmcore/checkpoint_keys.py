"""One report of the keys a checkpoint lacks or has in excess, shared by the conversions of every family.

A conversion maps the peer's names to ours, then calls :func:`check_keys` once with everything it
found wrong, so a bad checkpoint is refused with every offending key named in one message instead
of the first one only. Keys a conversion legitimately ignores (frozen parts that come from another
config section, duplicates of a registered module) never reach the report: each conversion lists
them in its own documented allow-list.
"""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointKeysError(ValueError):
    """A checkpoint does not fit the model: :attr:`missing` / :attr:`unexpected` hold the keys."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing, self.unexpected = missing, unexpected


def check_keys(source: str, missing: Iterable[str], unexpected: Iterable[str], *, limit: int = 12) -> None:
    """Raise :class:`CheckpointKeysError` naming the ``missing`` and ``unexpected`` keys (up to ``limit``
    of each, with their counts); nothing when both are empty.

    Args:
        source: what was read (``"model.flamingo.init /path/checkpoint.pt"``), the message's subject.
        missing: our parameter names the checkpoint gives no value.
        unexpected: checkpoint keys that map to nothing and are on no allow-list.
    """
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not missing and not unexpected:
        return
    parts = [f"{what} {len(keys)} keys: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    raise CheckpointKeysError(f"{source} does not fit the model: " + "; ".join(parts), missing, unexpected)
