"""Checks of the official archives a user puts in the manual directory, before TFDS reads them.

A missing archive, a wrong directory or a corrupt file should fail before preparation with the
path, what was expected there and how to get it, not hours later in training. Two levels:

* quick checks (seconds): the zip's central directory and the first bytes (PNG/JPEG headers)
  of each member;
* `verify_members`: every image and label map is read in full (which checks the zip's CRC-32 of
  each member) and decoded with TensorFlow's decoders, the ones training uses. PIL is not
  enough: it ignores PNG chunk CRCs that ``tf.io.decode_png`` enforces, so a file PIL reads
  can still stop training with "Invalid PNG data" and no file name.

`archive_fingerprint` identifies an archive's contents (from its central directory), so that a
prepared dataset can tell when the archive it was built from has been replaced.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

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


def corrupt_member_error(
    archive_path: str, member: str, expected: str, found: str, source: str
) -> DatasetNotFoundError:
    """The one-line error for a member that is not what the official release holds."""
    return DatasetNotFoundError(
        f"{os.path.basename(archive_path)}: {member}: expected {expected}, found {found}; the "
        "archive is damaged or not the official release: download it again from "
        f"{source} and replace {archive_path}"
    )


def describe_png(header: tuple[int, int, int, int] | None, head: bytes) -> str:
    if header is None:
        return f"no PNG header (first bytes {head[:8]!r})"
    width, height, depth, colour = header
    return f"a {width}x{height} {depth}-bit {PNG_COLOUR_TYPES.get(colour, str(colour))} PNG"


# The decoders of the training input pipeline (`example_transforms.decode`): images with
# `decode_image` (PNG or JPEG) into RGB, label maps with `decode_png` into one channel.
IMAGE, LABEL = "image", "label"


def _decode(kind: str, data: bytes) -> np.ndarray:
    import tensorflow as tf

    if kind == IMAGE:
        return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    return tf.io.decode_png(data, channels=1).numpy()


def _tf_reason(error: Exception) -> str:
    """TensorFlow's message without the op wrapping: 'Invalid PNG data, size 7308'."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    return re.sub(r"\s*\[Op:\w+\]\s*$", "", message).strip()


def damaged_member_error(
    archive_path: str, member: str, problem: str, source: str
) -> DatasetNotFoundError:
    """The one-line error for a damaged file inside an official archive.

    ``"ADEChallengeData2016.zip: <member> <problem>; the archive is damaged: download it again
    from <source> and replace <archive_path>"``.
    """
    return DatasetNotFoundError(
        f"{os.path.basename(archive_path)}: {member} {problem}; the archive is damaged: "
        f"download it again from {source} and replace {archive_path}"
    )


_CRC_RE = re.compile(r"Bad CRC-32 for file '(.*)'")


def crc_error_member(error: BaseException) -> str | None:
    """The member named by zipfile's ``Bad CRC-32 for file 'x'`` in ``error`` or its causes."""
    while error is not None:
        match = _CRC_RE.search(str(error))
        if match:
            return match.group(1)
        error = error.__cause__ or error.__context__
    return None


def read_member(
    archive: zipfile.ZipFile, archive_path: str, member: str, source: str, size: int = -1
) -> bytes:
    """The first ``size`` bytes of a member (all with -1), or the one-line damaged-file error.

    Reading to the end checks the member's CRC-32 (so may a short read of a small member).
    """
    try:
        with archive.open(member) as f:
            return f.read(size)
    except zipfile.BadZipFile as e:
        if crc_error_member(e) is not None:
            problem = "fails the zip's CRC-32 check (its bytes are not the ones the zip recorded)"
        else:
            problem = f"cannot be read ({e})"
        raise damaged_member_error(archive_path, member, problem, source) from e
    except (zlib.error, EOFError, OSError) as e:
        raise damaged_member_error(
            archive_path, member, f"cannot be decompressed ({e})", source
        ) from e


