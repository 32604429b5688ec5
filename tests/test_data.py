"""Data: packing with segment ids, sources, per-process rows, resumable iterator state."""

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lasp2_jax import data as D
from lasp2_jax.mesh import make_mesh


def _stream(n_docs=40, eos=0):
    rng = np.random.default_rng()
    docs = [rng.integers(1, 50, rng.integers(3, 40)) for _ in range(n_docs)]
    return np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint32), docs


def test_windows_pack_documents_with_segment_ids():
    stream, _ = _stream()
    w = D.Windows(stream, seq_len=32, eos_id=0)
    assert len(w) == (len(stream) - 1) // 32
    i = np.random.randint(len(w))
    item = w[i]
    np.testing.assert_array_equal(item["inputs"], stream[i * 32:(i + 1) * 32])
    np.testing.assert_array_equal(item["targets"], stream[i * 32 + 1:(i + 1) * 32 + 1])
    seg, inp = item["segment_ids"], item["inputs"]
    for t in range(1, 32):  # a new document starts right after each eos, nowhere else
        assert seg[t] - seg[t - 1] == int(inp[t - 1] == 0)
    assert seg[0] == 0
    np.testing.assert_array_equal(item["weights"], (inp != 0).astype(np.float32))


def test_masked_lm_windows_are_unshifted():
    stream, _ = _stream()
    item = D.Windows(stream, seq_len=16, eos_id=0, shift=False)[3]
    np.testing.assert_array_equal(item["inputs"], item["targets"])
    np.testing.assert_array_equal(item["inputs"], stream[48:64])


def test_eval_split_holds_out_whole_documents():
    stream, docs = _stream(100)
    train, held = D.split_stream(stream, 0.1, eos_id=0)
    assert len(train) + len(held) == len(stream) and train[-1] == 0
    assert 0.05 * len(stream) < len(held) <= 0.1 * len(stream)
    assert held[-1] == 0  # the held-out part is whole documents
    np.testing.assert_array_equal(np.concatenate([train, held]), stream)
    assert D.split_stream(stream, 0.0, 0)[1] is None


def test_stdlib_corpus_is_bytes_one_document_per_file():
    cfg = D.DataConfig(max_documents=20)
    stream = D.load_stream(cfg)
    files = D.stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert int((stream == 0).sum()) == 20 and stream.max() < 256
    with open(files[0], "rb") as f:
        first = f.read()
    assert bytes(stream[: len(first)].astype(np.uint8)) == first
    assert 2.0 < D.unigram_entropy(stream) < 5.5


@pytest.mark.parametrize("dtype,ext", [("uint16", ".bin"), ("uint32", ".bin"), ("uint32", ".npy")])
def test_token_files(tmp_path, dtype, ext):
    stream, _ = _stream()
    stream = (stream * 1000).astype(dtype)  # ids beyond a byte
    path = str(tmp_path / f"tok{ext}")
    if ext == ".npy":
        np.save(path, stream)
    else:
        stream.tofile(path)
    cfg = D.DataConfig(source="tokens", path=path, token_dtype=dtype, seq_len=16, batch_size=2)
    np.testing.assert_array_equal(np.asarray(D.load_stream(cfg)), stream)
    batch = next(D.BatchIterator(cfg.validate(), (0, 2)))
    assert batch["inputs"].shape == (2, 16) and batch["inputs"].max() < 50_000


def test_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = ["def foo(x):\n    return x + 1\n", "class Bar:\n    pass\n"] * 20
    for i, t in enumerate(texts[:2]):
        (tmp_path / f"doc{i}.txt").write_text(t)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120,
                                                       special_tokens=["[EOS]", "[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = D.DataConfig(source="text", path=str(tmp_path / "*.txt"),
                       tokenizer=str(tmp_path / "tokenizer.json"), eos_id=0).validate()
    stream = D.load_stream(cfg)
    ids0 = tok.encode(texts[0], add_special_tokens=False).ids
    np.testing.assert_array_equal(stream[: len(ids0)], ids0)
    assert stream[len(ids0)] == 0 and int((stream == 0).sum()) == 2
    assert D.vocab_size_needed(cfg) == tok.get_vocab_size()


def test_iterator_state_resumes_exactly():
    stream, _ = _stream(200)
    cfg = D.DataConfig(source="tokens", path="unused", seq_len=16, batch_size=4,
                       seed=np.random.randint(1000), num_threads=2)
    it = D.BatchIterator(cfg, (0, 4), stream=stream)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    again = D.BatchIterator(cfg, (0, 4), stream=stream)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_process_rows_partition_the_global_batch():
    """Row blocks of the processes together give the global batch, in order, and each
    process reads only its rows."""
    stream, _ = _stream(200)
    cfg = D.DataConfig(source="tokens", path="unused", seq_len=8, batch_size=6, seed=3,
                       num_threads=0)
    full = next(D.BatchIterator(cfg, (0, 6), stream=stream))
    parts = [next(D.BatchIterator(cfg, r, stream=stream)) for r in ((0, 2), (2, 4), (4, 6))]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), full["inputs"])
    # One process holding every device holds all rows.
    sh = NamedSharding(make_mesh(dp=2, sp=2, tp=2), PartitionSpec("dp", "sp"))
    assert D.process_rows(sh, (6, 8)) == (0, 6)


def test_epochs_reshuffle_and_cover_every_window():
    stream, _ = _stream(60)
    cfg = D.DataConfig(source="tokens", path="unused", seq_len=8, batch_size=1, num_threads=0)
    it = D.BatchIterator(cfg, (0, 1), stream=stream)
    n = len(it.windows)
    seen = [tuple(next(it)["inputs"][0]) for _ in range(2 * n)]
    every = {tuple(it.windows[i]["inputs"]) for i in range(n)}
    assert set(seen[:n]) == every and set(seen[n:]) == every
    assert seen[:n] != seen[n:]


@pytest.mark.parametrize("kw,needle", [
    (dict(source="web"), "DataConfig.source"),
    (dict(source="tokens"), "DataConfig.path"),
    (dict(token_dtype="int8"), "DataConfig.token_dtype"),
    (dict(seq_len=0), "DataConfig.seq_len"),
    (dict(tokenizer="/nonexistent/tokenizer.json"), "DataConfig.tokenizer"),
])
def test_bad_data_config_names_setting(kw, needle):
    with pytest.raises(ValueError, match=needle):
        D.DataConfig(**kw).validate()
