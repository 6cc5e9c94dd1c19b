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
        self._audio_cache: dict[str, np.ndarray] = {}  # audio clip key -> soft tokens, likewise

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
               soft: tuple[SoftTokens, ...] | list[SoftTokens] = (), images: Sequence = (),
               audio: Sequence = ()) -> Iterator[Event]:
        """Continue a raw prompt (text, or token ids). Each event carries the answer and thinking text its
        token added; the last one the stop reason. images: paths, bytes or Pillow images, one per `<|image|>`
        in a text prompt (expanded as Gemma4Processor does). audio: WAV paths or 1-D float arrays at the
        bundle's sample rate, one per `<|audio|>` (runtime/audio.py). soft: embeddings at placeholder ids of a
        token-id prompt (runtime/prompt.py)."""
        if images or audio:
            if not isinstance(prompt, str):
                raise EdgegenError("images and audio go with a text prompt holding one <|image|> per image and "
                                   "one <|audio|> per clip")
            return self._with_media(prompt, list(images), True, max_new_tokens, sampling, use_assistant,
                                     draft_tokens, stop_strings, list(audio))
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        tokens = self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens, soft=soft)
        return text_events(tokens, self.tokenizer, stop_strings)

    def _with_media(self, text: str, images: list, add_special_tokens: bool, max_new_tokens: int, sampling,
                     use_assistant: bool, draft_tokens, stop_strings, audio: list = ()) -> Iterator[Event]:
        """Preprocess and encode the images and audio clips (each one once per Generator: earlier chat turns'
        come from a cache), expand the placeholders, and stream; the encode times go into the stats."""
        vision = self.bundle.vision if images else None
        if images and vision is None:
            raise EdgegenError(f"bundle '{self.bundle.path}' has no vision graph, so it takes no images; export it "
                               "from a multimodal checkpoint (Gemma4ForConditionalGeneration) with the cpu profile")
        listener = self.bundle.audio if audio else None
        if audio and listener is None:
            raise _no_audio(self.bundle)
        # every image and clip is read and checked before anything runs
        patches = [vision.preprocess(image) for image in images] if images else []
        waves = listener.load(audio) if audio else []
        text = vision.expand(text, patches) if images else text
        ids = self.tokenizer.encode(listener.expand_text(text, waves) if audio else text,
                                    add_special_tokens=add_special_tokens)
        if len(ids) >= self.cache.max_context:
            raise EdgegenError(f"the prompt with its {'images' if images else 'audio'} is {len(ids)} tokens; this "
                               f"bundle holds {self.cache.max_context} (prompt + output): use fewer or shorter "
                               "media or a bundle exported with a larger --max-context")
        soft = vision.soft_tokens(ids, patches, self._image_cache) if images else []
        soft += listener.soft_tokens(ids, waves, self._audio_cache) if audio else []
        image_s, audio_s = (vision.encode_s if images else 0.0), (listener.encode_s if audio else 0.0)

        def events():
            for event in text_events(self.stream_ids(ids, max_new_tokens, sampling, use_assistant, draft_tokens,
                                                     soft=soft), self.tokenizer, stop_strings):
                event.stats.image_encode_s, event.stats.audio_encode_s = image_s, audio_s
                yield event

        return events()

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Sampling | None = None,
                 use_assistant: bool = True, draft_tokens: int | str | None = None,
                 stop_strings: tuple[str, ...] = (), soft: tuple[SoftTokens, ...] | list[SoftTokens] = (),
                 images: Sequence = (), audio: Sequence = ()) -> Result:
        """Blocking generation, built from `stream`. Token-id prompts work without a tokenizer (empty text).
        images: one per `<|image|>` of the prompt, audio: one clip per `<|audio|>` (see `stream`)."""
        if images or audio:
            return self.collect(self.stream(prompt, max_new_tokens, sampling, use_assistant, draft_tokens,
                                            stop_strings, images=images, audio=audio))
        if isinstance(prompt, list) and not _has_tokenizer(self):
            if stop_strings:
                raise EdgegenError("stop strings need the bundle's tokenizer, and this bundle has none")
            tokens = list(self.stream_ids(prompt, max_new_tokens, sampling, use_assistant, draft_tokens, soft=soft))
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
             tools: list[dict] | None = None, images: Sequence = (), audio: Sequence = ()) -> Iterator[Event]:
        """One conversation turn, streamed. Earlier turns' K/V are reused, not prefilled again (images too).

        user_message: text, or a list of content parts in transformers' format: {"type": "text", "text": ...},
        {"type": "image", "image": path | bytes | Pillow image} and {"type": "audio", "audio": WAV path | 1-D
        float array} ("path" or a local "url" also name a file). images, audio: shorthand for image and audio
        parts placed before the text. system: the conversation's system instruction
        (given again, it replaces the earlier one; None keeps it). enable_thinking: ask the model to reason
        first (events carry it as `thinking`). tools: function declarations the model may call (JSON schema
        dicts); a call comes back in the answer text as the template's markup,
        e.g. `<|tool_call>call:name{...}<tool_call|>`.
        """
        content = user_message
        if images or audio:
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            content = [*({"type": "image", "image": image} for image in images),
                       *({"type": "audio", "audio": clip} for clip in audio), *parts]
        if isinstance(content, list) and any(_media_source(p, "audio") is not None for p in content) \
                and self.bundle.audio is None:  # before the template sees parts it may not know
            raise _no_audio(self.bundle)
        text = self.conversation.next_text(self.tokenizer, content, system=system, tools=tools,
                                           enable_thinking=enable_thinking)
        try:
            sources, clips = ([src for m in self.conversation.messages if isinstance(m["content"], list)
                               for src in (_media_source(p, kind) for p in m["content"]) if src is not None]
                              for kind in ("image", "audio"))  # this turn's and earlier
            if sources or clips:
                events = self._with_media(text, sources, False, max_new_tokens, sampling, use_assistant,
                                           draft_tokens, stop_strings, clips)
            else:
                events = self.stream(self.tokenizer.encode(text, add_special_tokens=False), max_new_tokens, sampling,
                                     use_assistant, draft_tokens, stop_strings)
        except EdgegenError:
            self.conversation.messages.pop()  # a turn that never ran is not part of the conversation
            raise
        yield from self.conversation.answer(events)

    def reset(self) -> None:
        """Forget the conversation, the cached K/V and the encoded images and audio."""
        super().reset()
        self.messages.clear()
        self._image_cache.clear()
        self._audio_cache.clear()


