"""Text sources, splits and token blocks, on the real embedded Wikipedia sample and the real SmolLM2 tokenizer."""

import json

import pytest
import torch

from tyr.data import TextSource, load_text, token_blocks, wiki_articles
from tyr.data.wikitext import MIN_ARTICLE_CHARS, wikitext_to_prose
from tyr.errors import TyrError

MARKUP_RESIDUE = ["{{", "}}", "[[", "]]", "<ref", "</", "{|", "|}", "&nbsp;", "&amp;", "'''", "<!--", "==",
                  "[http", "File:", "Category:"]


@pytest.fixture(scope="module")
def articles():
    return wiki_articles()


def test_wikitext_to_prose_strips_markup():
    wikitext = (
        "{{Infobox person | name = {{nowrap|Ada}} | image = [[File:Ada.jpg|thumb|A [[portrait]] [1840]]]}}\n"
        "'''Ada Lovelace''' (born {{birth date|1815|12|10}}) was an [[England|English]] [[mathematician]]"
        "<ref name=\"a\">{{cite book|title=X}}</ref> who wrote about the {{lang|fr|machine analytique}}.<ref "
        "name=\"b\"/> She lived {{convert|5|km|mi}} from <!-- a comment --> the [[River Thames]] for many years.\n"
        "{| class=\"wikitable\"\n|-\n| {{flag|UK}} || cell\n|}\n"
        "== Early life ==\n"
        "* a list item that is not prose at all, really not\n"
        "Her father was the poet Lord Byron, and she was his only legitimate child.\n"
        "== References ==\n"
        "This paragraph sits after the references heading and must be dropped entirely.\n"
        "[[Category:Mathematicians]]"
    )
    assert wikitext_to_prose(wikitext) == (
        "Ada Lovelace (born) was an English mathematician who wrote about the machine analytique. "
        "She lived 5 km from the River Thames for many years.\n\n"
        "Her father was the poet Lord Byron, and she was his only legitimate child."
    )


def test_wiki_sample_is_clean_prose(articles):
    assert 80 <= len(articles) <= 120
    total_chars = sum(len(a.text) for a in articles)
    assert 2_000_000 <= total_chars <= 4_000_000
    assert len({a.title for a in articles}) == len(articles)
    for article in articles:
        assert len(article.text) >= MIN_ARTICLE_CHARS
        assert "(disambiguation)" not in article.title
        for residue in MARKUP_RESIDUE:
            assert residue not in article.text, (article.title, residue)
    anarchism = next(a for a in articles if a.title == "Anarchism")
    assert anarchism.text.startswith("Anarchism is a political philosophy")


def test_wiki_cache_is_written_once_and_reused(tmp_path, monkeypatch, articles):
    monkeypatch.setenv("TYR_CACHE", str(tmp_path))
    fresh = wiki_articles()
    cached_files = list((tmp_path / "data").glob("*.json"))
    assert len(cached_files) == 1 and not list((tmp_path / "data").glob(".*tmp*"))
    # A fresh extraction (empty cache) gives exactly what the shared cache holds: extraction is deterministic.
    assert [a.model_dump() for a in fresh] == [a.model_dump() for a in articles]
    # A second call reads the cache file: prove it by planting a marker in it.
    payload = json.loads(cached_files[0].read_text())
    payload[0]["text"] = "marker text"
    cached_files[0].write_text(json.dumps(payload))
    assert wiki_articles()[0].text == "marker text"


def test_split_is_deterministic_disjoint_and_by_article(articles):
    calibration = load_text(None, "calibration")
    validation = load_text("wiki", "validation")
    assert load_text(None, "calibration") == calibration
    assert not set(calibration) & set(validation)
    assert sorted(calibration + validation) == sorted(a.text for a in articles)
    assert 0.08 <= len(validation) / len(articles) <= 0.25
    with pytest.raises(ValueError, match="split"):
        load_text(None, "test")


def test_txt_source_splits_at_a_paragraph_boundary(tmp_path):
    paragraphs = [f"Paragraph number {i} says something different from the others." for i in range(20)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    [calibration] = load_text(str(path), "calibration")
    [validation] = load_text(str(path), "validation")
    assert calibration.split("\n\n") + validation.split("\n\n") == paragraphs
    assert 2 <= len(validation.split("\n\n")) <= 4  # about 15 % of the text, at the end


def test_jsonl_source_reads_the_chosen_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    documents = [f"document {i} " * 5 for i in range(40)]
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(documents)) + "\n")
    calibration = load_text(str(path), "calibration", text_field="body")
    validation = load_text(str(path), "validation", text_field="body")
    assert sorted(calibration + validation) == sorted(documents)
    assert validation and not set(calibration) & set(validation)
    with pytest.raises(TyrError, match="no field 'text'"):
        load_text(str(path), "calibration")


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(TyrError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "one_line.txt").write_text("just one line")
    with pytest.raises(TyrError, match="too little to split"):
        load_text(str(tmp_path / "one_line.txt"))
    # A dataset id: without the optional `datasets` package, or offline, the error says what is missing.
    with pytest.raises(TyrError, match="datasets|hub"):
        load_text("someone/some-dataset:config", "validation")
    assert TextSource.parse("someone/some-dataset:config").hf_config == "config"


def test_token_blocks_shape_separators_and_seed(tokenizer):
    documents = load_text(None, "validation")
    every = token_blocks(tokenizer, documents, seq_len=256, num_blocks=None)
    stream_length = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents)
    stream_length += len(documents) - 1  # one EOS between neighbouring documents
    assert every.dtype == torch.long and every.shape == (stream_length // 256, 256)
    assert (every == tokenizer.eos_token_id).sum() >= len(documents) - 2  # the tail block may be cut off
    first = token_blocks(tokenizer, documents, seq_len=256, num_blocks=8, seed=1)
    assert torch.equal(first, token_blocks(tokenizer, documents, seq_len=256, num_blocks=8, seed=1))
    assert not torch.equal(first, token_blocks(tokenizer, documents, seq_len=256, num_blocks=8, seed=2))
    # Sampled blocks are whole blocks of the stream, distinct and in text order.
    rows = [next(i for i in range(len(every)) if torch.equal(every[i], block)) for block in first]
    assert rows == sorted(set(rows))


def test_token_blocks_reports_too_little_text(tokenizer):
    documents = ["A short document about very little.", "Another one."]
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents) + 1
    with pytest.raises(ValueError, match=rf"{n_tokens} tokens.*3 blocks \(1536 tokens\)"):
        token_blocks(tokenizer, documents, seq_len=512, num_blocks=3)
    with pytest.raises(ValueError, match="seq_len"):
        token_blocks(tokenizer, documents, seq_len=1, num_blocks=1)
