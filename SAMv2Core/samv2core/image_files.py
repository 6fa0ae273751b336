"""Image files checked before they are trusted: a regular file (a pipe never blocks a read),
a header whose sizes are sane before any voxel is allocated, complete (not truncated), a name
ITK can take, and ITK's read errors reduced to their reason.

``check_regular_file`` is the one check every input (image, point list, model, config, batch
CSV) passes before it is opened. ``read_header`` reads only an image's header and refuses,
before allocation: complex or multi-component pixels, fewer than ``MIN_VOXELS_PER_AXIS``
voxels along an axis, and a header declaring far more data than the file(s) can hold (a
deflate stream expands at most about 1032 times) or than this machine's memory.

ITK reads a NIfTI file cut short (compressed or not) without complaint and fills the missing
voxels with zeros, so ``check_complete`` compares the bytes a file holds with the bytes its
header promises: NIfTI-1/2 (``.nii``, ``.nii.gz``), any gzip file (the stream must reach its
end marker and CRC), NRRD with attached gzip/raw data and MetaImage (``.mha``) with local raw
data. Other formats are left to ITK's own checks.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import re
import stat
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError

_CHUNK = 1 << 20
_NRRD_TYPES = {"char": 1, "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1,
               "uint8_t": 1, "short": 2, "short int": 2, "signed short": 2, "int16": 2, "int16_t": 2,
               "ushort": 2, "unsigned short": 2, "uint16": 2, "uint16_t": 2, "int": 4, "signed int": 4,
               "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4,
               "longlong": 8, "long long": 8, "int64": 8, "int64_t": 8, "ulonglong": 8, "uint64": 8,
               "uint64_t": 8, "unsigned long long": 8, "float": 4, "double": 8}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _gzip_length(path: Path) -> int:
    """Decompressed length of a gzip file; InputError if the stream is cut short or damaged."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(_CHUNK):
                n += len(block)
    except gzip.BadGzipFile:
        raise InputError(f"{path}: cannot read as an image (not a gzip-compressed file despite its .gz name)") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{path}: the compressed file is incomplete or damaged ({exc}); "
                         "it was probably cut short while copying") from None
    return n


def _head(path: Path, compressed: bool, n: int = 544) -> bytes:
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            return f.read(n)
    except (EOFError, OSError, zlib.error):
        return b""


def _nifti_expected(head: bytes) -> "int | None":
    """Bytes a NIfTI-1/2 file should hold (vox_offset + voxel data), from its header."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = struct.unpack(endian + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            dim = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dim[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dim[1: dim[0] + 1]], dtype=np.int64))
    return int(max(offset, 348)) + voxels * bitpix // 8


def _header_fields(path: Path, separator: str) -> "tuple[dict, int] | None":
    """Text header fields (lower-case keys) and the byte offset where data starts."""
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    end = raw.find(b"\n\n") if separator == ":" else -1
    if separator == "=":
        m = re.search(rb"ElementDataFile\s*=\s*([^\r\n]*)\r?\n", raw)
        end = m.end() if m else -1
    if end < 0:
        return None
    fields = {}
    for line in raw[:end].decode("latin-1").splitlines():
        if separator in line and not line.startswith("#"):
            k, v = line.split(separator, 1)
            fields[k.strip().lower()] = v.strip()
    return fields, end + (2 if separator == ":" else 0)


def _short(path: Path, expected: int, actual: int) -> InputError:
    return InputError(f"{path}: the file is incomplete: it holds {actual} of the {expected} bytes its header "
                      "declares (truncated while copying?)")


def check_complete(path: "str | Path") -> None:
    """Raise InputError when ``path`` is shorter than its header says, or its gzip stream is
    cut short. Formats without a known layout pass."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        return
    if name.endswith(".gz"):
        actual = _gzip_length(path)
        expected = _nifti_expected(_head(path, True)) if name.endswith(".nii.gz") else None
        if expected is not None and actual < expected:
            raise _short(path, expected, actual)
    elif name.endswith(".nii"):
        expected = _nifti_expected(_head(path, False))
        actual = path.stat().st_size
        if expected is not None and actual < expected:
            raise _short(path, expected, actual)
    elif name.endswith(".nrrd"):
        _check_nrrd(path)
    elif name.endswith(".mha"):
        _check_mha(path)


