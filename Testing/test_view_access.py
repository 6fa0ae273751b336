"""The browser view's policies without a browser: which files the page may open (symbolic links,
`..`, FIFOs, DICOM folders, one message for missing and forbidden), who may reach it (loopback by
default, a token or an explicit warning otherwise) and the gate in front of trame's web server
(token, other web sites, one tab at a time), on a plain aiohttp server."""
from __future__ import annotations

import asyncio
import os
import time

import pytest
from samv2core.errors import InputError
from samv2view.access import Exposure, check_request, decide_exposure, is_loopback
from samv2view.files import AllowedFiles

TOKEN = "s3cret-token-0123456789"


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "data" / "scan.nrrd").write_bytes(b"x")
    (tmp_path / "data" / "sub" / "deep.nrrd").write_bytes(b"x")
    (tmp_path / "outside" / "secret.nrrd").write_bytes(b"x")
    (tmp_path / "given.nrrd").write_bytes(b"x")
    (tmp_path / "not_given.nrrd").write_bytes(b"x")
    os.symlink(tmp_path / "outside" / "secret.nrrd", tmp_path / "data" / "link_out.nrrd")
    os.symlink(tmp_path / "data" / "scan.nrrd", tmp_path / "data" / "link_in.nrrd")
    os.mkfifo(tmp_path / "data" / "pipe.nrrd")
    return tmp_path


def _message(files: AllowedFiles, text: str) -> str:
    with pytest.raises(InputError) as info:
        files.resolve(text)
    return str(info.value).replace(text, "<path>")


def test_only_given_files_and_data_dirs_open_with_symlinks_resolved(tree):
    files = AllowedFiles.from_command_line([str(tree / "given.nrrd"), ""], [str(tree / "data")])
    assert files.resolve(tree / "given.nrrd") == (tree / "given.nrrd").resolve()
    assert files.resolve(f"  {tree / 'data' / 'scan.nrrd'} ") == (tree / "data" / "scan.nrrd").resolve()
    assert files.resolve("sub/deep.nrrd") == (tree / "data" / "sub" / "deep.nrrd").resolve()  # relative: in --data-dir
    assert files.resolve(tree / "data" / "link_in.nrrd") == (tree / "data" / "scan.nrrd").resolve()
    forbidden = [tree / "outside" / "secret.nrrd", tree / "not_given.nrrd", tree / "data" / "link_out.nrrd",
                 tree / "data" / ".." / "outside" / "secret.nrrd", "../outside/secret.nrrd", "/etc/passwd"]
    missing = [tree / "outside" / "missing.nrrd", tree / "data" / "missing.nrrd", "/no/such/dir/x.nrrd",
               "a" * 5000, "bad\0name"]
    messages = {_message(files, str(p)) for p in forbidden + missing}
    assert len(messages) == 1, messages  # missing and forbidden read the same: nothing outside is revealed
    assert "no such scan among the ones this view may open" in messages.pop()


def test_a_fifo_is_refused_without_being_opened(tree):
    files = AllowedFiles.from_command_line([], [str(tree / "data")])
    t0 = time.monotonic()
    with pytest.raises(InputError, match="not a regular file"):
        files.resolve(tree / "data" / "pipe.nrrd")  # opening it would block until a writer comes
    assert time.monotonic() - t0 < 5.0


def test_a_dicom_folder_opens_only_with_regular_allowed_files_inside(tree):
    series = tree / "data" / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"x")
    files = AllowedFiles.from_command_line([], [str(tree / "data")])
    assert files.resolve(series) == series.resolve()
    os.symlink(tree / "outside" / "secret.nrrd", series / "2.dcm")
    with pytest.raises(InputError, match="'2.dcm', which is not a regular file inside the allowed folders"):
        files.resolve(series)
    (series / "2.dcm").unlink()
    os.mkfifo(series / "3.dcm")
    with pytest.raises(InputError, match="'3.dcm'"):
        files.resolve(series)


def test_nothing_opens_by_default_and_a_missing_data_dir_is_named():
    with pytest.raises(InputError, match="no such scan among"):
        AllowedFiles().resolve("/etc/hostname")
    with pytest.raises(InputError, match="--data-dir /no/such/folder: no such folder"):
        AllowedFiles.from_command_line([], ["/no/such/folder"])


def test_loopback_needs_nothing_other_hosts_need_a_token_or_an_explicit_warning():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1"):
        assert not is_loopback(host)
    plain = decide_exposure("127.0.0.1")
    assert plain.token is None and plain.loopback and not plain.warning
    generated = decide_exposure("0.0.0.0")
    assert generated.generated and len(generated.token) >= 16 and generated.token in generated.url(8080)
    assert decide_exposure("0.0.0.0").token != generated.token  # a fresh one each time
    assert decide_exposure("0.0.0.0", token=TOKEN).token == TOKEN
    assert decide_exposure("127.0.0.1", token=TOKEN).token == TOKEN  # a token given is asked on loopback too
    insecure = decide_exposure("0.0.0.0", insecure_no_token=True)
    assert insecure.token is None and "WARNING" in insecure.warning and "0.0.0.0" in insecure.warning
    for bad in ("short", "has space in it 12345", "x" * 300):
        with pytest.raises(InputError, match="--token must be"):
            decide_exposure("0.0.0.0", token=bad)
    with pytest.raises(InputError, match="contradict"):
        decide_exposure("0.0.0.0", token=TOKEN, insecure_no_token=True)
    with pytest.raises(InputError, match="--host"):
        decide_exposure("no-such-host.invalid")


