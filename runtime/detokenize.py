"""Generated token ids to text, one token at a time: the answer and the model's thinking, apart.

Each token is decoded incrementally (tokenizers' `DecodeStream`: it looks at a few tokens around the new
one, never the whole output), so streaming costs the same per token at any length. Text is released as
soon as it is whole: a character spelled in byte-fallback tokens comes out with the token after its last
byte. The concatenated pieces equal a full decode of the same ids (`TextTokenizer.decode`), which the
tests check, also for invalid UTF-8.

Gemma 4 writes its reasoning in a channel before the answer: `<|channel>thought\\n ... <channel|>`. Text
inside the channel is thinking (its first line, the channel's name, is dropped); everything else is the
answer. Control tokens (`<eos>`, `<turn|>`, the channel markers, ...) are not text.
"""

from __future__ import annotations

from edgegen.runtime.tokenizer import CHANNEL_CLOSE, CHANNEL_OPEN, TextTokenizer


class _Segment:
    """A run of text tokens decoded together; `finish` releases what is still held (e.g. the bytes of an
    unfinished character, shown as U+FFFD the way a full decode shows them).

    Byte-fallback tokens (`<0xF0>`, ...) are decoded as a unit when their run ends: a full decode turns the
    whole run into U+FFFDs if any of it is not UTF-8, so a character can only be released once the run is
    known to be valid (one token later). The text between runs goes through a `DecodeStream`.
    """

    def __init__(self, tok: TextTokenizer):
        self._tok = tok
        self._run: list[int] = []  # byte-fallback tokens not yet decoded
        self._stream = None  # DecodeStream over the current part (the tokens since the last run)
        self._part: list[int] = []
        self._part_text = ""
        self._lost = False  # the stream refused a token: this part is decoded in full from then on

    def push(self, token: int) -> str:
        if token in self._tok.byte_ids:
            out = "" if self._run else self._end_part()  # what the stream holds comes before the run
            self._run.append(token)
            return out
        return self._end_run() + self._step(token)

    def finish(self) -> str:
        return self._end_part() + self._end_run()

    def _step(self, token: int) -> str:
        if self._stream is None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=False)
        self._part.append(token)
        piece = ""
        if not self._lost:
            try:
                piece = self._stream.step(self._tok.backend, token) or ""
            except Exception:  # tokenizers refuses a prefix that changed under it; never seen with Gemma 4
                self._lost = True
        if self._lost:
            piece = self._rest_of_part()
        self._part_text += piece
        return piece

    def _rest_of_part(self) -> str:
        full = self._tok.decode(self._part)
        return full[len(self._part_text):] if full.startswith(self._part_text) else ""

    def _end_part(self) -> str:
        if self._stream is None:
            return ""
        rest = self._rest_of_part()
        self._stream, self._part, self._part_text, self._lost = None, [], "", False
        return rest

    def _end_run(self) -> str:
        if not self._run:
            return ""
        text, self._run = self._tok.decode(self._run), []
        return text


class Detokenizer:
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
