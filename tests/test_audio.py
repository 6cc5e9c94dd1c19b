"""Audio input: the audio tower graph against PyTorch, numpy log-mel features and the `<|audio|>` expansion
against transformers' Gemma4 feature extractor and processor, bad audio files as one line each."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from edgegen.runtime import audio as raudio
from edgegen.runtime.errors import EdgegenError

RATE = 16000
# Lengths chosen around the arithmetic's edges: under one hop, odd frame counts, one sample past a multiple
# of the processor's 128-sample padding, and the 30 s maximum.
SECONDS = (0.0113, 0.0125, 0.37, 1.0001, 2.7, 7.31, 30.0)


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE))
    t = np.arange(n) / RATE
    tone = 0.4 * np.sin(2 * np.pi * (220 + 300 * t) * t)  # a chirp plus noise: energy across the mel bins
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray, rate: int = RATE, channels: int = 1, width: int = 2) -> Path:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    if channels > 1:
        pcm = np.repeat(pcm, channels)
    raw = pcm.tobytes() if width == 2 else (pcm // 256 + 128).astype(np.uint8).tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return path


@pytest.fixture(scope="module")
def processor(mm_pair):
    from edgegen.export import testing

    return testing.load_processor(mm_pair[0])


@pytest.fixture(scope="module")
def settings(mm_pair):
    from transformers import AutoConfig

    from edgegen.export import audio as xaudio

    return xaudio.audio_settings(mm_pair[0], AutoConfig.from_pretrained(mm_pair[0]))


# -- the tower graph ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_audio_graph_matches_pytorch(mm_pair, settings, tmp_path, quant):
    """The audio graph (tower + embedder) against transformers on clips longer than one attention chunk, fed
    to PyTorch padded and masked as the processor pads them; quantized graphs against PyTorch with the same
    weight rounding."""
    from transformers import AutoConfig

    from edgegen.export import audio as xaudio
    from edgegen.export.graphs import PROFILES
    from edgegen.export.onnx_graph import WeightFile
    from edgegen.export.quantize import Quant
    from edgegen.export.weights import Checkpoint

    config = AutoConfig.from_pretrained(mm_pair[0])
    ckpt = Checkpoint(mm_pair[0])
    assert xaudio.has_audio_tower(ckpt)
    # what export gives the tower: the target's fp32, else int8 weights with fp32 compute
    assert xaudio.audio_quant(Quant("fp32")) == Quant("fp32")
    assert xaudio.audio_quant(Quant("int4", 32, 4)) == Quant("int8", 32, 0)
    shared = WeightFile(tmp_path / "shared.weights")
    g = xaudio.build_audio_graph(ckpt, config.audio_config, config.text_config.hidden_size, Quant(quant), tmp_path,
                                 shared, PROFILES["cpu"])
    g.save(tmp_path)
    g.data.close()
    shared.close()
    report = xaudio.verify_audio(ckpt, config, tmp_path, Quant(quant), settings, seconds=(0.37, 1.3, 2.9))
    check = report["audio_soft_tokens"]
    assert check["value"] <= 1e-4, check


def test_clip_bounds_matter(mm_pair, settings):
    """The preset's clipped linears have finite bounds, and the clip's activations cross them (so the graph
    test above fails if a clamp is dropped)."""
    import torch
    from transformers import AutoConfig

    from edgegen.export import audio as xaudio
    from edgegen.export.weights import Checkpoint

    config = AutoConfig.from_pretrained(mm_pair[0])
    tower, _ = xaudio.pytorch_tower(Checkpoint(mm_pair[0]), config)
    feats = raudio.LogMel(settings["feature_extractor"])(_clip(1.0))
    crossed = []
    mods = [m for m in tower.modules() if type(m).__name__ == "Gemma4ClippableLinear"]
    assert mods and all(bool(torch.isfinite(m.input_max)) for m in mods)
    handles = [m.register_forward_pre_hook(
        lambda m, args: crossed.append(bool(((args[0] > m.input_max) | (args[0] < m.input_min)).any())))
        for m in mods]
    with torch.no_grad():
        tower(torch.from_numpy(feats[None]), torch.ones(1, len(feats), dtype=torch.bool))
    for h in handles:
        h.remove()
    assert any(crossed)


# -- features and placeholders ---------------------------------------------------------------------------------


def test_features_match_transformers(settings):
    """numpy log-mel frames equal Gemma4AudioFeatureExtractor's valid (mask=True) frames on clips of 7
    lengths, and the frame count is the mask's."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    ref = Gemma4AudioFeatureExtractor()
    ours = raudio.LogMel(settings["feature_extractor"])
    worst = 0.0
    for i, s in enumerate(SECONDS):
        clip = _clip(s, seed=i)
        out = ref([clip], return_tensors="np")  # a list: a bare 1-D array is read as a batch of 1-sample clips
        expected = out["input_features"][0][out["input_features_mask"][0]]
        got = ours(clip)
        assert got.shape == expected.shape, s
        if len(got):
            worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-6, worst


