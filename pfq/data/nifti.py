"""Reading a NIfTI file without trusting its header: check what it claims before reading the data.

`load_image` opens the file with `pfq.safe_open.open_regular` (regular files only), reads and checks
the raw header (NIfTI-1 or NIfTI-2, single file, `.nii` or `.nii.gz`), and only then reads the
voxel data, at most the bytes the header accounts for:

- dimensions positive, the voxel count at most `max_voxels()` (`PFQ_MAX_VOXELS`, default 2**27 =
  134M voxels, 512 MiB as float32; a 512 x 512 x 300 scan is 79M), so a few bytes of header cannot
  make the process allocate gigabytes;
- a real-valued data type (complex, RGB and unknown type codes are refused);
- `scl_slope` and `scl_inter` not infinite (nibabel silently ignores an infinite slope; NaN is
  the standard "no scaling", which nibabel itself writes);
- a qform-only header (sform code 0) with positive, finite voxel sizes in `pixdim` (nibabel turns a
  zero into 1 mm);
- `vox_offset` inside the file and the data complete: for `.nii`, checked against the file size
  before reading; for `.nii.gz`, by streaming decompression that stops at the header's size (a
  gzip bomb is never expanded beyond it) and refuses a stream that ends early.

Errors are `NiftiError`s whose `reason` `pfq.data.preprocess.read_volume` reports with the file.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from pfq.safe_open import open_regular, read_bounded

DEFAULT_MAX_VOXELS = 1 << 27
_NIFTI1_MAGIC, _NIFTI2_MAGIC = b"n+1\x00", b"n+2\x00\r\n\x1a\n"


class NiftiError(ValueError):
    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def max_voxels() -> int:
    """The cap on a volume's voxel count: `PFQ_MAX_VOXELS` if set, else 2**27."""
    text = os.environ.get("PFQ_MAX_VOXELS", "")
    try:
        return int(text) if text else DEFAULT_MAX_VOXELS
    except ValueError:
        raise NiftiError(f"PFQ_MAX_VOXELS={text!r} is not an integer") from None


def _header_class(head: bytes) -> type:
    """Nifti1Header or Nifti2Header from `sizeof_hdr` (either byte order) and the magic."""
    if len(head) < 348:
        raise NiftiError(f"not a readable NIfTI image (only {len(head)} bytes; a NIfTI header has 348)")
    for order in "<>":
        (size,) = struct.unpack(order + "i", head[:4])
        if size == 348:
            if head[344:348] == _NIFTI1_MAGIC:
                return nib.Nifti1Header
            if head[344:348] == b"ni1\x00":
                raise NiftiError("a two-file NIfTI (.hdr/.img) header; pfq reads single-file .nii or .nii.gz")
            raise NiftiError(
                "not a readable NIfTI image (348-byte header without the NIfTI-1 magic 'n+1'; an Analyze file?)"
            )
        if size == 540:
            if len(head) >= 12 and head[4:12] == _NIFTI2_MAGIC:
                return nib.Nifti2Header
            raise NiftiError("not a readable NIfTI image (540-byte header without the NIfTI-2 magic)")
    raise NiftiError("not a readable NIfTI image (no NIfTI-1/2 header)")


def check_header(header, file_size: int | None) -> tuple[int, int]:
    """(data offset, data bytes) of a raw header, refusing what a valid file cannot claim."""
    dim = [int(d) for d in header["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise NiftiError(f"header dim[0] = {ndim}: the number of dimensions must be 1 to 7")
    shape = dim[1 : ndim + 1]
    if min(shape) < 1:
        raise NiftiError(f"header dimensions {shape} are not all positive")
    code = int(header["datatype"])
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        raise NiftiError(f"unknown NIfTI datatype code {code}") from None
    if dtype.kind == "c":
        raise NiftiError(f"complex voxels ({dtype.name}); pfq reads real-valued images: save the magnitude")
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise NiftiError(f"unsupported voxel type {dtype} (datatype code {code}); pfq reads integer or float images")
    voxels, cap = math.prod(shape), max_voxels()
    if voxels > cap:
        raise NiftiError(
            f"the header claims {voxels} voxels {tuple(shape)}, over the cap of {cap} "
            "(PFQ_MAX_VOXELS); refused before reading"
        )
    for field in ("scl_slope", "scl_inter"):
        value = float(header[field])
        if math.isinf(value):  # NaN is how nibabel itself writes "no scaling"; an infinity is damage
            raise NiftiError(f"{field} is {value} (must be finite; 0 or NaN means no scaling)")
    sform, qform = int(header["sform_code"]), int(header["qform_code"])
    pixdim = [float(p) for p in header["pixdim"][1:4]]
    if sform == 0 and qform > 0 and not all(math.isfinite(p) and p > 0 for p in pixdim[: min(ndim, 3)]):
        raise NiftiError(
            f"qform-only header (sform code 0) with voxel sizes pixdim[1:4] = {pixdim}: each must be "
            "positive and finite for the qform to mean anything"
        )
    header_end = int(header["sizeof_hdr"]) + 4  # the header plus the 4-byte extension flag
    raw_offset = float(header["vox_offset"])
    if not math.isfinite(raw_offset) or raw_offset != int(raw_offset) or raw_offset < 0:
        raise NiftiError(f"vox_offset {raw_offset} is not a non-negative whole number of bytes")
    offset = int(raw_offset) or header_end
    if offset < header_end:
        raise NiftiError(f"vox_offset {offset} lies inside the {header_end}-byte header")
    nbytes = voxels * dtype.itemsize
    if file_size is not None:
        if offset >= file_size:
            raise NiftiError(f"vox_offset {offset} is past the end of the file ({file_size} bytes)")
        if offset + nbytes > file_size:
            raise NiftiError(
                f"truncated: the header claims {nbytes} bytes of voxel data from offset {offset}, "
                f"the file has {file_size - offset}"
            )
    return offset, nbytes


def load_image(path: str | Path) -> tuple[nib.Nifti1Image, object]:
    """(image with its data in memory, raw unfixed header); raises `NiftiError` or `UnsafeFileError`."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        compressed = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
        try:
            head = read_bounded(stream, 540)
            klass = _header_class(head)
            try:
                header = klass.from_fileobj(io.BytesIO(head), check=False)
            except Exception as e:  # nibabel raises its own types for headers it cannot parse
                raise NiftiError(f"not a readable NIfTI image ({type(e).__name__}: {e})") from None
            offset, nbytes = check_header(header, None if compressed else size)
            total = offset + nbytes
            data = head[:total] if total <= len(head) else head + read_bounded(stream, total - len(head))
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            what = "corrupt gzip stream" if compressed else "read error"
            raise NiftiError(f"not a readable NIfTI image ({what}: {e})") from None
    where = "the decompressed data" if compressed else "the file"
    if len(data) < offset:
        raise NiftiError(f"vox_offset {offset} is past the end of {where} ({len(data)} bytes)")
    if len(data) < total:
        raise NiftiError(
            f"truncated: the header claims {nbytes} bytes of voxel data from offset {offset}, "
            f"{where} has {len(data) - offset}"
        )
    image_class = nib.Nifti1Image if klass is nib.Nifti1Header else nib.Nifti2Image
    try:
        image = image_class.from_bytes(data)
    except Exception as e:  # nibabel raises many types for inconsistent headers
        raise NiftiError(f"not a readable NIfTI image ({type(e).__name__}: {e})") from None
    return image, header
