"""Reading the JSON files the scorers take, and the one error type every bad input raises.

A bad file must end in one message that names the file and the entry (``predictions.json: entry 3
(image_id 42): no 'caption'``). The scorers do not know file names: they raise
:class:`EvalInputError` naming the *role* of the input (``"predictions"``, ``"references"``, ...)
and the command line puts the path of that role in front. :class:`MissingToolError`: an optional tool
a request needs (SPICE's jars, NLTK's data) is absent; the command line also exits 2 on it.
"""

from __future__ import annotations

import json


class EvalInputError(ValueError):
    """An input that cannot be scored: ``role`` is which input ("predictions", "references", ...)."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role


class MissingToolError(RuntimeError):
    """An optional tool a request needs is not installed (SPICE's jars, NLTK's data, pycocoevalcap)."""


def read_json(path: str, role: str):
    """The parsed content of ``path``; unreadable or invalid JSON raises :class:`EvalInputError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise EvalInputError(role, f"cannot read the file: {e.strerror}") from e
    except ValueError as e:
        raise EvalInputError(role, f"not valid JSON: {e}") from e


def require_list(value, role: str, what: str) -> list:
    """``value`` if it is a non-empty list, else :class:`EvalInputError` ("expected a non-empty list of ...")."""
    if not isinstance(value, list):
        raise EvalInputError(role, f"expected a list of {what}, got {type(value).__name__}")
    if not value:
        raise EvalInputError(role, f"no {what}: the list is empty")
    return value


def require_keys(entry, keys: tuple[str, ...], role: str, where: str) -> dict:
    """``entry`` if it is a dict holding every key of ``keys``, else :class:`EvalInputError` naming ``where``."""
    if not isinstance(entry, dict):
        raise EvalInputError(role, f"{where}: expected an object, got {json.dumps(entry)[:80]}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise EvalInputError(role, f"{where}: no {', '.join(repr(k) for k in missing)} (has {sorted(entry)})")
    return entry
