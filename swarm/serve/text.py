"""Text around the token loop: the checkpoint's tokenizer, its chat template, and streamed detokenization.

Chat templates are Jinja, rendered in a sandbox with the variables transformers passes
(`messages`, `add_generation_prompt`, `bos_token`, `eos_token`), so a checkpoint's template gives
the same prompt here as with `tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swarm.errors import ConfigError


class ChatTemplateMissing(ConfigError):
    """The checkpoint has no chat template, so chat requests cannot be turned into a prompt."""


class TextModel:
    """The tokenizer of a local checkpoint directory (tokenizer.json + tokenizer_config.json)."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.exists():
            raise ConfigError(f"{path} does not exist: serving text needs the checkpoint's tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.chat_template = _chat_template(directory, self.config)

    def _special(self, name: str) -> str:
        value = self.config.get(name) or ""
        return str(value.get("content", "") if isinstance(value, dict) else value)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> str:
        if self.chat_template is None:
            raise ChatTemplateMissing(
                "this model has no chat template (no chat_template in tokenizer_config.json or "
                "chat_template.jinja): use /v1/completions with a plain prompt instead"
            )
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ConfigError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self._special("bos_token"),
                eos_token=self._special("eos_token"),
            )
        except jinja2.TemplateError as e:
            raise ConfigError(f"the model's chat template failed: {e}") from e

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        # The template writes the special tokens itself (BOS included), as transformers assumes.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"  # where transformers 5 saves it
    if jinja.exists():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is for chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Detokenizer:
    """Turn tokens into text deltas as they arrive, and stop at the first stop string.

    Incremental, as vLLM and transformers' streamers do: each token re-decodes only a short window
    (the tokens since the last emitted text, plus the one before them for context), so a long
    answer costs O(1) per token, and a token that ends in half a character waits for the next.
    A delta is held back while it might be the start of a stop string, so the streamed deltas
    always join to exactly the final text.
    """

    def __init__(self, text_model: TextModel, stop: Sequence[str] = ()) -> None:
        self.text_model = text_model
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # window start: context for the pending tokens' decoding
        self.read = 0  # tokens before this index are in `text`
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text safe to show after `token` ("" while undecided); sets `stopped` at a stop string."""
        self.ids.append(token)
        decode = self.text_model.decode
        before = decode(self.ids[self.prefix : self.read])
        window = decode(self.ids[self.prefix :])
        if window.endswith("\ufffd") or len(window) <= len(before):  # half a character, or nothing yet
            return ""
        self.text += window[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit_checked()

    def flush(self) -> str:
        """Whatever was held back, once no more tokens come (a last half character included)."""
        if self.stopped:
            return ""
        if self.read < len(self.ids):
            decode = self.text_model.decode
            before = decode(self.ids[self.prefix : self.read])
            self.text += decode(self.ids[self.prefix :])[len(before) :]
            self.prefix = self.read = len(self.ids)
        delta = self._emit_checked()
        return delta if self.stopped else delta + self._emit(len(self.text))

    def _emit_checked(self) -> str:
        # A stop string may straddle deltas: search from where the longest one could begin.
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(cut)
        return self._emit(len(self.text) - self._held_back(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        return max(
            (n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
            default=0,
        )

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta
