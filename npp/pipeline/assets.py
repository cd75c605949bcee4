"""The three files an ImageNet run downloads once: fetched, checked, resumable (`npp assets`, `make assets`).

Each asset has its official URL and, where it is published or settled by independent
copies, its size and SHA-256. A download goes to `NAME.part` and continues from its
length with an HTTP Range request after a dropped connection (a server that ignores
Range is read again from the start); the finished file is checked before it is renamed
into place, and a file of the wrong size or checksum is removed with an error naming it.
A file already there and valid is skipped. Where npp pins no checksum (the tokenizer and
the reference batch: their hosts publish none that npp could verify), the first complete
download's SHA-256 is written to `DIR/SHA256SUMS` and printed to compare with the source;
later runs check against it. `--manifest FILE` (JSON `{name: {url, sha256, size}}`) or
`NPP_ASSETS_URL` (a base URL: a mirror holding the files under their names) change where
files come from: a cluster without internet, and the tests' local server.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from npp.errors import UsageError
from npp.runtime.environment import assets_url
from npp.runtime.files import atomic_write_text, file_sha256
from npp.runtime.flags import Checked, documented, flag, need


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    what: str
    sha256: str | None = None
    size: int | None = None
    kind: str | None = None  # what the file must hold: "vq", "gpt", "inception" (torch checkpoints), "reference"
    default: bool = True  # fetched by a plain `npp assets`; the released GPTs only when named (`npp reproduce`)


ASSETS = {
    a.name: a
    for a in (
        Asset("vq_ds16_c2i.pt", "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt",
              "LlamaGen's VQ tokenizer (--vq)", kind="vq"),
        Asset("VIRTUAL_imagenet256_labeled.npz",
              "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
              "VIRTUAL_imagenet256_labeled.npz", "ADM's ImageNet 256 reference batch (--ref)", kind="reference"),
        # size and SHA-256 as independent copies record them; the name's 6726825d is the hash's first 8 digits
        Asset("pt_inception-2015-12-05-6726825d.pth",
              "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
              "pt_inception-2015-12-05-6726825d.pth", "the FID Inception weights (--inception)",
              "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95_628_359, kind="inception"),
    )
}

# The released class-conditional 256-px GPTs `npp reproduce` evaluates (npp.eval.published holds their published
# FIDs and settings). Both projects name their files c2i_B_256.pt etc., so npp's local names say whose they are.
# Their hosts publish no checksum: the first download's SHA-256 is recorded in SHA256SUMS, as for the tokenizer.
LLAMAGEN_HF = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/"
NPP_HF = "https://huggingface.co/pytttttt/LlamaGen-NPP/resolve/main/"
ASSETS.update({
    a.name: a
    for a in (
        *(Asset(f"llamagen_c2i_{s}_256.pt", f"{LLAMAGEN_HF}c2i_{s}_256.pt", f"LlamaGen's released GPT-{s} (256 px)",
                kind="gpt", default=False) for s in ("B", "L")),
        *(Asset(f"npp_c2i_{s}_256.pt", f"{NPP_HF}c2i_{s}_256.pt", f"the NPP authors' released GPT-{s} (256 px)",
                kind="gpt", default=False) for s in ("B", "L", "XL", "XXL")),
    )
})

COMMAND = "`make assets` (npp assets --out ckpts)"
SUMS = "SHA256SUMS"
BLOCK = 1 << 20


def asset_table(manifest: str = "", base_url: str | None = None) -> dict[str, Asset]:
    """The assets, with URLs (and checksums) from a manifest or a mirror when given."""
    table = dict(ASSETS)
    base_url = assets_url() if base_url is None else base_url
    if base_url:
        table = {n: replace(a, url=base_url.rstrip("/") + "/" + n) for n, a in table.items()}
    if manifest:
        try:
            entries = json.loads(Path(manifest).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--manifest {manifest} cannot be read as JSON ({e}): write "
                             '{"NAME": {"url": ..., "sha256": ..., "size": ...}}') from None
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise UsageError(f"--manifest {manifest} must map each name to an object: "
                             '{"NAME": {"url": ..., "sha256": ..., "size": ...}}')
        for name, entry in entries.items():
            base = table.get(name, Asset(name, "", name))
            table[name] = replace(base, **{k: entry[k] for k in ("url", "sha256", "size") if k in entry})
    return table


def recorded_sums(out: Path) -> dict[str, str]:
    path = out / SUMS
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def record_sum(out: Path, name: str, digest: str) -> None:
    sums = recorded_sums(out)
    sums[name] = digest
    atomic_write_text(out / SUMS, "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))


def expected_sha(asset: Asset, out: Path) -> tuple[str | None, str]:
    """The checksum to hold a file to, and where it comes from."""
    if asset.sha256:
        return asset.sha256, "npp's pin"
    got = recorded_sums(out).get(asset.name)
    return (got, f"{out / SUMS} (recorded at its first download)") if got else (None, "")


def wrong_kind(path: Path, asset: Asset) -> str | None:
    """Why the file cannot be this asset by what it holds (a GPT checkpoint saved as the tokenizer, an HTML error
    page from a proxy): the only check a file without a pinned checksum gets before its checksum is recorded."""
    if asset.kind == "reference":
        try:
            with zipfile.ZipFile(path) as z:
                if "arr_0.npy" in z.namelist():
                    return None
        except (zipfile.BadZipFile, OSError):
            return "is not an .npz file"
        return "holds no arr_0 (not an ADM reference batch)"
    if asset.kind is not None:
        from npp.pipeline.inputs import checkpoint_kind

        kind = checkpoint_kind(str(path))
        if kind not in (asset.kind, "unknown"):
            return "is not a PyTorch checkpoint" if kind == "not-torch" else f"is a {kind} checkpoint, not {asset.what}"
    return None


def problem(path: Path, asset: Asset, out: Path) -> str | None:
    """Why the file at `path` is not this asset (None: it is)."""
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        return f"has {size:,} bytes, {asset.name} has {asset.size:,}"
    why = wrong_kind(path, asset)
    if why:
        return why
    want, source = expected_sha(asset, out)
    if want:
        got = file_sha256(str(path))
        if got != want:
            return f"has SHA-256 {got}, {source} says {want}"
    return None


def fetch_one(asset: Asset, out: Path, timeout: float = 60.0, progress: bool = True) -> str:
    """Bring one asset into `out`; returns what was done ("present", "downloaded")."""
    target = out / asset.name
    if target.exists():
        why = problem(target, asset, out)
        if why is None:
            if not expected_sha(asset, out)[0]:  # a copy put here by hand: held to its checksum from now on
                record_new_sum(out, asset, target)
            return "present"
        target.unlink()
        print(f"{target} {why}: removed, downloading it again", flush=True)
    part = target.with_name(target.name + ".part")
    download(asset, part, timeout, progress)
    why = problem(part, asset, out)
    if why is not None:
        part.unlink()
        raise UsageError(f"{asset.url} gave a file that {why}: removed; the download is wrong or the source changed "
                         f"(check the URL, or pass --manifest with the right one)")
    if not expected_sha(asset, out)[0]:
        record_new_sum(out, asset, part)
    os.replace(part, target)
    return "downloaded"


def record_new_sum(out: Path, asset: Asset, path: Path) -> None:
    digest = file_sha256(str(path))
    record_sum(out, asset.name, digest)
    print(f"{asset.name}: no published checksum is pinned in npp; recorded SHA-256 {digest} in {out / SUMS} "
          "(compare it with the source's page; later runs check against it)", flush=True)


def download(asset: Asset, part: Path, timeout: float, progress: bool) -> None:
    """Into `part`, continuing from its length when the server honours Range."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if asset.size is not None and have > asset.size:
        part.unlink()
        have = 0
    request = urllib.request.Request(asset.url, headers={"User-Agent": "npp-assets"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already whole: the checks decide
            return
        raise UsageError(f"{asset.url}: HTTP {e.code} {e.reason}; check the URL or pass --manifest / "
                         "NPP_ASSETS_URL with a mirror") from None
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"{asset.url} cannot be reached ({getattr(e, 'reason', e)}): on a machine without "
                         f"internet, download {asset.name} elsewhere into {part.parent}, or set NPP_ASSETS_URL to a "
                         "mirror") from None
    with response:
        resumed = response.status == 206
        if have and not resumed:
            have = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else asset.size
        with open(part, "ab" if resumed else "wb") as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=asset.name, disable=not progress
        ) as bar:
            try:
                for block in iter(lambda: response.read(BLOCK), b""):
                    fh.write(block)
                    bar.update(len(block))
            except (http.client.IncompleteRead, OSError) as e:
                fh.flush()
                raise UsageError(f"{asset.url}: the connection dropped after {fh.tell():,} bytes ({type(e).__name__}); "
                                 f"run {COMMAND} again to continue from there ({part})") from None
        if length is not None and part.stat().st_size < total:
            raise UsageError(f"{asset.url}: the connection closed after {part.stat().st_size:,} of {total:,} bytes; "
                             f"run {COMMAND} again to continue from there ({part})")


ASSET_DIR = "ckpts"  # where `make assets` puts them, and where the make targets look
TIMEOUT_S = 60.0  # seconds a connection may stay silent


@documented
@dataclass(frozen=True)
class AssetsConfig(Checked):
    """The flags of `npp assets`."""

    out: str = flag(ASSET_DIR, "directory the files go to")
    only: str = flag("", "comma-separated asset names (default: the tokenizer, the reference batch and the Inception "
                         "weights; the released GPTs that `npp reproduce` evaluates are fetched when named: "
                         "llamagen_c2i_B_256.pt, npp_c2i_L_256.pt, ...; `npp reproduce list` lists them)")
    manifest: str = flag("", "JSON {name: {url, sha256, size}} replacing sources (a mirror; NPP_ASSETS_URL sets a "
                             "base URL)")
    timeout: float = flag(TIMEOUT_S, "seconds a connection may stay silent")
    progress: bool = flag(True, "show a progress bar per file (--noprogress: none)")

    def names(self) -> list[str] | None:
        return [n.strip() for n in self.only.split(",") if n.strip()] or None

    def validate(self) -> None:
        need(self.timeout > 0, f"--timeout must be > 0 seconds, got {self.timeout}")


def fetch_assets(out: str = ASSET_DIR, names: list[str] | None = None, manifest: str = "",
                 timeout: float = TIMEOUT_S, progress: bool = True) -> dict[str, str]:
    """Every default asset (or `names`, released GPTs included) into `out`; returns {name: "present" |
    "downloaded"}."""
    table = asset_table(manifest)
    unknown = [n for n in names or [] if n not in table]
    if unknown:
        raise UsageError(f"no asset named {', '.join(unknown)}: the assets are {', '.join(table)}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file: pass the directory the assets go to (ckpts)")
    root.mkdir(parents=True, exist_ok=True)
    done = {}
    for name in names or [n for n, a in table.items() if a.default]:
        done[name] = fetch_one(table[name], root, timeout, progress)
        print(f"{root / name}: {done[name]} ({table[name].what})", flush=True)
    return done


def missing_hint(name: str) -> str:
    """The fix an error about a missing asset names."""
    return f"{COMMAND} downloads {name} into ckpts/"
