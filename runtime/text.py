"""Token events to text events: the detokenizer (detokenize.py) and stop strings over the token loop.

Each `Event` is a `Token` with the answer text and the thinking text it added. Text that is not whole yet
(the bytes of an unfinished character) or that may be the start of a stop string is held back and comes
out with a later token; the last token brings everything still held. A stop string ends the answer before
it (it applies to the answer, not to the thinking) and closes the token loop; the last event then says
`stop_reason="stop_string"`.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass

from edgegen.runtime.detokenize import Detokenizer
from edgegen.runtime.loop import Token
from edgegen.runtime.tokenizer import TextTokenizer


@dataclass
class Event(Token):
    text: str = ""  # the answer text this token added (may be empty while text is held back)
    thinking: str = ""  # the thinking text this token added


def text_events(tokens: Generator[Token, None, None], tokenizer: TextTokenizer,
                stop_strings: tuple[str, ...] = ()) -> Generator[Event, None, None]:
    """The events of `tokens` with their text. Stops, and closes `tokens`, at the first stop string."""
    detokenizer = Detokenizer(tokenizer)
    stops = StopStrings(stop_strings)
    with closing(tokens):  # also when the caller stops early: the loop frees its Generator
        for t in tokens:
            thinking, piece = detokenizer.push(t.token_id)
            if t.stop_reason:
                more_thinking, more = detokenizer.finish()
                thinking, piece = thinking + more_thinking, piece + more
            text, stopped = stops.feed(piece, last=t.stop_reason is not None)
            reason = "stop_string" if stopped else t.stop_reason
            yield Event(t.token_id, t.drafted, t.stats, reason, text=text, thinking=thinking)
            if stopped:
                return


class StopStrings:
    """The answer so far, released up to where a stop string could still begin."""

    def __init__(self, stop_strings: tuple[str, ...]):
        self.stops = tuple(x for x in stop_strings if x)  # an empty stop string would match everywhere
        self.longest = max((len(x) for x in self.stops), default=0)
        self.answer, self.shown = "", 0

    def feed(self, piece: str, last: bool = False) -> tuple[str, bool]:
        """The text to show now, and whether a stop string ended the answer (the text stops before it)."""
        self.answer += piece
        if self.stops and piece:
            # A match not seen before starts after the text already shown (it held no whole stop string).
            hits = [i for i in (self.answer.find(x, self.shown) for x in self.stops) if i >= 0]
            if hits:
                return self._release(min(hits)), True
        if last or not self.stops:
            return self._release(len(self.answer)), False
        return self._release(max(len(self.answer) - self.longest + 1, self.shown)), False

    def _release(self, end: int) -> str:
        out, self.shown = self.answer[self.shown:end], end
        return out
