"""The released fairseq models: download (streamed, resumable, verified), safe extraction, cache.

The archives are ``adaptive_lm_wiki103.v2.tar.bz2`` (247M parameters) and ``adaptive_lm_gbw_huge.tar.bz2``
(1026M), the URLs of fairseq's ``TransformerLanguageModel.hub_models()`` (``fairseq/models/transformer_lm.py``). A
download goes to ``NAME.part`` and continues from where it stopped (HTTP Range); it is complete when its size equals the
server's Content-Length and the archive lists a ``model.pt``; its sha256 is then recorded beside it and checked
whenever the cached file is reused. Extraction refuses members that would land outside the target folder.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from adaptive_lm.core.errors import UserError

BASE_URL = "https://dl.fbaipublicfiles.com/fairseq/models/lm"
RELEASED = {
    "wiki103": "adaptive_lm_wiki103.v2.tar.bz2",
    "gbw": "adaptive_lm_gbw_huge.tar.bz2",
}


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTIVE_LM_CACHE", Path.home() / ".cache" / "adaptive-lm"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Stream ``url`` to ``dest`` (resuming a ``.part`` file), with a progress bar; returns ``dest``."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    except ValueError as e:  # not a URL (a --url or $ADAPTIVE_LM_BASE_URL without a scheme)
        raise UserError(f"{url}: not a URL ({e}); give the mirror as http(s)://host/path") from None
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already complete
            os.replace(part, dest)
            return dest
        raise UserError(f"{url}: the server answered HTTP {e.code}; try again later or download it by hand") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot reach {url} ({reason}): no network? Download it elsewhere; --path (from_pretrained) reads "
            "the archive as it is"
        ) from None
    with resp:
        resumed = resp.status == 206
        if not resumed:
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if resumed else "wb"
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not (progress and sys.stderr.isatty()),
            ) as bar,
        ):
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise UserError(f"{url}: download stopped at {got} of {total} bytes; run the same command to resume")
    os.replace(part, dest)
    return dest


def verify_archive(path: Path) -> None:
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
    except (tarfile.TarError, EOFError, OSError) as e:
        why = " ".join(str(e).split()) or type(e).__name__  # tarfile's reasons run over several lines
        raise UserError(f"{path}: not a readable archive ({why}); delete it and download again") from None
    if not any(Path(n).name == "model.pt" for n in names):
        raise UserError(f"{path}: archive has no model.pt (members: {', '.join(names[:5])} ...)")


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract into ``target`` after checking that no member escapes it (absolute paths, ``..``, links)."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            dest = (root / m.name).resolve()
            if not dest.is_relative_to(root):
                raise UserError(f"{archive}: member {m.name!r} would be written outside {target}; refusing")
            if m.issym() or m.islnk():
                link = (dest.parent / m.linkname).resolve() if m.issym() else (root / m.linkname).resolve()
                if not link.is_relative_to(root):
                    raise UserError(f"{archive}: link {m.name!r} -> {m.linkname!r} points outside; refusing")
            if m.isdev():
                raise UserError(f"{archive}: member {m.name!r} is a device file; refusing")
        tmp = target.with_name(target.name + ".extracting")
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kwargs)
    for child in tmp.iterdir():
        os.replace(child, target / child.name)
    tmp.rmdir()
    return target


def is_archive(path: Path) -> bool:
    """A tar archive, bzip2- or gzip-compressed or not, by its bytes: the released archives renamed without their
    extension (a browser's or a script's download) load as they are. Only a tar inside counts: a compressed
    checkpoint is not an archive (``safe_load`` says what it is)."""
    with open(path, "rb") as f:
        head = f.read(3)
    opener = bz2.open if head == b"BZh" else gzip.open if head[:2] == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            block = f.read(512)  # the first tar header
    except (OSError, EOFError, ValueError):
        return False
    return block[257:262] == b"ustar"


def open_archive(archive: Path) -> Path:
    """Extract (once, into the cache) and return the folder holding ``model.pt``."""
    name = archive.name
    for ext in (".tar.bz2", ".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    target = cache_dir() / "extracted" / f"{name}-{archive.stat().st_size}"
    if not (target / ".complete").exists():
        verify_archive(archive)
        shutil.rmtree(target, ignore_errors=True)
        safe_extract(archive, target)
        (target / ".complete").write_text(str(archive))
    found = sorted(target.rglob("model.pt"))
    if not found:
        raise UserError(f"{archive}: no model.pt inside")
    return found[0].parent


def fetch(name: str, directory: Path | None = None, base_url: str | None = None, progress: bool = True) -> Path:
    """Download (or reuse) a released model's archive and return the extracted folder."""
    if name not in RELEASED:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(RELEASED)}")
    d = directory or cache_dir()
    archive = d / RELEASED[name]
    url = f"{(base_url or os.environ.get('ADAPTIVE_LM_BASE_URL') or BASE_URL).rstrip('/')}/{RELEASED[name]}"
    digest_file = archive.with_name(archive.name + ".sha256")
    if archive.exists() and digest_file.exists():
        if sha256(archive) != digest_file.read_text().strip():
            raise UserError(f"{archive}: checksum differs from the one recorded at download; delete it and retry")
    else:
        download(url, archive, progress)
        verify_archive(archive)
        digest_file.write_text(sha256(archive))
    return open_archive(archive)
