"""Issue 17: data for a 10B run. The tiktoken engine gives the reference encoder's ids; the streaming pass
equals what it replaced; inputs from URLs, fsspec and Hugging Face datasets; many tasks merge into one."""
import json
import random
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from data_prep import BPETokenizer, DataError, TokenReader, iter_documents, prepare
from data_prep.fast_bpe import convert, why_not_convertible

pytest.importorskip("tiktoken")

TRICKY = ["don't", "I'll", "we've", "'s'S", "  leading", "trailing   ", "\n\n\n", "\r\n\r\n", "\t\tx", "12345678",
          "x1.5e-3", "<|endoftext|>", "<|pad|>", "日本語のテキスト", "😀😀 👍🏽", "e\u0301", "\u00a0nbsp", "\u2028",
          "a\u200bb", "ÿþ", "   \n  ", "mixed\u3000space", "$$$ ((( )))", "'''", "αβγ ΑΒΓ", "\x00\x01"]


def _stdlib_texts(n: int, seed: int = 0) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    return [f.read_text(encoding="utf-8", errors="replace") for f in rng.sample(files, n)]


@pytest.fixture(scope="module")
def trained():
    """A BPE with many merges, trained on code, prose and the tricky strings."""
    texts = _stdlib_texts(60) + TRICKY * 20
    return BPETokenizer.train(texts, 4000, special_tokens=["<|pad|>"])


def test_tiktoken_engine_gives_the_reference_ids_on_varied_text(trained):
    fast = trained.fast_encode()
    assert fast is not None
    texts = _stdlib_texts(40, seed=1) + TRICKY + ["".join(random.Random(3).choices(TRICKY, k=400))]
    mismatches = [t[:30] for t in texts if fast(t) != trained.encode(t)]
    assert mismatches == []
    assert sum(len(fast(t)) for t in texts) > 50_000  # real work was compared


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=300))
def test_tiktoken_engine_equals_reference_on_arbitrary_unicode(trained, text):
    assert trained.fast_encode()(text) == trained.encode(text)


def test_tokenizers_tiktoken_cannot_reproduce_keep_the_reference_encoder(trained):
    spec = json.loads(trained._tok.to_str())
    assert why_not_convertible(spec) is None
    for change, reason in [(("pre_tokenizer", "add_prefix_space", True), "pre-tokenizer"),
                           (("model", "dropout", 0.1), "dropout"),
                           (("model", "continuing_subword_prefix", "##"), "continuing_subword_prefix")]:
        other = json.loads(trained._tok.to_str())
        other[change[0]][change[1]] = change[2]
        assert reason in why_not_convertible(other)
        assert convert(json.dumps(other)) is None
    with_norm = dict(spec, normalizer={"type": "NFKC"})
    assert "normalizer" in why_not_convertible(with_norm)
    # merges whose token ids are out of merge order: tiktoken's rank order would merge differently
    swapped = json.loads(trained._tok.to_str())
    swapped["model"]["merges"][10], swapped["model"]["merges"][11] = (swapped["model"]["merges"][11],
                                                                      swapped["model"]["merges"][10])
    assert convert(json.dumps(swapped)) is None


def _shards(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("code")
    src = root / "src"
    src.mkdir()
    for i, text in enumerate(_stdlib_texts(50, seed=5)):
        (src / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    (root / "tok").mkdir()
    trained.save(root / "tok")
    return src, root / "tok"


def test_prepare_with_tiktoken_equals_prepare_with_hf(code_corpus, tmp_path, monkeypatch):
    src, tok = code_corpus
    fast = prepare([str(src)], tmp_path / "fast", tokenizer_dir=tok, shard_tokens=20_000, show_progress=False)
    monkeypatch.setenv("LMFORGE_ENCODER", "hf")
    ref = prepare([str(src)], tmp_path / "hf", tokenizer_dir=tok, shard_tokens=20_000, show_progress=False)
    assert fast["splits"] == ref["splits"] and len(fast["splits"]["train"]["shards"]) > 2
    assert _shards(tmp_path / "fast") == _shards(tmp_path / "hf")


def test_a_fast_encoder_that_disagrees_stops_prepare(code_corpus, tmp_path, monkeypatch):
    src, tok = code_corpus
    monkeypatch.setattr(BPETokenizer, "fast_encode", lambda self: (lambda text: [1, 2, 3]))
    with pytest.raises(DataError, match="tiktoken encoder gives other ids .* LMFORGE_ENCODER=hf"):
        prepare([str(src)], tmp_path / "out", tokenizer_dir=tok, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_in_jsonl_is_replaced_and_counted(tmp_path):
    """Before: the encoder raised TypeError on JSON's "\\ud800" escape and prepare died with a traceback."""
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "broken \\ud800 surrogate"}\n' + "".join(
        json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(20)), encoding="utf-8")
    prepare([str(src)], tmp_path / "out", tokenizer="char", show_progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["modified"]["lone_surrogates_replaced"]["count"] == 1
    docs = [d.text for d in iter_documents([str(src)])]
    assert "\ud800" in docs[0]  # the reader hands it on; cleaning replaces it
    reader_texts = []
    from data_prep import load_tokenizer
    tok = load_tokenizer(tmp_path / "out")
    for split in ("train", "val"):
        r = TokenReader(tmp_path / "out", split)
        reader_texts += [tok.decode(r.document(i)) for i in range(r.num_docs)]
    assert "broken \ufffd surrogate" in reader_texts


# ---- file discovery: glob's answer, without entering excluded trees --------------------------------------

def test_file_discovery_equals_glob_and_skips_excluded_trees(tmp_path, monkeypatch):
    import glob
    import os

    from data_prep.sources import _expand, list_files
    for name in ["a/b/c.py", "a/.h/x.py", ".top.py", "a/.hid.py", "z/[x].txt", "a/b/d/e.txt", "q/a1.py", "q/ab.py",
                 "a-b/c.py", "a/b-c.py", "big/site-packages/p/m.py", "big/keep.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / "a" / "b", tmp_path / "link")
    os.symlink(tmp_path / "missing", tmp_path / "a" / "broken.py")
    for pattern in ["**", "**/*.py", "*/*", "a/**/*.txt", ".*", "**/.*", "q/a?.py", "q/a[!b].py", "z/*", "a/.h/*.py",
                    "*/.*", "**/b/**"]:
        spec = f"{tmp_path}/{pattern}"
        expected = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        assert _expand(spec, []) == expected, pattern
    assert _expand(str(tmp_path), []) == sorted(p for p in tmp_path.rglob("*") if p.is_file())
    entered = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda d: entered.append(str(d)) or real_scandir(d))
    files = list_files([f"{tmp_path}/**/*.py"], ["*/site-packages/*"])
    assert tmp_path / "big" / "keep.py" in files and not any("site-packages" in str(f) for f in files)
    assert not any("site-packages" in d for d in entered)  # the excluded tree was never listed
