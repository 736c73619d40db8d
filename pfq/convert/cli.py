"""Command line of tools/convert_weights.py.

convert_weights.py SRC DEST_DIR [--overwrite] [--size S] [--in-chans N] [--num-classes C]
convert_weights.py --to-torch SRC_DIR DEST.safetensors [--overwrite] [--encoder-only]
"""

from __future__ import annotations

import argparse
import sys

from pfq.convert.errors import ConvertError
from pfq.model import SIZES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert ProFound-Conv PyTorch checkpoints (finetuned classifier, FCMAE pretraining, "
        "dense encoder; .pth/.pt/.pth.tar/.safetensors) to a pfq model directory, or export "
        "a pfq model directory back to a PyTorch safetensors state dict. Never imports torch.",
    )
    p.add_argument("src", help="checkpoint file (or, with --to-torch, a pfq model directory)")
    p.add_argument("dest", help="pfq model directory to create (or, with --to-torch, a .safetensors file)")
    p.add_argument("--to-torch", action="store_true", help="export SRC (a pfq model dir) to DEST.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    p.add_argument("--size", choices=list(SIZES), help="force the model size instead of inferring it")
    p.add_argument("--in-chans", type=int, help="force the number of input channels")
    p.add_argument("--num-classes", type=int, help="force the number of classes (classifier checkpoints)")
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="with --to-torch: export only the encoder, with bare upstream ConvNeXtV2 names",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.to_torch:
            if args.size or args.in_chans or args.num_classes:
                raise ConvertError("--size/--in-chans/--num-classes do not apply to --to-torch")
            from pfq.convert.pipeline import export_torch

            state = export_torch(args.src, args.dest, overwrite=args.overwrite, encoder_only=args.encoder_only)
            print(f"wrote {len(state)} tensors to {args.dest}")
            return 0
        if args.encoder_only:
            raise ConvertError("--encoder-only applies to --to-torch")
        from pfq.convert.layout import describe
        from pfq.convert.pipeline import convert_file

        out = convert_file(
            args.src,
            args.dest,
            overwrite=args.overwrite,
            size=args.size,
            in_chans=args.in_chans,
            num_classes=args.num_classes,
        )
        meta = out.metadata
        print(
            f"{args.src}: format {meta['source_format']} ({meta['source_format_name']}), "
            f"{describe(out.spec, meta['source_format'] == 'A')}"
        )
        for key in meta["source_filled_keys"]:
            print(f"  {key}: absent from the source, set to identity")
        print(f"wrote {args.dest}")
        return 0
    except (ConvertError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
