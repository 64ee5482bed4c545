"""Issue 11 "Trust": damaged datasets end in one `error: ...` line naming the file, never a traceback,
shard paths stay inside the dataset, and every shard's checksum and token ids are checked when a run
opens it."""
import hashlib
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

import data_prep.shards as shards
from data_prep import CharTokenizer, DataError, ShardWriter, TokenReader, load_tokenizer, prepare, read_meta

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.eval_sequences=4", "train.max_steps=2", "log.progress=false", "train.device=cpu", "data.url="]


@pytest.fixture(scope="module")
def char_data(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "char"
    prepare([str(tiny_corpus)], out, tokenizer="char", show_progress=False)
    return out


def copy_of(src, dst, edit=None):
    """A copy of the dataset `src` at `dst`, its meta.json changed by `edit(meta)`."""
    shutil.copytree(src, dst)
    if edit is not None:
        meta = json.loads((dst / "meta.json").read_text())
        edit(meta)
        (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def shard_tokens(path):
    return np.fromfile(path, dtype="<u2")


def swap_two_tokens(path):
    """Same size, every id still in the vocabulary: only a checksum can tell."""
    ids = shard_tokens(path)
    i = int(np.flatnonzero(ids[:-1] != ids[1:])[0])
    ids[i], ids[i + 1] = ids[i + 1], ids[i]
    ids.tofile(path)


def refresh_checksums(data_dir):
    """Record the shards' current checksums in meta.json, as a buggy preparer would have."""
    meta = json.loads((data_dir / "meta.json").read_text())
    for entry in meta["splits"].values():
        for s in entry["shards"]:
            data = (data_dir / s["file"]).read_bytes()
            s["sha256"] = hashlib.sha256(data).hexdigest()
            s["crc32"] = f"{zlib.crc32(data):08x}"
    (data_dir / "meta.json").write_text(json.dumps(meta))


def assert_one_line(error: pytest.ExceptionInfo, *fragments):
    msg = str(error.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


# ---------------------------------------------------------------- A: meta.json schema

def _set(path, value):
    def edit(meta):
        obj = meta
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def _drop_file(meta):
    del meta["splits"]["train"]["shards"][0]["file"]


@pytest.mark.parametrize("edit, field", [
    pytest.param(_set(["vocab_size"], 2**45), "vocab_size", id="vocab-2**45"),
    pytest.param(_set(["vocab_size"], -3), "vocab_size", id="vocab-negative"),
    pytest.param(_set(["vocab_size"], "65"), "vocab_size", id="vocab-string"),
    pytest.param(_set(["vocab_size"], 70000), "uint16", id="vocab-beyond-uint16"),
    pytest.param(_set(["eos_id"], 2**40), "eos_id", id="eos-2**40"),
    pytest.param(_set(["eos_id"], -1), "eos_id", id="eos-negative"),
    pytest.param(lambda m: m.update(eos_id=m["vocab_size"]), "eos_id", id="eos-equals-vocab"),
    pytest.param(_set(["splits"], ["train"]), "splits", id="splits-list"),
    pytest.param(_set(["tokenizer"], "chars.json"), "tokenizer", id="tokenizer-string"),
    pytest.param(_set(["splits", "train", "shards"], "train_00000.bin"), "splits.train.shards", id="shards-string"),
    pytest.param(_drop_file, "splits.train.shards[0].file", id="shard-without-file"),
    pytest.param(_set(["splits", "train", "shards", 0, "tokens"], "12"), "splits.train.shards[0].tokens",
                 id="tokens-string"),
    pytest.param(_set(["splits", "train", "shards", 0, "docs"], 1.5), "splits.train.shards[0].docs", id="docs-float"),
    pytest.param(_set(["splits", "train", "shards", 0, "file"], 7), "splits.train.shards[0].file", id="file-int"),
])
def test_damaged_meta_json_names_the_field(char_data, tmp_path, edit, field):
    data = copy_of(char_data, tmp_path / "d", edit)
    with pytest.raises(DataError) as e:
        read_meta(data)
    assert_one_line(e, str(data / "meta.json"), field)
    with pytest.raises(DataError):  # and so does everything that opens the dataset
        TokenReader(data, "train")


def test_meta_vocab_disagreeing_with_the_tokenizer_is_refused(char_data, tmp_path):
    data = copy_of(char_data, tmp_path / "d", lambda m: m.update(vocab_size=m["vocab_size"] + 1))
    with pytest.raises(DataError) as e:
        load_tokenizer(data)
    assert_one_line(e, str(data / "meta.json"), "vocab_size")


@pytest.mark.parametrize("content, fragment", [
    pytest.param({"kind": "char", "chars": ["a", 1, "b"]}, "entry 1", id="non-string"),
    pytest.param({"kind": "char", "chars": ["a", "b", "a"]}, "'a'", id="duplicate"),
    pytest.param({"kind": "char", "chars": ["a", "bc"]}, "'bc'", id="multi-char"),
    pytest.param({"kind": "char", "chars": "abc"}, "chars", id="chars-string"),
    pytest.param(["a", "b"], "kind", id="top-level-list"),
])
def test_damaged_chars_json_names_the_file(tmp_path, content, fragment):
    (tmp_path / "chars.json").write_text(json.dumps(content))
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path)
    assert_one_line(e, str(tmp_path / "chars.json"), fragment)


# ---------------------------------------------------------------- B: paths stay inside the dataset

@pytest.mark.parametrize("name", ["../../x.bin", "sub/../../x.bin", "ABSOLUTE"])
def test_shard_paths_outside_the_dataset_are_refused(char_data, tmp_path, name):
    data = tmp_path / "a" / "b" / "d"
    shutil.copytree(char_data, data)
    outside = tmp_path / "x.bin"  # exists with the right size: today it would simply be read
    shutil.copy(data / "train_00000.bin", outside)
    if name == "ABSOLUTE":
        name = str(outside)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["file"] = name
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        TokenReader(data, "train")
    assert_one_line(e, str(data / "meta.json"), "splits.train.shards[0].file", repr(name))


def test_symlinked_shard_leaving_the_dataset_is_refused(char_data, tmp_path):
    data = copy_of(char_data, tmp_path / "d")
    outside = tmp_path / "elsewhere.idx"
    (data / "val_00000.idx").rename(outside)
    (data / "val_00000.idx").symlink_to(outside)
    with pytest.raises(DataError) as e:
        TokenReader(data, "val")
    assert_one_line(e, str(data / "meta.json"), "splits.val.shards[0].index", "outside")


def test_tokenizer_file_outside_the_dataset_is_refused(char_data, tmp_path):
    data = tmp_path / "a" / "d"
    shutil.copytree(char_data, data)
    shutil.copy(data / "chars.json", tmp_path / "a" / "chars.json")
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer"]["file"] = "../chars.json"
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        read_meta(data)
    assert_one_line(e, str(data / "meta.json"), "tokenizer.file", "'../chars.json'")


# ---------------------------------------------------------------- C: checksums and token ranges at open

def test_prepare_records_a_crc32_beside_the_sha256(char_data):
    meta = read_meta(char_data)
    for entry in meta["splits"].values():
        for s in entry["shards"]:
            data = (char_data / s["file"]).read_bytes()
            assert s["crc32"] == f"{zlib.crc32(data):08x}"
            assert s["sha256"] == hashlib.sha256(data).hexdigest()


def test_same_size_corrupt_shard_is_refused_at_open(char_data, tmp_path):
    data = copy_of(char_data, tmp_path / "d")
    swap_two_tokens(data / "train_00000.bin")
    TokenReader(data, "val")  # the other split is intact
    with pytest.raises(DataError) as e:
        TokenReader(data, "train")
    assert_one_line(e, f"{data / 'train_00000.bin'}: checksum mismatch", "crc32")


def test_old_meta_without_crc32_is_checked_by_its_sha256(char_data, tmp_path):
    def drop_crc(meta):
        for s in meta["splits"]["train"]["shards"]:
            s.pop("crc32", None)
    data = copy_of(char_data, tmp_path / "d", drop_crc)
    TokenReader(data, "train")  # an old dataset still opens
    swap_two_tokens(data / "train_00000.bin")
    with pytest.raises(DataError) as e:
        TokenReader(data, "train")
    assert_one_line(e, f"{data / 'train_00000.bin'}: checksum mismatch", "sha256")


def test_out_of_vocabulary_id_is_refused_with_its_position(char_data, tmp_path):
    data = copy_of(char_data, tmp_path / "d")
    vocab = read_meta(data)["vocab_size"]
    ids = shard_tokens(data / "train_00000.bin")
    ids[100], ids[200] = vocab, vocab + 5
    ids.tofile(data / "train_00000.bin")
    refresh_checksums(data)
    with pytest.raises(DataError) as e:
        TokenReader(data, "train")
    assert_one_line(e, f"{data / 'train_00000.bin'}: token id {vocab} >= vocab_size {vocab} at position 100")


def test_range_check_spans_chunks_and_uint32(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SCAN_CHUNK", 16)  # several chunks; the bad id is in the third
    w = ShardWriter(tmp_path, "train", "uint32", eos_id=0)
    w.add_document(list(range(1, 40)) + [70000] + [5, 6])
    entry = w.close()
    meta = {"format_version": 1, "dtype": "uint32", "vocab_size": 70000, "eos_id": 0,
            "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "sha256": ""}, "splits": {"train": entry}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        TokenReader(tmp_path, "train")
    assert_one_line(e, "train_00000.bin: token id 70000 >= vocab_size 70000 at position 39")


def test_each_shard_is_scanned_once_per_process_until_it_changes(char_data, tmp_path, monkeypatch):
    data = copy_of(char_data, tmp_path / "d")
    scanned = []
    real = shards.scan_tokens
    monkeypatch.setattr(shards, "scan_tokens", lambda tokens, *a: scanned.append(Path(tokens.filename).name) or real(tokens, *a))
    TokenReader(data, "train")
    TokenReader(data, "train")  # the trainer opens a split several times
    TokenReader(data, "val")
    assert scanned == ["train_00000.bin", "val_00000.bin"]
    swap_two_tokens(data / "train_00000.bin")  # changed on disk: checked again
    with pytest.raises(DataError, match="checksum mismatch"):
        TokenReader(data, "train")


# ---------------------------------------------------------------- train.py: one line, exit 2

def train(cli, data_dir, run_dir):
    return cli("train.py", "configs/shakespeare_char.toml", *TINY, f"data.dir={data_dir}",
               f"train.out_dir={run_dir}")


def assert_cli_error(result, text):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {text}"), result.stderr


@pytest.mark.slow
def test_training_refuses_a_same_size_corrupt_shard(cli, char_data, tmp_path):
    data = copy_of(char_data, tmp_path / "d")
    swap_two_tokens(data / "train_00000.bin")
    assert_cli_error(train(cli, data, tmp_path / "r"), f"{data / 'train_00000.bin'}: checksum mismatch")


@pytest.mark.slow
def test_training_refuses_out_of_vocabulary_ids(cli, char_data, tmp_path):
    data = copy_of(char_data, tmp_path / "d")
    vocab = read_meta(data)["vocab_size"]
    ids = shard_tokens(data / "train_00000.bin")
    ids[::8] = vocab  # in every window, so training today hits it: IndexError in the embedding
    ids.tofile(data / "train_00000.bin")
    refresh_checksums(data)
    assert_cli_error(train(cli, data, tmp_path / "r"),
                     f"{data / 'train_00000.bin'}: token id {vocab} >= vocab_size {vocab} at position 0")


# ---------------------------------------------------------------- D: one SplitMix64

def test_one_splitmix64_with_unchanged_outputs():
    import data_prep.dedup
    import lm.data.batches
    from data_prep.hashing import mix64, splitmix64
    assert lm.data.batches.splitmix64 is splitmix64 and data_prep.dedup.mix64 is mix64
    x = np.array([0, 1, 2, 12345, 2**63, 2**64 - 1], dtype=np.uint64)
    # values of the two former copies (lm/data/batches.py's splitmix64, data_prep/dedup.py's finalizer)
    assert splitmix64(x).tolist() == [16294208416658607535, 10451216379200822465, 10905525725756348110,
                                      2454886589211414944, 5196802822362493915, 16490336266968443936]
    assert mix64(x).tolist() == [0, 6238072747940578789, 15839785061582574730, 17540659726606785873,
                                 2720858781877447050, 13029008266876403067]
    sig = data_prep.MinHasher().signature("the quick brown fox jumps over the lazy dog again and again")
    # one-permutation MinHash since issue 17 (before: [20308534, 643606737, 1031656216, 7586890, ...])
    assert sig[:6].tolist() == [136684355, 1777215890, 3417747425, 763311664, 1014442947, 2654974482]

    class Reader:
        num_tokens = 1000
    assert lm.data.batches.SampleStream(Reader(), 32, 1337, "x").starts(0, 8).tolist() == [706, 422, 708, 790, 353, 640,
                                                                                     113, 428]

