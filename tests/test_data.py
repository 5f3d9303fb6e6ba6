"""Input pipelines: sources, splits, determinism, resumable iterators, ArrayRecord build."""
import tracemalloc

import grain
import ml_collections
import numpy as np
import pytest

from omnimoe import data
from omnimoe.config import ConfigError


def _data_cfg(source="builtin", path="", val_fraction=0.1):
  return ml_collections.ConfigDict(dict(source=source, path=path, val_fraction=val_fraction,
                                        workers=0))


@pytest.fixture
def text_dir(tmp_path):
  """A folder of three text files (one nested, one hidden that must be skipped)."""
  tmp_path = tmp_path / "texts"
  (tmp_path / "sub").mkdir(parents=True)
  (tmp_path / "b.txt").write_bytes(b"second file " * 40)
  (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 2)
  (tmp_path / "sub" / "c.py").write_bytes(b"print('third')\n" * 30)
  (tmp_path / ".hidden").write_bytes(b"never read")
  return tmp_path


def test_builtin_corpus_is_sorted_python_source():
  files = data.builtin_files()
  assert len(files) > 100 and files == sorted(files)
  assert all(f.endswith(".py") and "site-packages" not in f for f in files)


def test_text_folder_stream_and_windows(text_dir):
  expected = ((bytes(range(256)) * 2) + b"second file " * 40 + b"print('third')\n" * 30)
  tokens = data.load_stream(_data_cfg("text", str(text_dir)))
  assert bytes(tokens) == expected
  train, val = data.splits(_data_cfg("text", str(text_dir), 0.25), seq_len=16, global_batch=2)
  windows = (len(expected) - 1) // 16
  assert len(train) + len(val) == windows and len(val) == round(windows * 0.25)
  np.testing.assert_array_equal(train[1], np.frombuffer(expected[16:33], np.uint8))
  np.testing.assert_array_equal(val[0], np.frombuffer(
      expected[len(train) * 16:len(train) * 16 + 17], np.uint8))
  assert train[0].dtype == np.int32 and train[0].shape == (17,)


def test_arrayrecord_build_matches_text_stream(text_dir, tmp_path):
  out = tmp_path / "corpus.array_record"
  data.main(["build", "--input", str(text_dir), "--output", str(out), "--chunk_tokens", "7"])
  text = data.load_stream(_data_cfg("text", str(text_dir)))
  stream = data.load_stream(_data_cfg("arrayrecord", str(out)))
  assert len(stream) == len(text)
  for start, stop in ((0, 7), (5, 30), (len(text) - 9, len(text))):  # across chunk borders
    np.testing.assert_array_equal(stream[start:stop], text[start:stop])


@pytest.mark.parametrize("source,path,match", [
    ("text", "/no/such/folder", "data.path='/no/such/folder': no such file"),
    ("arrayrecord", "/no/such/*.array_record", "data.path=.*no ArrayRecord files"),
    ("text", "", "data.path is empty"),
    ("parquet", "", "data.source='parquet'"),
])
def test_bad_source_names_the_field(source, path, match):
  with pytest.raises(ConfigError, match=match):
    data.splits(_data_cfg(source, path), seq_len=16, global_batch=2)


def test_split_too_small_names_the_fields(text_dir):
  with pytest.raises(ConfigError, match="data.val_fraction=.*train.batch_size=64"):
    data.splits(_data_cfg("text", str(text_dir)), seq_len=16, global_batch=64)
  with pytest.raises(ConfigError, match="data.val_fraction=1.5"):
    data.splits(_data_cfg("text", str(text_dir), 1.5), seq_len=16, global_batch=2)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_loader_is_deterministic_and_resumes_exactly(text_dir):
  train, _ = data.splits(_data_cfg("text", str(text_dir)), seq_len=8, global_batch=4)
  make = lambda seed: iter(data.loader(train, 4, seed=seed, shuffle=True))
  first, again, other = _take(make(0), 6), _take(make(0), 6), _take(make(1), 6)
  assert all(b.shape == (4, 9) and b.dtype == np.int32 for b in first)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))

  it = make(0)
  _take(it, 3)
  state = it.get_state()
  resumed = make(0)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 3)), np.stack(first[3:]))


