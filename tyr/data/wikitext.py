"""Turn a MediaWiki XML dump into plain article prose.

The default calibration/evaluation text is the small English Wikipedia dump that ships inside the gensim wheel
(its test data), so no hub access is needed. This is a deliberately small MediaWiki-markup stripper, not a
renderer: it keeps running prose and drops everything that is not prose (infoboxes, tables, references, file
links, lists of links, reference sections). Innermost-first regex passes handle nesting.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel
from tqdm.auto import tqdm

# Bump when the cleaning rules change: cached extractions are keyed by it.
EXTRACTOR_VERSION = 1
MIN_ARTICLE_CHARS = 1000

# Sections after which an article holds no more prose.
_TRAILING_SECTIONS = {"see also", "references", "notes", "external links", "further reading", "bibliography",
                      "sources", "footnotes", "citations", "notes and references", "references and notes",
                      "works cited", "primary sources", "secondary sources", "selected bibliography",
                      "publications", "discography", "filmography", "works", "gallery"}
# Block tags whose content is not prose.
_DROPPED_TAGS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "source", "syntaxhighlight", "chem",
                 "ce", "hiero", "graph", "mapframe", "references", "table")
_LINK_NAMESPACES = ("file:", "image:", "category:", "media:", "wikt:", "wiktionary:", "s:", "commons:", ":category:")
_DISAMBIGUATION_TEMPLATES = re.compile(r"\{\{\s*(disambig\w*|dab|hndis|geodis|surname|given name|set index\w*|"
                                       r"shipindex|mil-unit-dis|hospital-dis|school-dis|letter-number combination)"
                                       r"\s*[|}]", re.IGNORECASE)


class Article(BaseModel):
    title: str
    text: str


def iter_pages(xml_path: str | Path) -> Iterator[tuple[str, int, bool, str]]:
    """Yield (title, namespace, is_redirect, wikitext) for each page of a (optionally bz2) MediaWiki dump."""
    xml_path = Path(xml_path)
    opener = bz2.open if xml_path.suffix == ".bz2" else open
    with opener(xml_path, "rb") as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if _local(element.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in element}
            revision = {_local(child.tag): child for child in fields["revision"]} if "revision" in fields else {}
            text = revision["text"].text if "text" in revision and revision["text"].text else ""
            yield (fields["title"].text or "", int(fields["ns"].text or 0), "redirect" in fields, text)
            element.clear()


def extract_articles(xml_path: str | Path, min_chars: int = MIN_ARTICLE_CHARS) -> list[Article]:
    """Clean prose of every real article (main namespace, no redirect/disambiguation/list page), in dump order."""
    articles = []
    pages = tqdm(iter_pages(xml_path), desc="extracting wiki text", unit="page", leave=False)
    for title, namespace, is_redirect, wikitext in pages:
        if namespace != 0 or is_redirect or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        if "(disambiguation)" in title or title.startswith("List of") or _DISAMBIGUATION_TEMPLATES.search(wikitext):
            continue
        text = wikitext_to_prose(wikitext)
        if len(text) >= min_chars:
            articles.append(Article(title=title, text=text))
    return articles


def wikitext_to_prose(wikitext: str) -> str:
    text = re.sub(r"<!--.*?(-->|$)", "", wikitext, flags=re.DOTALL)
    for tag in _DROPPED_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    # A link's label may hold single brackets ("[above]"), so those are allowed inside.
    text = _replace_innermost(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]", _render_link, text)
    # Templates and tables nest inside each other: strip innermost ones until nothing changes.
    previous = None
    while previous != text:
        previous = text
        text = _replace_innermost(r"\{\{([^{}]*)\}\}", _render_template, text)
        text = _replace_innermost(r"\{\|((?:(?!\{\||\|\}).)*)\|\}", lambda _: "", text, flags=re.DOTALL)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining tags keep their content (<sub>, <small>, ...)
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__ and other magic words
    text = html.unescape(text).replace("\xa0", " ").replace("\u200b", "")
    return _keep_prose_lines(text)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _replace_innermost(pattern: str, render, text: str, flags: int = 0) -> str:
    compiled = re.compile(pattern, flags)
    while True:
        new = compiled.sub(render, text)
        if new == text:
            return new
        text = new


def _render_link(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(_LINK_NAMESPACES) or re.match(r"^:?[a-z]{2,3}(-[a-z]+)?:", lowered):
        return ""  # files, categories, interlanguage links
    label = label.rsplit("|", 1)[-1] if label else target.lstrip(":")
    return label


def _render_template(match: re.Match) -> str:
    """The visible text of the few inline templates that carry prose; every other template disappears."""
    parts = [part.strip() for part in match.group(1).split("|")]
    name = parts[0].lower().replace("_", " ")
    positional = [part for part in parts[1:] if "=" not in part]
    named = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    if not positional and name not in ("quote", "quotation"):
        return ""
    if name == "convert":
        if len(positional) >= 4 and positional[1] in ("-", "–", "to", "and", "or", "by", "x", "×"):
            return f"{positional[0]} {positional[1]} {positional[2]} {positional[3]}"
        return f"{positional[0]} {positional[1]}" if len(positional) >= 2 else positional[0]
    if name in ("lang", "transl") or name.startswith("lang-"):
        return positional[-1]
    if name in ("nowrap", "small", "smaller", "smallcaps", "nihongo", "formatnum", "flag", "flagcountry", "ill",
                "abbr", "sic", "not a typo", "mvar", "math", "bold", "em", "nobr", "proper name", "vr", "as of"):
        return (f"As of {positional[0]}" if name == "as of" else positional[0])
    if name in ("quote", "quotation", "blockquote", "cquote"):
        return named.get("text", positional[0] if positional else "")
    if name in ("chem", "chem2"):
        return "".join(positional)
    if name in ("circa", "c."):
        return f"c. {positional[0]}"
    return ""


def _keep_prose_lines(text: str) -> str:
    paragraphs: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).strip().lower() in _TRAILING_SECTIONS:
                break
            continue
        if not line or line[0] in "|!{}" or line.startswith(("*", "#", ";")):
            # Table residue and lists (mostly links, names, dates) are not running prose.
            continue
        line = line.lstrip(":").strip()
        line = _tidy(line)
        # Fragments left by removed templates ("Born 1950.", captions) carry no prose.
        if len(line.split()) >= 8 and "}}" not in line and "{{" not in line:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def _tidy(line: str) -> str:
    line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # "()" or "(, )" left by removed templates
    line = re.sub(r"\(\s*[,;]\s*", "(", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"([(])\s+", r"\1", line)
    line = re.sub(r"[ \t]{2,}", " ", line)
    line = re.sub(r"([,;])\1+", r"\1", line)
    return line.strip()
