"""Audio input without torch: WAV reading, Gemma 4's log-mel features, and the `<|audio|>` expansion.

What is read: WAV files of 16-bit PCM, one channel, at the bundle's sample rate (16 kHz for Gemma 4), at
most the feature extractor's `max_length` samples (30 s). Anything else is one EdgegenError line saying how
to convert it; nothing is resampled or mixed down here, because transformers' feature extractor does not
do it either (it takes a waveform at its rate) and a different resampler would change the features.
Samples are scaled to [-1, 1) as x / 32768, as soundfile and librosa read 16-bit PCM.

Features follow transformers' Gemma4AudioFeatureExtractor step for step, in the same dtypes (float32
frames and window, float64 FFT magnitudes, mel filters and log, float32 out), so they agree to float32
rounding: semicausal padding (frame_length // 2 zeros in front), frames of frame_length + 1 samples every
hop (the extra sample feeds pre-emphasis), periodic Hann window, |rFFT|, HTK mel filters, log(x + floor).
Only the clip's valid frames are made: the frames transformers' mask keeps (every sample of the window is
real audio). The tower turns F frames into ceil(ceil(F / 2) / 2) soft tokens, and the prompt's `<|audio|>`
becomes `<|audio>` + that many `<|audio|>` + `<audio|>`, as Gemma4Processor expands it.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from edgegen.runtime.errors import EdgegenError

AUDIO_TOKEN, BOA_TOKEN, EOA_TOKEN = "<|audio|>", "<|audio>", "<audio|>"


# -- mel filters (HTK scale, no normalisation) ----------------------------------------------------------


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (np.power(10, mel / 2595.0) - 1.0)


def mel_filters(bins: int, mels: int, low: float, high: float, sampling_rate: int) -> np.ndarray:
    """[bins, mels] triangular filters, float64: filter m rises from edge m to m+1 and falls to m+2, the
    edges evenly spaced in mel between `low` and `high`."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(low), _hz_to_mel(high), mels + 2))
    freqs = np.linspace(0, sampling_rate // 2, bins)
    width = np.diff(edges)
    offset = edges[None, :] - freqs[:, None]  # edge minus bin frequency
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(np.zeros(1), np.minimum(rising, falling))


class LogMel:
    """Gemma 4 log-mel features of one clip (settings: the manifest's audio.feature_extractor)."""

    def __init__(self, settings: dict):
        self.sampling_rate = int(settings["sampling_rate"])
        self.mels = int(settings["feature_size"])
        self.frame = int(round(self.sampling_rate * settings["frame_length_ms"] / 1000.0))
        self.hop = int(round(self.sampling_rate * settings["hop_length_ms"] / 1000.0))
        self.fft = 2 ** math.ceil(math.log2(self.frame)) * (2 if settings["fft_overdrive"] else 1)
        self.preemphasis = float(settings["preemphasis"])
        self.htk_preemphasis = bool(settings["preemphasis_htk_flavor"])
        self.scale = float(settings["input_scale_factor"])
        self.floor = np.float64(settings["mel_floor"])
        self.max_samples = int(settings.get("max_length") or 480000)
        n = np.arange(self.frame)
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / self.frame)).astype(np.float32)  # periodic Hann
        self.filters = mel_filters(self.fft // 2 + 1, self.mels, settings["min_frequency"],
                                   settings["max_frequency"], self.sampling_rate)
        mean, std = settings.get("per_bin_mean"), settings.get("per_bin_stddev")
        self.mean = None if mean is None else np.asarray(mean, np.float64).reshape(1, self.mels)
        self.std = None if std is None else np.asarray(std, np.float64).reshape(1, self.mels)

    def frames(self, samples: int) -> int:
        """Valid frames of a clip of `samples` samples."""
        return max(0, (self.frame // 2 + samples - (self.frame + 1)) // self.hop + 1)

    def __call__(self, wave_: np.ndarray) -> np.ndarray:
        """[frames, mels] float32 for a 1-D float32 waveform at `sampling_rate`."""
        x = np.asarray(wave_, np.float32)
        if self.scale != 1.0:
            x = x * self.scale
        x = np.concatenate([np.zeros(self.frame // 2, np.float32), x])
        count = self.frames(len(wave_))
        span = self.frame + 1
        frames = np.lib.stride_tricks.as_strided(x, (count, span), (x.strides[0] * self.hop, x.strides[0]),
                                                 writeable=False)
        if self.preemphasis > 0.0 and self.htk_preemphasis:
            frames = np.concatenate([frames[:, :1] * (1.0 - self.preemphasis),
                                     frames[:, 1:-1] - self.preemphasis * frames[:, :-2]], axis=-1)
        elif self.preemphasis > 0.0:
            frames = frames[:, 1:] - self.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=self.fft, axis=-1))
        logmel = np.log(magnitude @ self.filters + self.floor)
        if self.mean is not None:
            logmel = logmel - self.mean
        if self.std is not None:
            logmel = logmel / self.std
        return logmel.astype(np.float32)


def tokens_for_frames(frames: int) -> int:
    """Soft tokens the audio tower makes of `frames` mel frames (two stride-2 convolutions)."""
    for _ in range(2):
        frames = (frames + 1) // 2
    return frames


# -- reading clips -----------------------------------------------------------------------------------------


def read_wav(path: str | Path, sampling_rate: int) -> np.ndarray:
    """A 16-bit PCM mono WAV at `sampling_rate` as float32 in [-1, 1); one EdgegenError line otherwise."""
    path = Path(path)
    convert = f"convert it with: ffmpeg -i '{path}' -ac 1 -ar {sampling_rate} -c:a pcm_s16le out.wav"
    if not path.is_file():
        raise EdgegenError(f"audio file '{path}' does not exist")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, count = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(count)
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise EdgegenError(f"'{path}' is not a readable WAV file ({detail}); edgegen reads 16-bit PCM mono "
                           f"WAV at {sampling_rate} Hz; {convert}") from None
    if channels != 1:
        raise EdgegenError(f"'{path}' has {channels} channels; edgegen reads mono audio; {convert}")
    if width != 2:
        raise EdgegenError(f"'{path}' has {8 * width}-bit samples; edgegen reads 16-bit PCM; {convert}")
    if rate != sampling_rate:
        raise EdgegenError(f"'{path}' is sampled at {rate} Hz; the model's audio tower takes {sampling_rate} Hz; "
                           f"{convert}")
    if len(raw) != count * 2 or count == 0:
        raise EdgegenError(f"'{path}' is truncated or empty (its header says {count} samples, it holds "
                           f"{len(raw) // 2}); re-encode it: {convert}")
    return (np.frombuffer(raw, "<i2").astype(np.float32) / np.float32(32768.0)).astype(np.float32)


def load_clip(item, extractor: LogMel, label: str = "audio") -> np.ndarray:
    """A clip from a path (WAV) or a 1-D float array already at the extractor's rate, checked for length."""
    if isinstance(item, (str, Path)):
        clip = read_wav(item, extractor.sampling_rate)
        label = f"'{item}'"
    else:
        clip = np.asarray(item)
        if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
            raise EdgegenError(f"{label} must be a WAV path or a 1-D float array of samples at "
                               f"{extractor.sampling_rate} Hz, not {clip.dtype} of shape {clip.shape}")
        clip = clip.astype(np.float32)
        if not np.isfinite(clip).all():
            raise EdgegenError(f"{label} holds NaN or infinite samples")
    seconds = len(clip) / extractor.sampling_rate
    limit = extractor.max_samples / extractor.sampling_rate
    if len(clip) > extractor.max_samples:
        raise EdgegenError(f"{label} is {seconds:.1f} s long; the audio tower takes at most {limit:g} s per clip; "
                           "split it into shorter clips")
    if tokens_for_frames(extractor.frames(len(clip))) == 0:
        shortest = 1000 * (extractor.frame + 1 - extractor.frame // 2) / extractor.sampling_rate
        raise EdgegenError(f"{label} is {1000 * seconds:.0f} ms long, too short to make one audio token; "
                           f"use at least {shortest:.0f} ms")
    return clip


def expand_placeholders(ids: list[int], counts: list[int], audio_id: int, boa_id: int, eoa_id: int) -> list[int]:
    """Replace the i-th `<|audio|>` in `ids` by `<|audio>` + counts[i] x `<|audio|>` + `<audio|>`."""
    found = ids.count(audio_id)
    if found != len(counts):
        raise EdgegenError(f"the prompt has {found} {AUDIO_TOKEN} placeholder(s) for {len(counts)} audio clip(s); "
                           f"put one {AUDIO_TOKEN} where each clip goes")
    out, clip = [], 0
    for t in ids:
        if t == audio_id:
            out += [boa_id] + [audio_id] * counts[clip] + [eoa_id]
            clip += 1
        else:
            out.append(t)
    return out


# -- the audio graph ---------------------------------------------------------------------------------------


class AudioEncoder:
    """The bundle's audio graph and its feature extractor settings: clips -> soft tokens [T, hidden]."""

    def __init__(self, session, settings: dict):
        self.session, self.settings = session, settings
        self.extractor = LogMel(settings["feature_extractor"])
        self.encode_s = 0.0  # time spent in features + graph for new clips (the last `soft_tokens`)

    @classmethod
    def open(cls, bundle_dir: str | Path, threads: int | None = None) -> AudioEncoder:
        """The audio graph of a bundle directory; one EdgegenError line for a bundle without one."""
        from edgegen.runtime.manifest import load_manifest
        from edgegen.runtime.model import open_session

        m = load_manifest(bundle_dir)
        return cls.of(Path(bundle_dir), m, lambda spec: open_session(Path(bundle_dir), spec, threads))

    @classmethod
    def of(cls, bundle_dir: Path, manifest, open_graph) -> AudioEncoder:
        """For a loaded manifest; `open_graph(spec)` opens a session (Bundle passes its own)."""
        if "audio" not in manifest.graphs or not manifest.audio:
            raise EdgegenError(f"bundle '{bundle_dir}' has no audio encoder; export it from a checkpoint with an "
                               "audio tower (Gemma 4 E2B or E4B) to give it audio")
        return cls(open_graph(manifest.graphs["audio"]), manifest.audio)

    def load(self, clips) -> list[np.ndarray]:
        """Every clip read and checked (paths or arrays) before anything runs."""
        return [load_clip(c, self.extractor, f"audio clip {i + 1}") for i, c in enumerate(clips)]

    def counts(self, waves: list[np.ndarray]) -> list[int]:
        """Soft tokens per clip: what the prompt expansion and the graph both make."""
        return [tokens_for_frames(self.extractor.frames(len(w))) for w in waves]

    def encode(self, wave_: np.ndarray) -> np.ndarray:
        """One clip's soft tokens [T, hidden]: its features through the audio graph."""
        from edgegen.runtime.manifest import INPUT_FEATURES
        from edgegen.runtime.prompt import encode

        return encode(self.session, {INPUT_FEATURES: self.extractor(wave_)[None]}, "audio")

    def expand(self, ids: list[int], waves: list[np.ndarray]) -> list[int]:
        """Token ids with each `<|audio|>` expanded (see expand_placeholders)."""
        s = self.settings
        return expand_placeholders(ids, self.counts(waves), s["audio_token_id"], s["boa_token_id"], s["eoa_token_id"])

    def expand_text(self, text: str, waves: list[np.ndarray]) -> str:
        """Gemma4Processor's prompt expansion on text: the i-th `<|audio|>` becomes `<|audio>` + T_i `<|audio|>`
        + `<audio|>` (the same ids as `expand` on the tokenized text: the markers are special tokens)."""
        found, counts = text.count(AUDIO_TOKEN), self.counts(waves)
        if found != len(counts):
            raise EdgegenError(f"the prompt has {found} {AUDIO_TOKEN} placeholder(s) for {len(counts)} audio "
                               f"clip(s); put one {AUDIO_TOKEN} where each clip goes")
        pieces = text.split(AUDIO_TOKEN)
        return pieces[0] + "".join(f"{BOA_TOKEN}{AUDIO_TOKEN * n}{EOA_TOKEN}{piece}"
                                   for n, piece in zip(counts, pieces[1:], strict=True))

    def soft_tokens(self, ids: list[int], waves: list[np.ndarray], cache: dict | None = None) -> list:
        """The clips' soft tokens at the runs of audio-token ids in an expanded prompt `ids` (one run per clip,
        in order); runs the graph once per clip not in `cache` (key -> soft tokens, filled here) and records
        the time in `encode_s`."""
        import hashlib

        from edgegen.runtime.prompt import place

        media = [("audio " + hashlib.sha256(w.tobytes()).hexdigest(), n, lambda w=w: self.encode(w))
                 for w, n in zip(waves, self.counts(waves), strict=True)]
        spans, self.encode_s = place(ids, self.settings["audio_token_id"], media, cache, "audio", "clips")
        return spans
