"""Dataset preparation: from the registry's name to a prepared TFDS builder.

`load_builder(config)` returns the builder of ``config.data.name``, preparing it (in ArrayRecord
format) if needed: the embedded dataset is generated, real datasets are built from the official
archives in ``config.data.manual_dir``. Preparation guards against damaged or replaced archives:

* the archives are checked before TFDS reads them; every image and label map is decoded once
  with TensorFlow's decoders (the ones training uses), so a damaged file fails preparation with
  its path inside the archive instead of failing training hours later;
* TFDS's extraction cache (``<data_dir>/downloads/extracted/ZIP.<archive name>``, keyed by the
  archive's file name only) is never reused: preparation always extracts the archive that is
  in the manual directory now, and removes the extracted copy once the dataset is written;
* a fingerprint of each archive (`archives.archive_fingerprint`) is recorded next to the
  prepared data; if the manual directory later holds a different archive of that name, loading
  stops and says which prepared directory to delete.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.core.download.extractor import ExtractError

from tce_jax import datasets
from tce_jax.datasets import archives
from tce_jax.datasets.archives import DatasetNotFoundError

# Written next to the prepared TFDS files: the fingerprints of the archives they came from.
ARCHIVES_RECORD = "tce_archives.json"


def load_builder(config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder, object]:
    """Returns the prepared TFDS builder and the `DatasetSpec` of `config.data.name`.

    Prepares the dataset (in ArrayRecord format) if needed: the embedded dataset is generated,
    real datasets are built from the archives in `config.data.manual_dir`. In multi-process
    runs, process 0 prepares while the others wait.

    Raises:
      DatasetNotFoundError: the archives are missing or damaged, or the dataset was prepared
        from archives other than those now in the manual directory.
    """
    spec = datasets.get_dataset_spec(config.data.name, config)
    data_dir = config.data.data_dir or None
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        if jax.process_index() == 0:
            prepare(builder, spec, config)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"prepare {spec.tfds_name}")
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                raise DatasetNotFoundError(
                    f"Process {jax.process_index()} cannot see the dataset that process 0 "
                    f"prepared under {builder.data_dir!s}: put config.data.data_dir on a "
                    "file system shared by every host, or prepare it on each host first."
                )
    else:
        check_archives_unchanged(builder, spec, _manual_dir(builder, config))
    return builder, spec


def _manual_dir(builder, config) -> str:
    return config.data.manual_dir or archives.default_manual_dir(builder)


def prepare(builder, spec, config) -> None:
    """Checks the archives of ``spec`` and prepares ``builder`` from them.

    Raises:
      DatasetNotFoundError: naming the archive (and the file in it) and the fix.
    """
    manual_dir = _manual_dir(builder, config)
    if spec.check_manual_dir is not None:
        spec.check_manual_dir(manual_dir)
    fingerprints = {
        name: archives.archive_fingerprint(os.path.join(manual_dir, name)) for name in spec.archives
    }
    extract_dir = os.path.join(os.fspath(builder.data_dir_root), "downloads", "extracted")
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=config.data.manual_dir or None,
                extract_dir=extract_dir,
                # Always extract again: TFDS would reuse any earlier extraction of an archive
                # of the same file name, whatever the archive holds now.
                download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD,
                try_download_gcs=False,  # nothing is downloaded at run time
            ),
        )
    except DatasetNotFoundError:
        raise
    except ExtractError as e:
        raise _extract_error(e, spec, manual_dir) from e
    except (
        AssertionError,
        FileNotFoundError,
        zipfile.BadZipFile,
        tfds.core.DatasetNotFoundError,
    ) as e:
        raise DatasetNotFoundError(
            f"Could not prepare dataset {config.data.name!r} (TFDS {spec.tfds_name!r}) in "
            f"{builder.data_dir!s} from manual_dir={config.data.manual_dir or None!r}: {e}\n"
            "See the README section on datasets for which archives to download and where to "
            "put them (config.data.manual_dir)."
        ) from e
    finally:
        _remove_extractions(extract_dir, spec.archives)
    if fingerprints:
        _write_record(os.fspath(builder.data_dir), fingerprints)


def _extract_error(error: ExtractError, spec, manual_dir: str) -> DatasetNotFoundError:
    """Our message for a failed TFDS extraction: the archive and member for a bad CRC."""
    member = archives.crc_error_member(error)
    text = str(error)
    for name in spec.archives:
        path = os.path.join(manual_dir, name)
        if path in text or name in text:
            if member is not None:
                return archives.damaged_member_error(
                    path,
                    member,
                    "fails the zip's CRC-32 check (its bytes are not the ones the zip recorded)",
                    spec.source,
                )
            return DatasetNotFoundError(
                f"Could not extract {path} ({error.__cause__ or error}): free disk space under "
                f"the data dir, or download the archive again from {spec.source} if it is "
                "damaged."
            )
    return DatasetNotFoundError(f"Could not extract the archives of {spec.tfds_name}: {error}")


def _remove_extractions(extract_dir: str, names) -> None:
    """Deletes TFDS's extracted copies of our archives, complete or not: they are never reused
    (see `prepare`), and as large as the archives (12 GB for Cityscapes)."""
    if not names or not os.path.isdir(extract_dir):
        return
    for entry in os.listdir(extract_dir):
        # TFDS extracts into "incomplete.<uuid>_ZIP.<name>", then renames it "ZIP.<name>".
        if any(entry == f"ZIP.{name}" or entry.endswith(f"_ZIP.{name}") for name in names):
            path = os.path.join(extract_dir, entry)
            logging.info("Removing TFDS's extracted copy %s.", path)
            shutil.rmtree(path, ignore_errors=True)


def _write_record(data_dir: str, fingerprints: dict) -> None:
    path = os.path.join(data_dir, ARCHIVES_RECORD)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(fingerprints, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_archives_unchanged(builder, spec, manual_dir: str) -> None:
    """Raises if the manual directory now holds other archives than the data were prepared from.

    Compares the fingerprints recorded at preparation with the archives present now (a missing
    archive, or data prepared before fingerprints were recorded, are not checked).

    Raises:
      DatasetNotFoundError: one line naming the prepared directory to delete.
    """
    if not spec.archives:
        return
    data_dir = os.fspath(builder.data_dir)
    try:
        with open(os.path.join(data_dir, ARCHIVES_RECORD)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return  # prepared before records were kept, or unreadable: nothing to compare
    for name in spec.archives:
        path = os.path.join(manual_dir, name)
        if name not in recorded or not os.path.isfile(path):
            continue
        try:
            now = archives.archive_fingerprint(path)
        except (zipfile.BadZipFile, OSError) as e:
            logging.warning(
                "Cannot read %s (%s); using the data prepared in %s.", path, e, data_dir
            )
            continue
        if now["sha256"] != recorded[name].get("sha256"):
            then = recorded[name]
            raise DatasetNotFoundError(
                f"{spec.tfds_name} in {data_dir} was prepared from another {name} "
                f"({then.get('members')} files, {then.get('size')} bytes) than {path} "
                f"({now['members']} files, {now['size']} bytes): to prepare it again from the "
                f"new archive, delete {data_dir}; to keep the prepared data, put the original "
                "archive back or point config.data.manual_dir elsewhere."
            )