def _check_nrrd(path: Path) -> None:
    parsed = _header_fields(path, ":")
    if parsed is None:
        return
    fields, start = parsed
    if "data file" in fields or "datafile" in fields:
        return  # detached data: ITK reads and checks it
    try:
        voxels = int(np.prod([int(s) for s in fields.get("sizes", "").split()], dtype=np.int64))
        size = _NRRD_TYPES[fields.get("type", "").lower()]
    except (ValueError, KeyError):
        return
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        n = 0
        with open(path, "rb") as f:
            f.seek(start)
            try:
                while block := f.read(_CHUNK):
                    n += len(d.decompress(block))
            except zlib.error as exc:
                raise InputError(f"{path}: the compressed data is damaged ({exc})") from None
        if not d.eof or n < voxels * size:
            raise InputError(f"{path}: the compressed data is incomplete ({n} of {voxels * size} bytes; "
                             "truncated while copying?)")
    elif encoding == "raw":
        actual = path.stat().st_size - start
        if actual < voxels * size:
            raise _short(path, voxels * size, actual)


def _check_mha(path: Path) -> None:
    parsed = _header_fields(path, "=")
    if parsed is None:
        return
    fields, start = parsed
    if fields.get("elementdatafile", "").upper() != "LOCAL" or fields.get("compresseddata", "False") == "True":
        return
    try:
        voxels = int(np.prod([int(s) for s in fields["dimsize"].split()], dtype=np.int64))
        size = _MET_TYPES[fields["elementtype"]] * int(fields.get("elementnumberofchannels", "1"))
    except (ValueError, KeyError):
        return
    actual = path.stat().st_size - start
    if actual < voxels * size:
        raise _short(path, voxels * size, actual)


def itk_reason(exc: BaseException) -> str:
    """The reason in an ITK exception text, without the C++ source location and object ids."""
    reasons, nrrd = [], []
    for line in str(exc).strip().splitlines():
        line = line.strip()
        line = re.sub(r"^Exception thrown in SimpleITK \w+:\s*", "", line)
        line = re.sub(r"^\S+\.(cxx|hxx|h|cpp|txx):\d+:?\s*", "", line)
        line = re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        if line.startswith("[nrrd]"):
            text = re.sub(r"^\[nrrd\]\s*\w+:\s*", "", line)
            if text and not text.startswith("trouble"):
                nrrd.append(text)
        elif line:
            reasons.append(line)
    text = nrrd[-1] if nrrd else " ".join(reasons)
    return (text or "unknown reason")[:240]


# --- what every input passes before it is opened -----------------------------------------------
def check_regular_file(path: "str | os.PathLike", what: str = "input", folder_ok: bool = False) -> Path:
    """``path`` if it is a regular file (or, with ``folder_ok``, a folder); InputError for a
    missing path, a pipe (FIFO), a device or a socket, which would block or never end."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise InputError(f"{p}: no such file{' or folder' if folder_ok else ''}") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot open the {what} ({exc.strerror})") from None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return p
    if stat.S_ISDIR(mode):
        raise InputError(f"{p}: is a folder; the {what} must be a file")
    kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise InputError(f"{p}: is {kind}, not a regular file; the {what} must be a file")


@contextlib.contextmanager
def itk_path(path: "str | os.PathLike") -> Iterator[str]:
    """A path string ITK can open for ``path``. ITK aborts the process (not an exception) on
    a name that is not valid UTF-8, so such a file is opened through a symbolic link with a
    plain name (and the same extension) in a private temporary folder."""
    p = Path(path)
    try:
        str(p).encode("utf-8")
        yield str(p)
        return
    except UnicodeEncodeError:
        pass
    m = re.search(r"(\.[A-Za-z0-9_]{1,12})+$", p.name.encode("utf-8", "replace").decode("utf-8"))
    with tempfile.TemporaryDirectory(prefix="samv2-") as tmp:
        link = Path(tmp) / ("image" + (m.group(0) if m else ""))
        os.symlink(os.fsencode(p.absolute()), os.fsencode(link))
        yield str(link)


# --- the header, before any voxel is allocated --------------------------------------------------
MIN_VOXELS_PER_AXIS = 4
MAX_DEFLATE_RATIO = 1100  # deflate expands at most ~1032:1; gzip'd NIfTI/NRRD/MHA cannot hold more
_COMPLEX = {getattr(sitk, n) for n in ("sitkComplexFloat32", "sitkComplexFloat64") if hasattr(sitk, n)}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares (no voxel read)."""

    size: tuple  # (x, y, z[, t]) voxels
    spacing: tuple
    origin: tuple
    direction: tuple
    pixel_type: str
    components: int
    bytes_per_component: int

    @property
    def voxels(self) -> int:
        return int(np.prod(np.asarray(self.size, dtype=np.float64)))

    @property
    def nbytes(self) -> float:
        return float(np.prod(np.asarray(self.size, dtype=np.float64))) * self.components * self.bytes_per_component