def test_features_match_with_preemphasis_and_normalisation(settings):
    """The optional paths (HTK and plain pre-emphasis, input scale, per-bin mean and stddev) as configured."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(3)
    for htk in (True, False):
        extra = dict(preemphasis=0.97, preemphasis_htk_flavor=htk, input_scale_factor=2.0,
                     per_bin_mean=list(rng.standard_normal(128)), per_bin_stddev=list(1 + rng.random(128)))
        ref = Gemma4AudioFeatureExtractor(**extra)
        ours = raudio.LogMel({**settings["feature_extractor"], **extra})
        clip = _clip(1.7, seed=5)
        out = ref([clip], return_tensors="np")
        expected = out["input_features"][0][out["input_features_mask"][0]]
        assert np.abs(ours(clip) - expected).max() <= 1e-6


def test_placeholder_expansion_matches_processor(mm_pair, processor, settings):
    """`<|audio|>` expands to the processor's ids, one and two clips per prompt, clips of 5 lengths."""
    from edgegen.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(mm_pair[0], {"files": ["tokenizer.json"]})
    ids = {name: tok.token_id(t) for name, t in (("audio", raudio.AUDIO_TOKEN), ("boa", raudio.BOA_TOKEN),
                                                   ("eoa", raudio.EOA_TOKEN))}
    assert ids == {"audio": processor.audio_token_id, "boa": tok.token_id(processor.boa_token),
                   "eoa": tok.token_id(processor.eoa_token)}
    ours = raudio.LogMel(settings["feature_extractor"])
    cases = [(f"Transcribe {raudio.AUDIO_TOKEN} please.", [SECONDS[i]]) for i in (1, 2, 3, 4, 6)]
    cases.append((f"A {raudio.AUDIO_TOKEN} then B {raudio.AUDIO_TOKEN}.", [0.37, 2.7]))
    for text, lengths in cases:
        clips = [_clip(s) for s in lengths]
        expected = processor(text=text, audio=clips, return_tensors="np")["input_ids"][0].tolist()
        counts = [raudio.tokens_for_frames(ours.frames(len(c))) for c in clips]
        got = raudio.expand_placeholders(tok.encode(text), counts, ids["audio"], ids["boa"], ids["eoa"])
        assert got == expected, (text, lengths)


def test_wav_reading(tmp_path):
    clip = _clip(0.5)
    got = raudio.read_wav(_write_wav(tmp_path / "a.wav", clip), RATE)
    pcm = np.clip(np.round(clip * 32767), -32768, 32767).astype(np.int16)
    assert got.dtype == np.float32 and np.array_equal(got, pcm.astype(np.float32) / 32768)


# -- bad input ----------------------------------------------------------------------------------------------------


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = _write_wav(tmp / "good.wav", _clip(1.0))
    truncated = tmp / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:-5000])
    garbage = tmp / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot a chunk" * 3)
    text = tmp / "notes.wav"
    text.write_text("hello")
    return {
        "truncated": (truncated, "truncated"),
        "garbage": (garbage, "not a readable WAV"),
        "text": (text, "not a readable WAV"),
        "missing": (tmp / "nope.wav", "does not exist"),
        "rate": (_write_wav(tmp / "8k.wav", _clip(1.0), rate=8000), "8000 Hz"),
        "stereo": (_write_wav(tmp / "stereo.wav", _clip(1.0), channels=2), "2 channels"),
        "8bit": (_write_wav(tmp / "8bit.wav", _clip(1.0), width=1), "8-bit"),
        "long": (_write_wav(tmp / "long.wav", _clip(31.0)), "at most 30 s"),
        "short": (_write_wav(tmp / "short.wav", _clip(0.005)), "too short"),
    }


