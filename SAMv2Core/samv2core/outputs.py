"""Writing outputs safely: the one home for atomic writes and output checks.

* ``atomic_write(target, write)``: ``write`` fills a temporary file in the target's folder
  (an ASCII name of bounded length, unique per process and call, with the target's extension
  so format-by-extension writers work), which is then renamed onto the target with
  ``os.replace``: readers never see a partial file.
* ``OutputSet``: several files written all-or-nothing (e.g. JSON + .mrk.json + CSV). Every
  file is staged first; only when all were written are they renamed into place. If a rename
  fails, targets already replaced get their previous content back. ``OutputSet(folder=DIR)``
  builds the whole folder afresh beside it and swaps it in with one atomic rename, so even a
  run killed at any instant (SIGKILL) leaves the previous result or the new one, never a mix.
* Leftovers (``.partial-<pid>-...``) of a process that no longer runs are removed the next
  time something is written in that folder.
* ``check_outputs(outputs, inputs)``: refuses, before any work, an output that resolves to an
  input (same path, symlink, hard link) or that cannot be written (folder missing rights, a
  file where a folder is needed, a name too long for the file system...).
  ``check_output_folder`` does the same for a folder whose named files will be written.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import InputError

PARTIAL_PREFIX = ".partial-"
_LEFTOVER = re.compile(r"^\.partial-(\d+)-")
_MAX_EXT = 16  # longest extension kept on a temporary name (".nii.gz", ".safetensors", ".mrk.json")


def _extension(name: str) -> str:
    """The target's full extension (".nii.gz") when it is short and plain ASCII, else ""."""
    m = re.search(r"(\.[A-Za-z0-9_]{1,12})+$", name)
    ext = m.group(0) if m else ""
    return ext if len(ext) <= _MAX_EXT and ext != name else ""


