"""Write files so that readers see either the old state or the complete new file, never a partial one.

Every writer goes to a temporary file in the destination's directory (same filesystem, so the final
``os.replace`` is atomic), is flushed to disk, then moved into place. On any failure the temporary file
is removed and the destination is left as it was. An existing destination is only replaced when the
caller says ``force=True``; without it the move uses a hard link, which fails if the name appeared in
the meantime, so two writers cannot silently overwrite each other.

Example::

    atomic_write_bytes("model.onnx", data)
    atomic_torch_save(state_dict, "plan.pt", force=True)
    atomic_write("report.txt", lambda tmp: tmp.write_text(text))
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConvfactorError

__all__ = [
    "OutputExistsError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "temporary_sibling",
    "publish",
    "check_writable",
    "StagedOutputs",
]


class OutputExistsError(ConvfactorError, FileExistsError):
    """The output file exists and ``force`` was not given."""


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """The destination as a Path, after checking it may be written.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
        ConvfactorError: the parent directory does not exist, or ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise ConvfactorError(f"{path} is a directory, not a file name")
    if not path.parent.is_dir():
        raise ConvfactorError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    return path


@contextlib.contextmanager
def temporary_sibling(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh, empty temporary file next to ``path``, removed on exit unless it was moved away.

    Created with the process umask like any new file (``tempfile.mkstemp`` would make it 0600, and the
    mode travels with the rename).
    """
    path = Path(path)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            with open(temp, "xb"):
                break
        except FileExistsError:  # name collision: draw another
            continue
    try:
        yield temp
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def publish(temp: str | os.PathLike, path: str | os.PathLike, force: bool) -> None:
    """Move a finished temporary file onto ``path`` in one step.

    Args:
        temp: the finished file, on the same filesystem as ``path``.
        path: the destination.
        force: replace ``path`` if it exists; otherwise fail if it exists, even if it was created
            after the caller's first check.
    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False (``temp`` is left in place).
    """
    temp, path = Path(temp), Path(path)
    os.chmod(temp, _new_file_mode())  # staged files may come from writers that create them 0600
    if force:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # fails if path exists: no overwrite even under a race
    except FileExistsError:
        raise OutputExistsError(f"{path} exists; pass force=True (--force) to overwrite it") from None
    except OSError:
        # Filesystems without hard links: the check-then-replace window is the best we can do.
        if path.exists():
            raise OutputExistsError(f"{path} exists; pass force=True (--force) to overwrite it") from None
        os.replace(temp, path)
        return
    temp.unlink()


def _new_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644  # the common umask 022, where the umask cannot be read without changing it


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], *, force: bool = False) -> Path:
    """Call ``writer(temp_path)`` to produce the file, then move it onto ``path`` atomically.

    Args:
        path: destination file.
        writer: writes the complete content to the path it is given (a sibling temp file that exists
            and is empty). Its return value is ignored.
        force: overwrite an existing ``path``.
    Returns:
        ``path`` as a Path.
    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False (checked before ``writer`` runs).
        Whatever ``writer`` raises; the temporary file is removed and ``path`` is untouched.
    """
    path = check_writable(path, force)
    with temporary_sibling(path) as temp:
        writer(temp)
        _fsync(temp)
        publish(temp, path, force)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda temp: temp.write_bytes(data), force=force)


def atomic_write_text(path: str | os.PathLike, text: str, *, force: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda temp: temp.write_text(text, encoding=encoding), force=force)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, force: bool = False) -> Path:
    """``torch.save(obj, path)`` atomically (see ``atomic_write``)."""
    import torch  # local: keeps this helper importable without torch for plain file writes

    return atomic_write(path, lambda temp: torch.save(obj, temp), force=force)


class StagedOutputs:
    """A set of outputs published all together or not at all.

    Each file is written under its final name into a hidden staging directory beside its destination
    (an ONNX file's external ``.data`` keeps its reference); ``commit`` moves them into place in the
    order they were staged, so the caller stages last the file that marks the set complete (a report).
    If any move fails, the files already moved are taken back: new ones removed, replaced ones restored
    from a hard link (or copy) kept in the staging directory. On exit the staging directories are
    removed, whatever happened: no partial set and no temporary file is left.

    Example::

        with StagedOutputs(force=False) as staged:
            staged.write(Path("m.pt"), lambda p: torch.save(obj, p))
            staged.write(Path("m.report.json"), lambda p: p.write_text(text))
            staged.commit()
    """

    def __init__(self, force: bool):
        self.force = force
        self._dirs: dict[Path, Path] = {}
        self._files: list[tuple[Path, Path]] = []

    def path_for(self, destination: Path) -> Path:
        """Where to write ``destination``'s content now; it is published by ``commit``."""
        staged = self._staging_dir(destination) / destination.name
        self._files.append((staged, destination))
        return staged

    def _staging_dir(self, destination: Path) -> Path:
        parent = destination.parent
        if parent not in self._dirs:
            self._dirs[parent] = Path(tempfile.mkdtemp(dir=parent, prefix=".convfactor-staging-"))
        return self._dirs[parent]

    def write(self, destination: Path, writer: Callable[[Path], Any]) -> None:
        """Stage ``destination`` by calling ``writer(path)``, then flush it to disk."""
        staged = self.path_for(destination)
        writer(staged)
        _fsync(staged)

    def adopt(self, staged: Path, destination: Path) -> None:
        """Publish an extra file that a writer put in a staging directory (ONNX external data)."""
        self._files.append((staged, destination))

    def commit(self) -> None:
        """Move every staged file into place; on a failure, undo the moves already made and re-raise.

        Raises:
            OutputExistsError: a destination exists and ``force`` is False (nothing is left published).
            OSError: a move failed (nothing is left published; replaced files are back).
        """
        done: list[tuple[Path, Path | None]] = []  # (destination, saved old content or None)
        try:
            for staged, destination in self._files:
                if not staged.exists():
                    continue
                saved = self._save_old(destination) if self.force else None
                publish(staged, destination, self.force)
                done.append((destination, saved))
        except BaseException:
            for destination, saved in reversed(done):
                with contextlib.suppress(OSError):
                    if saved is not None:
                        os.replace(saved, destination)
                    else:
                        destination.unlink()
            raise

    def _save_old(self, destination: Path) -> Path | None:
        """A copy of an existing destination in the staging directory (a hard link where possible)."""
        if not destination.is_file():
            return None
        saved = self._staging_dir(destination) / f".old.{secrets.token_hex(4)}.{destination.name}"
        try:
            os.link(destination, saved)
        except OSError:
            shutil.copy2(destination, saved)
        return saved

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc: Any) -> None:
        for directory in self._dirs.values():
            shutil.rmtree(directory, ignore_errors=True)
