"""Files written whole: a reader (or a run resumed after a crash) never sees half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved over ``path`` when the block ends, deleted
    if it raises. The folder is created; the name carries the process id, so concurrent writers of
    one file do not share a temporary (the last one to finish wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_whole(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) at ``path`` through :func:`written_whole`; returns the path."""
    with written_whole(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
