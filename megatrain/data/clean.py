"""Document cleaning: newlines, control characters, unicode NFC, minimum length, exact dedup."""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field

# Every C0/C1 control character except '\n' and '\t' ('\r' is turned into '\n' before this runs).
_CONTROL = {c: None for c in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def clean_text(text: str) -> str:
    """Normalise newlines to '\\n', drop control characters, then compose to NFC.

    Controls go before NFC so a base letter and a combining mark separated only by a control
    character still compose.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_CONTROL)
    if not unicodedata.is_normalized("NFC", text):  # the common case skips a full copy
        text = unicodedata.normalize("NFC", text)
    return text


@dataclass
class Cleaner:
    """Stateful filter over a document stream: ``cleaner(text)`` → cleaned text, or None when dropped."""

    min_chars: int = 0
    num_seen: int = 0
    num_kept: int = 0
    num_short: int = 0
    num_duplicate: int = 0
    _hashes: set = field(default_factory=set, repr=False)

    def __call__(self, text: str) -> str | None:
        self.num_seen += 1
        text = clean_text(text)
        if len(text) < max(self.min_chars, 1):  # empty documents carry nothing, whatever min_chars says
            self.num_short += 1
            return None
        return text if self._first_time(text.encode("utf-8")) else None

    def record(self, record: dict) -> dict | None:
        """A prompt/completion or messages record with every string cleaned and only its own fields kept, or None
        for an exact duplicate of an earlier record. ``min_chars`` does not apply (a short answer is still an answer)."""
        import json
        self.num_seen += 1
        if "messages" in record:
            out = {"messages": [{"role": m["role"], "content": clean_text(m["content"])} for m in record["messages"]]}
        else:
            out = {"prompt": clean_text(record["prompt"]), "completion": clean_text(record["completion"])}
        return out if self._first_time(json.dumps(out, sort_keys=True, ensure_ascii=False).encode("utf-8")) else None

    def _first_time(self, key: bytes) -> bool:
        """Count ``key`` as kept (first sighting) or duplicate; 128-bit digests: collisions are out of reach."""
        digest = hashlib.blake2b(key, digest_size=16).digest()
        if digest in self._hashes:
            self.num_duplicate += 1
            return False
        self._hashes.add(digest)
        self.num_kept += 1
        return True

    def stats(self) -> dict:
        return {"docs_seen": self.num_seen, "docs_kept": self.num_kept,
                "dropped_short": self.num_short, "dropped_duplicate": self.num_duplicate}
