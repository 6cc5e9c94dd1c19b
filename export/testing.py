"""Random-weight Gemma 4 target + assistant pairs for tests and benchmarks.

Every preset keeps the structural features of the published pair it is named after (its config.json
files; docs/architecture.md, "The pair in brief"): per-layer embeddings, KV-shared layers fed by one
store layer of each kind, sliding + full layers with different head dims, proportional RoPE with partial
rotary on full layers, final logit softcapping, the double-wide MLP (E2B) and the assistant's centroid
head with a non-trivial token ordering. Sizes shrink; nothing else does. Pairs are written with
`save_pretrained` (safetensors) plus a tokenizer and generation config, so tests go through the real
loading path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgegen.export.compat import apply_transformers_shims

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _pattern(num_layers: int, period: int) -> list[str]:
    return [_FULL if (i + 1) % period == 0 else _SLIDING for i in range(num_layers)]


@dataclass(frozen=True)
class Preset:
    """Sizes of a synthetic pair. Structure is fixed by the family (E2B-like or E4B-like)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    full_every: int  # E2B: every 5th layer is full attention, E4B: every 6th
    num_kv_shared_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    global_head_dim: int
    sliding_window: int
    ple_dim: int
    double_wide_mlp: bool
    assistant_hidden: int
    assistant_intermediate: int
    assistant_heads: int = 4
    num_centroids: int = 32
    centroid_top_k: int = 4
    max_position_embeddings: int = 131072
    init_std: float = 0.06
    # 26B-A4B / 31B structure: full layers with num_global_kv_heads KV heads whose values are their keys
    # (attention_k_eq_v, no v_proj); with num_experts, a router and top-k experts beside the dense MLP.
    num_global_kv_heads: int | None = None
    k_eq_v: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    # The published assistant's head: the centroid head (E2B, E4B) or a plain tied lm_head (26B-A4B, 31B).
    centroid_head: bool = True
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "e2b-like": Preset(
        vocab_size=512, hidden_size=128, intermediate_size=192, num_layers=10, full_every=5,
        num_kv_shared_layers=5, num_heads=4, num_kv_heads=1, head_dim=32, global_head_dim=64,
        sliding_window=16, ple_dim=16, double_wide_mlp=True, assistant_hidden=64, assistant_intermediate=128,
    ),
    "e4b-like": Preset(
        vocab_size=512, hidden_size=160, intermediate_size=256, num_layers=12, full_every=6,
        num_kv_shared_layers=6, num_heads=4, num_kv_heads=2, head_dim=32, global_head_dim=64,
        sliding_window=16, ple_dim=16, double_wide_mlp=False, assistant_hidden=64, assistant_intermediate=128,
    ),
    # Benchmark slice: real E2B per-layer dims, fewer layers, 32k vocabulary (weights dominate a step).
    "e2b-slice": Preset(
        vocab_size=32768, hidden_size=1536, intermediate_size=6144, num_layers=10, full_every=5,
        num_kv_shared_layers=5, num_heads=8, num_kv_heads=1, head_dim=256, global_head_dim=512,
        sliding_window=512, ple_dim=256, double_wide_mlp=True, assistant_hidden=256,
        assistant_intermediate=2048, num_centroids=256, centroid_top_k=32, init_std=0.02,
    ),
    # Small layers with the real Gemma 4 vocabulary: the 262,144-row tables and the real tokenizer
    # (save_pair(..., real_tokenizer=True)) at a size tests can export and run in seconds.
    "real-vocab": Preset(
        vocab_size=262144, hidden_size=64, intermediate_size=128, num_layers=6, full_every=3,
        num_kv_shared_layers=3, num_heads=2, num_kv_heads=1, head_dim=32, global_head_dim=64,
        sliding_window=16, ple_dim=8, double_wide_mlp=True, assistant_hidden=32, assistant_intermediate=64,
        assistant_heads=2, num_centroids=64, centroid_top_k=8,
    ),
    # Smallest preset with hidden >= 1024, for the context-scaling benchmark.
    "h1024": Preset(
        vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_layers=10, full_every=5,
        num_kv_shared_layers=5, num_heads=8, num_kv_heads=1, head_dim=128, global_head_dim=256,
        sliding_window=512, ple_dim=64, double_wide_mlp=True, assistant_hidden=256,
        assistant_intermediate=1024, num_centroids=128, centroid_top_k=16, init_std=0.02,
    ),
    # 26B-A4B structure (data/gemma4/pairs.json): one period of its 5 sliding + 1 full layers (more random
    # layers amplify fp32 rounding past the parity tests' 1e-4 sanity bound), the full layer with global head dim,
    # fewer (global) KV heads and K=V; 128 -> 16 experts, top-8 -> top-4, the dense MLP beside them; no
    # per-layer embeddings and no KV sharing in the target (the assistant reads the last layer of each kind).
    "moe-like": Preset(
        vocab_size=512, hidden_size=128, intermediate_size=96, num_layers=6, full_every=6,
        num_kv_shared_layers=0, num_heads=4, num_kv_heads=2, head_dim=32, global_head_dim=64,
        sliding_window=16, ple_dim=0, double_wide_mlp=False, assistant_hidden=64, assistant_intermediate=256,
        num_global_kv_heads=1, k_eq_v=True, num_experts=16, top_k_experts=4, moe_intermediate_size=32,
        centroid_head=False,
    ),
    # 31B structure: dense, 32/16/4 heads -> 8/4/1, K=V full layers, no per-layer embeddings, no KV sharing.
    "31b-like": Preset(
        vocab_size=512, hidden_size=160, intermediate_size=320, num_layers=6, full_every=6,
        num_kv_shared_layers=0, num_heads=8, num_kv_heads=4, head_dim=32, global_head_dim=64,
        sliding_window=16, ple_dim=0, double_wide_mlp=False, assistant_hidden=64, assistant_intermediate=256,
        num_global_kv_heads=1, k_eq_v=True, centroid_head=False,
    ),
}

# Gemma-style special tokens, ids fixed so generation configs can name them.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 5
GEMMA4_VOCAB, GEMMA4_TURN_END_ID = 262144, 106  # the real tokenizer: <pad> 0, <eos> 1, <bos> 2 as above

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def target_text_config(preset: Preset, **overrides):
    from transformers import Gemma4TextConfig

    kwargs = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        global_head_dim=preset.global_head_dim,
        layer_types=_pattern(preset.num_layers, preset.full_every),
        sliding_window=preset.sliding_window,
        num_kv_shared_layers=preset.num_kv_shared_layers,
        hidden_size_per_layer_input=preset.ple_dim,
        vocab_size_per_layer_input=preset.vocab_size,
        final_logit_softcapping=30.0,
        use_double_wide_mlp=preset.double_wide_mlp,
        attention_k_eq_v=preset.k_eq_v,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        initializer_range=preset.init_std,
        pad_token_id=PAD_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        bos_token_id=BOS_ID,
    )
    kwargs.update(_large_structure(preset))
    kwargs.update(overrides)
    return Gemma4TextConfig(**kwargs)


def _large_structure(preset: Preset) -> dict:
    """The config fields only the 26B-A4B / 31B structure sets (defaults otherwise)."""
    out = {}
    if preset.num_global_kv_heads is not None:
        out["num_global_key_value_heads"] = preset.num_global_kv_heads
    if preset.num_experts:
        out.update(enable_moe_block=True, num_experts=preset.num_experts, top_k_experts=preset.top_k_experts,
                   moe_intermediate_size=preset.moe_intermediate_size)
    return out


