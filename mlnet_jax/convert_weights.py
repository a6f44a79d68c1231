"""Convert VGG-16 or ML-Net weights to mlnet_jax's ``.npz`` weights file.

    python -m mlnet_jax.convert_weights SRC DST [--format auto|torchvision|safetensors|keras|keras1|mlnet-keras1]
    python -m mlnet_jax.convert_weights --download timm|torchvision DST
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlnet_jax.download import PUBLIC_WEIGHTS, download_weights
from mlnet_jax.errors import UserError, WeightsError
from mlnet_jax.interrupts import sigterm_raises, stopped
from mlnet_jax.weight_formats import FORMATS, read_source, require_torch
from mlnet_jax.weights_file import check_finite, check_vgg16_params, save_weights


def read_checked(src: str, fmt: str = "auto") -> tuple[dict, dict]:
    """``src`` as (params, metadata to write), checked: VGG-16's shapes, finite values."""
    params, metadata = read_source(src, fmt)
    check_vgg16_params(params["backbone"], src)
    check_finite(params, src)
    return params, {"model": "vgg16", **metadata, "converted_from": str(src)}


def convert(src: str, dst: str, fmt: str = "auto") -> dict:
    """Read ``src`` and write ``dst``; returns the metadata written."""
    _refuse_same_file(src, dst)
    params, metadata = read_checked(src, fmt)
    save_weights(dst, params, metadata)
    return metadata


def _refuse_same_file(src: str, dst: str) -> None:
    if Path(dst).exists() and Path(src).exists() and os.path.samefile(src, dst):
        raise WeightsError(f"{dst}: is SRC itself; name another file for the converted weights")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlnet_jax.convert_weights", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s SRC DST [--format F] | %(prog)s --download NAME DST [--debug]")
    parser.add_argument("paths", nargs="+", metavar="SRC DST",
                        help="source file and destination .npz (only DST with --download)")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    parser.add_argument("--download", choices=tuple(PUBLIC_WEIGHTS),
                        help="fetch public ImageNet VGG-16 weights instead of reading SRC")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_intermixed_args(argv)  # SRC --format F DST too
    expected = 1 if args.download else 2
    if len(args.paths) != expected:
        parser.error("give DST with --download, SRC DST otherwise")
    try:
        with sigterm_raises():
            metadata, dst = _convert_or_download(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        return stopped(e, "the destination is as it was (nothing half-written)")
    print(f"wrote {dst}: {metadata['model']} from {metadata['source']}, preprocessing "
          f"{metadata['preprocessing']}, pooling {metadata['pooling']}")
    return 0


def _convert_or_download(args) -> tuple[dict, str]:
    """(metadata, destination) of the weights written."""
    if not args.download:
        (src, dst), fmt = args.paths, args.format
        return convert(src, dst, fmt), dst
    dst = args.paths[0]
    if PUBLIC_WEIGHTS[args.download][2] == "torchvision":
        require_torch(f"--download {args.download}")  # before fetching 528 MB
    src, fmt = download_weights(args.download)
    _refuse_same_file(str(src), dst)
    try:  # only the cached file's own faults are its to answer for, not DST's
        params, metadata = read_checked(str(src), fmt)
    except WeightsError as e:
        raise WeightsError(f"{e} (the cached download: delete {src} to fetch it again)"
                           ) from None
    save_weights(dst, params, metadata)
    return metadata, dst


if __name__ == "__main__":
    sys.exit(main())
