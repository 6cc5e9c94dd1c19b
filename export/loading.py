"""Load a Gemma 4 target + assistant pair (HF id or local directory) and check that they fit together.

Safetensors only, no remote code. Checks run on the configs before any weight is read, so a mismatched
pair fails in a second with one line naming both values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgegen.export.compat import apply_transformers_shims, fix_assistant_generation_config
from edgegen.export.weights import Checkpoint, Tensor, Weights, lm_head, text_prefix
from edgegen.runtime.errors import EdgegenError

TARGET_TYPES = {"gemma4": "Gemma4ForConditionalGeneration", "gemma4_text": "Gemma4ForCausalLM"}
ASSISTANT_TYPES = {"gemma4_assistant": "Gemma4AssistantForCausalLM"}


class Pair:
    """A checked target + assistant pair.

    The target is never loaded whole for export: `weights` reads its text model's tensors one at a time from
    the checkpoint (bf16 or fp32 on disk, float32 on read). The assistant is small and loaded in fp32 (the
    oracle for its checks). `target` loads the whole HF target in fp32 on first use, for small-model tools
    and tests that want the PyTorch module itself.
    """

    def __init__(self, target_dir: Path, assistant_dir: Path, config, assistant: torch.nn.Module):
        self.target_dir, self.assistant_dir = Path(target_dir), Path(assistant_dir)
        self.config = config  # the target's config (Gemma4Config or Gemma4TextConfig)
        self.assistant = assistant
        self.checkpoint = Checkpoint(self.target_dir)
        self.weights = Weights(self.checkpoint, text_prefix(self.checkpoint))
        self.assistant_weights = Weights(Checkpoint(self.assistant_dir))
        self._target = None

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def lm_head(self) -> Tensor | None:
        """The target's lm_head weight if it is not tied to the input embedding, else None."""
        return None if self.text_config.tie_word_embeddings else lm_head(self.checkpoint)

    @property
    def generation_config(self):
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(self.target_dir)
        except OSError:  # no generation_config.json: what from_pretrained would derive from the config
            return GenerationConfig.from_model_config(self.config)

    @property
    def target(self) -> torch.nn.Module:
        """The whole HF target in fp32 (loaded on first use; export itself never needs it)."""
        if self._target is None:
            cls = TARGET_TYPES[self.config.model_type]
            self._target = eager_experts(_from_pretrained(cls, self.target_dir, "target"))
        return self._target

    @property
    def text_model(self) -> torch.nn.Module:
        """The loaded target's text decoder (Gemma4TextModel) for either target class."""
        model = self.target.model
        return getattr(model, "language_model", model)