def assistant_config(preset: Preset, centroid_head: bool | None = None):
    """centroid_head None: the preset's (its published assistant's) head."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    apply_transformers_shims()
    text = Gemma4TextConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.assistant_hidden,
        intermediate_size=preset.assistant_intermediate,
        num_hidden_layers=4,
        num_attention_heads=preset.num_heads if preset.num_global_kv_heads is not None else preset.assistant_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        global_head_dim=preset.global_head_dim,
        layer_types=[_SLIDING, _SLIDING, _SLIDING, _FULL],
        sliding_window=preset.sliding_window,
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=None,
        use_double_wide_mlp=False,
        attention_k_eq_v=preset.k_eq_v,
        **({"num_global_key_value_heads": preset.num_global_kv_heads} if preset.num_global_kv_heads else {}),
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.init_std,
        pad_token_id=PAD_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        bos_token_id=BOS_ID,
    )
    return Gemma4AssistantConfig(
        text_config=text.to_dict(),
        backbone_hidden_size=preset.hidden_size,
        use_ordered_embeddings=preset.centroid_head if centroid_head is None else centroid_head,
        num_centroids=preset.num_centroids,
        centroid_intermediate_top_k=preset.centroid_top_k,
        tie_word_embeddings=True,
    )


def _perturb_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Make norm weights and layer scalars non-trivial so a graph that drops one is caught."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))


def build_target(preset: Preset | str, seed: int = 0, conditional: bool = False, **overrides):
    """A random-weight target: `Gemma4ForCausalLM`, or `Gemma4ForConditionalGeneration` (text only)."""
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    text = target_text_config(preset, **overrides)
    if conditional:
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict()))
    else:
        model = Gemma4ForCausalLM(text)
    _perturb_(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def build_assistant(preset: Preset | str, seed: int = 0, centroid_head: bool | None = None):
    """centroid_head None: the preset's (its published assistant's) head."""
    from transformers import Gemma4AssistantForCausalLM

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    centroid_head = preset.centroid_head if centroid_head is None else centroid_head
    torch.manual_seed(seed + 100)
    model = Gemma4AssistantForCausalLM(assistant_config(preset, centroid_head))
    _perturb_(model, torch.Generator().manual_seed(seed + 101))
    if centroid_head:
        # A non-trivial ordering: clusters are random subsets of the vocabulary, not contiguous ranges.
        order = torch.randperm(preset.vocab_size, generator=torch.Generator().manual_seed(seed + 102))
        model.masked_embedding.token_ordering.copy_(order)
    return model.eval()


def _corpus_text(max_chars: int = 400_000) -> list[str]:
    """Offline training text every Python installation carries: the standard library's own sources."""
    import os

    root = Path(os.__file__).parent
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with Gemma-style special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_TOKENIZER_CACHE: dict[int, object] = {}


def save_pair(
    out_dir: str | Path,
    preset: Preset | str = "e2b-like",
    seed: int = 0,
    centroid_head: bool | None = None,
    conditional: bool = False,
    real_tokenizer: bool = False,
) -> tuple[Path, Path]:
    """Write `<out>/target` and `<out>/assistant` as HF checkpoints; return both paths. `real_tokenizer`: the
    real Gemma 4 tokenizer and chat template (needs the 262,144-token vocabulary), stopping at <eos> and
    <turn|> as the published generation config does."""
    from transformers import GenerationConfig

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if real_tokenizer and preset.vocab_size != GEMMA4_VOCAB:
        raise ValueError(f"the real tokenizer needs a {GEMMA4_VOCAB}-token vocabulary, not {preset.vocab_size}")
    eos = [EOS_ID, GEMMA4_TURN_END_ID] if real_tokenizer else [EOS_ID, END_OF_TURN_ID]
    out_dir = Path(out_dir)
    target_dir, assistant_dir = out_dir / "target", out_dir / "assistant"
    target = build_target(preset, seed, conditional=conditional, eos_token_id=eos)
    target.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos, pad_token_id=PAD_ID,
                                                do_sample=False)
    target.save_pretrained(target_dir)
    if real_tokenizer:
        write_gemma4_tokenizer(target_dir)
    else:
        if preset.vocab_size not in _TOKENIZER_CACHE:
            _TOKENIZER_CACHE[preset.vocab_size] = build_tokenizer(preset.vocab_size)
        copy.deepcopy(_TOKENIZER_CACHE[preset.vocab_size]).save_pretrained(target_dir)
    assistant = build_assistant(preset, seed, centroid_head)
    assistant.save_pretrained(assistant_dir)
    return target_dir, assistant_dir


