"""A conversation on top of the text stream: the messages so far and the prompt of the next turn.

Each turn renders the whole conversation with the bundle's chat template (system turn, tool declarations,
`enable_thinking`), as transformers' `apply_chat_template` does; the token loop reuses the K/V of the part
an earlier turn already ran. The conversation keeps answers only: the template drops earlier turns'
thinking.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import closing

from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.text import Event
from edgegen.runtime.tokenizer import TextTokenizer


class Conversation:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    def next_prompt(self, tokenizer: TextTokenizer, user_message: str | list[dict], *, system: str | None = None,
                    tools: list[dict] | None = None, enable_thinking: bool = False) -> list[int]:
        """Add the user's turn; the prompt ids that ask for the answer. `system` given again replaces the
        earlier instruction; None keeps it."""
        text = self.next_text(tokenizer, user_message, system=system, tools=tools, enable_thinking=enable_thinking)
        try:
            return tokenizer.encode(text, add_special_tokens=False)
        except EdgegenError:
            self.messages.pop()
            raise

    def next_text(self, tokenizer: TextTokenizer, user_message: str | list[dict], *, system: str | None = None,
                  tools: list[dict] | None = None, enable_thinking: bool = False) -> str:
        """Add the user's turn (text, or content parts); the rendered conversation that asks for the answer
        (image parts render as the template's `<|image|>`, which the caller expands)."""
        if system is not None:
            if self.messages and self.messages[0]["role"] in ("system", "developer"):
                self.messages[0] = {"role": self.messages[0]["role"], "content": system}
            else:
                self.messages.insert(0, {"role": "system", "content": system})
        self.messages.append({"role": "user", "content": user_message})
        try:
            return tokenizer.render_chat(self.messages, add_generation_prompt=True, tools=tools,
                                         enable_thinking=enable_thinking)
        except EdgegenError:
            self.messages.pop()  # a turn that never ran is not part of the conversation
            raise

    def answer(self, events: Generator[Event, None, None]) -> Iterator[Event]:
        """`events`, passed through; their answer text becomes the assistant's turn, also when the caller
        stops early (the conversation keeps what was said)."""
        reply = []
        try:
            with closing(events):
                for ev in events:
                    reply.append(ev.text)
                    yield ev
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