def _detached_data_bytes(path: Path) -> "int | None":
    """Bytes of the data files a detached header (.mhd/.nhdr) names, None if it names none."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 16).decode("latin-1")
    except OSError:
        return None
    m = re.search(r"^(?:ElementDataFile\s*=|data ?file\s*:)\s*(.+?)\s*$", raw, re.M | re.I)
    if not m or m.group(1).upper() == "LOCAL":
        return None
    total = 0
    for entry in os.scandir(path.parent):  # data files sit beside their header (upper bound)
        if entry.is_file() and entry.path != str(path):
            total += entry.stat().st_size
    return total


def _bzip2_nrrd(path: Path) -> bool:
    """A NRRD with bzip2-encoded data (bzip2 expands far more than deflate can: no ratio bound)."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return False
    try:
        parsed = _header_fields(path, ":")
    except OSError:
        return False
    return parsed is not None and parsed[0].get("encoding", "").lower() in ("bzip2", "bz2")


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES")) * float(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return float("inf")


def _bytes_per_component(pixel_id: int) -> int:
    try:
        return int(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_id)).dtype.itemsize)
    except (RuntimeError, TypeError, ValueError):
        return 8


def read_header(path: "str | os.PathLike", files_bytes: "int | None" = None, slices: "int | None" = None,
                label: "str | None" = None) -> ImageHeader:
    """The header of image file ``path`` (for a DICOM series: its first file, ``slices`` files
    holding ``files_bytes`` bytes), checked before any voxel is read; InputError naming the
    problem otherwise."""
    p = Path(path)
    label = label or str(p)
    reader = sitk.ImageFileReader()
    with itk_path(p) as name:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{label}: cannot read as an image ({itk_reason(exc)})") from None
    size = tuple(int(s) for s in reader.GetSize())
    if slices is not None and len(size) == 3 and size[2] == 1:
        size = size[:2] + (int(slices),)
    pid = reader.GetPixelID()
    header = ImageHeader(size, tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()),
                         sitk.GetPixelIDValueAsString(pid), int(reader.GetNumberOfComponents()),
                         _bytes_per_component(pid))
    if pid in _COMPLEX or "complex" in header.pixel_type.lower():
        raise InputError(f"{label}: complex-valued voxels ({header.pixel_type}) are not supported: convert to "
                         "magnitude (or real part) explicitly first; the imaginary part is never dropped silently")
    spatial = size[:3] if len(size) == 4 and size[3] == 1 else size
    if len(spatial) == 3 and min(spatial) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{label}: the image is {' x '.join(map(str, spatial))} voxels; at least "
                         f"{MIN_VOXELS_PER_AXIS} are needed along every axis (a single slice or a tiny volume "
                         "cannot be matched)")
    on_disk = files_bytes
    if on_disk is None:
        on_disk = p.stat().st_size + (_detached_data_bytes(p) or 0)
    if header.nbytes > MAX_DEFLATE_RATIO * on_disk + (1 << 20) and not _bzip2_nrrd(p):
        raise InputError(f"{label}: the header declares {' x '.join(map(str, size))} voxels "
                         f"({header.nbytes / 1e6:.0f} MB) but the file holds only {on_disk} bytes; refused before "
                         "reading (damaged or forged header)")
    # the reader's buffer, the float32 copy and the volume's own copy live at once
    needed = header.voxels * (header.components * header.bytes_per_component + 8)
    memory = _physical_memory()
    if needed > memory:
        raise InputError(f"{label}: {' x '.join(map(str, size))} voxels would need about {needed / 1e9:.1f} GB of "
                         f"memory; this machine has {memory / 1e9:.1f} GB")
    return header