# -- full-size stand-ins ------------------------------------------------------------------------------------
# The published E2B/E4B structure (data/gemma4/pairs.json) with the real Gemma 4 tokenizer and random bf16
# weights: costs what the real pair costs (memory, bundle size, time per token); only its text is noise.
# Written tensor by tensor into <= 2 GB safetensors shards, so building one never holds the model in memory.

REALSIZE = ("e2b", "e4b", "26b-a4b", "31b")
_DATA = Path(__file__).parent / "data" / "gemma4"
_SHARD_BYTES = 2 << 30


def _published(name: str) -> dict:
    import json

    if name not in REALSIZE:
        raise ValueError(f"unknown full-size preset {name!r}; choose one of {REALSIZE}")
    return json.loads((_DATA / "pairs.json").read_text())["pairs"][name]


def cache_dir() -> Path:
    """Where full-size stand-ins are built: $EDGEGEN_CACHE/presets (default ~/.cache/edgegen/presets)."""
    import os

    return Path(os.environ.get("EDGEGEN_CACHE") or Path.home() / ".cache" / "edgegen") / "presets"


def realsize_configs(name: str, conditional: bool = False, layers: int | None = None):
    """(target config, assistant config) of a full-size preset, as transformers config objects. `layers`: a
    slice of the target, its first `layers` layers (real dimensions, fewer layers; the last is full attention)."""
    from transformers import (
        Gemma4AssistantConfig,
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    apply_transformers_shims()
    pub = _published(name)
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106])
    fields = dict(pub["target_text_config"])
    if layers is not None:
        fields["num_hidden_layers"] = layers
        fields["layer_types"] = fields["layer_types"][: layers - 1] + ["full_attention"]
    text = Gemma4TextConfig(**fields, **ids)
    target = text
    if conditional:
        target = Gemma4Config(text_config=text.to_dict(), vision_config=Gemma4VisionConfig().to_dict(),
                              audio_config=Gemma4AudioConfig().to_dict())
    a = dict(pub["assistant_config"])
    a_text = Gemma4TextConfig(**a.pop("text_config"), **ids).to_dict()
    return target, Gemma4AssistantConfig(text_config=a_text, **a)


def _tensor_specs(model_cls, config) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of what save_pretrained would write, from a model on the meta device."""
    with torch.device("meta"):
        model = model_cls(config)
    tied = {k for k in getattr(model, "_tied_weights_keys", None) or {}}
    state = model.state_dict()
    return [(k, tuple(v.shape), v.dtype) for k, v in state.items() if k not in tied]


def _fill_random(name: str, shape: tuple[int, ...], rng, std: float, write) -> None:
    """Like the HF init, in bf16: norms and layer scalars ~1, other weights N(0, std); except q_norm and
    k_norm, at d^-1/4. Gemma 4 scores attention as q.k with scale 1 after normalizing q and k, so with
    unit norm weights random scores have a standard deviation of sqrt(head_dim) (16-23 at full size):
    attention is nearly one-hot, near-ties flip on rounding noise, and fp32 summation order alone moves
    the logits of a 35-layer model (a trained model's norms do not do that). d^-1/4 gives unit variance."""
    import numpy as np

    from edgegen.export.weights import to_bfloat16

    n = int(np.prod(shape, dtype=np.int64))
    leaf = name.rsplit(".", 2)
    ones = (name.endswith(("layer_scalar", "router.scale", "router.per_expert_scale"))
            or (leaf[-1] == "weight" and "norm" in leaf[-2]))
    centre = float(shape[-1]) ** -0.25 if leaf[-2] in ("q_norm", "k_norm") else 1.0
    step = 1 << 24
    for start in range(0, n, step):
        count = min(step, n - start)
        if ones:
            chunk = centre * (1.0 + 0.05 * rng.standard_normal(count, dtype=np.float32))
        else:
            chunk = std * rng.standard_normal(count, dtype=np.float32)
        write(to_bfloat16(chunk))


def _save_random(model_cls, config, out: Path, seed: int, std: float) -> None:
    import json

    import numpy as np

    from edgegen.export.weights import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    specs = _tensor_specs(model_cls, config)
    shards, current, size = [], [], 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * (8 if dtype == torch.int64 else 2)
        if current and size + nbytes > _SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, "I64" if dtype == torch.int64 else "BF16", shape))
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    vocab = config.get_text_config().vocab_size
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

        shapes = {n: s for n, _, s in shard}

        def fill(name, write, shapes=shapes):
            if name.endswith("token_ordering"):  # the centroid head's clusters: a random token permutation
                write(rng.permutation(vocab).astype(np.int64))
            else:
                _fill_random(name, shapes[name], rng, std, write)

        write_safetensors(out / file, shard, fill)
        for name, dtype, shape in shard:
            weight_map[name] = file
            total += int(np.prod(shape, dtype=np.int64)) * (8 if dtype == "I64" else 2)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = "bfloat16"
    config.save_pretrained(out)


