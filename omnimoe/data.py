"""Input pipelines (grain): byte-level text corpora and ArrayRecord files of token ids.

Every source is one stream of token ids cut into windows of `seq_len + 1` tokens (inputs
`w[:-1]`, targets `w[1:]`). The last `data.val_fraction` of the stream is held out for
validation, so one rule serves a folder of one file as well as a corpus of thousands.

  builtin      the Python standard library's own `.py` files (sorted, read as bytes):
               offline, no download; the vocabulary is the 256 byte values.
  text         every file under `data.path` (sorted, hidden files skipped), as bytes.
  arrayrecord  ArrayRecord files (`data.path`: a file, a glob, a folder or a comma-separated
               list), read in order as one stream. Each record is a consecutive chunk of the
               stream, a little-endian int32 array; within one file every record holds the
               same number of tokens except the file's last, which may hold fewer (files may
               differ). `python -m omnimoe.data build --input DIR --output FILE` writes such a
               file from a text folder, streaming it chunk by chunk.

Training windows are shuffled by `train.seed` (afresh each epoch), repeated without end and
dealt out to the processes by the rows their devices hold (`loader`), so the batch at each
step is fixed by the seed and the step; the iterator's state goes into the checkpoint and a
resumed run reads the exact next batch. Given `model.vocab_size`, every window is checked to
hold ids in [0, vocab_size): an id outside it would otherwise train on garbage or give NaN.
"""
from __future__ import annotations

import argparse
import glob
import os
import sysconfig

import grain
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
  """A token stream stored as ArrayRecord chunks, sliced like a 1-D array (random access).

  Only each file's first and last record are read up front (their lengths give the file's
  token count); a record read later with another length than the format implies is a
  ValueError, so a broken file never yields shifted tokens.
  """

  def __init__(self, files: list[str]):
    self._files = list(files)
    self._sources = [grain.sources.ArrayRecordDataSource([f]) for f in self._files]
    self._counts = [len(src) for src in self._sources]
    self._chunks, self._lasts, sizes = [], [], []
    for f, n in enumerate(self._counts):
      chunk = last = 0
      if n:
        chunk = self._tokens_of(f, 0).size
        last = self._tokens_of(f, n - 1).size if n > 1 else chunk
        if not 0 < last <= chunk:
          raise ValueError(
              f"{self._files[f]}: record 0 holds {chunk} tokens and the last record "
              f"{n - 1} holds {last}; records must hold the same number of tokens (> 0), "
              "the file's last at most as many")
      self._chunks.append(chunk)
      self._lasts.append(last)
      sizes.append((n - 1) * chunk + last if n else 0)
    self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

  def _tokens_of(self, f: int, r: int) -> np.ndarray:
    raw = self._sources[f][r]
    if len(raw) % 4:
      raise ValueError(f"{self._files[f]}: record {r} holds {len(raw)} bytes, not whole "
                       "int32 tokens")
    return np.frombuffer(raw, dtype="<i4")

  def _record(self, f: int, r: int) -> np.ndarray:
    """Record `r` of file `f`, checked to hold the tokens the format says it holds."""
    tokens = self._tokens_of(f, r)
    expected = self._lasts[f] if r == self._counts[f] - 1 else self._chunks[f]
    if tokens.size != expected:
      raise ValueError(
          f"{self._files[f]}: record {r} holds {tokens.size} tokens, expected {expected}: "
          "within a file every record must hold the same number of tokens except the last")
    return tokens

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, s: slice) -> np.ndarray:
    start, stop, step = s.indices(len(self))
    if step != 1:
      raise ValueError(f"ArrayRecordTokens: slice step {step}: only contiguous slices")
    parts, pos = [], start
    while pos < stop:
      f = int(np.searchsorted(self._offsets, pos, side="right")) - 1
      local = pos - int(self._offsets[f])
      r, begin = divmod(local, self._chunks[f])
      record = self._record(f, r)
      parts.append(record[begin:begin + stop - pos])
      pos += parts[-1].size
    return np.concatenate(parts) if parts else np.zeros(0, "<i4")


