"""Writing outputs safely: the one home for atomic writes and output checks.

* ``atomic_write(target, write)``: ``write`` fills a temporary file in the target's folder
  (name unique per process and call, same extension so format-by-extension writers work),
  which is then renamed onto the target with ``os.replace``: readers never see a partial file.
* ``OutputSet``: several files written all-or-nothing (e.g. JSON + .mrk.json + CSV). Every
  file is staged first; only when all were written are they renamed into place. If a rename
  fails, targets already replaced get their previous content back.
* ``check_outputs(outputs, inputs)``: refuses, before any work, an output that resolves to an
  input (same path, symlink, hard link) or that cannot be written (folder missing rights, a
  file where a folder is needed...). ``check_output_folder`` does the same for a folder
  whose named files will be written.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable

from .errors import InputError


def temp_path_for(target: "str | os.PathLike") -> Path:
    """A fresh temporary name next to ``target`` (same folder, so os.replace is atomic),
    unique per process and call, keeping the full extension (``.nii.gz`` stays last)."""
    target = Path(target)
    return target.parent / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"


def _apply_umask(path: Path) -> None:
    # some writers (safetensors, tempfile) create files 0600; give outputs the usual mode
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass


def atomic_write(target: "str | os.PathLike", write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename the result onto ``target``; returns ``target``.
    On any failure the temporary file is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target)
    try:
        write(tmp)
        if not tmp.exists():
            raise OSError(f"the writer produced no file for {target.name}")
        _apply_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return target


def write_text_atomic(target: "str | os.PathLike", text: str) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


class OutputSet:
    """Files written all-or-nothing::

        with OutputSet() as out:
            write_json(out.stage("a.json"))
            write_csv(out.stage("b.csv"))
        # both renamed into place here; on an exception in the block, neither was

    ``commit()`` may also be called explicitly; an uncommitted set is discarded on exit.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (tmp, target)
        self.committed = False

    def stage(self, target: "str | os.PathLike") -> Path:
        """The temporary path to write ``target``'s content to."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(target)
        self._staged.append((tmp, target))
        return tmp

    def write_text(self, target: "str | os.PathLike", text: str) -> None:
        self.stage(target).write_text(text, encoding="utf-8")

    def commit(self) -> list[Path]:
        for tmp, target in self._staged:
            if not tmp.exists():
                raise OSError(f"{target}: nothing was written")
        backups: list[tuple[Path, Path]] = []  # (backup, target) of replaced existing files
        done: list[Path] = []
        try:
            for tmp, target in self._staged:
                if target.is_file():
                    backup = temp_path_for(target)
                    _keep_copy(target, backup)
                    backups.append((backup, target))
                _apply_umask(tmp)
                os.replace(tmp, target)
                done.append(target)
        except BaseException:
            restored = {t for _, t in backups}
            for backup, target in backups:  # put previous content back
                try:
                    os.replace(backup, target)
                except OSError:
                    pass
            for target in done:
                if target not in restored:
                    _remove(target)
            self.discard()
            raise
        for backup, _ in backups:
            _remove(backup)
        self._staged.clear()
        self.committed = True
        return done

    def discard(self) -> None:
        for tmp, _ in self._staged:
            _remove(tmp)
        self._staged.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        else:
            self.discard()


def _keep_copy(path: Path, backup: Path) -> None:
    """Keep ``path``'s current content at ``backup`` (a hard link, or a copy)."""
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)


# --- checks before any work -----------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _input_files(inputs: Iterable) -> list[Path]:
    """Input paths, with a folder input (DICOM series) expanded to the files directly in it."""
    out: list[Path] = []
    for item in inputs:
        if item is None:
            continue
        p = Path(item)
        out.append(p)
        if p.is_dir():
            try:
                out.extend(c for c in p.iterdir() if c.is_file())
            except OSError:
                pass
    return out


def check_writable(target: "str | os.PathLike", folder: bool = False) -> Path:
    """Refuse (InputError) an output location that cannot be written: a folder where a file
    is needed (or the reverse), a parent that is a file, a folder without write permission."""
    target = Path(target)
    if target.exists():
        if folder and not target.is_dir():
            raise InputError(f"{target}: is a file; an output folder is needed here")
        if not folder and target.is_dir():
            raise InputError(f"{target}: is a folder; an output file name is needed here")
        if not os.access(target if folder else target.parent, os.W_OK):
            raise InputError(f"{target}: cannot write here (permission denied)")
        return target
    parent = target.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{target}: cannot create it, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{target}: cannot write to {parent} (permission denied)")
    return target


def check_outputs(outputs: Iterable, inputs: Iterable, folder_outputs: Iterable = ()) -> None:
    """Refuse outputs that would overwrite an input or cannot be written, before any work.

    ``outputs``: output file paths (None entries ignored). ``folder_outputs``: pairs
    (folder, names written into it). ``inputs``: input files or folders.
    """
    ins = _input_files(inputs)
    files = [Path(o) for o in outputs if o is not None]
    for folder, names in folder_outputs:
        if folder is None:
            continue
        check_writable(folder, folder=True)
        for inp in ins:
            if _same_file(Path(folder), inp):
                raise InputError(f"{folder}: the output folder is the input {inp}; choose another folder")
        files.extend(Path(folder) / n for n in names)
    seen: dict[Path, Path] = {}
    for out in files:
        for inp in ins:
            if _same_file(out, inp):
                raise InputError(f"{out}: this output would overwrite the input {inp}; choose another name")
        key = Path(os.path.abspath(out))
        if key in seen:
            raise InputError(f"{out}: the same file is named for two outputs")
        seen[key] = out
        if out.parent not in {Path(f) for f, _ in folder_outputs}:
            check_writable(out)
