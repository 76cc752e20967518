"""Stop strings on a growing text: where the first one ends the text, and how much may be shown.

The text arrives in pieces (one token's worth at a time). A stop string that completes
in a new piece can have started at most len(stop) - 1 characters before it, so each push
searches only the new piece plus that tail of the text before it: the cost of a push
depends on the piece and on the longest stop string (bounded at the edge,
`sampling_params.MAX_STOP_CHARS`), never on how long the output already is. A match
must end inside the new piece, so one already passed over (before `min_tokens`) is not
found again later.

Text that may be the start of a stop string is held back until the next pieces rule it
in or out, so a streamed reply never shows characters a stop string later removes, and
streamed and whole replies agree. The cut is at the exact character: a token whose text
is " marqué" with stop "qué" leaves " mar".
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        assert stops and all(stops), "stop strings must be non-empty"
        self.stops = tuple(dict.fromkeys(stops))  # order kept, duplicates dropped
        self._keep = max(len(s) for s in self.stops) - 1  # tail a later match can start in
        self._tail = ""  # the last `_keep` characters pushed (unreleased ones included)
        self._held = 0  # characters at the end of `_tail` not yet released
        self.num_released = 0  # characters released so far (the visible text's length)
        self.hit: str | None = None  # the stop string that ended the text

    def push(self, piece: str, match: bool = True) -> str:
        """Add `piece`; return the text that is now safe to show. After a hit, the text up
        to the stop string's first character is released and nothing more ever is.
        `match=False` (before min_tokens) passes over complete stop strings."""
        if self.hit is not None or not piece:
            return ""
        window = self._tail + piece
        new_from = len(self._tail)  # a match must end at or after this index + 1
        release_from = new_from - self._held
        if match:
            cut, stop = min(((i, s) for s in self.stops
                             if (i := window.find(s, max(0, new_from - len(s) + 1))) >= 0),
                            default=(-1, None))
            if stop is not None:
                self.hit = stop
                out = window[release_from:cut]
                self.num_released += len(out)
                return out
        hold = self._partial_suffix(window)
        out = window[release_from:len(window) - hold]
        self.num_released += len(out)
        self._held = min(hold, len(window) - release_from)  # never re-hold released text
        self._tail = window[-self._keep:] if self._keep else ""
        return out

    def flush(self) -> str:
        """The end of the text: release what was held back (it never became a stop string)."""
        if self.hit is not None or not self._held:
            return ""
        out = self._tail[len(self._tail) - self._held:]
        self._held = 0
        self.num_released += len(out)
        return out

    def _partial_suffix(self, window: str) -> int:
        """Length of the longest end of `window` that is a proper prefix of a stop string.

        Candidates start at an occurrence of the stop's first character within its last
        len(stop) - 1 characters; the earliest one that fits is the longest."""
        best = 0
        for s in self.stops:
            end = len(window) - best  # only a start before this gives a longer suffix
            i = window.find(s[0], max(0, len(window) - len(s) + 1), end)
            while i >= 0:
                if s.startswith(window[i:]):
                    best = len(window) - i
                    break
                i = window.find(s[0], i + 1, end)
        return best
