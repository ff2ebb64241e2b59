"""Shard specs -> shard URLs, and one opener that streams any of them.

A spec is a string or a list of strings. Each string may be an OpenCLIP-style ``::`` list
(``/data/a-{000..009}.tar::/data/b.tar``); each part is brace-expanded and then is one of:

- a local path or glob (``/data/laion-*.tar``, ``file:///data/x.tar``): must exist, checked up front;
- ``pipe:COMMAND``: the tar is the command's standard output (webdataset's convention);
- ``s3://bucket/key.tar``: streamed as ``pipe:aws s3 cp s3://bucket/key.tar -``;
- ``http://...`` / ``https://...``: streamed as ``pipe:curl -s -L --fail ... URL`` (with connect and
  stall timeouts).

URLs are not checked up front (that would mean fetching them). :func:`open_shard` opens one shard as
a binary stream; a stream that breaks (the command exits non-zero, or the tar is truncated) raises
:class:`ShardStreamError` (an ``OSError``) when it is closed or read, which the data pipeline turns
into one skipped-and-counted sample. The child process is always ended when the reader stops, so
an abandoned shard never leaves a process behind and never blocks.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from braceexpand import braceexpand

PIPE_PREFIX = "pipe:"
CURL = "curl -s -L --fail --connect-timeout 30 --speed-limit 1 --speed-time 60"
# After the tar's end-of-archive, how long a finished stream's command may take to exit.
EXIT_GRACE_S = 30.0


class ShardStreamError(OSError):
    """A shard stream broke: its command failed, or it could not be opened."""


def to_url(part: str) -> str:
    """One expanded spec part -> a local path or a ``pipe:`` URL (s3 / http(s) rewritten to a pipe)."""
    if part.startswith(PIPE_PREFIX):
        if not part[len(PIPE_PREFIX):].strip():
            raise ValueError(f"shard {part!r}: empty pipe command")
        return part
    if part.startswith("s3://"):
        return f"{PIPE_PREFIX}aws s3 cp {shlex.quote(part)} -"
    if part.startswith(("http://", "https://")):
        # A stalled server must not hang the reader: give up below 1 B/s for 60 s.
        return f"{PIPE_PREFIX}{CURL} {shlex.quote(part)}"
    if part.startswith("file://"):
        return part[len("file://"):]
    if "://" in part:
        raise ValueError(f"shard {part!r}: unsupported URL scheme (use a local path, pipe:, s3://, http(s)://)")
    return part


def is_stream(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def expand_shard_spec(spec) -> list[str]:
    """Shard URLs of ``spec`` in order; raises ValueError naming the missing local files."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for listed in str(pattern).split("::"):
            if not listed.strip():
                continue
            for part in braceexpand(listed.strip()):
                url = to_url(part)
                if not is_stream(url) and any(c in url for c in "*?["):
                    urls += sorted(glob.glob(url))
                else:
                    urls.append(url)
    local = [u for u in urls if not is_stream(u)]
    missing = [p for p in local if not os.path.isfile(p)]
    if not urls:
        raise ValueError(f"shards {spec!r}: no file matches {', '.join(str(p) for p in patterns) or 'an empty spec'}")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"shards {spec!r}: {len(missing)} of {len(urls)} file(s) missing: {shown}")
    return urls


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """Open one shard URL as a binary stream (a local file, or a ``pipe:`` command's stdout).

    On a normal exit the command must finish with status 0 (its remaining output is drained first),
    else :class:`ShardStreamError` is raised with the tail of its stderr. When the block is left early
    (an exception, or the reading generator is closed), the command is killed and reaped.
    """
    if not is_stream(url):
        with open(url, "rb") as f:
            yield f
        return
    command = url[len(PIPE_PREFIX):]
    with tempfile.TemporaryFile() as stderr:
        try:
            # Its own process group, so that a kill also reaches every command of a pipeline.
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise ShardStreamError(f"{url}: cannot start: {e}") from None
        finished = False
        try:
            yield proc.stdout
            while proc.stdout.read(1 << 16):  # the tar padding after end-of-archive, or junk
                pass
            finished = True
        finally:
            proc.stdout.close()
            if not finished:
                _kill_group(proc)
            try:
                status = proc.wait(timeout=EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status = proc.wait()
        if finished and status != 0:
            stderr.seek(0)
            tail = stderr.read()[-300:].decode("utf-8", "replace").strip()
            raise ShardStreamError(f"{url}: command exited with status {status}" + (f": {tail}" if tail else ""))


#: Prefixes of shard specs that are not local files (WebDataset's ``pipe:`` and URLs).
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


def spec_patterns(spec) -> list[str]:
    """The patterns of a shard spec: a string or a list, each possibly an OpenCLIP ``a::b`` list."""
    return [part.strip() for pattern in ([spec] if isinstance(spec, str) else list(spec))
            for part in str(pattern).split("::") if part.strip()]


def first_local_shard(spec) -> str | None:
    """The first existing local shard of ``spec`` (None when there is none)."""
    for pattern in spec_patterns(spec):
        if is_remote(pattern):
            continue
        for path in braceexpand(pattern):
            paths = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
            if paths and os.path.isfile(paths[0]):
                return paths[0]
    return None
