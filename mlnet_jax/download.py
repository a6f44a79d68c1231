"""Optional download of public ImageNet VGG-16 weights (the only network use of the package)."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import WeightsError

# name → (url, file name, format for weight_formats.read_source, the file's SHA-256 or, for
# torchvision, the start of it its file name carries, which torch.hub checks the same way).
PUBLIC_WEIGHTS = {
    "timm": ("https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors",
             "vgg16.tv_in1k.safetensors", "safetensors",
             "57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8"),
    "torchvision": ("https://download.pytorch.org/models/vgg16-397923af.pth",
                    "vgg16-397923af.pth", "torchvision", "397923af"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLNET_JAX_CACHE", Path.home() / ".cache" / "mlnet_jax"))


def download_weights(name: str, timeout: float = 60.0) -> tuple[Path, str]:
    """Fetch (or reuse from the cache) a public weights file; returns (path, format).

    The file's SHA-256 is checked against the published one, after a download and on each
    reuse: a wrong, stale or tampered file is never converted; a download is then not kept,
    a cached file is named, to delete.
    """
    if name not in PUBLIC_WEIGHTS:
        raise WeightsError(f"--download must be one of {', '.join(PUBLIC_WEIGHTS)}, got {name!r}")
    url, filename, fmt, sha256 = PUBLIC_WEIGHTS[name]
    target = cache_dir() / filename
    if target.is_file() and target.stat().st_size > 0:
        digest = _sha256(target)
        if not digest.startswith(sha256):
            raise WeightsError(f"{target}: not the file published at {url} (its SHA-256 is "
                               f"{digest[:16]}…, expected {sha256[:16]}…): delete it to download "
                               "it again, or put the right file there")
        return target, fmt
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            # Read in chunks, a body cut short ends quietly: kept, it would be the cached copy
            # every later --download reads.
            expected, got = response.headers.get("Content-Length"), tmp.stat().st_size
            if expected is not None and got != int(expected):
                raise _CutShort(f"{got:,} of {int(expected):,} bytes arrived")
            digest = _sha256(tmp)
            if not digest.startswith(sha256):
                raise WeightsError(f"{url} sent a file whose SHA-256 is {digest[:16]}…, not "
                                   f"the published {sha256[:16]}…; it was not kept")
    except (urllib.error.URLError, OSError, TimeoutError, _CutShort) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(
            f"could not download {url} ({reason}); without network, fetch that file on another "
            "machine, then convert it (python -m mlnet_jax.convert_weights FILE DST) or save it "
            f"as {target}, where --download finds it") from None
    return target, fmt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _CutShort(Exception):
    """The connection ended before the whole file arrived."""