def write_gemma4_tokenizer(target_dir: Path) -> None:
    """The real Gemma 4 tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) into
    `target_dir`, from the package's copy (tokenizer.json stored xz-compressed)."""
    import lzma
    import shutil

    with lzma.open(_DATA / "tokenizer.json.xz") as src, (target_dir / "tokenizer.json").open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(_DATA / name, target_dir / name)


def realsize_pair(name: str, root: str | Path | None = None, conditional: bool = False,
                  seed: int = 0, layers: int | None = None) -> tuple[Path, Path]:
    """The full-size stand-in `name` (e2b, e4b): built on first use under `root` (default `cache_dir()`),
    as `<root>/<name>[-mm]/target` and `/assistant`; returns both paths. `conditional`: the published
    multimodal layout (Gemma4ForConditionalGeneration, `model.language_model.` names, vision and audio
    towers present). E2B takes ~9.3 GB of disk (+1 GB multimodal), E4B ~16 GB. `layers`: a slice of the target
    (realsize_configs), built as `<root>/<name>-L<layers>`; a 26B-A4B layer is ~1.5 GB in bf16."""
    from transformers import (
        Gemma4AssistantForCausalLM,
        Gemma4ForCausalLM,
        Gemma4ForConditionalGeneration,
        GenerationConfig,
    )

    base = Path(root) if root is not None else cache_dir()
    pair_dir = base / (name + ("-mm" if conditional else "") + (f"-L{layers}" if layers else ""))
    target_dir, assistant_dir = pair_dir / "target", pair_dir / "assistant"
    done = pair_dir / ".complete"
    if done.is_file():
        return target_dir, assistant_dir
    target_cfg, assistant_cfg = realsize_configs(name, conditional, layers)
    std = target_cfg.get_text_config().initializer_range
    cls = Gemma4ForConditionalGeneration if conditional else Gemma4ForCausalLM
    _save_random(cls, target_cfg, target_dir, seed, std)
    GenerationConfig(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, do_sample=False).save_pretrained(target_dir)
    write_gemma4_tokenizer(target_dir)
    _save_random(Gemma4AssistantForCausalLM, assistant_cfg, assistant_dir, seed + 1, std)
    GenerationConfig(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, num_assistant_tokens=4,
                     do_sample=False).save_pretrained(assistant_dir)
    done.write_text("ok\n")
    return target_dir, assistant_dir


def _small_towers() -> dict:
    """Vision and audio configs far smaller than the published ones, with the same tensor names."""
    from transformers import Gemma4AudioConfig, Gemma4VisionConfig

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=64,
                              subsampling_conv_channels=[128, 4])  # 128: the mel bins (see _mm_towers)
    return {"vision_config": vision.to_dict(), "audio_config": audio.to_dict()}


