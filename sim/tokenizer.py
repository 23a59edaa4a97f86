"""A deterministic word-level tokenizer and chat template.

Real tokenizers need model files that cannot be fetched here; what a control plane depends on is
that the same text always gives the same token ids and counts, that chat prompts are templated, and
that generated tokens detokenize to text. This tokenizer behaves like the one the golden vLLM server
used (a WordLevel model with a lowercasing normalizer and a ``\\w+|[^\\w\\s]+`` pre-tokenizer, no
decoder): each word or run of punctuation is one token, and detokenized text is the tokens joined by
spaces. So the golden prompts have the same token counts here as on the recorded server.

Ids: ``0..3`` are ``[PAD] [UNK] <s> </s>``; a word of the form ``w<k>`` is id ``4 + k`` (so the
generated text of the simulator reads back to the same ids); any other word hashes into the vocab.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

PAD, UNK, BOS, EOS = 0, 1, 2, 3
_SPECIALS = {"[PAD]": PAD, "[UNK]": UNK, "<s>": BOS, "</s>": EOS}
_SPECIAL_STRS = {v: k for k, v in _SPECIALS.items()}
_FIRST_WORD_ID = 4

# Special tokens are matched whole before the word/punctuation split.
_PIECE = re.compile(r"<s>|</s>|\[PAD\]|\[UNK\]|\w+|[^\w\s]+")

# Bounded: the reverse map only serves /detokenize and stop strings of prompt words.
_REVERSE_CACHE_SIZE = 65536
# Bounded: once full, new words are hashed each time (still correct, just slower).
_ENCODE_CACHE_SIZE = 262144


def split_pieces(text: str) -> list[str]:
    """``_PIECE.findall(text)``, about 2x faster on prose and 5x on plain words.

    No piece spans whitespace and every other character belongs to one, so the pieces of the
    text are the pieces of its whitespace-separated words; a word of letters and digits only is
    one ``\\w+`` piece as it stands (``str.isalnum`` is exactly the regex's ``\\w`` less ``_``,
    and ``str.split`` splits on exactly its ``\\s``). Only the other words need the regex.
    """
    pieces: list[str] = []
    for word in text.split():
        if word.isalnum():
            pieces.append(word)
        else:
            pieces.extend(_PIECE.findall(word))
    return pieces


class SimTokenizer:
    def __init__(self, vocab_size: int = 128256) -> None:
        if vocab_size <= _FIRST_WORD_ID + 1:
            raise ValueError(f"vocab_size must be > {_FIRST_WORD_ID + 1}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = BOS
        self.eos_token_id = EOS
        self.bos_token = "<s>"
        self._word_span = vocab_size - _FIRST_WORD_ID
        self._reverse: OrderedDict[int, str] = OrderedDict()
        # Generated tokens are detokenized once per token per stream; cache their text.
        self._piece_cache: dict[int, str] = {}
        # Prompt pieces (as written, specials included) -> id. Routers tokenize every prompt, and
        # long prompts repeat the same words: a dict hit is ~10x cheaper than the regex and hash.
        self._encode_cache: dict[str, int] = dict(_SPECIALS)

    def _word_id(self, word: str) -> int:
        # ``w<k>`` without a regex: a router tokenizes every prompt, and a prompt of unseen
        # words comes here once per word (str.isdecimal is exactly the regex's Unicode ``\d``).
        digits = word[1:]
        if word[:1] == "w" and 0 < len(digits) < 9 and digits.isdecimal():
            k = int(digits)
            if k < self._word_span:
                return _FIRST_WORD_ID + k
        tid = _FIRST_WORD_ID + zlib.crc32(word.encode()) % self._word_span
        rev = self._reverse
        if tid not in rev:
            rev[tid] = word
            if len(rev) > _REVERSE_CACHE_SIZE:
                rev.popitem(last=False)
        return tid

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = split_pieces(text)
        cache = self._encode_cache
        ids = [cache.get(piece, -1) for piece in pieces]
        if -1 in ids:
            for i, tid in enumerate(ids):
                if tid == -1:
                    piece = pieces[i]
                    tid = self._word_id(piece.lower())
                    ids[i] = tid
                    if len(cache) < _ENCODE_CACHE_SIZE:
                        cache[piece] = tid
        if add_special_tokens:
            ids.insert(0, BOS)
        return ids

    def token_str(self, tid: int) -> str:
        special = _SPECIAL_STRS.get(tid)
        if special is not None:
            return special
        word = self._reverse.get(tid)
        return word if word is not None else f"w{tid - _FIRST_WORD_ID}"

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self.token_str(t) for t in ids]

    def piece(self, tid: int) -> str:
        """Text one generated token adds to the output: a space, then the token."""
        text = self._piece_cache.get(tid)
        if text is None:
            text = " " + self.token_str(tid)
            if len(self._piece_cache) < _REVERSE_CACHE_SIZE:
                self._piece_cache[tid] = text
        return text

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(
            self.piece(t) for t in ids if not (skip_special_tokens and t in _SPECIAL_STRS)
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """``<s>`` then ``role: content`` per message, then ``assistant:`` (the golden template)."""
        parts = [self.bos_token]
        for message in messages:
            parts.append(
                f"{message.get('role', 'user')}: {_content_text(message.get('content'))}\n"
            )
        if add_generation_prompt:
            parts.append("assistant:")
        return "".join(parts)


def _content_text(content: Any) -> str:
    """OpenAI content is a string or a list of parts; only text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return str(content)