def test_bad_audio_is_one_line(tmp_path, settings):
    extractor = raudio.LogMel(settings["feature_extractor"])
    for name, (path, words) in _bad_files(tmp_path).items():
        with pytest.raises(EdgegenError) as err:
            raudio.load_clip(path, extractor)
        message = str(err.value)
        assert words in message and "\n" not in message, (name, message)
    for bad, words in ((np.zeros((2, 100), np.float32), "1-D float"), (np.zeros(1000, np.int16), "1-D float"),
                       (np.full(4000, np.nan, np.float32), "NaN")):
        with pytest.raises(EdgegenError, match=words):
            raudio.load_clip(bad, extractor)


# -- the bundle: export, speculative decoding with audio ------------------------------------------------------


@pytest.fixture(scope="module")
def hf(mm_pair):
    from edgegen.export.loading import load_pair

    p = load_pair(str(mm_pair[0]), str(mm_pair[1]))
    return p.target, p.assistant


def test_export_writes_the_audio_graph(mm_bundle, mm_pair):
    from edgegen.runtime.manifest import load_manifest

    m = load_manifest(mm_bundle)
    assert "audio" in m.graphs and m.audio["feature_extractor"]["sampling_rate"] == RATE
    assert {"audio.onnx", "audio.weights"} <= set(m.files)  # integrity-checked like the other graphs
    assert m.audio["tokens_per_second"] == 25.0 and m.audio["audio_token_id"] == 258881
    check = m.parity["checks"]["audio_soft_tokens"]
    assert check["passed"] and check["value"] <= 1e-4


@pytest.mark.parametrize("field, value", [("feature_size", "x"), ("sampling_rate", 0), ("audio_token_id", -1),
                                          ("per_bin_mean", [0.0])])
