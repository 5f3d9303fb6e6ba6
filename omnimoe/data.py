"""Input pipelines (grain): byte-level text corpora and ArrayRecord files of token ids.

Every source is one stream of token ids cut into windows of `seq_len + 1` tokens (inputs
`w[:-1]`, targets `w[1:]`). The last `data.val_fraction` of the stream is held out for
validation, so one rule serves a folder of one file as well as a corpus of thousands.

  builtin      the Python standard library's own `.py` files (sorted, read as bytes):
               offline, no download; the vocabulary is the 256 byte values.
  text         every file under `data.path` (sorted, hidden files skipped), as bytes.
  arrayrecord  ArrayRecord files (`data.path`: a file, a glob, a folder or a comma-separated
               list) whose records are consecutive chunks of the stream, each a little-endian
               int32 array; `python -m omnimoe.data build --input DIR --output FILE` writes
               them from a text folder.

Training windows are shuffled by `train.seed` (afresh each epoch), repeated without end and
dealt out to the processes (`jax.process_index()`), so the batch at each step is fixed by the
seed and the step; the iterator's state goes into the checkpoint and a resumed run reads the
exact next batch.
"""
from __future__ import annotations

import argparse
import glob
import os
import sysconfig

import grain
import jax
import numpy as np

from omnimoe.config import ConfigError

SOURCES = ("builtin", "text", "arrayrecord")
BYTE_VOCAB = 256  # byte-level sources use token ids 0..255


def builtin_files() -> list[str]:
  """The standard library's `.py` files (site-packages excluded), sorted: fixed per Python."""
  root = sysconfig.get_paths()["stdlib"]
  files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  installed = {"site-packages", "dist-packages"}
  return sorted(f for f in files if not installed & set(f.split(os.sep)))


def text_files(path: str) -> list[str]:
  """All regular files under `path` (or `path` itself), sorted, hidden names skipped."""
  if os.path.isfile(path):
    return [path]
  found = []
  for root, dirs, names in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [os.path.join(root, n) for n in names if not n.startswith(".")]
  return sorted(f for f in found if os.path.isfile(f))


def read_bytes(files: list[str]) -> np.ndarray:
  """The files' bytes concatenated in order, as one uint8 token stream."""
  chunks = []
  for f in files:
    with open(f, "rb") as fh:
      chunks.append(fh.read())
  return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def arrayrecord_files(path: str) -> list[str]:
  """Expand `data.path` for ArrayRecord: comma-separated entries, each a file, glob or folder."""
  files = []
  for entry in path.split(","):
    entry = entry.strip()
    if os.path.isdir(entry):
      files += sorted(glob.glob(os.path.join(entry, "*.array_record*")))
    else:
      files += sorted(glob.glob(entry))
  return files


class ArrayRecordTokens:
  """A token stream stored as ArrayRecord chunks, sliced like a 1-D array (random access)."""

  def __init__(self, files: list[str]):
    self._records = grain.sources.ArrayRecordDataSource(files)
    n = len(self._records)
    self._chunk = len(self._chunk_at(0))
    self._len = (n - 1) * self._chunk + len(self._chunk_at(n - 1))

  def _chunk_at(self, i: int) -> np.ndarray:
    return np.frombuffer(self._records[i], dtype="<i4")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, s: slice) -> np.ndarray:
    first, last = s.start // self._chunk, (s.stop - 1) // self._chunk
    parts = np.concatenate([self._chunk_at(i) for i in range(first, last + 1)])
    offset = first * self._chunk
    return parts[s.start - offset:s.stop - offset]


class TokenWindows(grain.sources.RandomAccessDataSource):
  """Windows `[i*L, i*L + L + 1)` of a token stream, for window ids in `[start, stop)`."""

  def __init__(self, tokens, seq_len: int, start: int, stop: int):
    self._tokens, self._seq_len, self._start, self._stop = tokens, seq_len, start, stop

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int) -> np.ndarray:
    begin = (self._start + index) * self._seq_len
    return np.asarray(self._tokens[begin:begin + self._seq_len + 1], dtype=np.int32)

  def __repr__(self) -> str:
    return f"TokenWindows(seq_len={self._seq_len}, windows=[{self._start}, {self._stop}))"


