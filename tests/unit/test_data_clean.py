"""Cleaning: newlines, control characters, NFC, minimum length, exact dedup."""
from megatrain.data.clean import Cleaner, clean_text


def test_newlines_normalised():
    assert clean_text("a\r\nb\rc\n") == "a\nb\nc\n"


def test_control_characters_dropped_except_newline_and_tab():
    assert clean_text("a\x00b\x07c\x1bd\x7fe\x85f\tg\nh") == "abcdef\tg\nh"


def test_nfc_composes():
    assert clean_text("e\u0301") == "\u00e9"
    # a control character between base and combining mark is removed first, so they still compose
    assert clean_text("e\x01\u0301") == "\u00e9"
    assert clean_text("\u00e9") == "\u00e9"


def test_min_chars_and_empty_documents():
    cleaner = Cleaner(min_chars=5)
    assert cleaner("abcd") is None
    assert cleaner("abcde") == "abcde"
    assert Cleaner(min_chars=0)("\x00\x01") is None  # nothing left after cleaning: always dropped
    assert cleaner.stats()["dropped_short"] == 1


def test_exact_dedup_after_cleaning():
    cleaner = Cleaner(min_chars=1)
    assert cleaner("hello\r\nworld") == "hello\nworld"
    assert cleaner("hello\nworld") is None  # same content once cleaned
    assert cleaner("hello\nworld!") == "hello\nworld!"
    assert cleaner.stats() == {"docs_seen": 3, "docs_kept": 2, "dropped_short": 0, "dropped_duplicate": 1}