def _no_audio(bundle: Bundle) -> EdgegenError:
    return EdgegenError(f"bundle '{bundle.path}' has no audio graph, so it takes no audio; export it from a "
                        "checkpoint with an audio tower (Gemma 4 E2B or E4B) with the cpu profile")


def _media_source(part, kind: str = "image") -> object | None:
    """The image (kind "image") or audio clip (kind "audio") of a content part in transformers' format
    ({"type": kind, kind | "path" | "url": ...}), or None for another part. URLs must be local files:
    edgegen fetches nothing."""
    if not isinstance(part, dict) or part.get("type") != kind:
        return None
    for key in (kind, "path", "url"):
        if part.get(key) is not None:
            source = part[key]
            if key == "url" and isinstance(source, str) and "://" in source:
                if not source.startswith("file://"):
                    raise EdgegenError(f"{kind} url '{source}' is not a local file; edgegen fetches nothing, "
                                       "download it and pass the path")
                source = source[len("file://"):]
            return source
    what = "a path, bytes or a Pillow image" if kind == "image" else "a WAV path or a 1-D float array"
    raise EdgegenError(f'an {kind} content part needs "{kind}", "path" or "url" ({what})')


def _has_tokenizer(gen: Generator) -> bool:
    return "tokenizer.json" in gen.bundle.manifest.tokenizer.get("files", [])
