"""Writing WebDataset tar shards: the one writer beside the reader (``pipeline.read_tar``).

Every tar we write (the shapes generators, the demos' copies, CapFilt's output) goes through
:class:`TarWriter`, so all of them share two properties:

- atomic: members go to ``PATH.tmp``, renamed to ``PATH`` only when the tar is complete, so a
  crashed run never leaves a truncated shard under the final name (resumable tools check for it);
- deterministic: every member has mtime 0, mode 0644, uid/gid 0 and no owner names, in the USTAR
  format, so the same samples give the same bytes on every machine and every run (CapFilt's resume
  test compares a resumed run's shards byte for byte with an uninterrupted run's).

:class:`ShardWriter` splits a stream of samples over ``<prefix>-000000.tar``, ``-000001.tar``, ...
"""

from __future__ import annotations

import io
import os
import tarfile


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """The header of a regular-file member with fixed metadata (mtime 0, mode 0644, owner 0, no names)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class TarWriter:
    """One tar file written atomically; use as a context manager or call :meth:`close`.

    Leaving the ``with`` block normally renames ``path + ".tmp"`` to ``path``. Leaving it with an
    exception only closes the temporary file: the final path is never touched, and the partial
    ``.tmp`` stays for inspection until a rerun overwrites it.
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp_path = path + ".tmp"
        self._tar: tarfile.TarFile | None = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        """Append one member ``name`` holding ``data``."""
        self._tar.addfile(member_info(name, len(data)), io.BytesIO(data))

    def write_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append one WebDataset sample: a member ``KEY.EXT`` per item of ``members``, in their order."""
        for ext, data in members.items():
            self.add(f"{key}.{ext}", data)

    def close(self, complete: bool = True) -> None:
        """Finish the tar and, when ``complete``, move it to its final path (a second call does nothing)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if complete:
                os.replace(self.tmp_path, self.path)

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


class ShardWriter:
    """Samples -> ``<out_dir>/<prefix>-000000.tar``, ... with at most ``shard_size`` samples per shard.

    ``paths`` lists the shards begun so far; call :meth:`close` after the last sample.
    """

    def __init__(self, out_dir: str, prefix: str, shard_size: int):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.count = 0
        self.paths: list[str] = []
        self._shard: TarWriter | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample (see :meth:`TarWriter.write_sample`), starting a new shard when one is full."""
        if self.count % self.shard_size == 0:
            self.close()
            self.paths.append(os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):06d}.tar"))
            self._shard = TarWriter(self.paths[-1])
        self._shard.write_sample(key, members)
        self.count += 1

    def close(self) -> None:
        """Finish the current shard (renamed to its final path)."""
        if self._shard is not None:
            self._shard.close()
            self._shard = None
