"""Uploaded files, handled safely (no streamlit here, so it is testable on its own).

- An upload is written under a scratch folder the caller owns (``$COVIDTRACK_HOME/work/...``)
  with a sanitised base name, refusing more than :data:`MAX_UPLOAD_BYTES`.
- A zip archive (a DICOM folder) is unpacked member by member: absolute paths, ``..``
  components, drive letters and symlinks are refused (no path traversal); the number of files
  and the total unpacked size are bounded, counted on the bytes actually written, so a zip bomb
  with a lying header stops at the limit too.

- A server-side path must lie under ``COVIDTRACK_IMPORT_ROOT`` when that is set (set it whenever
  the dashboard is reachable by others, so they cannot make it read arbitrary server files).

Limits can be changed with ``COVIDTRACK_MAX_UPLOAD_MB``, ``COVIDTRACK_MAX_UNPACKED_MB`` and
``COVIDTRACK_MAX_ARCHIVE_FILES``.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from covidtrack.errors import InputError

MB = 1024 * 1024
MAX_UPLOAD_BYTES = int(os.environ.get("COVIDTRACK_MAX_UPLOAD_MB", "1024")) * MB
MAX_UNPACKED_BYTES = int(os.environ.get("COVIDTRACK_MAX_UNPACKED_MB", "3072")) * MB
MAX_ARCHIVE_FILES = int(os.environ.get("COVIDTRACK_MAX_ARCHIVE_FILES", "5000"))
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
CHUNK = 1 * MB


def safe_name(name: str, default: str = "upload") -> str:
    """A base file name with only ``[A-Za-z0-9._-]`` (no folders, no leading dots)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    if len(clean) > 120:  # shorten the stem, keep the suffix that says what the file is
        suffix = next((x for x in (*IMAGE_SUFFIXES, ".zip") if clean.lower().endswith(x)), "")
        clean = clean[: 120 - len(suffix)] + clean[len(clean) - len(suffix):]
    return clean or default


def save_upload(name: str, stream: BinaryIO, folder: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Copy an uploaded stream into ``folder`` under a sanitised name; refuse oversize uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_name(name)
    written = 0
    with target.open("wb") as out:
        while chunk := stream.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                out.close()
                target.unlink(missing_ok=True)
                raise InputError(name, f"upload larger than {max_bytes // MB} MB",
                                 "upload one series at a time, or import a server-side folder instead")
            out.write(chunk)
    return target


def _member_target(dest: Path, member: zipfile.ZipInfo, archive: Path) -> Path | None:
    """Where a member may go inside ``dest``; None for folders; InputError for unsafe names."""
    raw = member.filename.replace("\\", "/")
    parts = PurePosixPath(raw).parts
    if raw.startswith("/") or any(p == ".." for p in parts) or (parts and re.match(r"^[A-Za-z]:", parts[0])):
        raise InputError(archive, f"archive member {member.filename!r} points outside the archive folder",
                         "re-create the zip from the DICOM folder itself (no absolute paths or '..')")
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InputError(archive, f"archive member {member.filename!r} is a symbolic link",
                         "zip the DICOM files themselves, not links to them")
    if member.is_dir():
        return None
    target = (dest / Path(*parts)).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise InputError(archive, f"archive member {member.filename!r} escapes the target folder", "re-create the zip")
    return target


def safe_extract(
    archive: Path, dest: Path, max_files: int = MAX_ARCHIVE_FILES, max_bytes: int = MAX_UNPACKED_BYTES
) -> Path:
    """Unpack a zip into ``dest`` (created) within the limits; returns ``dest``.

    On any refusal the partly unpacked folder is removed and :class:`InputError` says why.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(archive, f"not a readable zip archive ({err})", "upload a .zip of the DICOM folder, or a NIfTI file") from err
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > max_files:
                raise InputError(archive, f"archive holds {len(members)} files, more than the limit of {max_files}",
                                 "upload one series per archive or raise COVIDTRACK_MAX_ARCHIVE_FILES")
            declared = sum(m.file_size for m in members)
            if declared > max_bytes:
                raise InputError(archive, f"archive unpacks to {declared // MB} MB, more than {max_bytes // MB} MB",
                                 "upload one series per archive or raise COVIDTRACK_MAX_UNPACKED_MB")
            total = 0
            for member in zf.infolist():
                target = _member_target(dest, member, archive)
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, target.open("wb") as out:
                    while chunk := src.read(CHUNK):
                        total += len(chunk)
                        if total > max_bytes:  # the header may lie: count what is really written
                            raise InputError(archive, f"archive unpacks to more than {max_bytes // MB} MB",
                                             "upload one series per archive")
                        out.write(chunk)
    except BaseException:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def prepare_upload(name: str, stream: BinaryIO, folder: Path) -> Path:
    """Save an upload and return what the pipeline should read: the unpacked folder for a zip,
    else the image file itself."""
    saved = save_upload(name, stream, folder)
    lower = saved.name.lower()
    if lower.endswith(".zip"):
        out = safe_extract(saved, folder / "unpacked")
        saved.unlink(missing_ok=True)  # keep only one copy of the data on disk
        # a zipped NIfTI / NRRD / MHA (one volume file, no DICOM): load that file
        volumes = [p for p in out.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES[:-1])
                   and "__MACOSX" not in p.parts]
        if len(volumes) == 1 and not any(p.suffix.lower() == ".dcm" for p in out.rglob("*.dcm")):
            return volumes[0]
        return out
    if not lower.endswith(IMAGE_SUFFIXES):
        raise InputError(name, "unsupported file type", "upload a .zip of a DICOM folder, or a .nii/.nii.gz/.nrrd/.mha file")
    return saved


def check_server_path(path: Path) -> Path:
    """The resolved path if the Import page may read it; InputError otherwise."""
    resolved = path.expanduser().resolve()
    root = os.environ.get("COVIDTRACK_IMPORT_ROOT", "").strip()
    if root and not resolved.is_relative_to(Path(root).expanduser().resolve()):
        raise InputError(path, f"outside the import folder {root}", "copy the data under COVIDTRACK_IMPORT_ROOT or ask the administrator")
    if not resolved.exists():
        raise InputError(path, "no such file or folder on the server", "check the path (it is read on the server, not your computer)")
    return resolved
