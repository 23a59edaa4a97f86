"""The simulator tokenizer's word ids: ``w<k>`` maps to ``4 + k``, anything else hashes.

The fast path in ``SimTokenizer._word_id`` replaced a ``w(\\d+)`` regex; these tests hold it to
that regex's meaning (Unicode decimal digits included) so that token ids, and with them every
block hash the router and the engines compute, stay what they were.
"""

from __future__ import annotations

import re
import zlib

from hypothesis import given
from hypothesis import strategies as st

from shoal.sim.tokenizer import SimTokenizer, split_pieces

FIRST_WORD_ID = 4
W_WORD = re.compile(r"w(\d+)")
# The tokenizer's own definition of a piece (vLLM's golden server used the same split).
PIECE = re.compile(r"<s>|</s>|\[PAD\]|\[UNK\]|\w+|[^\w\s]+")


def reference_word_id(word: str, vocab_size: int) -> int:
    span = vocab_size - FIRST_WORD_ID
    m = W_WORD.fullmatch(word)
    if m is not None and len(m.group(1)) < 9 and int(m.group(1)) < span:
        return FIRST_WORD_ID + int(m.group(1))
    return FIRST_WORD_ID + zlib.crc32(word.encode()) % span


def test_generated_words_read_back_to_their_ids() -> None:
    tok = SimTokenizer(vocab_size=1000)
    assert tok.encode("w0 w17 w995") == [4, 21, 999]
    # Past the vocabulary, too long, or not all digits: hashed like any other word.
    for word in ("w996", "w123456789", "w12x", "w", "ww1", "w-1", "w1.5"):
        assert tok._word_id(word) == reference_word_id(word, 1000)
    # Unicode decimal digits count as digits, as they did under the regex.
    assert tok._word_id("w\u0663") == 4 + 3  # ARABIC-INDIC DIGIT THREE
    assert tok._word_id("w\u00b2") == reference_word_id("w\u00b2", 1000)  # superscript: no


@given(
    st.one_of(
        st.text(min_size=1, max_size=12),
        st.from_regex(r"w[0-9\u0660-\u0669\u00b2]{0,10}", fullmatch=True),
    ),
    st.sampled_from([10, 1000, 128256]),
)
def test_word_ids_match_the_regex_definition(word: str, vocab_size: int) -> None:
    assert SimTokenizer(vocab_size=vocab_size)._word_id(word) == reference_word_id(word, vocab_size)


def test_pieces_split_words_punctuation_and_specials() -> None:
    assert split_pieces("Hello, world!  <s>x[UNK]y_z \u00e9t\u00e9\u00a0w1") == [
        "Hello",
        ",",
        "world",
        "!",
        "<s>",
        "x",
        "[UNK]",
        "y_z",
        "\u00e9t\u00e9",
        "w1",
    ]


@given(
    st.lists(
        st.one_of(
            st.text(max_size=3),
            st.sampled_from(["<s>", "</s>", "[PAD]", "[UNK]", " ", "\t", "\u00a0", "_", "w1"]),
        ),
        max_size=12,
    ).map("".join)
)
def test_pieces_match_the_regex_on_any_text(text: str) -> None:
    assert split_pieces(text) == PIECE.findall(text)
