"""Checks of the official archives a user puts in the manual directory, before TFDS reads them.

A missing archive, a wrong directory or a corrupt file should fail in seconds with the path,
what was expected there and how to get it, not an hour into preparation (DESIGN §4). The
checks read the zip's central directory and the first bytes (PNG/JPEG headers) of each
member; they do not decompress whole images.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# PNG colour types (IHDR): 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA.
PNG_COLOUR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not prepared and cannot be prepared from what is on disk.

    Also raised for archives that are present but incomplete or corrupt; the message names the
    path, what was expected and how to get it.
    """


def default_manual_dir(builder) -> str:
    """TFDS's manual directory when none is configured: ``<data_dir>/downloads/manual``."""
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def require_manual_dir(manual_dir: str, archives: Iterable[str], how_to_get: str) -> None:
    """Raises `DatasetNotFoundError` unless ``manual_dir`` holds every file in ``archives``."""
    archives = list(archives)
    expected = ", ".join(archives)
    if not os.path.isdir(manual_dir):
        raise DatasetNotFoundError(
            f"The manual directory {manual_dir} does not exist. Expected it to hold {expected}.\n"
            f"{how_to_get}\nSet config.data.manual_dir (--config.data.manual_dir=DIR) to the "
            "directory that holds the archives."
        )
    missing = [a for a in archives if not os.path.isfile(os.path.join(manual_dir, a))]
    if not missing:
        return
    present = sorted(os.listdir(manual_dir))
    hint = ""
    extracted = [a for a in missing if os.path.isdir(os.path.join(manual_dir, _stem(a)))]
    if extracted:
        hint = (
            f"\n{manual_dir} holds an extracted folder ({', '.join(_stem(a) for a in extracted)}) "
            "where the zip file itself is expected: put the original .zip archives there "
            "(they are read without extracting them by hand)."
        )
    shown = ", ".join(present[:10]) + (" ..." if len(present) > 10 else "")
    raise DatasetNotFoundError(
        f"Missing {', '.join(os.path.join(manual_dir, a) for a in missing)}. "
        f"The manual directory {manual_dir} must hold {expected}; it holds "
        f"{shown or 'nothing'}.{hint}\n"
        f"{how_to_get}"
    )


def _stem(name: str) -> str:
    return name[: -len(".zip")] if name.endswith(".zip") else name


def open_zip(path: str, how_to_get: str) -> zipfile.ZipFile:
    """Opens ``path`` as a zip archive, or raises `DatasetNotFoundError` saying it is corrupt."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetNotFoundError(
            f"{path} is not a readable zip archive ({e}): the download is incomplete or "
            f"corrupt. Download it again.\n{how_to_get}"
        ) from e


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, bit_depth, colour_type)`` from a PNG's first 26 bytes, or None."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def read_head(archive: zipfile.ZipFile, member: str, size: int = 64) -> bytes:
    """The first ``size`` bytes of a member (decompresses only that much)."""
    with archive.open(member) as f:
        return f.read(size)


def corrupt_member_error(
    archive_path: str, member: str, expected: str, found: str, how_to_get: str
) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"Corrupt file {member} in {archive_path}: expected {expected}, found {found}. "
        f"The archive is damaged or is not the official release; download it again.\n"
        f"{how_to_get}"
    )


def describe_png(header: tuple[int, int, int, int] | None, head: bytes) -> str:
    if header is None:
        return f"no PNG header (first bytes {head[:8]!r})"
    width, height, depth, colour = header
    return f"a {width}x{height} {depth}-bit {PNG_COLOUR_TYPES.get(colour, str(colour))} PNG"
