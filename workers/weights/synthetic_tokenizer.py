"""A byte-level tokenizer of any vocabulary size, for `dummy` models that come without one.

Ids 0-2 are <unk>, <s> and </s>; the next 256 are the bytes (GPT-2's byte-level alphabet, so any text
encodes and any output decodes); the rest are filler tokens `<|tN|>`, so every id a random model can emit
has a spelling. Built once per vocabulary size and cached; text prompts then work against dummy models.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def synthetic_tokenizer_dir(vocab_size: int, cache_dir: Path) -> Path:
    """Directory of a byte-level tokenizer with exactly `vocab_size` tokens (made on first use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    target = Path(cache_dir) / "tokenizers" / f"bytes-{vocab_size}"
    if (target / "tokenizer.json").is_file():
        return target
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"a byte-level tokenizer needs at least {len(specials) + len(alphabet)} tokens, not {vocab_size}")
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    vocab |= {f"<|t{i}|>": i for i in range(len(vocab), vocab_size)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    fast.save_pretrained(str(tmp))
    os.chmod(tmp, 0o755)
    try:
        tmp.rename(target)
    except OSError:  # another process made it first
        pass
    return target