def save_bf16_pair(out_dir: str | Path, preset: Preset | str = "e2b-like", seed: int = 0,
                   multimodal: bool = False) -> tuple[Path, Path]:
    """A small pair written the way published checkpoints are: bf16 safetensors, and with `multimodal` the
    Gemma4ForConditionalGeneration layout with (small) vision and audio towers. Weights are random (no HF
    model is instantiated), written tensor by tensor like the full-size stand-ins."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    out_dir = Path(out_dir)
    target_dir, assistant_dir = out_dir / "target", out_dir / "assistant"
    text = target_text_config(preset)
    if multimodal:
        _save_random(Gemma4ForConditionalGeneration, Gemma4Config(text_config=text.to_dict(), **_small_towers()),
                     target_dir, seed, preset.init_std)
    else:
        _save_random(Gemma4ForCausalLM, text, target_dir, seed, preset.init_std)
    if preset.vocab_size not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[preset.vocab_size] = build_tokenizer(preset.vocab_size)
    copy.deepcopy(_TOKENIZER_CACHE[preset.vocab_size]).save_pretrained(target_dir)
    _save_random(Gemma4AssistantForCausalLM, assistant_config(preset), assistant_dir, seed + 1, preset.init_std)
    return target_dir, assistant_dir


# -- multimodal preset --------------------------------------------------------------------------------------
# A Gemma4ForConditionalGeneration with the real tokenizer (its <|image|>/<|audio|> tokens need the 262,144-token
# vocabulary) and the towers of the published E2B config at reduced sizes. "E2B structure" is what transformers'
# Gemma4VisionConfig / Gemma4AudioConfig default to (both documented against google/gemma-4-e2b-it): the vision
# tower is a patch embedder (linear over 16x16x3 patches + a 2-axis position-embedding table), bidirectional
# encoder layers with q/k/v norms and axial 2-D RoPE, 3x3 position-wise average pooling, then the multimodal
# embedder (scale-free RMSNorm + projection into the text width); the audio tower is the subsampling conv
# projection + conformer-style layers with chunked attention. Widths, depths and the position table shrink;
# kernel sizes, patch size, pooling, RoPE kind and layer kinds do not. Clipped linears are on (finite random
# bounds) in both towers so an export that drops a clamp is caught; the text model is the "real-vocab" preset.

MULTIMODAL_PRESET = "real-vocab"
IMAGE_SOFT_TOKENS = 70  # the smallest budget Gemma4ImageProcessor accepts (E2B's default is 280)
SPECIAL_MEDIA_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                        "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


def multimodal_towers() -> dict:
    """Vision and audio configs of the multimodal preset (see above)."""
    from transformers import Gemma4AudioConfig, Gemma4VisionConfig

    vision = Gemma4VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                                num_key_value_heads=3, head_dim=16, position_embedding_size=256,
                                use_clipped_linears=True, initializer_range=0.06)
    # subsampling_conv_channels[0] stays 128: transformers sizes the input projection as channels[0] // 4 *
    # channels[1], which equals the flattened (mel bins / 4) * channels[1] only with the 128 mel bins
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              output_proj_dims=64, subsampling_conv_channels=[128, 4])
    return {"vision_config": vision.to_dict(), "audio_config": audio.to_dict()}


def _perturb_towers_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random position tables (HF initializes them to ones: every patch position would look alike) and finite
    clip bounds on the clipped linears (HF: +-inf, i.e. no clamp)."""
    with torch.no_grad():
        for name, b in model.named_parameters():
            if name.endswith("position_embedding_table"):
                b.copy_(0.5 * torch.randn(b.shape, generator=generator))
        for name, b in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("input_min", "output_min"):
                b.fill_(-1.0 - torch.rand((), generator=generator).item())
            elif leaf in ("input_max", "output_max"):
                b.fill_(1.0 + torch.rand((), generator=generator).item())


