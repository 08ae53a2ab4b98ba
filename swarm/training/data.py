"""Training data: bytes of text files, cut into fixed-length sequences, served in a seeded order.

With no data given, the corpus is the Python standard library's own source files on this
machine: real text, present wherever Swarm runs, and nothing to download. Tokens are bytes
(vocabulary 256), so any text works without a tokenizer.

The order is a pure function of (seed, position): `batch(i)` is the same batch on every run
and in every process, so a resumed trainer continues where it stopped, and several trainers
(`shard=(k, n)`) read disjoint sequences.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.errors import ConfigError

VOCAB_SIZE = 256  # one token per byte
SEPARATOR = b"\n\n"  # between files, so no sequence runs from one file into the next unmarked
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class DataConfig:
    data: Path | None = None  # a text file or a directory of them; None: the standard library's sources
    seq_len: int = 256  # tokens (bytes) per sequence
    seed: int = 0
    max_bytes: int = 64 << 20  # read at most this much text (the stdlib has ~160 MB of sources)
    validation_fraction: float = 0.01  # sequences held out for evaluation
    shard: tuple[int, int] = (0, 1)  # (k, n): this trainer reads every n-th training sequence from k

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a token and its successor), got {self.seq_len}")
        if self.max_bytes < self.seq_len:
            raise ConfigError(f"max_bytes={self.max_bytes} is below one sequence of {self.seq_len} bytes")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        k, n = self.shard
        if not 0 <= k < n:
            raise ConfigError(f"shard must be (k, n) with 0 <= k < n, got {self.shard}")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(data: Path | None) -> list[Path]:
    """The files to read, in a fixed order (sorted paths)."""
    if data is None:
        root = stdlib_dir()
        files = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts)]
    elif data.is_file():
        files = [data]
    elif data.is_dir():
        files = [p for p in data.rglob("*") if p.is_file() and not _SKIP_DIRS & set(p.parts)]
    else:
        raise ConfigError(f"--data {data} is neither a file nor a directory")
    files.sort()
    if not files:
        raise ConfigError(f"no files to train on in {data or stdlib_dir()}")
    return files


def read_corpus(files: list[Path], max_bytes: int, seed: int) -> torch.Tensor:
    """The files' bytes joined by SEPARATOR, up to max_bytes, files taken in a seeded order.

    Binary files (with NUL bytes) and unreadable ones are skipped: this is a text corpus.
    """
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    chunks: list[bytes] = []
    total = 0
    for i in order:
        try:
            data = files[i].read_bytes()
        except OSError:
            continue
        if not data or b"\0" in data:
            continue
        data = data[: max_bytes - total] + SEPARATOR
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise ConfigError(f"none of the {len(files)} files is readable text")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


class ByteDataset:
    """Non-overlapping sequences of `seq_len` bytes; a seeded permutation per epoch."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.files = corpus_files(config.data)
        corpus = read_corpus(self.files, config.max_bytes, config.seed)
        count = len(corpus) // config.seq_len
        if count < 2:
            raise ConfigError(
                f"the corpus has {len(corpus)} bytes: fewer than two sequences of {config.seq_len}"
            )
        self.sequences = corpus[: count * config.seq_len].view(count, config.seq_len)
        held_out = max(1, int(count * config.validation_fraction)) if config.validation_fraction else 0
        # The tail is held out: a fixed, contiguous piece, never seen in training.
        self.validation = self.sequences[count - held_out :] if held_out else self.sequences[:0]
        k, n = config.shard
        self.train = self.sequences[: count - held_out][k::n]
        if len(self.train) == 0:
            raise ConfigError(f"shard {config.shard} of {count - held_out} training sequences is empty")

    @property
    def nbytes(self) -> int:
        return self.sequences.numel()

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        """Batch number `index` ([batch_size, seq_len] int64): the same on every run for this config.

        Batches walk through a seeded permutation of the training sequences, a new one each epoch.
        """
        if index < 0 or batch_size < 1:
            raise ValueError(f"need index >= 0 and batch_size >= 1, got {index}, {batch_size}")
        n = len(self.train)
        rows = []
        for position in range(index * batch_size, (index + 1) * batch_size):
            epoch, offset = divmod(position, n)
            rows.append(int(self._permutation(epoch)[offset]))
        return self.train[rows].long()

    def _permutation(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            cached = self._cached = (epoch, torch.randperm(len(self.train), generator=generator))
        return cached[1]

    def validation_batch(self, batch_size: int) -> torch.Tensor:
        """The first `batch_size` held-out sequences (fewer if there are not as many)."""
        return self.validation[:batch_size].long()


def encode(text: str) -> torch.Tensor:
    """Text -> byte tokens [1, n]."""
    return torch.tensor([list(text.encode())], dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    """Byte tokens -> text; bytes that do not form valid UTF-8 become U+FFFD."""
    return bytes(int(t) for t in tokens.flatten()).decode(errors="replace")
