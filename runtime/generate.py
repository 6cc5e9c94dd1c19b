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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
        self._image_cache: dict[str, np.ndarray] = {}  # image key -> soft tokens, for later chat turns

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
               soft: tuple[SoftTokens, ...] | list[SoftTokens] = (), images: Sequence = ()) -> Iterator[Event]:
        """Continue a raw prompt (text, or token ids). Each event carries the answer and thinking text its
        token added; the last one the stop reason. images: paths, bytes or Pillow images, one per `<|image|>`
        in a text prompt (expanded as Gemma4Processor does). soft: embeddings at placeholder ids of a
        token-id prompt (runtime/prompt.py)."""
        if images:
            if not isinstance(prompt, str):
                raise EdgegenError("images go with a text prompt holding one <|image|> per image")
            return self._with_images(prompt, list(images), True, max_new_tokens, sampling, use_assistant,
                                     draft_tokens, stop_strings)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        tokens = self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens, soft)
        return text_events(tokens, self.tokenizer, stop_strings)

    def _with_images(self, text: str, images: list, add_special_tokens: bool, max_new_tokens: int, sampling,
                     use_assistant: bool, draft_tokens, stop_strings) -> Iterator[Event]:
        """Preprocess and encode the images (each one once per Generator: earlier chat turns' images come from
        a cache), expand the placeholders, and stream; the encode time goes into the stats."""
        vision = self.bundle.vision
        if vision is None:
            raise EdgegenError(f"bundle '{self.bundle.path}' has no vision graph, so it takes no images; export it "
                               "from a multimodal checkpoint (Gemma4ForConditionalGeneration) with the cpu profile")
        patches = [vision.preprocess(image) for image in images]  # every image is checked before anything runs
        ids = self.tokenizer.encode(vision.expand(text, patches), add_special_tokens=add_special_tokens)
        if len(ids) >= self.cache.max_context:
            raise EdgegenError(f"the prompt with its images is {len(ids)} tokens; this bundle holds "
                               f"{self.cache.max_context} (prompt + output): use fewer images or a bundle exported "
                               "with a larger --max-context")
        soft = vision.soft_tokens(ids, patches, self._image_cache)
        encode_s = vision.encode_s

        def events():
            for event in text_events(self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens,
                                                     soft), self.tokenizer, stop_strings):
                event.stats.image_encode_s = encode_s
                yield event

        return events()

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
                 use_assistant: bool = True, draft_tokens: int | str | None = None,
                 stop_strings: tuple[str, ...] = (), soft: tuple[SoftTokens, ...] | list[SoftTokens] = (),
                 images: Sequence = ()) -> Result:
        """Blocking generation, built from `stream`. Token-id prompts work without a tokenizer (empty text).
        images: one per `<|image|>` of the prompt (see `stream`)."""
        if images:
            return self.collect(self.stream(prompt, max_new_tokens, sampling, use_assistant, draft_tokens,
                                            stop_strings, images=images))
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

    def chat(self, user_message: str | list[dict], max_new_tokens: int = 256, sampling: Sampling | None = None,
             use_assistant: bool = True, draft_tokens: int | str | None = None, stop_strings: tuple[str, ...] = (),
             *, system: str | None = None, enable_thinking: bool = False,
             tools: list[dict] | None = None, images: Sequence = ()) -> Iterator[Event]:
        """One conversation turn, streamed. Earlier turns' K/V are reused, not prefilled again (images too).

        user_message: text, or a list of content parts in transformers' format: {"type": "text", "text": ...}
        and {"type": "image", "image": path | bytes | Pillow image} ("path" or a local "url" also name a file).
        images: shorthand for image parts placed before the text. system: the conversation's system instruction
        (given again, it replaces the earlier one; None keeps it). enable_thinking: ask the model to reason
        first (events carry it as `thinking`). tools: function declarations the model may call (JSON schema
        dicts); a call comes back in the answer text as the template's markup,
        e.g. `<|tool_call>call:name{...}<tool_call|>`.
        """
        content = user_message
        if images:
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            content = [*({"type": "image", "image": image} for image in images), *parts]
        text = self.conversation.next_text(self.tokenizer, content, system=system, tools=tools,
                                           enable_thinking=enable_thinking)
        try:
            sources = [src for m in self.conversation.messages if isinstance(m["content"], list)
                       for src in map(_image_source, m["content"]) if src is not None]  # this turn's and earlier
            if sources:
                events = self._with_images(text, sources, False, max_new_tokens, sampling, use_assistant,
                                           draft_tokens, stop_strings)
            else:
                events = self.stream(self.tokenizer.encode(text, add_special_tokens=False), max_new_tokens, sampling,
                                     use_assistant, draft_tokens, stop_strings)
        except EdgegenError:
            self.conversation.messages.pop()  # a turn that never ran is not part of the conversation
            raise
        yield from self.conversation.answer(events)

    def reset(self) -> None:
        """Forget the conversation, the cached K/V and the encoded images."""
        super().reset()
        self.messages.clear()
        self._image_cache.clear()


def _image_source(part) -> object | None:
    """The image of a content part in transformers' format ({"type": "image", "image" | "path" | "url": ...}),
    or None for another part. URLs must be local files: edgegen fetches nothing."""
    if not isinstance(part, dict) or part.get("type") != "image":
        return None
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            source = part[key]
            if key == "url" and isinstance(source, str) and "://" in source:
                if not source.startswith("file://"):
                    raise EdgegenError(f"image url '{source}' is not a local file; edgegen fetches nothing, "
                                       "download it and pass the path")
                source = source[len("file://"):]
            return source
    raise EdgegenError('an image content part needs "image", "path" or "url" (a path, bytes or a Pillow image)')


def _has_tokenizer(gen: Generator) -> bool:
    return "tokenizer.json" in gen.bundle.manifest.tokenizer.get("files", [])