def build_multimodal_target(seed: int = 0):
    """The random-weight multimodal target (Gemma4ForConditionalGeneration) of the multimodal preset."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    preset = PRESETS[MULTIMODAL_PRESET]
    torch.manual_seed(seed)
    text = target_text_config(preset, eos_token_id=[EOS_ID, GEMMA4_TURN_END_ID])
    model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict(), **multimodal_towers()))
    _perturb_(model, torch.Generator().manual_seed(seed + 1))
    _perturb_towers_(model, torch.Generator().manual_seed(seed + 2))
    return model.eval()


def write_processor(target_dir: Path, image_soft_tokens: int = IMAGE_SOFT_TOKENS) -> None:
    """The processor files of a multimodal checkpoint: the real tokenizer with its media tokens named (as the
    published tokenizer_config does), the image processor and the audio feature extractor, and
    processor_config.json."""
    import json

    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    target_dir = Path(target_dir)
    write_gemma4_tokenizer(target_dir)
    path = target_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["extra_special_tokens"] = dict(SPECIAL_MEDIA_TOKENS)
    path.write_text(json.dumps(cfg, indent=1))
    # One processor_config.json with each part's settings nested under its name, as ProcessorMixin saves it
    # (an image processor and a feature extractor saved apart would both write preprocessor_config.json).
    (target_dir / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Gemma4Processor", "image_seq_length": image_soft_tokens, "audio_seq_length": 750,
         "audio_ms_per_token": 40,
         "image_processor": json.loads(Gemma4ImageProcessorPil(max_soft_tokens=image_soft_tokens).to_json_string()),
         "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string())}, indent=1))


def save_multimodal_pair(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `<out>/target` (Gemma4ForConditionalGeneration + processor files) and `<out>/assistant` with
    `save_pretrained`; return both paths."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    target_dir, assistant_dir = out_dir / "target", out_dir / "assistant"
    eos = [EOS_ID, GEMMA4_TURN_END_ID]
    target = build_multimodal_target(seed)
    target.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos, pad_token_id=PAD_ID,
                                                do_sample=False)
    target.save_pretrained(target_dir)
    write_processor(target_dir)
    build_assistant(MULTIMODAL_PRESET, seed).save_pretrained(assistant_dir)
    return target_dir, assistant_dir


def load_processor(target_dir: str | Path):
    """transformers' Gemma4Processor for a checkpoint directory, without its video processor (which needs
    torchvision, not a dependency here): the image processor, feature extractor and tokenizer it saved, and
    Gemma4Processor's own prompt expansion."""
    import json

    from transformers import AutoTokenizer, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class _Processor(Gemma4Processor):
        def __init__(self, feature_extractor, image_processor, tokenizer, chat_template=None, **kwargs):
            self.image_seq_length = kwargs.pop("image_seq_length", 280)
            self.audio_seq_length = kwargs.pop("audio_seq_length", 750)
            self.audio_ms_per_token = kwargs.pop("audio_ms_per_token", 40)
            for name in ("image", "boi", "eoi", "audio", "boa", "eoa"):
                setattr(self, f"{name}_token", getattr(tokenizer, f"{name}_token"))
            self.image_token_id, self.audio_token_id = tokenizer.image_token_id, tokenizer.audio_token_id
            self.video_token, self.video_token_id = "<|video|>", tokenizer.convert_tokens_to_ids("<|video|>")
            ProcessorMixin.__init__(self, feature_extractor=feature_extractor, image_processor=image_processor,
                                    tokenizer=tokenizer, chat_template=chat_template)

    target_dir = Path(target_dir)
    settings = json.loads((target_dir / "processor_config.json").read_text())
    settings.pop("processor_class", None)
    image_processor = Gemma4ImageProcessorPil.from_dict(settings.pop("image_processor"))
    feature_extractor = Gemma4AudioFeatureExtractor.from_dict(settings.pop("feature_extractor"))
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    return _Processor(feature_extractor, image_processor, tokenizer, chat_template=tokenizer.chat_template, **settings)
