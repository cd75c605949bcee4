"""Tokenize on inputs a user can hand it that the happy-path tests never see (issue: edge cases)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from npp.app.cli import main
from npp.errors import NppError, UsageError
from npp.models.checkpoint import CheckpointMismatchError, load_vq
from npp.models.vq import VQModel, vq_config
from npp.pipeline.shards import iter_tar_samples, load_manifest, read_meta
from npp.pipeline.sources import SourceError
from npp.tokenize.run import TokenizeConfig, tokenize


def _cfg(data, vq, out, **kw):
    return TokenizeConfig(data=str(data), vq=str(vq), out=str(out), image_size=32, samples_per_shard=4,
                          batch=16, workers=0, **kw)


def _png(path, value=0, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format="PNG")


def test_vq_without_config_is_refused_when_group_count_cannot_be_inferred(tmp_path, vq_path):
    torch.manual_seed(0)
    toy = VQModel(vq_config("VQ-toy"))  # widths 16/32: LlamaGen's 32 groups cannot be right for 16
    torch.save({"model": toy.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointMismatchError, match="bare.pt.*'norm_groups' cannot be inferred"):
        load_vq(tmp_path / "bare.pt")
    # widths that are multiples of 32: LlamaGen's default is consistent and the codes are exact
    wide = VQModel(vq_config("VQ-toy", ch=32, norm_groups=32)).eval()
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pt")
    loaded, _ = load_vq(tmp_path / "wide.pt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode_codes(x), wide.encode_codes(x))


def test_colliding_file_names_get_unique_keys_and_webdataset_reads_every_shard(tmp_path, vq_path):
    data = tmp_path / "images"
    for i, name in enumerate(["x y.png", "x.y.png", "x_y.png", "x-y.png"]):
        _png(data / "c0" / name, 40 * i)
    _png(data / "c1" / "x_y.png", 200)
    out = tmp_path / "shards"
    tokenize(_cfg(data, vq_path, out).plan())
    keys = [s.key for p in sorted(out.glob("*.tar")) for s in iter_tar_samples(p)]
    assert len(keys) == len(set(keys)) == 5
    seen = [s["__key__"] for p in sorted(out.glob("*.tar")) for s in wds.WebDataset(str(p), shardshuffle=False)]
    assert sorted(seen) == sorted(keys)


def test_a_shard_whose_inputs_all_failed_is_not_written(tmp_path, vq_path):
    data = tmp_path / "images"
    _png(data / "c0" / "good.png", 10)
    _png(data / "c1" / "good.png", 90)
    (data / "c1" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "shards"
    tokenize(TokenizeConfig(data=str(data), vq=str(vq_path), out=str(out), image_size=32, samples_per_shard=1,
                            workers=0).plan())
    meta = read_meta(out)
    assert meta["samples"] == 2 and meta["failures"] == 1 and len(meta["empty_shards"]) == 1
    assert not (out / meta["empty_shards"][0]).exists() and meta["shard_pattern"] is None
    listed = [m["file"] for m in load_manifest(out)]
    assert sorted(listed) == sorted(p.name for p in out.glob("*.tar")) and len(listed) == 2
    for name in listed:  # every listed shard reads with plain webdataset
        assert len(list(wds.WebDataset(str(out / name), shardshuffle=False))) == 1
    again = tokenize(TokenizeConfig(data=str(data), vq=str(vq_path), out=str(out), image_size=32,
                                    samples_per_shard=1, workers=0).plan())
    assert again["inputs_this_run"] == 0  # the empty shard counts as done


def test_failure_reasons_are_the_same_in_identical_runs(toy_tree, vq_path, tmp_path):
    for name in ("a", "b"):
        tokenize(_cfg(toy_tree, vq_path, tmp_path / name).plan())
    a = pq.read_table(tmp_path / "a" / "failures.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "failures.parquet").to_pylist()
    assert a == b and len(a) == 3
    assert not any(" at 0x" in f["reason"] for f in a), a


def test_gpt_checkpoint_as_tokenizer_is_named(tmp_path, toy_tree):
    from tests.helpers import make_gpt

    gpt = make_gpt()
    torch.save({"model": gpt.state_dict(), "config": gpt.config.to_dict(), "steps": 0}, tmp_path / "model.pt")
    # named before torch loads anything (npp.pipeline.inputs reads the pickle's names)...
    with pytest.raises(UsageError, match="model.pt is a GPT checkpoint, not a VQ tokenizer"):
        tokenize(_cfg(toy_tree, tmp_path / "model.pt", tmp_path / "out").plan())
    # ...and by the loader too, for callers that skip the check
    with pytest.raises(CheckpointMismatchError, match="model.pt is a GPT checkpoint, not a VQ tokenizer"):
        tokenize(_cfg(toy_tree, tmp_path / "model.pt", tmp_path / "out"))


def test_tokenizer_and_source_are_identified_by_content_not_path(toy_tree, vq_path, tmp_path):
    out = tmp_path / "shards"
    tokenize(_cfg(toy_tree, vq_path, out).plan())
    copy = tmp_path / "elsewhere" / "vq_copy.pt"
    copy.parent.mkdir()
    shutil.copy(vq_path, copy)
    link = tmp_path / "data_link"
    link.symlink_to(toy_tree)
    again = tokenize(_cfg(link, copy, out).plan())  # same content: accepted, nothing to redo
    assert again["inputs_this_run"] == 0
    moved = tmp_path / "moved"
    shutil.copytree(toy_tree, moved)
    assert tokenize(_cfg(moved, vq_path, out).plan())["inputs_this_run"] == 0


def test_path_flags_stay_the_string_typed(toy_tree, vq_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SyntaxWarning)
        main(["tokenize", "run", "--data", str(toy_tree), "--vq", str(vq_path), "--out", "1e3", "--image-size", "32",
              "--workers", "0", "--split", "2in1"])
    assert (tmp_path / "1e3" / "meta.json").exists() and not (tmp_path / "1000.0").exists()
    assert read_meta(tmp_path / "1e3")["split"] == "2in1"


def _npp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "npp", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("flag,value,message", [
    ("--samples-per-shard", "0", "--samples-per-shard must be a whole number >= 1"),
    ("--workers", "-2", "--workers must be >= 0, or -1 for auto"),
    ("--crop-range", "0.9", "--crop-range '0.9': each range must be >= 1"),
])
def test_bad_flags_fail_fast_with_one_line_and_create_nothing(toy_tree, vq_path, tmp_path, flag, value, message):
    out = tmp_path / "out"
    proc = _npp("tokenize", "run", "--data", str(toy_tree), "--vq", str(vq_path), "--out", str(out), "--ten-crop",
                flag, value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not out.exists()


def test_flags_are_checked_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom npp.app.cli import main\n"
            "try:\n    main(['tokenize', 'run', '--data', 'nowhere', '--vq', 'x.pt', '--out', 'o'])\n"
            "except SystemExit as e:\n    assert e.code == 2\n"
            "assert 'torch' not in sys.modules, 'torch was imported before the flags were checked'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "data path 'nowhere' does not exist" in proc.stderr


def _rows(n, labels):
    img = Image.new("RGB", (40, 40), (10, 200, 30))
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return pa.table({"image": [{"bytes": buf.getvalue(), "path": f"{i}.png"} for i in range(n)], "label": labels})


def test_parquet_problems_name_the_file_and_column(tmp_path, vq_path):
    strings = tmp_path / "strings"
    strings.mkdir()
    pq.write_table(_rows(2, ["n01440764", "n01443537"]), strings / "a.parquet")
    with pytest.raises(SourceError, match=r"a.parquet: label column 'label' holds string, not integer"):
        tokenize(_cfg(strings, vq_path, tmp_path / "o1").plan())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    pq.write_table(_rows(2, [0, 1]), corrupt / "a.parquet")
    (corrupt / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=r"b.parquet is not a readable parquet file"):
        tokenize(_cfg(corrupt, vq_path, tmp_path / "o2").plan())
    stray = tmp_path / "stray"
    stray.mkdir()
    pq.write_table(_rows(4, [0, 1, 2, 999]), stray / "a.parquet")
    with pytest.raises(SourceError, match=r"4 distinct labels but the largest is 999.*--num-classes"):
        tokenize(_cfg(stray, vq_path, tmp_path / "o3").plan())
    counts = tokenize(_cfg(stray, vq_path, tmp_path / "o4", num_classes=3).plan())  # the stray label is a failure
    assert counts["encoded"] == 3 and counts["failed"] == 1
    assert issubclass(SourceError, NppError)


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init is dead for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_loader_workers_exit_when_tokenize_is_killed(tmp_path, vq_path):
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(4):
        for i in range(150):
            _png(data / f"c{c}" / f"{i}.png", int(rng.integers(256)), size=96)
    proc = subprocess.Popen([sys.executable, "-m", "npp", "tokenize", "run", "--data", str(data), "--vq",
                             str(vq_path), "--out", str(tmp_path / "out"), "--image-size", "64", "--workers", "2",
                             "--batch", "128"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the loader workers never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"loader workers {left} outlived the killed tokenize run"


def test_progress_in_a_log_file_updates_at_the_promised_interval(toy_tree, vq_path, tmp_path):
    """stderr to a file: one update per TQDM_MININTERVAL (10 s), not one per batch."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    with open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "npp", "tokenize", "run", "--data", str(toy_tree), "--vq",
                               str(vq_path), "--out", str(tmp_path / "out"), "--image-size", "32", "--workers", "0",
                               "--batch", "2"], stderr=err, stdout=subprocess.DEVNULL, env=env, timeout=120)
    assert proc.returncode == 0
    updates = (tmp_path / "err.log").read_text().replace("\r", "\n").count("tokenize rank 0:")
    assert updates <= 3, f"{updates} progress updates for a run of a few seconds (37 batches)"
