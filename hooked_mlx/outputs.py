"""The rules every writer follows (``convert``, ``save_sae``, the SAELens / sparsify exports, ``harvest``,
``train-sae --out``, ``TunedLens.save``, ``plot_patching``):

1. A writer never deletes or overwrites anything it did not create.
2. An existing non-empty output is refused. The error lists what is there and says how to choose another
   path or pass ``overwrite=True`` (``--overwrite``), which replaces only the files the writer itself
   writes; every other file in the folder stays as it was.
3. An output equal to one of the writer's sources, or inside one, is refused (``overwrite`` or not).
4. A path that is a file where a folder is expected (or the reverse) is refused.
5. The checks run before any long work (``check_output_dir`` / ``check_output_file`` up front) and again
   when the result is committed.
6. Writes are atomic: a folder is staged beside its destination and renamed into place (with
   ``overwrite``, file by file with ``os.replace``); a file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PathLike = str | os.PathLike


class OutputExistsError(FileExistsError):
    """The output path already holds something the writer would have to replace."""


class OutputOverlapsSourceError(ValueError):
    """The output path is one of the writer's own sources, or inside one."""


def _listing(folder: Path, n: int = 6) -> str:
    names = sorted(os.listdir(folder))
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_sources(out: Path, sources: Iterable[PathLike | None], what: str) -> None:
    for s in sources:
        if s is None:
            continue
        src = Path(s).expanduser().resolve()
        if out == src or src in out.parents:
            rel = "is" if out == src else "is inside"
            raise OutputOverlapsSourceError(
                f"{what}: the output {out} {rel} the source {src}. Writing there could destroy the source; "
                f"expected a separate output path. Choose an output outside {src}."
            )


def check_output_dir(out: PathLike, *, sources: Iterable[PathLike | None] = (), overwrite: bool = False,
                     what: str = "output", allowed: Callable[[str], bool] | None = None) -> Path:
    """Check that folder ``out`` may be written; returns it resolved. Raises before any work is done.

    ``allowed(name)``: entries of an existing folder that are the writer's own (e.g. a training checkpoint
    that ``--resume`` continues); a folder holding only such entries is accepted without ``overwrite``."""
    out = Path(out).expanduser().resolve()
    _check_sources(out, sources, what)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"{what}: {out} is a file, but the output is a folder. Choose another path (a new or empty "
            f"folder); the file is left as it is."
        )
    if out.is_dir() and not overwrite:
        foreign = [n for n in os.listdir(out) if allowed is None or not allowed(n)]
        if foreign:
            raise OutputExistsError(
                f"{what}: the output folder {out} is not empty (it holds {_listing(out)}). Expected a new or "
                f"empty folder. Choose another path, or pass --overwrite (overwrite=True), which replaces only "
                f"the files this writer writes and leaves the others."
            )
    return out


def check_output_file(out: PathLike, *, sources: Iterable[PathLike | None] = (), overwrite: bool = False,
                      what: str = "output") -> Path:
    """Check that file ``out`` may be written; returns it resolved."""
    out = Path(out).expanduser().resolve()
    _check_sources(out, sources, what)
    if out.is_dir():
        raise OutputExistsError(f"{what}: {out} is a folder, but the output is a file. Choose a file path.")
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{what}: {out} already exists. Choose another path, or pass overwrite=True (--overwrite) to "
            f"replace that file."
        )
    return out


def _staged_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if not p.is_dir())


@contextmanager
def staged_dir(out: PathLike, *, sources: Iterable[PathLike | None] = (), overwrite: bool = False,
               what: str = "output", allowed: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``out``; on a normal exit its contents become ``out``.

    A new or empty ``out`` is replaced by one ``rename`` (atomic). With ``overwrite`` (or ``allowed``
    entries) into a non-empty folder, each staged file replaces its namesake with ``os.replace``; nothing
    else in the folder is touched. On an exception the staging folder is removed and ``out`` is untouched."""
    out = check_output_dir(out, sources=sources, overwrite=overwrite, what=what, allowed=allowed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_output_dir(out, sources=sources, overwrite=overwrite, what=what, allowed=allowed)
        if not out.exists():
            os.rename(tmp, out)
            return
        if not any(out.iterdir()):
            out.rmdir()  # empty: ours to replace
            os.rename(tmp, out)
            return
        files = _staged_files(tmp)
        for rel in files:  # refuse before moving anything
            dest = out / rel
            parents = [out / Path(*rel.parts[:i]) for i in range(1, len(rel.parts))]
            if dest.is_dir() or any(p.exists() and not p.is_dir() for p in parents):
                raise OutputExistsError(f"{what}: cannot write {dest}: a folder or file of that name is in the way.")
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, out / rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file_atomic(out: PathLike, write: Callable[[str], object], *, sources: Iterable[PathLike | None] = (),
                      overwrite: bool = False, what: str = "output", suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``out`` (checked by ``check_output_file``).

    ``suffix``: the temporary name's ending, for writers that pick a format from it (``.safetensors``)."""
    out = check_output_file(out, sources=sources, overwrite=overwrite, what=what)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix or ".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        check_output_file(out, sources=sources, overwrite=overwrite, what=what)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def write_text_atomic(out: PathLike, text: str, *, overwrite: bool = False, what: str = "output") -> Path:
    """``write_file_atomic`` for a text file (UTF-8)."""
    return write_file_atomic(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite,
                             what=what)
