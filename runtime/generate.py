"""The Python API: `Generator`, three pieces stacked.

  tokens  `stream_ids` (loop.py): the draft/verify loop; one `Token` (id, drafted?, stats) per generated
          id, the last one with its stop reason (eos, max_new_tokens, context)
  text    `stream` (text.py): the same events with the answer and thinking text each token added, and
          stop strings (reason stop_string)
  chat    `chat` (chat.py): a conversation turn rendered with the bundle's chat template, streamed as text

`generate` is `stream` collected into a `Result`. Events and results keep the model's thinking (its
`<|channel>thought ... <channel|>` text) apart from the answer: `thinking` and `text`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgegen.runtime.chat import Conversation
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.loop import Stats, Token, TokenLoop
from edgegen.runtime.model import Bundle
from edgegen.runtime.prompt import SoftTokens
from edgegen.runtime.sampling import Sampling
from edgegen.runtime.text import Event, text_events
from edgegen.runtime.tokenizer import TextTokenizer

__all__ = ["Event", "Generator", "Result", "Stats", "Token"]


@dataclass
class Result:
    text: str  # the answer
    token_ids: list[int]
    stats: Stats
    stop_reason: str  # eos | stop_string | max_new_tokens | context
    thinking: str = ""


class Generator(TokenLoop):
    """Generation over one bundle: the token loop, with text and chat on top. The `Bundle` (sessions) may be
    shared by several Generators across threads; a Generator owns one KV cache and one conversation, so use
    one per thread (a second thread is refused while one generates)."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None,
                 draft_tokens: int | str | None = "auto", ep: str = "cpu"):
        super().__init__(bundle, threads, draft_tokens, ep)
        self._tokenizer: TextTokenizer | None = None
        self.conversation = Conversation()

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.bundle.path, self.bundle.manifest.tokenizer)
        return self._tokenizer

    @property
    def messages(self) -> list[dict]:
        return self.conversation.messages

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
               use_assistant: bool = True, draft_tokens: int | str | None = None,
               stop_strings: tuple[str, ...] = (),
               soft: tuple[SoftTokens, ...] | list[SoftTokens] = ()) -> Iterator[Event]:
        """Continue a raw prompt (text, or token ids). Each event carries the answer and thinking text its
        token added; the last one the stop reason. soft: embeddings at placeholder ids of a token-id prompt
        (runtime/prompt.py)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        tokens = self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens, soft)
        return text_events(tokens, self.tokenizer, stop_strings)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
                 use_assistant: bool = True, draft_tokens: int | str | None = None,
                 stop_strings: tuple[str, ...] = (), soft: tuple[SoftTokens, ...] | list[SoftTokens] = ()) -> Result:
        """Blocking generation, built from `stream`. Token-id prompts work without a tokenizer (empty text)."""
        if isinstance(prompt, list) and not _has_tokenizer(self):
            if stop_strings:
                raise EdgegenError("stop strings need the bundle's tokenizer, and this bundle has none")
            tokens = list(self.stream_ids(prompt, max_new_tokens, sampling, use_assistant, draft_tokens, soft))
            return Result("", [t.token_id for t in tokens], tokens[-1].stats, tokens[-1].stop_reason)
        return self.collect(self.stream(prompt, max_new_tokens, sampling, use_assistant, draft_tokens, stop_strings,
                                        soft))

    @staticmethod
    def collect(events: Iterable[Event]) -> Result:
        """The Result of a `stream` or `chat`, consumed to its end."""
        events = list(events)
        return Result("".join(e.text for e in events), [e.token_id for e in events], events[-1].stats,
                      events[-1].stop_reason, "".join(e.thinking for e in events))

    def chat(self, user_message: str, max_new_tokens: int = 256, sampling: Sampling | None = None,
             use_assistant: bool = True, draft_tokens: int | str | None = None, stop_strings: tuple[str, ...] = (),
             *, system: str | None = None, enable_thinking: bool = False,
             tools: list[dict] | None = None) -> Iterator[Event]:
        """One conversation turn, streamed. Earlier turns' K/V are reused, not prefilled again.

        system: the conversation's system instruction (given again, it replaces the earlier one; None keeps
        it). enable_thinking: ask the model to reason first (events carry it as `thinking`). tools: function
        declarations the model may call (JSON schema dicts); a call comes back in the answer text as the
        template's markup, e.g. `<|tool_call>call:name{...}<tool_call|>`.
        """
        ids = self.conversation.next_prompt(self.tokenizer, user_message, system=system, tools=tools,
                                            enable_thinking=enable_thinking)
        yield from self.conversation.answer(
            self.stream(ids, max_new_tokens, sampling, use_assistant, draft_tokens, stop_strings))

    def reset(self) -> None:
        """Forget the conversation and the cached K/V."""
        super().reset()
        self.messages.clear()


def _has_tokenizer(gen: Generator) -> bool:
    return "tokenizer.json" in gen.bundle.manifest.tokenizer.get("files", [])
