"""Text around the token loop (swarm/serve/text.py): chat templates as transformers renders them, and
streamed detokenization that joins to exactly the decoded text, cut at the first stop string."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from swarm.serve.text import ChatTemplateMissing, Detokenizer, TextModel
from tests.checkpoints import add_word_tokenizer

TEXTS = [
    "héllo wörld, ünïcode 日本語のテキスト and emoji 🐝🐝 swarm of GPUs.",
    "The quick brown fox — jumps; über alles 42!",
]
MESSAGES = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w40 w41"}]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> TextModel:
    """A byte-level BPE tokenizer: characters span several tokens, as with real models."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    path = tmp_path_factory.mktemp("byte-level")
    tokenizer.save(str(path / "tokenizer.json"))
    return TextModel(path)


def stream(text_model: TextModel, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    detok = Detokenizer(text_model, stop)
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas, detok.stopped


def test_streamed_text_joins_to_the_decoded_text_cut_at_the_first_stop(byte_level: TextModel) -> None:
    rng = random.Random(0)
    for trial in range(200):
        text = rng.choice(TEXTS)
        cut = rng.randrange(len(text))
        text = text[cut:] + " " + text[:cut]
        ids = byte_level.encode(text)
        assert byte_level.decode(ids) == text
        stops = (
            [] if trial % 3 == 0 else [text[(i := rng.randrange(len(text))) : i + rng.randint(1, 4)], "zzz"]
        )
        deltas, stopped = stream(byte_level, ids, stops)
        found = [text.find(s) for s in stops if s in text]
        assert "".join(deltas) == (text[: min(found)] if found else text), (trial, stops)
        assert stopped == bool(found)
        assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_text_that_may_begin_a_stop_string_is_held_back(byte_level: TextModel) -> None:
    detok = Detokenizer(byte_level, ["two x"])
    shown = "".join(detok.add(t) for t in byte_level.encode("one two"))
    assert shown == "one "  # "two" may be the start of "two x"
    rest = "".join(detok.add(t) for t in byte_level.encode(" three")) + detok.flush()
    assert shown + rest == "one two three" and not detok.stopped


def test_chat_prompt_is_what_transformers_renders(tmp_path: Path) -> None:
    add_word_tokenizer(tmp_path)
    ours = TextModel(tmp_path).render_chat(MESSAGES)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs == "<s><|system|> w7 <|user|> w40 w41 <|assistant|>"


def test_a_model_without_chat_template_says_so(tmp_path: Path) -> None:
    add_word_tokenizer(tmp_path, chat_template=None)
    text_model = TextModel(tmp_path)
    assert text_model.chat_template is None
    with pytest.raises(ChatTemplateMissing, match="no chat template"):
        text_model.chat_ids(MESSAGES)
