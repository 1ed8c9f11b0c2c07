"""Tokenization in the controller: prompts and chat templates in, incremental text out.

Workers see token ids only. The detokenizer is incremental (the `tokenizers` DecodeStream, which holds
back bytes of a multi-byte character split across tokens) and applies stop strings: text that could be
the start of a stop string is held back while streaming, so a stop string that spans tokens never leaks
into the output, and the text is cut where the stop string begins.

Tokenizers are loaded as transformers' `PreTrainedTokenizerFast` (tokenizer.json and
tokenizer_config.json, chat template included), not through `AutoTokenizer`, whose config machinery
imports torch: the controller process does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

from controller.errors import InvalidRequest


class ModelTokenizer:
    def __init__(self, directory: str | Path):
        self.hf = PreTrainedTokenizerFast.from_pretrained(str(directory))
        self.backend = self.hf.backend_tokenizer
        self.vocab_size = len(self.hf)

    def eos_token_ids(self, hf_config: dict) -> list[int]:
        ids = hf_config.get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return sorted(set(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        """The text of these ids, special tokens included (what `/detokenize` answers)."""
        return self.hf.decode(token_ids, skip_special_tokens=False)

    def token_strs(self, token_ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(token_ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise InvalidRequest("this model has no chat template: use /v1/completions", param="messages")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self.hf.encode(text, add_special_tokens=False)

    def detokenizer(self, stop: list[str] | None, prompt_token_ids: list[int]) -> Detokenizer:
        return Detokenizer(self, stop or [], prompt_token_ids[-4:])


@dataclass
class Detokenizer:
    """Turns a request's output tokens into text deltas, honouring stop strings."""

    tokenizer: ModelTokenizer
    stop: list[str]
    prefix_ids: list[int]
    text: str = ""  # all text decoded so far (up to a stop string, once one is found)
    emitted: int = 0  # characters of `text` already returned as deltas
    num_tokens: int = 0  # tokens that count as output (up to the one completing a stop string)
    stopped: bool = False
    _stream: DecodeStream = field(init=False)

    def __post_init__(self) -> None:
        try:
            self._stream = DecodeStream(ids=self.prefix_ids, skip_special_tokens=True)
        except TypeError:  # older tokenizers: no prefix ids
            self._stream = DecodeStream(skip_special_tokens=True)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_ids: list[int]) -> None:
        """Feed new tokens; after a stop string is found, later tokens are ignored."""
        for token_id in token_ids:
            if self.stopped:
                return
            self.num_tokens += 1
            piece = self._stream.step(self.tokenizer.backend, token_id)
            if not piece:
                continue
            search_from = max(0, len(self.text) - self._hold)
            self.text += piece
            if self.stop:
                self._find_stop(search_from)

    def _find_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def delta(self, final: bool) -> str:
        """Text not yet returned; while streaming, the tail that could begin a stop string is held back."""
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self._hold)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
