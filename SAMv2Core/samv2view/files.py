"""Which files the browser view may open: the scans named on the command line and anything inside
the ``--data-dir`` folders, nothing else.

A path typed in the page is resolved (symbolic links and ``..`` followed) before it is compared,
so a link inside an allowed folder that points outside it is refused. A missing path and a
forbidden one get the same message, so the page tells nothing about what exists outside the
allowed folders. Only regular files (or a DICOM series folder of regular files) are handed to
the loader: a FIFO, device or socket is refused from its ``stat``, never opened. A header that
names its voxels' file elsewhere (NRRD ``data file:``, MetaImage ``ElementDataFile``, Analyze's
``.img`` beside its ``.hdr``) is allowed only when that file is a regular one in the header's own
folder or allowed itself.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from samv2core.errors import InputError

HEADER_BYTES = 65536
DATA_FILE_FIELDS = {  # the header field naming a detached voxel file, per format
    ".nrrd": re.compile(rb"^data ?file:[ \t]*(.*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE),
    ".nhdr": re.compile(rb"^data ?file:[ \t]*(.*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE),
    ".mha": re.compile(rb"^ElementDataFile[ \t]*=[ \t]*(.*?)[ \t]*\r?$", re.MULTILINE),
    ".mhd": re.compile(rb"^ElementDataFile[ \t]*=[ \t]*(.*?)[ \t]*\r?$", re.MULTILINE),
}


def _real(path: "str | os.PathLike") -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


@dataclass(frozen=True)
class AllowedFiles:
    """The resolved scans given on the command line (``files``) and allowed folders (``folders``)."""

    files: tuple[Path, ...] = ()
    folders: tuple[Path, ...] = ()

    @classmethod
    def from_command_line(cls, files: Iterable[str], folders: Iterable[str]) -> "AllowedFiles":
        """Resolve the command line's scans and ``--data-dir`` folders; a folder must exist."""
        real_folders = []
        for folder in folders:
            real = _real(folder)
            if not real.is_dir():
                raise InputError(f"--data-dir {folder}: no such folder")
            real_folders.append(real)
        return cls(tuple(_real(f) for f in files if str(f).strip()), tuple(real_folders))

    def _allowed(self, real: Path) -> bool:
        return real in self.files or any(real == d or d in real.parents for d in self.folders)

    def _unknown(self, text: str) -> InputError:
        return InputError(f"{text}: no such scan among the ones this view may open "
                          "(the files given on the command line and the --data-dir folders)")

    def resolve(self, text: "str | os.PathLike") -> Path:
        """The real path of an allowed regular file or DICOM folder named by ``text``.

        An absolute path is taken as is; a relative one is looked up in each ``--data-dir`` in
        turn. Raises InputError, with one message for missing and forbidden paths.
        """
        text = str(text).strip()
        if not text:
            raise InputError("no path given")
        candidates = [Path(text)] if os.path.isabs(text) else [d / text for d in self.folders]
        for candidate in candidates:
            try:
                real = _real(candidate)
                if not self._allowed(real):
                    continue
                mode = os.stat(real).st_mode
            except (OSError, ValueError):  # missing, unreadable, too long, NUL in the name
                continue
            if stat.S_ISREG(mode):
                self._check_detached_data(text, real)
                return real
            if stat.S_ISDIR(mode):
                self._check_series_folder(text, real)
                return real
            raise InputError(f"{text}: not a regular file (a FIFO, device or socket is never opened)")
        raise self._unknown(text)

    def _check_series_folder(self, text: str, folder: Path) -> None:
        """A DICOM folder's reader opens every entry: each must be a regular file, in the folder or allowed."""
        try:
            entries = list(os.scandir(folder))
        except OSError:
            raise self._unknown(text) from None
        for entry in entries:
            real = _real(entry.path)
            try:
                mode = os.stat(real).st_mode
            except (OSError, ValueError):
                mode = 0
            if stat.S_ISDIR(mode):
                continue  # the series reader does not descend into sub-folders
            if not (stat.S_ISREG(mode) and (folder in real.parents or self._allowed(real))):
                raise InputError(f"{text}: the folder holds {entry.name!r}, which is not a regular file "
                                 "inside the allowed folders (it is never opened)")

    def _check_detached_data(self, text: str, header: Path) -> None:
        """The file a header sends the reader to must be regular and allowed (or beside the header)."""
        suffix = header.suffix.lower()
        named = []
        if suffix in DATA_FILE_FIELDS:
            with open(header, "rb") as stream:  # a regular file: reading its head cannot block
                head = stream.read(HEADER_BYTES)
            if suffix in (".nrrd", ".nhdr"):
                head = head.split(b"\n\n", 1)[0]  # the header ends at the first empty line
            found = DATA_FILE_FIELDS[suffix].search(head)
            value = found.group(1).decode("utf-8", "replace") if found else ""
            if value and value.upper() != "LOCAL":
                if value.upper().startswith("LIST") or "%" in value or len(value.split()) > 1:
                    raise InputError(f"{text}: its voxels are split over a list or pattern of files, "
                                     "which the view does not open")
                named.append(value)
        elif suffix == ".hdr":  # Analyze / NIfTI pair: the reader opens the .img beside it
            named += [n for n in (header.stem + ".img", header.stem + ".img.gz") if (header.parent / n).exists()]
        for name in named:
            real = _real(header.parent / name)
            try:
                regular = stat.S_ISREG(os.stat(real).st_mode)
            except (OSError, ValueError):
                regular = False
            if not (regular and (real.parent == header.parent or self._allowed(real))):
                raise InputError(f"{text}: its voxels are in {name!r}, which is not a regular file beside it "
                                 "or in the allowed folders (it is never opened)")
