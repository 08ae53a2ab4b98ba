"""Training data: the embedded stdlib corpus, byte tokens, seeded order, shards, held-out tail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.errors import ConfigError
from swarm.training.data import (
    VOCAB_SIZE,
    ByteDataset,
    DataConfig,
    corpus_files,
    decode,
    encode,
    stdlib_dir,
)


@pytest.fixture(scope="module")
def stdlib() -> ByteDataset:
    return ByteDataset(DataConfig(seq_len=64, max_bytes=2 << 20, seed=3))


def test_default_corpus_is_the_standard_librarys_source(stdlib: ByteDataset) -> None:
    files = corpus_files(None)
    assert stdlib_dir() / "os.py" in files and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert stdlib.nbytes == (2 << 20) // 64 * 64  # read up to max_bytes, whole sequences
    text = decode(stdlib.batch(0, 4))
    assert "def " in text or "import " in text or "class " in text  # real Python source
    assert int(stdlib.sequences.max()) < VOCAB_SIZE


def test_order_is_a_pure_function_of_seed_and_index(stdlib: ByteDataset) -> None:
    again = ByteDataset(DataConfig(seq_len=64, max_bytes=2 << 20, seed=3))
    for index in (0, 1, 57):
        assert torch.equal(stdlib.batch(index, 8), again.batch(index, 8))
    other = ByteDataset(DataConfig(seq_len=64, max_bytes=2 << 20, seed=4))
    assert not torch.equal(stdlib.batch(0, 8), other.batch(0, 8))
    assert stdlib.batch(0, 8).shape == (8, 64) and stdlib.batch(0, 8).dtype == torch.long


def random_text(n: int, seed: int = 0) -> str:
    letters = torch.randint(97, 123, (n,), generator=torch.Generator().manual_seed(seed))
    return "".join(map(chr, letters.tolist()))


def test_an_epoch_covers_every_training_sequence_once(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(random_text(4000))
    data = ByteDataset(DataConfig(data=tmp_path, seq_len=10, validation_fraction=0.1))
    n = len(data.train)
    seen = torch.cat([data.batch(i, 7) for i in range(n // 7)])
    rows = {tuple(r.tolist()) for r in seen}
    assert len(seen) == len(rows) == n // 7 * 7  # no repeats within an epoch
    held_out = {tuple(r.tolist()) for r in data.validation.long()}
    assert not rows & held_out and len(held_out) == int((4000 + 2) // 10 * 0.1)
    # the next epoch is another permutation of the same sequences
    assert not torch.equal(data.batch(0, n), data.batch(1, n))


def test_shards_are_disjoint(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(random_text(4000, seed=1))
    shards = [ByteDataset(DataConfig(data=tmp_path, seq_len=8, shard=(k, 3))) for k in range(3)]
    seqs = [{tuple(r.tolist()) for r in s.train.long()} for s in shards]
    whole = ByteDataset(DataConfig(data=tmp_path, seq_len=8))
    assert sum(map(len, seqs)) == len(whole.train) and all(seqs)
    assert set.union(*seqs) == {tuple(r.tolist()) for r in whole.train.long()}
    assert not (seqs[0] & seqs[1] or seqs[1] & seqs[2] or seqs[0] & seqs[2])


def test_data_path_file_directory_and_errors(tmp_path: Path) -> None:
    (tmp_path / "doc.md").write_text("hello swarm " * 100)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    data = ByteDataset(DataConfig(data=tmp_path, seq_len=16))
    assert "hello swarm" in decode(data.sequences)
    assert ByteDataset(DataConfig(data=tmp_path / "doc.md", seq_len=16)).nbytes > 0
    with pytest.raises(ConfigError, match="neither a file nor a directory"):
        ByteDataset(DataConfig(data=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="fewer than two sequences"):
        ByteDataset(DataConfig(data=tmp_path / "doc.md", seq_len=4096, max_bytes=8192))
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        DataConfig(seq_len=1)
    with pytest.raises(ConfigError, match="shard"):
        DataConfig(shard=(3, 3))
    assert decode(encode("héllo")) == "héllo"
