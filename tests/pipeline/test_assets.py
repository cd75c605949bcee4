"""`npp assets` against a real HTTP server on 127.0.0.1: the download code as users run it, with the URLs pointed
at the server by a manifest (the way a mirror is used)."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from npp.errors import UsageError
from npp.pipeline.assets import ASSETS, SUMS, fetch_assets

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # several read blocks, not a whole number of them
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Files(http.server.BaseHTTPRequestHandler):
    """Serves /NAME by mode: good (Range honoured), short (a complete response that is too small), wrong (other
    bytes), drop (announces the whole file, sends half, closes), norange (ignores Range)."""

    mode: dict = {}
    requests: list = []
    bodies: dict = {}  # other content than PAYLOAD for a name

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.strip("/")
        mode = self.mode.get(name, "good")
        rng = self.headers.get("Range")
        self.requests.append((name, rng))
        full = self.bodies.get(name, PAYLOAD)
        body = full[: len(full) // 2] if mode == "short" else full[::-1] if mode == "wrong" else full
        start = int(rng.split("=")[1].rstrip("-")) if rng and mode != "norange" else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "drop":
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.mode[name] = "good"  # the next try finds the server whole again
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    Files.mode, Files.requests, Files.bodies = {}, [], {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def manifest(tmp_path, url, **entries):
    path = tmp_path / "mirror.json"
    path.write_text(json.dumps({name: {"url": f"{url}/{name}", **fields} for name, fields in entries.items()}))
    return str(path)


def test_a_good_file_is_downloaded_checked_and_then_skipped(server, tmp_path):
    m = manifest(tmp_path, server, a={"sha256": SHA, "size": len(PAYLOAD)})
    out = tmp_path / "ckpts"
    assert fetch_assets(str(out), ["a"], m, progress=False) == {"a": "downloaded"}
    assert (out / "a").read_bytes() == PAYLOAD and not (out / "a.part").exists()
    assert fetch_assets(str(out), ["a"], m, progress=False) == {"a": "present"}
    assert len(Files.requests) == 1  # the valid file was not fetched again


def test_a_truncated_or_wrong_file_is_refused_and_removed(server, tmp_path):
    out = tmp_path / "ckpts"
    m = manifest(tmp_path, server, short={"sha256": SHA, "size": len(PAYLOAD)}, wrong={"sha256": SHA})
    Files.mode.update(short="short", wrong="wrong")
    with pytest.raises(UsageError, match=f"has {len(PAYLOAD) // 2:,} bytes, short has {len(PAYLOAD):,}"):
        fetch_assets(str(out), ["short"], m, progress=False)
    with pytest.raises(UsageError, match=f"has SHA-256 {hashlib.sha256(PAYLOAD[::-1]).hexdigest()}, npp's pin says"):
        fetch_assets(str(out), ["wrong"], m, progress=False)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing wrong is left to be used


def test_a_dropped_connection_resumes_from_the_part_with_a_range_request(server, tmp_path):
    out = tmp_path / "ckpts"
    m = manifest(tmp_path, server, a={"sha256": SHA, "size": len(PAYLOAD)})
    Files.mode["a"] = "drop"
    with pytest.raises(UsageError, match="again to continue from there"):
        fetch_assets(str(out), ["a"], m, progress=False)
    half = (out / "a.part").stat().st_size
    assert 0 < half < len(PAYLOAD) and not (out / "a").exists()
    assert fetch_assets(str(out), ["a"], m, progress=False) == {"a": "downloaded"}
    assert (out / "a").read_bytes() == PAYLOAD
    assert Files.requests == [("a", None), ("a", f"bytes={half}-")]


def test_a_server_ignoring_range_is_read_from_the_start(server, tmp_path):
    out = tmp_path / "ckpts"
    out.mkdir()
    (out / "a.part").write_bytes(b"stale bytes of another try")
    m = manifest(tmp_path, server, a={"sha256": SHA})
    Files.mode["a"] = "norange"
    assert fetch_assets(str(out), ["a"], m, progress=False) == {"a": "downloaded"}
    assert (out / "a").read_bytes() == PAYLOAD


def test_an_unpinned_file_records_its_checksum_and_is_held_to_it(server, tmp_path):
    out = tmp_path / "ckpts"
    m = manifest(tmp_path, server, a={})
    fetch_assets(str(out), ["a"], m, progress=False)
    assert (out / SUMS).read_text() == f"{SHA}  a\n"
    (out / "a").write_bytes(PAYLOAD[:-1] + b"x")  # changed on disk since: removed and fetched again
    assert fetch_assets(str(out), ["a"], m, progress=False) == {"a": "downloaded"}
    assert (out / "a").read_bytes() == PAYLOAD


def test_npp_assets_from_the_command_line(server, tmp_path):
    """The command as users type it, from a mirror (NPP_ASSETS_URL); a typo'd name gets the list."""
    env = {**os.environ, "NPP_ASSETS_URL": server}
    name = "pt_inception-2015-12-05-6726825d.pth"
    bad = subprocess.run([sys.executable, "-m", "npp", "assets", "--out", str(tmp_path), "--only", "inception"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "the assets are vq_ds16_c2i.pt" in bad.stderr
    # the mirror serves other bytes than the pinned Inception weights: refused, nothing kept
    got = subprocess.run([sys.executable, "-m", "npp", "assets", "--out", str(tmp_path), "--only", name,
                          "--noprogress"], capture_output=True, text=True, env=env)
    assert got.returncode == 2 and f"has {len(PAYLOAD):,} bytes, {name} has 95,628,359" in got.stderr
    assert not any(tmp_path.glob("pt_inception*"))


def test_the_pinned_checksums_are_well_formed():
    for asset in ASSETS.values():
        # the released GPTs of both projects share their file names: npp's names say whose each is
        upstream = asset.name.split("_", 1)[1] if asset.kind == "gpt" else asset.name
        assert asset.url.startswith("https://") and asset.url.endswith("/" + upstream)
        assert asset.sha256 is None or len(asset.sha256) == 64
    inception = ASSETS["pt_inception-2015-12-05-6726825d.pth"]
    assert inception.sha256.startswith("6726825d")  # torch hub's convention: the name carries the hash's head


def test_the_wrong_kind_of_file_is_refused_and_a_copy_put_by_hand_is_held_to_its_checksum(server, tmp_path,
                                                                                           monkeypatch):
    """The tokenizer and the reference batch have no pinned checksum: what a file holds is checked (a GPT
    checkpoint saved under the tokenizer's name, an error page from a proxy), and a valid copy a user put there
    gets its checksum recorded, so a later change is caught."""
    import io

    import torch

    from tests.helpers import make_gpt, save_small_vq

    monkeypatch.setenv("NPP_ASSETS_URL", server)
    vq_bytes = io.BytesIO()
    torch.save({"model": save_small_vq(tmp_path / "v.pt").state_dict()}, vq_bytes)
    Files.bodies["vq_ds16_c2i.pt"] = vq_bytes.getvalue()
    out = tmp_path / "ckpts"
    out.mkdir()
    torch.save({"model": make_gpt().state_dict()}, out / "vq_ds16_c2i.pt")  # the wrong checkpoint, right name
    assert fetch_assets(str(out), ["vq_ds16_c2i.pt"], progress=False) == {"vq_ds16_c2i.pt": "downloaded"}
    assert (out / "vq_ds16_c2i.pt").read_bytes() == vq_bytes.getvalue()
    assert (out / SUMS).read_text() == f"{hashlib.sha256(vq_bytes.getvalue()).hexdigest()}  vq_ds16_c2i.pt\n"
    (out / SUMS).unlink()  # as if the user had copied the file in by hand
    assert fetch_assets(str(out), ["vq_ds16_c2i.pt"], progress=False) == {"vq_ds16_c2i.pt": "present"}
    assert "vq_ds16_c2i.pt" in (out / SUMS).read_text()
    Files.bodies["vq_ds16_c2i.pt"] = b"<html>proxy error</html>"
    (out / "vq_ds16_c2i.pt").unlink()
    (out / SUMS).unlink()
    with pytest.raises(UsageError, match="is not a PyTorch checkpoint"):
        fetch_assets(str(out), ["vq_ds16_c2i.pt"], progress=False)
    with pytest.raises(UsageError, match="is not an .npz file"):
        fetch_assets(str(out), ["VIRTUAL_imagenet256_labeled.npz"], progress=False)
    assert sorted(p.name for p in out.iterdir()) == []
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        fetch_assets(str(tmp_path / "afile"), progress=False)
