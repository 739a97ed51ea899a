"""Where calibration and evaluation text comes from, and the calibration/validation split.

A source is one of:
  - the default: English Wikipedia articles from the gensim wheel's test dump (no hub needed);
  - a plain ``.txt`` file: one continuous text, split at a paragraph boundary (first part calibration, the rest
    validation), so validation text never overlaps calibration text;
  - a ``.jsonl`` file: one document per line in a field ("text" unless told), split by a hash of each document;
  - a Hugging Face dataset id (``name`` or ``name:config``), read with the optional `datasets` package.

Splits are by document (article) and deterministic: a document goes to validation when the SHA-256 of its key
(the article title, or the document text) falls in the lowest ``validation_fraction`` of the hash range. That
does not depend on document order, so adding documents never moves the others between splits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.data.wikitext import EXTRACTOR_VERSION, Article, extract_articles
from tyr.errors import TyrError

Split = Literal["calibration", "validation"]
SPLITS = ("calibration", "validation")
DEFAULT_VALIDATION_FRACTION = 0.15
GENSIM_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_SOURCE_NAMES = ("default", "wiki", "wikipedia")


class TextSource(BaseModel):
    """A text source as recorded in configs and result files."""

    kind: Literal["wiki", "txt", "jsonl", "hf"]
    location: str = Field("", description="file path or dataset id; empty for the embedded wiki text")
    text_field: str = "text"
    hf_config: str | None = None
    max_documents: int = Field(20_000, description="cap on documents read from a hub dataset")
    validation_fraction: float = Field(DEFAULT_VALIDATION_FRACTION, gt=0, lt=1)

    @classmethod
    def parse(cls, spec: str | None, text_field: str = "text") -> "TextSource":
        """None/"default"/"wiki" -> embedded wiki; an existing .txt/.jsonl file; anything else: a dataset id."""
        if spec is None or spec.strip().lower() in DEFAULT_SOURCE_NAMES:
            return cls(kind="wiki")
        path = Path(spec).expanduser()
        if path.exists() or path.suffix.lower() in (".txt", ".jsonl"):
            if not path.is_file():
                raise TyrError(f"text source {spec!r}: no such file")
            suffix = path.suffix.lower()
            if suffix not in (".txt", ".jsonl"):
                raise TyrError(f"text source {spec!r}: expected a .txt or .jsonl file, got {suffix or 'no suffix'}")
            return cls(kind=suffix[1:], location=str(path.resolve()), text_field=text_field)
        name, _, config = spec.partition(":")
        return cls(kind="hf", location=name, hf_config=config or None, text_field=text_field)

    def describe(self) -> str:
        if self.kind == "wiki":
            return "wiki (English Wikipedia sample from the gensim wheel)"
        return f"{self.kind}:{self.location}" + (f":{self.hf_config}" if self.hf_config else "")


def load_text(source: str | TextSource | None = None, split: Split = "calibration",
              text_field: str = "text") -> list[str]:
    """The documents of one split of a text source (see the module docstring for the accepted sources)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    spec = source if isinstance(source, TextSource) else TextSource.parse(source, text_field=text_field)
    if spec.kind == "wiki":
        articles = wiki_articles()
        return [a.text for a in articles if _split_of(a.title, spec.validation_fraction) == split]
    if spec.kind == "txt":
        return _split_txt(_read_utf8(Path(spec.location)), split, spec.validation_fraction)
    if spec.kind == "jsonl":
        documents = _read_jsonl(Path(spec.location), spec.text_field)
        return [d for d in documents if _split_of(d, spec.validation_fraction) == split]
    return _load_hf(spec, split)


def wiki_articles() -> list[Article]:
    """Clean articles of the embedded Wikipedia sample, extracted once and cached under the tyr cache."""
    from tyr.models.default import cache_dir

    cache = cache_dir() / "data" / f"enwiki-gensim-sample-v{EXTRACTOR_VERSION}.json"
    if cache.is_file():
        try:
            return [Article(**a) for a in json.loads(cache.read_text(encoding="utf-8"))]
        except (ValueError, TypeError):
            pass  # a damaged cache is rebuilt below
    articles = extract_articles(gensim_wiki_dump())
    atomic_write_json(cache, [a.model_dump() for a in articles])
    return articles