def test_each_request_needs_the_token_and_this_site():
    guarded = Exposure("0.0.0.0", TOKEN, loopback=False)
    assert not check_request(guarded, "host:1", None, None, None).allowed
    assert not check_request(guarded, "host:1", None, "wrong" + TOKEN, None).allowed
    first = check_request(guarded, "host:1", None, TOKEN, None)
    assert first.allowed and first.set_cookie
    assert check_request(guarded, "host:1", "http://host:1", None, TOKEN).allowed
    assert not check_request(guarded, "host:1", "http://evil.example", None, TOKEN).allowed
    local = Exposure("127.0.0.1", None, loopback=True)
    assert check_request(local, "127.0.0.1:8080", None, None, None).allowed
    assert check_request(local, "localhost:8080", "http://localhost:8080", None, None).allowed
    assert not check_request(local, "attacker.example:8080", None, None, None).allowed  # DNS rebinding
    assert not check_request(local, "127.0.0.1:8080", "http://evil.example", None, None).allowed
    assert not check_request(local, "127.0.0.1:8080", "null", None, None).allowed


def test_the_gate_serves_one_tab_at_a_time_and_resets_when_it_goes(monkeypatch):
    aiohttp = pytest.importorskip("aiohttp", reason="the gate runs on aiohttp (the 'view' extra)")
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from samv2view import guard
    from samv2view.guard import Gate

    monkeypatch.setattr(guard, "RECONNECT_GRACE_S", 0.3)
    resets = []

    async def page(request):
        return web.Response(text="page")

    async def socket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    async def scenario(shared: bool):
        gate = Gate(Exposure("127.0.0.1", TOKEN, loopback=True), 1234, shared, lambda: resets.append(shared))
        app = web.Application(middlewares=[gate.middleware])
        app.add_routes([web.get("/index.html", page), web.get("/ws", socket)])
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/index.html")).status == 403
            ok = await client.get(f"/index.html?token={TOKEN}")
            assert ok.status == 200 and await ok.text() == "page"
            first = await client.ws_connect("/ws")  # the cookie set above carries the token
            second = await client.get("/index.html")
            body = await second.text()
            if not shared:
                assert second.status == 409 and "another browser tab" in body
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await client.ws_connect("/ws")
            else:
                assert second.status == 200
            await first.close()
            for _ in range(50):
                if gate.connected == 0:
                    break
                await asyncio.sleep(0.02)
            assert (await client.get("/index.html")).status == 200

    asyncio.run(scenario(shared=False))
    assert resets == [False]
    asyncio.run(scenario(shared=True))
    assert resets == [False]  # a shared session is never reset


def test_a_header_may_send_the_reader_only_beside_it_or_into_the_allowed_folders(tree):
    import SimpleITK as sitk

    data = tree / "data"
    image = sitk.Image(4, 4, 4, sitk.sitkInt16)
    for name in ("pair.mhd", "pair.nhdr", "pair.hdr"):
        sitk.WriteImage(image, str(data / name))
    files = AllowedFiles.from_command_line([], [str(data)])
    for name in ("pair.mhd", "pair.nhdr", "pair.hdr"):  # as ITK writes them: the voxels beside the header
        assert files.resolve(data / name) == (data / name).resolve()
        assert sitk.ReadImage(str(files.resolve(data / name))).GetSize() == (4, 4, 4)

    def rewrite(name: str, field: bytes, value: bytes) -> None:
        text = (data / name).read_bytes()
        start = text.index(field)
        end = text.index(b"\n", start)
        (data / name).write_bytes(text[:start] + field + value + text[end:])

    rewrite("pair.mhd", b"ElementDataFile = ", str(tree / "outside" / "secret.nrrd").encode())
    with pytest.raises(InputError, match="its voxels are in .*never opened"):
        files.resolve(data / "pair.mhd")
    rewrite("pair.mhd", b"ElementDataFile = ", b"../outside/secret.nrrd")
    with pytest.raises(InputError, match="its voxels are in"):
        files.resolve(data / "pair.mhd")
    rewrite("pair.mhd", b"ElementDataFile = ", b"pipe.nrrd")  # a FIFO beside it would block the reader
    with pytest.raises(InputError, match="its voxels are in 'pipe.nrrd'"):
        files.resolve(data / "pair.mhd")
    rewrite("pair.mhd", b"ElementDataFile = ", b"LIST")
    with pytest.raises(InputError, match="list or pattern"):
        files.resolve(data / "pair.mhd")
    rewrite("pair.nhdr", b"data file: ", b"sub/deep.nrrd")  # inside the allowed folder: fine
    assert files.resolve(data / "pair.nhdr") == (data / "pair.nhdr").resolve()
    rewrite("pair.nhdr", b"data file: ", str(tree / "outside" / "secret.nrrd").encode())
    with pytest.raises(InputError, match="its voxels are in"):
        files.resolve(data / "pair.nhdr")
    (data / "pair.img").unlink()
    os.symlink(tree / "outside" / "secret.nrrd", data / "pair.img")
    with pytest.raises(InputError, match="'pair.img'"):
        files.resolve(data / "pair.hdr")
    given = AllowedFiles.from_command_line([str(data / "pair.nhdr")], [])  # given on the command line
    with pytest.raises(InputError, match="its voxels are in"):
        given.resolve(data / "pair.nhdr")