def _format_name(member: str) -> str:
    return "JPEG" if member.lower().endswith((".jpg", ".jpeg")) else "PNG"


def default_workers() -> int:
    """Decoding threads: one per CPU this process may use (TF's decoders release the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def verify_members(
    archive_path: str,
    members: Sequence[tuple[str, str]],
    source: str,
    *,
    check: Callable[[str, np.ndarray], str | None] | None = None,
    workers: int | None = None,
    report_every_s: float = 30.0,
) -> dict[str, tuple[int, int]]:
    """Reads and decodes every listed member of a zip archive, as training will.

    Each member is read in full (zipfile checks its CRC-32) and decoded with TensorFlow's
    decoder of its kind: ``IMAGE`` members with ``tf.io.decode_image(channels=3)``, ``LABEL``
    members with ``tf.io.decode_png(channels=1)``. Members are decoded in a thread pool (one
    zip handle per thread); progress is printed every ``report_every_s`` seconds. The first
    damaged member in the given order is reported.

    Args:
      archive_path: the zip file.
      members: ``(member name, IMAGE or LABEL)`` pairs.
      source: where to download the archive again (for the message).
      check: optional ``check(member, array) -> problem or None`` on each decoded array
        (``[H, W, C]`` uint8); a problem is reported as a damaged member.
      workers: decoding threads (default: the CPUs available).

    Returns:
      ``{member: (height, width)}``.

    Raises:
      DatasetNotFoundError: one line naming the archive, the member, the problem and the fix.
    """
    import tensorflow as tf  # here, not in the worker threads

    workers = workers or default_workers()
    local = threading.local()
    opened: list[zipfile.ZipFile] = []
    lock = threading.Lock()

    def archive_of_this_thread() -> zipfile.ZipFile:
        if not hasattr(local, "archive"):
            local.archive = zipfile.ZipFile(archive_path)
            with lock:
                opened.append(local.archive)
        return local.archive

    def verify(member: str, kind: str) -> tuple[int, int]:
        data = read_member(archive_of_this_thread(), archive_path, member, source)
        try:
            array = _decode(kind, data)
        except tf.errors.OpError as e:  # InvalidArgumentError for every broken file seen
            problem = f"is not a decodable {_format_name(member)} ({_tf_reason(e)})"
            raise damaged_member_error(archive_path, member, problem, source) from e
        problem = check(member, array) if check is not None else None
        if problem is not None:
            raise damaged_member_error(archive_path, member, problem, source)
        return array.shape[0], array.shape[1]

    name = os.path.basename(archive_path)
    start = last_report = time.monotonic()
    shapes: dict[str, tuple[int, int]] = {}
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(verify, member, kind) for member, kind in members]
        for done, ((member, _), future) in enumerate(zip(members, futures, strict=True), 1):
            shapes[member] = future.result()
            now = time.monotonic()
            if now - last_report >= report_every_s and done < len(members):
                last_report = now
                left = (now - start) / done * (len(members) - done)
                print(
                    f"Verifying {name}: {done}/{len(members)} files decoded, "
                    f"about {_duration(left)} left",
                    flush=True,
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for archive in opened:
            archive.close()
    print(
        f"Verified {name}: {len(members)} files decoded in "
        f"{_duration(time.monotonic() - start)} ({workers} threads)",
        flush=True,
    )
    return shapes


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def archive_fingerprint(path: str) -> dict[str, object]:
    """What identifies an archive's contents, from its central directory (no decompression).

    A hash of every member's name, size and CRC-32: a re-download of the same release gives
    the same fingerprint (whatever its modification time), a changed file a different one.

    Returns:
      ``{"size": bytes, "members": count, "sha256": hex digest}``.
    """
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in sorted(infos, key=lambda i: i.filename):
            digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
    return {"size": os.path.getsize(path), "members": len(infos), "sha256": digest.hexdigest()}