class TokenWindows(grain.sources.RandomAccessDataSource):
  """Windows `[i*L, i*L + L + 1)` of a token stream, for window ids in `[start, stop)`.

  With `vocab_size`, each window returned is checked to hold ids in [0, vocab_size).
  """

  def __init__(self, tokens, seq_len: int, start: int, stop: int,
               vocab_size: int | None = None):
    self._tokens, self._seq_len, self._start, self._stop = tokens, seq_len, start, stop
    self._vocab_size = vocab_size

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int) -> np.ndarray:
    begin = (self._start + index) * self._seq_len
    window = np.asarray(self._tokens[begin:begin + self._seq_len + 1], dtype=np.int32)
    if self._vocab_size is not None:
      bad = np.flatnonzero((window < 0) | (window >= self._vocab_size))
      if bad.size:
        raise ValueError(
            f"token id {window[bad[0]]} at stream position {begin + bad[0]} (window "
            f"{self._start + index}) is outside model.vocab_size={self._vocab_size}")
    return window

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


def splits(data_cfg, seq_len: int, global_batch: int,
           vocab_size: int | None = None) -> tuple[TokenWindows, TokenWindows]:
  """Train and validation windows: the last `val_fraction` of the stream is validation.

  With `vocab_size`, every window is checked against it, and the first window of each split
  is read here so that a wrong vocabulary fails before compilation.
  """
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={data_cfg.val_fraction}: must lie in (0, 1)")
  tokens = load_stream(data_cfg)
  windows = (len(tokens) - 1) // seq_len
  n_val = int(round(windows * data_cfg.val_fraction))
  train, val = (TokenWindows(tokens, seq_len, 0, windows - n_val, vocab_size),
                TokenWindows(tokens, seq_len, windows - n_val, windows, vocab_size))
  for name, part in (("training", train), ("validation", val)):
    if len(part) < global_batch:
      raise ConfigError(
          f"data.val_fraction={data_cfg.val_fraction}: the {name} split has {len(part)} "
          f"windows of train.seq_len={seq_len}, fewer than train.batch_size={global_batch} "
          f"(the stream has {len(tokens)} tokens)")
  if vocab_size is not None:
    for part in (train, val):
      _ = part[0]  # reading a window checks its ids against vocab_size
  return train, val


def loader(source: TokenWindows, global_batch: int, *, seed: int, shuffle: bool,
           workers: int = 0, block: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """Endless batches of this process's rows of each global batch.

  Global batch s holds windows s*B .. s*B + B - 1 of the (per-epoch reshuffled) window order;
  `block = (b, blocks)` takes every blocks-th of them from the b-th: (B / blocks, L + 1) int32
  (`omnimoe.sharding.process_batch_block` gives a process its block; processes that hold the
  same rows get the same block). So each batch is a function of the seed and the step alone,
  whatever the number of processes or worker processes.
  """
  index, blocks = block
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat()[index::blocks].batch(global_batch // blocks, drop_remainder=True)
  ds = ds.to_iter_dataset()
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def build_arrayrecord(input_path: str, output: str, chunk_tokens: int) -> int:
  """Write the byte stream of a text folder as ArrayRecord chunks; returns the token count.

  Streams file by file through one chunk-sized buffer (memory O(chunk_tokens)): every record
  holds exactly `chunk_tokens` tokens except the last.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  if chunk_tokens < 1:
    raise ValueError(f"--chunk_tokens={chunk_tokens}: must be >= 1")
  files = text_files(input_path)
  if not sum(os.path.getsize(f) for f in files):
    raise ValueError(f"--input={input_path!r}: holds no text files")
  buf, filled, total = np.empty(chunk_tokens, np.uint8), 0, 0
  writer = ArrayRecordWriter(output, "group_size:1")
  try:
    for path in files:
      with open(path, "rb") as fh:
        while got := fh.readinto(memoryview(buf)[filled:]):
          filled += got
          if filled == chunk_tokens:
            writer.write(buf.astype("<i4").tobytes())
            total, filled = total + filled, 0
    if filled:
      writer.write(buf[:filled].astype("<i4").tobytes())
      total += filled
  finally:
    writer.close()
  return total


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