def resolve(name_or_path: str, what: str) -> Path:
    """A local directory as is; otherwise an HF hub id, downloaded (safetensors and metadata only)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EdgegenError(f"{what} '{name_or_path}' is a file; pass the model's directory or an HF id")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise EdgegenError(f"{what} '{name_or_path}' does not exist; pass a model directory or an HF id")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]
        )
    except Exception as exc:
        raise EdgegenError(_hub_failure(exc, name_or_path, what)) from None
    return Path(local)


def _hub_failure(exc: Exception, repo_id: str, what: str) -> str:
    """One line for a failed hub download: gated and private repos name the login; the rest say what failed."""
    kind = {type(exc).__name__} | {c.__name__ for c in type(exc).__mro__}
    login = "log in with `hf auth login` or set HF_TOKEN"
    if "GatedRepoError" in kind:
        return (f"{what} '{repo_id}' is a gated model: accept its license on https://huggingface.co/{repo_id} "
                f"with your account, then {login}")
    if "RepositoryNotFoundError" in kind:
        return f"{what} '{repo_id}' is not a local directory, and the Hugging Face hub has no model of that id " \
               f"that you can see (check the id; if it is private, {login})"
    if "LocalEntryNotFoundError" in kind or "OfflineModeIsEnabled" in kind:
        return (f"{what} '{repo_id}' is not a local directory or in the Hugging Face cache, and the hub cannot "
                "be reached (offline?); download it where there is network, or pass a model directory")
    return (f"{what} '{repo_id}' is not a local directory, and fetching it as a Hugging Face id failed "
            f"({type(exc).__name__}); check the path, or the id and your network")


def read_config(path: Path, what: str) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EdgegenError(f"{what} '{path}' has no config.json; is it a Hugging Face model directory?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = exc.msg if hasattr(exc, "msg") else exc
        raise EdgegenError(f"{what} config '{cfg_file}' is not valid JSON ({detail})") from None
    if not isinstance(cfg, dict):
        raise EdgegenError(f"{what} config '{cfg_file}' is not a JSON object; is it a Hugging Face config?")
    return cfg


def _text(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def _per_kind(text: dict, what: str) -> dict[str, dict]:
    """Per attention kind: KV heads and head dim, as transformers derives them.

    Asked of transformers itself because a saved config keeps the full-attention head dim in
    `per_layer_config`, while a hand-written one says `global_head_dim`: reading either key alone misses one.
    """
    from transformers import Gemma4TextConfig

    try:
        cfg = Gemma4TextConfig.from_dict(text)
        kinds = dict.fromkeys(cfg.layer_types)  # in order of first appearance
        layers = {kind: cfg.per_layer_config[cfg.layer_types.index(kind)] for kind in kinds}
    except Exception as exc:  # any malformed field: the user's fix is the same
        raise EdgegenError(f"{what} config is not a valid Gemma 4 config ({type(exc).__name__})") from None
    return {
        kind: {"num_key_value_heads": layer.num_key_value_heads, "head_dim": layer.head_dim}
        for kind, layer in layers.items()
    }


def check_pair(target_cfg: dict, assistant_cfg: dict) -> None:
    """Raise EdgegenError naming both values when the assistant cannot draft for this target."""
    ttype, atype = target_cfg.get("model_type"), assistant_cfg.get("model_type")
    if ttype in ASSISTANT_TYPES:
        raise EdgegenError(
            f"target is a Gemma 4 assistant (model_type '{ttype}'): pass the target first, then the assistant"
        )
    if ttype not in TARGET_TYPES:
        raise EdgegenError(
            f"target is model_type '{ttype}', not a Gemma 4 model (expected one of {sorted(TARGET_TYPES)})"
        )
    if atype not in ASSISTANT_TYPES:
        raise EdgegenError(
            f"assistant is model_type '{atype}', not a Gemma 4 assistant (expected 'gemma4_assistant')"
        )
    t, a = _text(target_cfg), _text(assistant_cfg)
    checks = [
        ("assistant backbone_hidden_size vs target hidden_size", assistant_cfg.get("backbone_hidden_size"),
         t.get("hidden_size")),
        ("assistant vocab_size vs target vocab_size", a.get("vocab_size"), t.get("vocab_size")),
        ("assistant sliding_window vs target sliding_window", a.get("sliding_window"), t.get("sliding_window")),
    ]
    target_kinds = _per_kind(t, "target")
    for kind, ak in _per_kind(a, "assistant").items():
        tk = target_kinds.get(kind, {})
        for key in ("num_key_value_heads", "head_dim"):
            checks.append((f"{kind} {key} (assistant vs target)", ak[key], tk.get(key)))
    for what, av, tv in checks:
        if av != tv:
            raise EdgegenError(f"mismatched pair: {what}: {av} != {tv}; use the assistant made for this target")
    # A target without KV-shared layers (26B-A4B, 31B) still has store layers: transformers makes the last
    # layer of each attention kind one, and the assistant reads those.


def _check_weights(path: Path, what: str) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EdgegenError(f"{what} '{path}' has no .safetensors weights (other formats are not loaded)")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:  # touching one tensor catches truncation of the data section
                    handle.get_slice(keys[-1])
            size = f.stat().st_size
            with f.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
            _check_data_extent(f, size, header_len)
        except EdgegenError:
            raise
        except Exception as exc:
            raise EdgegenError(f"{what} weights '{f.name}' are corrupt or truncated ({type(exc).__name__})") from None


def _check_data_extent(f: Path, size: int, header_len: int) -> None:
    with f.open("rb") as fh:
        fh.seek(8)
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise EdgegenError(f"weights '{f.name}' are truncated: {size} bytes, header says {8 + header_len + end}")


def eager_experts(model: torch.nn.Module) -> torch.nn.Module:
    """A mixture-of-experts model set to transformers' plain per-expert loop (its reference form) instead of
    grouped_mm, which also has no float64 kernel (the export's checks run a float64 copy)."""
    if getattr(model.config.get_text_config(), "enable_moe_block", False):
        model.config._experts_implementation = "eager"
    return model


_COMMON = dict(use_safetensors=True, trust_remote_code=False)


def stored_dtype(path: Path) -> torch.dtype:
    """bfloat16 if every floating-point tensor of the checkpoint is stored in bf16, else float32: a teacher
    kept in its own bf16 needs half the memory of an fp32 copy (E2B: ~9.3 instead of ~18.5 GB)."""
    kinds = set()
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        kinds |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))}
    return torch.bfloat16 if kinds == {"BF16"} else torch.float32


