"""Image files checked before they are trusted: complete (not truncated), and ITK's read errors
reduced to their reason.

ITK reads a NIfTI file cut short (compressed or not) without complaint and fills the missing
voxels with zeros, so ``check_complete`` compares the bytes a file holds with the bytes its
header promises: NIfTI-1/2 (``.nii``, ``.nii.gz``), any gzip file (the stream must reach its
end marker and CRC), NRRD with attached gzip/raw data and MetaImage (``.mha``) with local raw
data. Other formats are left to ITK's own checks.
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import numpy as np

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
