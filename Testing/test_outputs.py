"""Atomic outputs, all-or-nothing output sets, output-vs-input checks and the checksummed
embedding disk cache (issue 13, defects 1, 3, 5, 7)."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from samv2core.checked_tensors import CorruptFileError, load_checked, save_checked
from samv2core.errors import InputError
from samv2core.outputs import OutputSet, atomic_write, check_outputs, temp_path_for


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_temp_names_unique_and_keep_extension(tmp_path):
    names = {temp_path_for(tmp_path / "scan.nii.gz").name for _ in range(50)}
    assert len(names) == 50
    assert all(n.endswith(".nii.gz") and n.startswith(".partial-") and str(os.getpid()) in n for n in names)


def test_atomic_write_failure_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.json"]


def test_output_set_is_all_or_nothing(tmp_path):
    with pytest.raises(ValueError):
        with OutputSet() as out:
            out.write_text(tmp_path / "a.json", "{}")
            out.write_text(tmp_path / "b.csv", "x")
            raise ValueError("the third writer failed")
    assert _listing(tmp_path) == []
    with OutputSet() as out:
        out.write_text(tmp_path / "a.json", "{}")
        out.write_text(tmp_path / "b.csv", "x")
    assert _listing(tmp_path) == ["a.json", "b.csv"]


def test_output_set_rename_failure_restores_previous_files(tmp_path):
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b").mkdir()  # a folder where a file should go: the rename fails
    out = OutputSet()
    out.write_text(tmp_path / "a.json", "new a")
    out.write_text(tmp_path / "b", "new b")
    with pytest.raises(OSError):
        out.commit()
    assert (tmp_path / "a.json").read_text() == "old a"
    assert _listing(tmp_path) == ["a.json", "b"]


@pytest.mark.parametrize("kind", ["same", "relative", "symlink", "hardlink", "folder"])
def test_check_outputs_refuses_an_input(tmp_path, kind, monkeypatch):
    src = tmp_path / "v.nrrd"
    src.write_bytes(b"scan")
    if kind == "same":
        check = lambda: check_outputs([src], [src])  # noqa: E731
    elif kind == "relative":
        monkeypatch.chdir(tmp_path)
        check = lambda: check_outputs(["./sub/../v.nrrd"], [str(src)])  # noqa: E731
        (tmp_path / "sub").mkdir()
    elif kind == "symlink":
        (tmp_path / "link.nrrd").symlink_to(src)
        check = lambda: check_outputs([tmp_path / "link.nrrd"], [src])  # noqa: E731
    elif kind == "hardlink":
        os.link(src, tmp_path / "hard.nrrd")
        check = lambda: check_outputs([tmp_path / "hard.nrrd"], [src])  # noqa: E731
    else:
        check = lambda: check_outputs([], [src], [(tmp_path, ["v.nrrd", "report.json"])])  # noqa: E731
    with pytest.raises(InputError, match="overwrite the input"):
        check()
    assert src.read_bytes() == b"scan"


def test_check_outputs_refuses_unwritable_locations(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_outputs([tmp_path / "file" / "out.json"], [])
    with pytest.raises(InputError, match="is a folder"):
        check_outputs([tmp_path], [])
    with pytest.raises(InputError, match="is a file"):
        check_outputs([], [], [(tmp_path / "file", ["a"])])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(InputError, match="permission denied"):
            check_outputs([ro / "out.json"], [])
    finally:
        ro.chmod(0o700)


def test_checked_tensors_detect_payload_corruption(tmp_path):
    path = tmp_path / "t.safetensors"
    save_checked(path, {"a": torch.arange(1000, dtype=torch.float32)}, {"k": "v"})
    t, meta = load_checked(path)
    assert meta["k"] == "v" and torch.equal(t["a"], torch.arange(1000, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[-100:-90] = b"\xff" * 10  # header intact, payload changed
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        load_checked(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError):
        load_checked(path)


def _session(lite_net, cache=None):
    from samv2core.embed import Embedder
    from samv2core.session import EmbeddingSession

    return EmbeddingSession(Embedder(lite_net, device="cpu", precision="fp32", model_id="lite-test"), cache_dir=cache)


def test_disk_cache_entry_corrupted_is_recomputed_and_replaced(tmp_path, lite_net, lung_crop, caplog):
    from samv2core.matching import match_points

    cache = tmp_path / "cache"
    emb = _session(lite_net, cache)
    first = emb.embed(lung_crop)
    (entry,) = cache.iterdir()
    data = bytearray(entry.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\x7f" * 4096  # corrupt the payload only
    entry.write_bytes(bytes(data))
    fresh = _session(lite_net, cache)
    with caplog.at_level(logging.WARNING):
        again = fresh.embed(lung_crop)
    assert "checksum mismatch" in caplog.text
    assert not again.meta.get("from_disk_cache")
    assert torch.equal(again.rows, first.rows)
    t, _ = load_checked(entry)  # replaced by a good entry
    assert torch.equal(t["rows"], first.rows) and entry.read_bytes() != bytes(data)
    # a self-match through the cache is exact again
    p = lung_crop.index_to_lps(np.array([60.0, 50.0, 15.0]))
    third = _session(lite_net, cache).embed(lung_crop)
    assert third.meta.get("from_disk_cache")
    (m,) = match_points(third, third, [p], method="nn")
    assert np.isfinite(m.score) and np.linalg.norm(m.query_point.xyz - p) < 4.5


def test_concurrent_cache_writers_do_not_collide(tmp_path, lite_net, lung_crop):
    from samv2core.cache import EmbeddingDiskCache

    e = _session(lite_net).embed(lung_crop)
    writers = [EmbeddingDiskCache(tmp_path) for _ in range(20)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda w: w.save("same-key", e), writers))
    files = _listing(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors")
    load_checked(tmp_path / files[0])