def _from_pretrained(cls_name: str, path: Path, what: str, dtype: torch.dtype = torch.float32):
    import transformers

    try:
        return getattr(transformers, cls_name).from_pretrained(path, dtype=dtype, **_COMMON).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgegenError(f"cannot load the {what}: {first[:200]}") from None


def _quiet_transformers() -> None:
    """Errors must stay one line on stderr: no loading bars or warnings from transformers."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_target(target: str) -> tuple[torch.nn.Module, Path]:
    """A Gemma 4 target alone (for `edgegen distill`): checked, then loaded in the precision it is stored in
    (bf16 stays bf16; never upcast to fp32 at real size)."""
    apply_transformers_shims()
    _quiet_transformers()
    target_dir = resolve(target, "target")
    cfg = read_config(target_dir, "target")
    if cfg.get("model_type") not in TARGET_TYPES:
        raise EdgegenError(
            f"target is model_type '{cfg.get('model_type')}', not a Gemma 4 model "
            f"(expected one of {sorted(TARGET_TYPES)})"
        )
    _check_weights(target_dir, "target")
    model = _from_pretrained(TARGET_TYPES[cfg["model_type"]], target_dir, "target", stored_dtype(target_dir))
    return model, target_dir


def load_assistant_for(assistant: str, target_dir: Path) -> torch.nn.Module:
    """An existing assistant, checked against the target in `target_dir`, loaded in fp32 (distill --init)."""
    apply_transformers_shims()
    _quiet_transformers()
    assistant_dir = resolve(assistant, "assistant")
    check_pair(read_config(target_dir, "target"), read_config(assistant_dir, "assistant"))
    _check_weights(assistant_dir, "assistant")
    return _from_pretrained("Gemma4AssistantForCausalLM", assistant_dir, "assistant")


def _target_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgegenError(f"cannot read the target config: {first[:200]}") from None


def _check_target_tensors(pair: Pair) -> None:
    """Every tensor the text model needs is in the checkpoint with the shape its config implies (what
    from_pretrained would check), found from a model built on the meta device: nothing is read."""
    from transformers import Gemma4TextModel

    with torch.device("meta"):
        model = Gemma4TextModel(pair.text_config)
    for name, tensor in model.state_dict().items():
        if name not in pair.weights:
            raise EdgegenError(f"the target checkpoint has no tensor '{pair.weights.prefix}{name}'; "
                               "is it a complete Gemma 4 checkpoint?")
        shape = pair.checkpoint.shape(pair.weights.prefix + name)
        if tuple(shape) != tuple(tensor.shape):
            raise EdgegenError(f"target tensor '{pair.weights.prefix}{name}' has shape {list(shape)} but the config "
                               f"implies {list(tensor.shape)}; the weights do not belong to this config")


def load_pair(target: str, assistant: str, draft_tokens: int = 4) -> Pair:
    """Check a pair and open it: the target's checkpoint is indexed, not loaded; the assistant is loaded."""
    apply_transformers_shims()
    _quiet_transformers()
    target_dir, assistant_dir = resolve(target, "target"), resolve(assistant, "assistant")
    target_cfg, assistant_cfg = read_config(target_dir, "target"), read_config(assistant_dir, "assistant")
    check_pair(target_cfg, assistant_cfg)
    _check_weights(target_dir, "target")
    _check_weights(assistant_dir, "assistant")
    amodel = _from_pretrained("Gemma4AssistantForCausalLM", assistant_dir, "assistant")
    fix_assistant_generation_config(amodel, draft_tokens)
    pair = Pair(target_dir, assistant_dir, _target_config(target_dir), amodel)
    _check_target_tensors(pair)
    return pair
