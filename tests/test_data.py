"""Input pipelines: sources, splits, determinism, resumable iterators, ArrayRecord build."""
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


def test_worker_processes_give_the_same_batches_and_resume(text_dir):
  train, _ = data.splits(_data_cfg("text", str(text_dir)), seq_len=8, global_batch=4)
  inline = _take(iter(data.loader(train, 4, seed=0, shuffle=True)), 5)
  workers = iter(data.loader(train, 4, seed=0, shuffle=True, workers=2))
  np.testing.assert_array_equal(np.stack(_take(workers, 4)), np.stack(inline[:4]))
  resumed = iter(data.loader(train, 4, seed=0, shuffle=True, workers=2))
  resumed.set_state(workers.get_state())
  np.testing.assert_array_equal(next(resumed), inline[4])