def gensim_wiki_dump() -> Path:
    # Locate the wheel's data without importing gensim (its import pulls scipy and compiled extensions).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise TyrError("the default text needs the gensim wheel's test data: pip install --no-deps gensim==4.4.0 "
                       "(or pass a .txt/.jsonl file as the text source)")
    path = Path(list(spec.submodule_search_locations)[0]) / GENSIM_WIKI_DUMP
    if not path.is_file():
        raise TyrError(f"{path} is missing: reinstall gensim==4.4.0 (pip install --no-deps gensim==4.4.0)")
    return path


def _split_of(key: str, validation_fraction: float) -> Split:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if position < validation_fraction else "calibration"


def _split_txt(text: str, split: Split, validation_fraction: float) -> list[str]:
    separator = "\n\n"
    pieces = [p.strip() for p in text.split(separator) if p.strip()]
    if len(pieces) < 2:  # no blank lines: cut at a line boundary instead
        separator = "\n"
        pieces = [line.strip() for line in text.splitlines() if line.strip()]
    if len(pieces) < 2:
        raise TyrError(f"the text file has {len(pieces)} non-empty line(s): too little to split into "
                       "calibration and validation text")
    cumulative = list(itertools.accumulate(len(p) for p in pieces))
    cut = next(i + 1 for i, size in enumerate(cumulative) if size >= (1 - validation_fraction) * cumulative[-1])
    cut = min(cut, len(pieces) - 1)
    return [separator.join(pieces[:cut] if split == "calibration" else pieces[cut:])]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TyrError(f"text file {path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to "
                       "UTF-8") from err
    except OSError as err:
        raise TyrError(f"cannot read text file {path}: {err.strerror}") from err


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TyrError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or text_field not in record:
            raise TyrError(f"{path}:{number}: no field {text_field!r} (choose the field with --text-field)")
        if not isinstance(record[text_field], str):
            raise TyrError(f"{path}:{number}: field {text_field!r} is not a string")
        if record[text_field].strip():
            documents.append(record[text_field])
    if not documents:
        raise TyrError(f"{path} holds no non-empty documents in field {text_field!r}")
    return documents


def _load_hf(spec: TextSource, split: Split) -> list[str]:
    """Calibration reads the dataset's train split; validation its validation (or test) split when it has one,
    else the hash-selected part of train. Streaming keeps large datasets from being downloaded whole."""
    try:
        import datasets
    except ImportError as err:
        raise TyrError(f"text source {spec.location!r} is not a file, and reading a dataset id needs the optional "
                       "package `datasets` (pip install datasets); or pass a .txt/.jsonl file") from err
    try:
        available = datasets.get_dataset_split_names(spec.location, spec.hf_config)
    except Exception as err:  # the library raises many types for offline / unknown datasets
        raise TyrError(f"cannot open dataset {spec.location!r} (not a local file, and the hub is unreachable or "
                       f"has no such dataset): {err}") from err
    held_out = next((name for name in ("validation", "valid", "test") if name in available), None)
    if split == "validation" and held_out:
        return _read_hf_split(datasets, spec, held_out, keep=lambda _: True)
    if "train" not in available:
        raise TyrError(f"dataset {spec.location!r} has no train split (splits: {', '.join(available)})")
    if held_out:  # the dataset's own split is the held-out one: calibration may use all of train
        return _read_hf_split(datasets, spec, "train", keep=lambda _: True)
    return _read_hf_split(datasets, spec, "train",
                          keep=lambda text: _split_of(text, spec.validation_fraction) == split)


def _read_hf_split(datasets, spec: TextSource, name: str, keep) -> list[str]:
    stream = datasets.load_dataset(spec.location, spec.hf_config, split=name, streaming=True)
    documents = []
    for record in stream:
        if spec.text_field not in record:
            raise TyrError(f"dataset {spec.location!r} has no field {spec.text_field!r} "
                           f"(fields: {', '.join(record)}); choose it with --text-field")
        text = record[spec.text_field]
        if isinstance(text, str) and text.strip() and keep(text):
            documents.append(text)
            if len(documents) >= spec.max_documents:
                break
    return documents