def load_stream(data_cfg):
  """The configured token stream (1-D, sliceable); a missing or empty path is a ConfigError."""
  if data_cfg.source not in SOURCES:
    raise ConfigError(f"data.source={data_cfg.source!r}: must be one of {SOURCES}")
  if data_cfg.source == "builtin":
    return read_bytes(builtin_files())
  path = data_cfg.path
  if not path:
    raise ConfigError(f"data.path is empty: data.source={data_cfg.source!r} needs a path")
  if data_cfg.source == "text":
    if not os.path.exists(path):
      raise ConfigError(f"data.path={path!r}: no such file or folder")
    tokens = read_bytes(text_files(path))
  else:
    files = arrayrecord_files(path)
    if not files:
      raise ConfigError(f"data.path={path!r}: no ArrayRecord files found")
    tokens = ArrayRecordTokens(files)
  if not len(tokens):
    raise ConfigError(f"data.path={path!r}: holds no tokens")
  return tokens


def splits(data_cfg, seq_len: int, global_batch: int) -> tuple[TokenWindows, TokenWindows]:
  """Train and validation windows: the last `val_fraction` of the stream is validation."""
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={data_cfg.val_fraction}: must lie in (0, 1)")
  tokens = load_stream(data_cfg)
  windows = (len(tokens) - 1) // seq_len
  n_val = int(round(windows * data_cfg.val_fraction))
  train, val = (TokenWindows(tokens, seq_len, 0, windows - n_val),
                TokenWindows(tokens, seq_len, windows - n_val, windows))
  for name, part in (("training", train), ("validation", val)):
    if len(part) < global_batch:
      raise ConfigError(
          f"data.val_fraction={data_cfg.val_fraction}: the {name} split has {len(part)} "
          f"windows of train.seq_len={seq_len}, fewer than train.batch_size={global_batch} "
          f"(the stream has {len(tokens)} tokens)")
  return train, val


def loader(source: TokenWindows, global_batch: int, *, seed: int, shuffle: bool,
           workers: int = 0) -> grain.IterDataset:
  """Endless batches of this process's rows of each global batch: (B / P, L + 1) int32.

  Global batch s holds windows s*B .. s*B + B - 1 of the (per-epoch reshuffled) window order;
  process p takes every P-th of them. So each batch is a function of the seed and the step
  alone, whatever the number of processes or worker processes.
  """
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)
  count = jax.process_count()
  ds = ds.repeat()[jax.process_index()::count].batch(global_batch // count, drop_remainder=True)
  ds = ds.to_iter_dataset()
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def build_arrayrecord(input_path: str, output: str, chunk_tokens: int) -> int:
  """Write the byte stream of a text folder as ArrayRecord chunks; returns the token count."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tokens = read_bytes(text_files(input_path)).astype("<i4")
  if not tokens.size:
    raise ValueError(f"--input={input_path!r}: holds no text files")
  writer = ArrayRecordWriter(output, "group_size:1")
  for start in range(0, tokens.size, chunk_tokens):
    writer.write(tokens[start:start + chunk_tokens].tobytes())
  writer.close()
  return int(tokens.size)


def main(argv=None) -> None:
  """`python -m omnimoe.data build --input DIR --output FILE [--chunk_tokens N]`."""
  parser = argparse.ArgumentParser(prog="python -m omnimoe.data")
  commands = parser.add_subparsers(dest="command", required=True)
  build = commands.add_parser("build", help="tokenize a text folder (bytes) into ArrayRecord")
  build.add_argument("--input", required=True, help="folder (or file) of text")
  build.add_argument("--output", required=True, help="ArrayRecord file to write")
  build.add_argument("--chunk_tokens", type=int, default=65536, help="tokens per record")
  args = parser.parse_args(argv)
  n = build_arrayrecord(args.input, args.output, args.chunk_tokens)
  print(f"wrote {n} tokens to {args.output}")


if __name__ == "__main__":
  main()
