"""The knowledge base of the ``rag-medcpt`` expert: public documents, never patient records.

Two sources:

* the MedlinePlus health-topics XML as the U.S. National Library of Medicine publishes it
  (https://medlineplus.gov/xml.html, ``mplus_topics_YYYY-MM-DD.xml``, optionally zipped as
  ``mplus_topics_compressed_YYYY-MM-DD.zip``): one document per ``<health-topic>`` of the
  chosen language (English by default), its ``title`` attribute, its ``<also-called>``
  names and its ``<full-summary>`` (HTML held as escaped text, reduced here to plain text);
* a folder of ``.txt`` / ``.md`` / ``.xml`` documents: every text file is one document (its
  first line is the title); a MedlinePlus XML file found in the folder contributes its
  topics.

Where the knowledge base is looked for (:func:`find_kb`): the ``kb`` option, then
``$MEDMIX_KB``, then ``$MEDMIX_MODEL_DIR/medlineplus`` (the newest ``mplus_topics_*`` file
there). Everything is file-system checks, so a missing knowledge base fails at once.

A knowledge base made of patient records would let labels reach the embeddings through
retrieval; nothing here reads a cohort, and documents come only from these files.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from medmix_core.errors import DataError, WeightsNotFoundError

MEDLINEPLUS_URL = "https://medlineplus.gov/xml.html"
_TEXT_SUFFIXES = (".txt", ".md")
_TOPIC_FILE = re.compile(r"^mplus_topics(_compressed)?_\d{4}-\d{2}-\d{2}\.(xml|zip)$")


class KnowledgeBaseNotFoundError(WeightsNotFoundError):
    """A knowledge base that is not on this machine (a downloaded artefact, like weights)."""


@dataclass(frozen=True)
class Document:
    """One knowledge-base entry.

    Attributes:
        doc_id: stable identifier (the MedlinePlus topic id, or the file's relative path).
        title: the topic title (or the file's first line).
        text: what the article encoder reads: title, alternative names, plain summary.
        url: the topic page, when known.
    """

    doc_id: str
    title: str
    text: str
    url: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class _PlainText(HTMLParser):
    """HTML -> text: block elements become line breaks, list items get a dash."""

    _BLOCKS = {"p", "ul", "ol", "div", "br", "h1", "h2", "h3", "h4", "table", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self._BLOCKS:
            self.parts.append("\n")
        elif tag == "li":
            self.parts.append("\n- ")

    def handle_endtag(self, tag):
        if tag in self._BLOCKS or tag == "li":
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(re.sub(r"\s+", " ", data))  # in HTML a newline is a space

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line and line != "-")


def html_to_text(fragment: str) -> str:
    """Plain text of an HTML fragment (MedlinePlus summaries use p, ul/li, a, em)."""
    parser = _PlainText()
    parser.feed(html.unescape(fragment) if "&lt;" in fragment else fragment)
    parser.close()
    return parser.text()


def _open_topics(path: Path):
    """A binary stream of the XML inside ``path`` (.xml, or a .zip holding one .xml)."""
    if path.suffix.lower() != ".zip":
        return path.open("rb")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path} is not a readable zip file ({exc}); download the MedlinePlus "
                        f"health-topics file again from {MEDLINEPLUS_URL}.") from exc
    names = [n for n in zf.namelist() if n.lower().endswith(".xml")]
    if len(names) != 1:
        raise DataError(f"{path} holds {len(names)} .xml files ({names[:5]}); expected exactly "
                        f"one MedlinePlus health-topics XML.")
    return zf.open(names[0])


def parse_medlineplus(path: str | os.PathLike, language: str = "English") -> list[Document]:
    """Documents from the MedlinePlus health-topics XML.

    Args:
        path: ``mplus_topics_*.xml`` or the ``.zip`` NLM publishes it in.
        language: keep topics whose ``language`` attribute is this ("English", "Spanish"),
            or None for all.
    Returns:
        One document per ``<health-topic>``, in file order.
    Raises:
        DataError: the file is missing, is not XML, is not a ``<health-topics>`` file, or
            holds no topic of that language.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"MedlinePlus file {str(path)!r} does not exist; expected the "
                        f"health-topics XML from {MEDLINEPLUS_URL}.")
    docs: list[Document] = []
    seen_root = None
    stream = _open_topics(path)
    try:
        for event, el in ET.iterparse(stream, events=("start", "end")):
            if seen_root is None and event == "start":
                seen_root = el.tag
                if el.tag != "health-topics":
                    raise DataError(
                        f"{path} has root element <{el.tag}>; a MedlinePlus health-topics file "
                        f"has <health-topics>. Download mplus_topics_YYYY-MM-DD.xml from "
                        f"{MEDLINEPLUS_URL} (not the group or definitions files).")
            if event != "end" or el.tag != "health-topic":
                continue
            if language is None or el.get("language") == language:
                title = (el.get("title") or "").strip()
                if not title:
                    raise DataError(f"{path}: a <health-topic> (id={el.get('id')!r}) has no "
                                    f"title attribute; the file is damaged.")
                also = [a.text.strip() for a in el.findall("also-called") if a.text]
                summary = html_to_text(el.findtext("full-summary") or "")
                head = title + (" (also called: " + ", ".join(also) + ")" if also else "")
                text = head + "." + ("\n" + summary if summary else "")
                docs.append(Document(doc_id=str(el.get("id") or title), title=title,
                                     text=text, url=el.get("url") or ""))
            el.clear()  # the file is ~30 MB: keep memory flat
    except ET.ParseError as exc:
        raise DataError(f"{path} is not well-formed XML ({exc}); download it again from "
                        f"{MEDLINEPLUS_URL}.") from exc
    finally:
        stream.close()
    if not docs:
        raise DataError(f"{path} holds no <health-topic> with language={language!r}; expected "
                        f"the MedlinePlus health-topics XML ({MEDLINEPLUS_URL}).")
    return docs


def _is_medlineplus(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return bool(_TOPIC_FILE.match(path.name))
    with path.open("rb") as fh:
        return b"<health-topics" in fh.read(4096)


def read_folder(folder: str | os.PathLike, language: str = "English") -> list[Document]:
    """Documents from a folder: one per ``.txt`` / ``.md`` file, plus the topics of any
    MedlinePlus XML (or zip) in it; files in sorted path order, searched recursively.

    Raises:
        DataError: the folder is missing or holds no document.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"Knowledge base {str(root)!r} is not a folder; expected a folder of "
                        f".txt/.md documents or a MedlinePlus health-topics XML file.")
    docs: list[Document] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        rel = path.relative_to(root).as_posix()
        if suffix in _TEXT_SUFFIXES:
            text = path.read_text("utf-8", errors="replace").replace("\r\n", "\n").strip()
            if text:
                title = text.splitlines()[0].lstrip("# ").strip()
                docs.append(Document(doc_id=rel, title=title, text=text))
        elif suffix in (".xml", ".zip") and _is_medlineplus(path):
            docs.extend(parse_medlineplus(path, language))
    if not docs:
        raise DataError(f"Knowledge base folder {str(root)!r} holds no document (.txt, .md, or "
                        f"a MedlinePlus health-topics .xml/.zip).")
    return docs


def find_kb(kb: str | os.PathLike | None = None) -> Path:
    """The knowledge-base file or folder to use (file-system checks only).

    Args:
        kb: an explicit file or folder; when given it is the only place looked at.
    Raises:
        KnowledgeBaseNotFoundError: naming every place looked at and how to provide one.
    """
    hint = (f"Download the MedlinePlus health-topics XML (mplus_topics_YYYY-MM-DD.xml) from "
            f"{MEDLINEPLUS_URL} and put it in $MEDMIX_MODEL_DIR/medlineplus/, or pass the "
            f"expert option kb=<that file, or a folder of .txt/.md documents>, or set "
            f"MEDMIX_KB. Never use patient records as the knowledge base.")
    if kb is not None:
        path = Path(kb).expanduser()
        if path.is_file() or path.is_dir():
            return path
        raise KnowledgeBaseNotFoundError(f"Knowledge base kb={str(path)!r} does not exist. "
                                         + hint)
    looked = []
    env = os.environ.get("MEDMIX_KB")
    if env:
        path = Path(env).expanduser()
        if path.exists():
            return path
        looked.append(f"MEDMIX_KB={env} (does not exist)")
    else:
        looked.append("MEDMIX_KB: not set")
    model_dir = os.environ.get("MEDMIX_MODEL_DIR")
    if model_dir:
        folder = Path(model_dir).expanduser() / "medlineplus"
        files = sorted(p for p in folder.glob("mplus_topics*") if _TOPIC_FILE.match(p.name)) \
            if folder.is_dir() else []
        if files:
            # the date in the name sorts; prefer the plain XML of the newest date
            return max(files, key=lambda p: (p.name.split("_")[-1].split(".")[0],
                                             p.suffix == ".xml"))
        looked.append(f"{folder} ({'no mplus_topics_*.xml file' if folder.is_dir() else 'absent'})")
    else:
        looked.append("MEDMIX_MODEL_DIR: not set")
    raise KnowledgeBaseNotFoundError("No knowledge base for rag-medcpt on this machine. Looked "
                                     "in:\n  - " + "\n  - ".join(looked) + "\n" + hint)


def load_kb(path: str | os.PathLike, language: str = "English") -> list[Document]:
    """Documents of a knowledge base found by :func:`find_kb` (file or folder)."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path, language)
    if path.suffix.lower() in _TEXT_SUFFIXES:
        text = path.read_text("utf-8", errors="replace").strip()
        if not text:
            raise DataError(f"Knowledge-base file {path} is empty.")
        return [Document(doc_id=path.name, title=text.splitlines()[0].lstrip("# ").strip(),
                         text=text)]
    return parse_medlineplus(path, language)