def test_each_epoch_is_a_fresh_permutation_of_the_windows():
  windows, seq_len, batch = 24, 4, 4
  source = data.TokenWindows(np.arange(windows * seq_len + 1), seq_len, 0, windows)
  batches = _take(iter(data.loader(source, batch, seed=0, shuffle=True)), 2 * windows // batch)
  order = np.concatenate([b[:, 0] // seq_len for b in batches])  # window ids, as drawn
  first, second = order[:windows], order[windows:]
  np.testing.assert_array_equal(np.sort(first), np.arange(windows))
  np.testing.assert_array_equal(np.sort(second), np.arange(windows))
  assert not np.array_equal(first, second)  # reshuffled, not repeated
  assert not np.array_equal(first, np.arange(windows))  # shuffled at all


def test_worker_processes_give_the_same_batches_and_resume(text_dir):
  train, _ = data.splits(_data_cfg("text", str(text_dir)), seq_len=8, global_batch=4)
  inline = _take(iter(data.loader(train, 4, seed=0, shuffle=True)), 5)
  workers = iter(data.loader(train, 4, seed=0, shuffle=True, workers=2))
  np.testing.assert_array_equal(np.stack(_take(workers, 4)), np.stack(inline[:4]))
  resumed = iter(data.loader(train, 4, seed=0, shuffle=True, workers=2))
  resumed.set_state(workers.get_state())
  np.testing.assert_array_equal(next(resumed), inline[4])


def _rng():
  """A fresh generator and its seed (named in failure messages to replay a run)."""
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _write_records(path, records):
  """An ArrayRecord file holding `records` (int arrays) as written, lengths unchecked."""
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(np.asarray(record, "<i4").tobytes())
  writer.close()


def test_arrayrecord_files_of_different_sizes_read_as_one_stream(tmp_path):
  rng, seed = _rng()
  shards, texts = tmp_path / "shards", []
  shards.mkdir()
  for i, chunk in enumerate((7, 5, 11)):  # each file a short last chunk, chunks differ
    size = chunk * int(rng.integers(2, 6)) + int(rng.integers(1, chunk))
    texts.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    (tmp_path / f"text{i}").write_bytes(texts[-1])
    assert data.build_arrayrecord(str(tmp_path / f"text{i}"),
                                  str(shards / f"part-{i}.array_record"), chunk) == size
  expected = np.frombuffer(b"".join(texts), np.uint8)
  n, first, second = len(expected), len(texts[0]), len(texts[0]) + len(texts[1])
  files = ",".join(str(shards / f"part-{i}.array_record") for i in range(3))
  for path in (str(shards), files, str(shards / "part-*.array_record")):
    stream = data.load_stream(_data_cfg("arrayrecord", path))
    assert len(stream) == n, f"seed {seed}"
    spans = [(0, n), (first - 3, first + 2), (first - 1, second + 1), (second, n)]
    spans += [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(200)]
    for start, stop in spans:
      np.testing.assert_array_equal(stream[start:stop], expected[start:stop],
                                    err_msg=f"seed {seed}, slice [{start}:{stop}]")
  train, val = data.splits(_data_cfg("arrayrecord", files, 0.3), seq_len=4, global_batch=2,
                           vocab_size=256)
  last = len(train) + len(val) - 1
  np.testing.assert_array_equal(val[len(val) - 1], expected[last * 4:last * 4 + 5])


@pytest.mark.parametrize("lengths,match", [
    ((5, 3, 5, 2), r"bad.array_record: record 1 holds 3 tokens, expected 5"),
    ((3, 5), r"bad.array_record: record 0 holds 3 tokens and the last record 1 holds 5"),
])
def test_arrayrecord_records_of_unequal_length_are_an_error(tmp_path, lengths, match):
  _write_records(tmp_path / "bad.array_record", [np.arange(k) for k in lengths])
  with pytest.raises(ValueError, match=match):
    stream = data.load_stream(_data_cfg("arrayrecord", str(tmp_path / "bad.array_record")))
    stream[0:len(stream)]


def test_token_ids_outside_the_vocabulary_name_model_vocab_size(tmp_path):
  rng, seed = _rng()
  tokens = rng.integers(0, 256, 200)
  tokens[50] = 256  # inside training window 6 of seq_len 8, not a first window
  path = str(tmp_path / "ids.array_record")
  _write_records(path, [tokens[i:i + 16] for i in range(0, 200, 16)])
  cfg = _data_cfg("arrayrecord", path)
  train, _ = data.splits(cfg, seq_len=8, global_batch=2)  # unchecked without a vocabulary
  assert train[6].max() == 256
  train, _ = data.splits(cfg, seq_len=8, global_batch=2, vocab_size=256)
  with pytest.raises(ValueError, match=r"token id 256 at stream position 50 \(window 6\) "
                                       r"is outside model.vocab_size=256"):
    train[6]
  np.testing.assert_array_equal(train[5], tokens[40:49], err_msg=f"seed {seed}")
  tokens[3] = -1
  _write_records(path, [tokens[i:i + 16] for i in range(0, 200, 16)])
  with pytest.raises(ValueError, match=r"token id -1 .*\(window 0\).*model.vocab_size=256"):
    data.splits(cfg, seq_len=8, global_batch=2, vocab_size=256)  # fails before training


def test_arrayrecord_build_round_trips_and_streams(tmp_path):
  rng, seed = _rng()
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  sizes = [int(rng.integers(1, 4000)) for _ in range(4)] + [0, 2_000_003]
  texts = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]
  for i, text in enumerate(texts):
    (corpus / f"f{i}.txt").write_bytes(text)
  out = str(tmp_path / "corpus.array_record")
  tracemalloc.start()
  try:
    count = data.build_arrayrecord(str(corpus), out, 4099)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  expected = b"".join(texts)
  assert count == len(expected), f"seed {seed}"
  assert peak < 1_000_000, f"peak {peak} bytes: the builder must not hold the corpus"
  records = [np.frombuffer(r, "<i4") for r in grain.sources.ArrayRecordDataSource(out)]
  assert [len(r) for r in records[:-1]] == [4099] * (len(records) - 1)
  assert 0 < len(records[-1]) <= 4099
  assert np.concatenate(records).astype(np.uint8).tobytes() == expected, f"seed {seed}"