def test_a_malformed_audio_section_is_one_line(mm_bundle, tmp_path, field, value):
    import json

    from edgegen.runtime.manifest import load_manifest

    raw = json.loads((mm_bundle / "manifest.json").read_text())
    section = raw["audio"] if field.endswith("_id") else raw["audio"]["feature_extractor"]
    section[field] = value
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EdgegenError, match=r"malformed field \(audio\)"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("k", [3, "auto"])
def test_speculative_with_audio_equals_transformers_and_plain(mm_bundle, hf, processor, k):
    """Greedy speculative output with an audio clip == transformers' generate(**processor(...),
    assistant_model=...) == transformers without the assistant == our plain decoding."""
    import torch

    from edgegen.runtime.audio import AudioEncoder
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    text = f"<start_of_turn>user\nWhat is said here? {raudio.AUDIO_TOKEN}<end_of_turn>\n<start_of_turn>model\n"
    clip = _clip(1.3, seed=7)
    gen = Generator(Bundle(mm_bundle, threads=1))
    enc = AudioEncoder.open(mm_bundle, threads=1)
    waves = enc.load([clip])
    ids = enc.expand(gen.tokenizer.encode(text), waves)
    soft = enc.soft_tokens(ids, waves)
    result = gen.generate(ids, 12, draft_tokens=k, soft=soft)
    ours = result.token_ids
    assert result.stats.drafted > 0 or k == "auto"
    gen.reset()
    plain = gen.generate(ids, 12, use_assistant=False, soft=soft).token_ids
    gen.reset()  # the clip's soft tokens matter: the placeholders' own embeddings answer otherwise
    assert gen.generate(ids, 12, use_assistant=False).token_ids != plain

    inputs = processor(text=text, audio=[clip], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    target, assistant = hf
    refs = []
    for extra in ({"assistant_model": assistant}, {}):
        with torch.no_grad():
            out = target.generate(**inputs, max_new_tokens=len(ours), do_sample=False, **extra)
        refs.append(out[0, len(ids):].tolist())
    assert ours == plain == refs[0] == refs[1]


def test_a_bundle_without_audio_says_so(bundle_dir):
    from edgegen.runtime.audio import AudioEncoder

    text_bundle = bundle_dir("e2b-like")
    with pytest.raises(EdgegenError, match="has no audio encoder") as err:
        AudioEncoder.open(text_bundle)
    assert "\n" not in str(err.value)


def test_audio_runs_without_torch(mm_bundle, tmp_path):
    """WAV reading, features, the audio graph and speculative decoding with the clip, in an interpreter that
    cannot import torch or transformers; same ids as this process."""
    import json

    from test_no_torch import run_blocked

    from edgegen.runtime.audio import AudioEncoder
    from edgegen.runtime.generate import Generator

    wav = _write_wav(tmp_path / "clip.wav", _clip(0.8, seed=9))
    prompt = f"Listen: {raudio.AUDIO_TOKEN}"
    code = f"""
import json
from edgegen.runtime.audio import AudioEncoder
from edgegen.runtime.generate import Generator
gen = Generator({str(mm_bundle)!r})
enc = AudioEncoder.open({str(mm_bundle)!r})
waves = enc.load([{str(wav)!r}])
ids = enc.expand(gen.tokenizer.encode({prompt!r}), waves)
out = gen.generate(ids, 6, draft_tokens=2, soft=enc.soft_tokens(ids, waves)).token_ids
print(json.dumps({{"ids": out, **report()}}))
"""
    proc = run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["attempts"] == [] and got["loaded"] == []
    gen, enc = Generator(mm_bundle), AudioEncoder.open(mm_bundle)
    waves = enc.load([wav])
    ids = enc.expand(gen.tokenizer.encode(prompt), waves)
    assert got["ids"] == gen.generate(ids, 6, draft_tokens=2, soft=enc.soft_tokens(ids, waves)).token_ids


# -- the API: generate(audio=...), chat audio parts --------------------------------------------------------------


def test_generate_with_audio_equals_the_encoder_path(mm_bundle, tmp_path):
    """`generate(prompt, audio=[wav])` is the expansion + soft tokens above (same ids), and reports the
    audio encode time."""
    from edgegen.runtime.audio import AudioEncoder
    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    wav = _write_wav(tmp_path / "c.wav", _clip(0.6, seed=11))
    prompt = f"Two clips: {raudio.AUDIO_TOKEN} and {raudio.AUDIO_TOKEN}."
    gen = Generator(Bundle(mm_bundle, threads=1))
    result = gen.generate(prompt, 8, draft_tokens=2, audio=[wav, _clip(0.3, seed=12)])
    enc = AudioEncoder.open(mm_bundle, threads=1)
    waves = enc.load([wav, _clip(0.3, seed=12)])
    ids = enc.expand(gen.tokenizer.encode(prompt), waves)
    assert result.stats.prompt_tokens == len(ids) and result.stats.audio_encode_s > 0
    assert result.token_ids == Generator(gen.bundle).generate(ids, 8, draft_tokens=2,
                                                              soft=enc.soft_tokens(ids, waves)).token_ids


def test_chat_with_an_audio_part_equals_transformers(mm_bundle, hf, processor, tmp_path):
    """A chat turn with a transformers-format audio part: the same answer as transformers given the
    processor's rendering of the same messages; the next turn reuses the clip's K/V."""
    import torch

    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    clip = _clip(1.1, seed=13)
    wav = _write_wav(tmp_path / "turn.wav", clip)
    content = [{"type": "audio", "audio": str(wav)}, {"type": "text", "text": "What is said?"}]
    gen = Generator(Bundle(mm_bundle, threads=1))
    events = list(gen.chat(content, max_new_tokens=10, draft_tokens=3))
    ours = [e.token_id for e in events]

    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}, content[1]]}],
                                             tokenize=False, add_generation_prompt=True)
    pcm = np.clip(np.round(clip * 32767), -32768, 32767).astype(np.float32) / 32768  # what the WAV holds
    inputs = processor(text=rendered, audio=[pcm.astype(np.float32)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ref = hf[0].generate(**inputs, max_new_tokens=len(ours), do_sample=False, assistant_model=hf[1])
    assert ours == ref[0, inputs["input_ids"].shape[1]:].tolist()

    follow = list(gen.chat("And then?", max_new_tokens=4))
    ids = inputs["input_ids"][0].tolist()
    eoa = len(ids) - ids[::-1].index(processor.audio_token_id)  # one past the clip's last soft token
    # the clip's K/V stayed (the earlier answer may re-tokenize differently, so not necessarily all of it)
    assert follow[-1].stats.reused_tokens >= eoa


def test_an_image_and_a_clip_in_one_prompt_equal_transformers(mm_bundle, hf, processor):
    """Both modalities through one prompt: ids and greedy speculative output equal transformers'."""
    import torch
    from PIL import Image

    from edgegen.runtime.generate import Generator
    from edgegen.runtime.model import Bundle

    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 200, 3), dtype=np.uint8))
    clip = _clip(0.9, seed=14)
    text = f"<start_of_turn>user\nSee <|image|> and hear {raudio.AUDIO_TOKEN}.<end_of_turn>\n<start_of_turn>model\n"
    result = Generator(Bundle(mm_bundle, threads=1)).generate(text, 10, draft_tokens=3, images=[image], audio=[clip])
    inputs = processor(text=text, images=[image], audio=[clip], return_tensors="pt")
    assert result.stats.prompt_tokens == inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = hf[0].generate(**inputs, max_new_tokens=len(result.token_ids), do_sample=False, assistant_model=hf[1])
    assert result.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_bad_audio_through_the_api_runs_nothing(mm_bundle, tmp_path, bundle_dir):
    from edgegen.runtime.generate import Generator

    gen = Generator(mm_bundle)
    prompt = f"Hear {raudio.AUDIO_TOKEN}"
    bad = _write_wav(tmp_path / "8k.wav", _clip(1.0), rate=8000)
    cases = [([bad], "8000 Hz"), ([_clip(1.0), _clip(1.0)], "1 <|audio|> placeholder(s) for 2"),
             ([_clip(25.0)], "holds 512"), ([tmp_path / "none.wav"], "does not exist")]
    for clips, words in cases:
        with pytest.raises(EdgegenError) as err:
            gen.generate(prompt, 4, audio=clips)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert gen.processed == [] and not gen.messages  # nothing ran
    with pytest.raises(EdgegenError, match="has no audio graph"):
        Generator(bundle_dir("e2b-like")).generate(prompt, 4, audio=[_clip(1.0)])
    with pytest.raises(EdgegenError, match="has no audio graph"):
        list(Generator(bundle_dir("e2b-like")).chat([{"type": "audio", "audio": _clip(1.0)}]))


