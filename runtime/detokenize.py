"""Generated token ids to text, one token at a time: the answer and the model's thinking, apart.

Each token is decoded incrementally (tokenizers' `DecodeStream`: it looks at a few tokens around the new
one, never the whole output), so streaming costs the same per token at any length. Text is released as
soon as it is whole: a character split over byte-fallback tokens comes out with its last byte. The
concatenated pieces equal a full decode of the same ids (`TextTokenizer.decode`), which the tests check.

Gemma 4 writes its reasoning in a channel before the answer: `<|channel>thought\\n ... <channel|>`. Text
inside the channel is thinking (its first line, the channel's name, is dropped); everything else is the
answer. Control tokens (`<eos>`, `<turn|>`, the channel markers, ...) are not text.
"""

from __future__ import annotations

from edgegen.runtime.tokenizer import CHANNEL_CLOSE, CHANNEL_OPEN, TextTokenizer


class _Segment:
    """A run of text tokens decoded together; `finish` releases what the stream still holds (e.g. bytes of
    an unfinished character, shown as U+FFFD the way a full decode shows them)."""

    def __init__(self, tok: TextTokenizer):
        from tokenizers.decoders import DecodeStream

        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=False)
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._stream.step(self._tok.backend, token) or ""
        self.text += piece
        return piece

    def finish(self) -> str:
        full = self._tok.decode(self.ids)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        return rest


class TextStream:
    """`push(token_id) -> (thinking, answer)`: the text this token adds to each; `finish()` at the end."""

    def __init__(self, tok: TextTokenizer):
        self._tok = tok
        self._open, self._close = tok.token_id(CHANNEL_OPEN), tok.token_id(CHANNEL_CLOSE)
        self._segment = _Segment(tok)
        self._thinking = False
        self._name_left = False  # inside a channel, before the end of its name line

    def push(self, token: int) -> tuple[str, str]:
        if self._open is not None and token in (self._open, self._close):
            out = self._finish_segment()
            self._thinking = token == self._open
            self._name_left = self._thinking
            self._segment = _Segment(self._tok)
            return out
        if token in self._tok.hidden_ids:
            return "", ""
        return self._route(self._segment.push(token))

    def finish(self) -> tuple[str, str]:
        return self._finish_segment()

    def _finish_segment(self) -> tuple[str, str]:
        return self._route(self._segment.finish())

    def _route(self, piece: str) -> tuple[str, str]:
        if not self._thinking:
            return "", piece
        if self._name_left:
            if "\n" not in piece:
                return "", ""
            piece = piece.split("\n", 1)[1]
            self._name_left = False
        return piece, ""