def temp_path_for(target: "str | os.PathLike") -> Path:
    """A fresh temporary name next to ``target`` (same folder, so os.replace is atomic),
    unique per process and call, keeping the full extension (``.nii.gz`` stays last). The
    name never contains the target's own name, so it is short and ASCII whatever the
    target is called (a long or non-UTF-8 name still works)."""
    target = Path(target)
    return target.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}{_extension(target.name)}"


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine (ours, or another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_leftovers(folder: "str | os.PathLike") -> list[Path]:
    """Remove ``.partial-<pid>-*`` files and folders of processes that no longer run (a run
    killed while writing); returns what was removed. Best effort: never raises."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _apply_umask(path: Path) -> None:
    # some writers (safetensors, tempfile) create files 0600; give outputs the usual mode
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _WriterPath:
    """The path a C++/Rust writer is given for ``tmp``: ``tmp`` itself, or, when its folder's
    name is not valid UTF-8 (ITK and safetensors abort on such strings), the same file
    reached through an open handle on the folder (``/proc/self/fd/N/name``)."""

    def __init__(self, tmp: Path):
        self.fd = None
        self.path = tmp
        if not _utf8(tmp) and os.path.isdir("/proc/self/fd"):
            self.fd = os.open(tmp.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            self.path = Path(f"/proc/self/fd/{self.fd}") / tmp.name

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _named_for(exc: BaseException, tmp: Path, target: Path, writer_path: Path) -> BaseException:
    """``exc`` with the temporary file's name replaced by the target's (users never see
    internal names); OSErrors keep their errno so the CLI reports them as one line."""
    if isinstance(exc, OSError):
        if exc.errno is None:  # raised without one: keep the text, name the target
            return OSError(errno.EIO, public_text(str(exc), target), str(target))
        return OSError(exc.errno, exc.strerror or str(exc), str(target))
    text = str(exc)
    code = re.search(r"\(os error (\d+)\)", text)  # Rust writers (safetensors): a full disk is errno 28
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(target))
    for internal in {str(writer_path), str(tmp), tmp.name}:
        text = text.replace(internal, str(target))
    if text == str(exc):
        return exc
    try:
        return type(exc)(text)
    except Exception:  # an exception type that needs other arguments
        return exc


def atomic_write(target: "str | os.PathLike", write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename the result onto ``target``; returns ``target``.
    On any failure the temporary file is removed, ``target`` is left as it was, and the
    error names ``target`` (not the temporary file)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    tmp = temp_path_for(target)
    handle = _WriterPath(tmp)
    try:
        write(handle.path)
        if not tmp.exists():
            raise OSError(errno.EIO, f"the writer produced no file for {target.name}", str(target))
        _apply_umask(tmp)
        os.replace(tmp, target)
    except Exception as exc:
        _remove(tmp)
        named = _named_for(exc, tmp, target, handle.path)
        if named is exc:
            raise
        raise named from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        handle.close()
    return target


_INTERNAL = re.compile(r"\S*\.partial-\d+-[0-9a-f]{12}(\.[A-Za-z0-9_.]+)?")


def public_text(text: str, target: "str | os.PathLike") -> str:
    """``text`` with any internal temporary path replaced by ``target`` (users never see them)."""
    return _INTERNAL.sub(lambda m: str(target), text)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(doc, indent: int = 2, default=None) -> str:
    """``doc`` as strict JSON (a NaN or infinite number becomes null: ``NaN`` is not JSON and
    other readers refuse the whole file)."""
    return json.dumps(_finite(json.loads(json.dumps(doc, default=default))), indent=indent, allow_nan=False)


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


# --- swapping a folder in one step ------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry(src: Path, dst: Path) -> None:
    """Make ``dst`` hold what ``src`` holds, by hard links where possible (no data copied;
    the originals are not touched)."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_file():
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class OutputSet:
    """Files written all-or-nothing::

        with OutputSet() as out:
            write_json(out.stage("a.json"))
            write_csv(out.stage("b.csv"))
        # both renamed into place here; on an exception in the block, neither was

    With ``folder=DIR`` every target lies in DIR: the new content of DIR is built in a fresh
    folder beside it (files it already holds are kept, by hard link, except the ones named
    in ``replaces``: the outputs of an earlier run that this run may not write again) and
    swapped in with one atomic rename. A run killed at any instant leaves the previous DIR or
    the new one; its leftover is removed by the next run.

    ``commit()`` may also be called explicitly; an uncommitted set is discarded on exit.
    """

    def __init__(self, folder: "str | os.PathLike | None" = None, replaces: Iterable[str] = ()):
        self._staged: list[tuple[Path, Path]] = []  # (tmp, target)
        self._handles: list[_WriterPath] = []
        self.committed = False
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and self.folder.is_dir() and not os.access(self.folder.parent, os.W_OK | os.X_OK):
            self.folder = None  # no room beside it for the new folder: files are committed one by one
        self._replaces = set(replaces)
        self._stage_dir: Optional[Path] = None

    def _stage_folder(self) -> Path:
        if self._stage_dir is None:
            parent = self.folder.parent
            parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(parent)
            if self.folder.is_dir():
                clean_leftovers(self.folder)
            self._stage_dir = parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._stage_dir.mkdir()
        return self._stage_dir

    def stage(self, target: "str | os.PathLike") -> Path:
        """The temporary path to write ``target``'s content to."""
        target = Path(target)
        if self.folder is not None:
            try:
                rel = Path(os.path.abspath(target)).relative_to(os.path.abspath(self.folder))
            except ValueError:
                raise ValueError(f"{target} is not inside the output folder {self.folder}") from None
            tmp = self._stage_folder() / rel
            tmp.parent.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(target.parent)
            tmp = temp_path_for(target)
        self._staged.append((tmp, target))
        handle = _WriterPath(tmp)
        self._handles.append(handle)
        return handle.path

    def write_text(self, target: "str | os.PathLike", text: str) -> None:
        self.stage(target).write_text(text, encoding="utf-8")

    def commit(self) -> list[Path]:
        for tmp, target in self._staged:
            if not tmp.exists():
                raise OSError(errno.EIO, "nothing was written", str(target))
        if self.folder is not None:
            return self._commit_folder()
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
        self._close_handles()
        self._staged.clear()
        self.committed = True
        return done

    def _commit_folder(self) -> list[Path]:
        stage = self._stage_folder()
        written = {tmp.relative_to(stage).parts[0] for tmp, _ in self._staged}
        try:
            for where, _, files in os.walk(stage):
                for name in files:
                    _apply_umask(Path(where) / name)
            if self.folder.is_dir():
                for entry in os.scandir(self.folder):  # keep what is not this command's output
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if entry.name in written and is_dir:  # never drop a user's folder for a file
                        raise IsADirectoryError(errno.EISDIR, "is a folder where an output file must go",
                                                str(self.folder / entry.name))
                    if entry.name in written or (entry.name in self._replaces and not is_dir) \
                            or _LEFTOVER.match(entry.name):
                        continue
                    _carry(Path(entry.path), stage / entry.name)
                if not _exchange(stage, self.folder):
                    old = self.folder.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
                    os.rename(self.folder, old)
                    os.rename(stage, self.folder)
                    stage = old
                _remove(stage)  # now the previous content
            else:
                if self.folder.exists() or self.folder.is_symlink():
                    raise OSError(errno.ENOTDIR, "not a folder", str(self.folder))
                os.rename(stage, self.folder)
        except BaseException:
            self.discard()
            raise
        self._close_handles()
        done = [target for _, target in self._staged]
        self._staged.clear()
        self._stage_dir = None
        self.committed = True
        return done

    def _close_handles(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            _remove(tmp)
        if self._stage_dir is not None:
            _remove(self._stage_dir)
            self._stage_dir = None
        self._close_handles()
        self._staged.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.committed:
            self.commit()
            return
        staged = list(zip(self._staged, self._handles))
        self.discard()
        if isinstance(exc, Exception):  # name the target, never the staged file, in the error
            for (tmp, target), handle in staged:
                if str(tmp) in str(exc) or str(handle.path) in str(exc) or getattr(exc, "filename", None) in (
                        str(tmp), str(handle.path)):
                    named = _named_for(exc, tmp, target, handle.path)
                    if named is not exc:
                        raise named from None


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


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _check_name_length(target: Path) -> None:
    """Refuse a name the file system cannot hold, before any work (not after it)."""
    limit = _name_max(target.parent)
    for part in target.parts:
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{target}: a name in this path is {len(os.fsencode(part))} bytes long; the file "
                             f"system allows {limit}")


def check_writable(target: "str | os.PathLike", folder: bool = False) -> Path:
    """Refuse (InputError) an output location that cannot be written: a folder where a file
    is needed (or the reverse), a parent that is a file, a folder without write permission."""
    target = Path(target)
    _check_name_length(target)
    if target.exists():
        if not folder and not target.is_dir() and not target.is_file():
            raise InputError(f"{target}: exists and is not a regular file (a pipe or device); choose a file name")
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