# -- the CLI ----------------------------------------------------------------------------------------------------


def _edgegen(*args: str):
    from test_bad_input import edgegen

    return edgegen(*args, timeout=300)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad-audio"))


@pytest.mark.parametrize("case", ["truncated", "rate", "stereo", "long", "too many for the context", "no audio graph"])
def test_cli_bad_audio_is_one_error_line(mm_bundle, bundle_dir, bad_files, case):
    """Exit 2 (a user error), nothing on stdout, and one stderr line that names the problem (every bad file
    kind goes through the same reader: test_bad_audio_is_one_line covers them all through the API)."""
    good = bad_files["truncated"][0].with_name("good.wav")
    clip, words = bad_files.get(case, (good, {"too many for the context": "holds 512",
                                              "no audio graph": "has no audio graph"}.get(case)))
    bundle = bundle_dir("e2b-like") if case == "no audio graph" else mm_bundle
    repeat = 20 if case == "too many for the context" else 1
    proc = _edgegen("run", str(bundle), "-p", "What is said?", "-n", "3", *["--audio", str(clip)] * repeat)
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    assert (proc.returncode, proc.stdout, len(lines)) == (2, b"", 1), proc.stderr
    assert lines[0].startswith("error:") and words in lines[0], lines[0]


def test_cli_run_with_audio(mm_bundle, bad_files):
    """`edgegen run B --audio clip.wav -p ...` answers what the API's chat turn with that clip answers."""
    import json

    from edgegen.runtime.generate import Generator

    good = bad_files["truncated"][0].with_name("good.wav")
    proc = _edgegen("run", str(mm_bundle), "--audio", str(good), "-p", "What is said?", "-n", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stats"]["audio_encode_s"] > 0
    events = list(Generator(mm_bundle).chat("What is said?", max_new_tokens=5, audio=[good]))
    assert out["token_ids"] == [e.token_id for e in events]
