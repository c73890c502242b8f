"""Hand a stored scan and its segmentation to 3D Slicer or ITK-SNAP (the first half of the round
trip whose second half is :mod:`covidtrack.hitl.importing`).

:func:`export_scan` writes, for one scan, the CT and the active (or model) masks as NIfTI with the
scan's canonical geometry (they overlay each other, and the original DICOM, in any viewer), a
colour table per label map for each tool, and a README naming the labels and the command that
brings a corrected infection mask back. No patient-identifying text is written: the files carry
the scan's pseudonymous id, never a name, ID or date.

Files::

    ct.nii.gz                      HU, int16
    infection.nii.gz               0 none, 1 GGO, 2 consolidation      (edit this one)
    lungs.nii.gz                   0 none, 1 right lung, 2 left lung
    lobes.nii.gz                   1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL    (when segmented)
    <map>.ctbl                     3D Slicer colour tables (Data module: load with the label map)
    <map>.itksnap.txt              ITK-SNAP label descriptions (Segmentation > Import Label Descriptions)
    README.txt
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from covidtrack.errors import StoreError
from covidtrack.labels import LOBE_LABELS
from covidtrack.report.viewer import INFECTION_COLOURS, LOBE_COLOURS, LUNG_COLOURS

if TYPE_CHECKING:
    from covidtrack.store import Store

#: label value -> (name, RGB) per exported map; colours as the dashboard draws them
LABEL_MAPS: dict[str, dict[int, tuple[str, tuple[int, int, int]]]] = {
    "infection": {1: ("GGO", INFECTION_COLOURS[1]), 2: ("consolidation", INFECTION_COLOURS[2])},
    "lungs": {1: ("right lung", LUNG_COLOURS[1]), 2: ("left lung", LUNG_COLOURS[2])},
    "lobes": {k: (LOBE_LABELS[k], LOBE_COLOURS[k]) for k in LOBE_LABELS},
}


def slicer_color_table(labels: dict[int, tuple[str, tuple[int, int, int]]]) -> str:
    """A 3D Slicer colour table (``.ctbl``: ``value name R G B A`` per line)."""
    lines = ["# covidtrack colour table for 3D Slicer", f"# {len(labels) + 1} values", "0 background 0 0 0 0"]
    lines += [f"{k} {name.replace(' ', '_')} {r} {g} {b} 255" for k, (name, (r, g, b)) in sorted(labels.items())]
    return "\n".join(lines) + "\n"


def itksnap_labels(labels: dict[int, tuple[str, tuple[int, int, int]]]) -> str:
    """An ITK-SNAP label description file."""
    lines = ["################################################", "# ITK-SnAP Label Description File",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL", "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    lines += [f"{k:5d} {r:5d} {g:4d} {b:4d}        1  1  1    \"{name}\"" for k, (name, (r, g, b)) in sorted(labels.items())]
    return "\n".join(lines) + "\n"


def _readme(scan_id: str, kind: str, versions: dict[str, str], maps: list[str]) -> str:
    return "\n".join([
        f"covidtrack scan {scan_id}: CT and {kind} segmentation ({', '.join(f'{k} {v}' for k, v in sorted(versions.items()))})",
        "",
        "ct.nii.gz          CT in HU on the scan's canonical grid; every mask below overlays it (and the original DICOM).",
        *[f"{m + '.nii.gz':<18} " + ", ".join(f"{k} {n}" for k, (n, _) in sorted(LABEL_MAPS[m].items())) for m in maps],
        "",
        "3D Slicer: load ct.nii.gz as a volume and a mask as a label map (or segmentation); load the matching .ctbl",
        "colour table for its names and colours. ITK-SNAP: main image ct.nii.gz, segmentation infection.nii.gz,",
        "Segmentation > Import Label Descriptions > infection.itksnap.txt.",
        "",
        "To bring a corrected infection mask back (values 1 GGO, 2 consolidation; other labels are refused):",
        f"  python -m covidtrack hitl import {scan_id} infection.nii.gz --table covidtrack --author YOUR_INITIALS --minutes N",
        "or the Review page's 'Import a mask corrected in 3D Slicer / ITK-SNAP'. It is stored as a new correction;",
        "the model output is never overwritten.",
        "",
    ])


def export_scan(store: "Store", scan_id: str, out_dir: str | Path, kind: str = "active") -> list[Path]:
    """Write the scan's CT, its ``kind`` segmentation ("active": what the dashboard shows, a
    correction when there is one; "model": the model output) and the colour tables into
    ``out_dir``. Returns the files written. StoreError for an unknown scan."""
    scans = store.scans()
    row = scans[scans["scan_id"] == scan_id]
    if row.empty:
        raise StoreError(f"{store.path}: no scan {scan_id}. Fix: pick one from `python -m covidtrack patients --scans` "
                         "or the dashboard's Patients page")
    seg = store.segmentation(scan_id, kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sources = {"ct": Path(row["volume_path"].iloc[0]), "infection": seg.infection_path, "lungs": seg.lungs_path,
               "lobes": seg.lobes_path}
    maps = []
    for name, src in sources.items():
        if src is None:
            continue  # no lobes segmented
        if not Path(src).exists():
            raise StoreError(f"{src}: file referenced by the store is missing. Fix: re-ingest the scan")
        dst = out / f"{name}.nii.gz"
        shutil.copyfile(src, dst)
        written.append(dst)
        if name in LABEL_MAPS:
            maps.append(name)
            for suffix, text in ((".ctbl", slicer_color_table(LABEL_MAPS[name])), (".itksnap.txt", itksnap_labels(LABEL_MAPS[name]))):
                path = out / f"{name}{suffix}"
                path.write_text(text)
                written.append(path)
    versions = seg.model_versions if isinstance(seg.model_versions, dict) else {}
    readme = out / "README.txt"
    readme.write_text(_readme(scan_id, "corrected" if seg.kind == "corrected" else "model", versions, maps))
    written.append(readme)
    return written


def export_zip(store: "Store", scan_id: str, kind: str = "active") -> bytes:
    """The same files as :func:`export_scan`, as a zip archive in memory (dashboard download)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="covidtrack-export-") as tmp:
        files = export_scan(store, scan_id, tmp, kind)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # NIfTI files are gzip already
            for f in files:
                zf.write(f, arcname=f"{scan_id}/{f.name}")
        return buf.getvalue()
