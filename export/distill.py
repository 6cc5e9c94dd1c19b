"""`edgegen distill`: train a Gemma 4 assistant (MTP drafter) for a given target from plain text.

The drafter is trained on exactly what it sees at run time (docs/architecture.md, "One round"): for a draft
burst starting at position t it gets the target's embedding of token x_t (times sqrt(H)) and the target's
post-norm hidden state at t-1, sits at the constant position t and cross-attends to the target's store
layers' K/V for positions < t (sliding layers: the last `window` of them). Steps 2..k are unrolled: each
consumes the drafter's own previous token (argmax) and its own projected hidden state. Step i learns the
target's distribution at position t+i-1 (KL to the target's softmax). Every position of a training window
is a burst start, so one target pass feeds T-k bursts.

With `use_ordered_embeddings` (the centroid head), the token ordering is learned from the target's
embedding table by balanced k-means; the centroid scorer is trained to rank the cluster of the target's
top token first.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgegen.export.compat import apply_transformers_shims
from edgegen.runtime.errors import EdgegenError

CHECKPOINT = "distill-checkpoint.pt"


@dataclass
class DistillOptions:
    steps: int = 2000
    draft_tokens: int = 4
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 100
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 4
    num_centroids: int = 0  # 0: plain lm_head; else use_ordered_embeddings with this many clusters
    centroid_top_k: int = 8
    seed: int = 0
    checkpoint_every: int = 200
    bursts_per_window: int = 0  # burst starts trained per window (0: all T-k of them)
    self_generated: int = 0  # sequences the target generates itself to train on, half of every batch:
    #                          drafts are judged on the target's own continuations
    self_generated_temperature: float = 1.0  # 0: greedy continuations (what greedy speculation verifies)
    init: str | None = None  # start from this assistant (HF id or dir) instead of a fresh one; its shape
    #                          and token ordering win over hidden_size/num_layers/num_centroids
    save_dtype: str = "float32"  # or bfloat16 (smaller files; loads back exactly into fp32)


def default_corpus() -> list[str]:
    """Offline text every Python installation carries: the standard library's own sources."""
    import os

    root = Path(os.__file__).parent
    skip = {"test", "idlelib", "site-packages", "tkinter", "lib2to3", "turtledemo"}
    texts = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        texts.append(path.read_text(encoding="utf-8", errors="ignore"))
    return texts


def read_corpus(data: Path | None) -> list[str]:
    if data is None:
        return default_corpus()
    data = Path(data)
    if data.is_file():
        files = [data]
    elif data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in {".txt", ".md", ".py", ".jsonl"})
    else:
        raise EdgegenError(f"--data '{data}' does not exist; pass a text file or a directory of .txt/.md/.py files")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise EdgegenError(f"--data file '{f}' is not UTF-8 text") from None
    if not any(t.strip() for t in texts):
        raise EdgegenError(f"--data '{data}' holds no text")
    return texts


def tokenize(target_dir: Path, texts: list[str]) -> np.ndarray:
    tok_file = Path(target_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise EdgegenError(f"target '{target_dir}' has no tokenizer.json; distill needs the target's tokenizer")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int64)


def balanced_clusters(emb: np.ndarray, num_clusters: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Token ordering for the centroid head: equal-size clusters of similar embedding rows.

    Spherical k-means, then a greedy balanced assignment (most confident tokens first, each cluster
    capped at vocab/num_clusters). Returns a permutation of the vocabulary, cluster by cluster.
    """
    v = emb.shape[0]
    if v % num_clusters:
        raise EdgegenError(f"vocabulary {v} is not divisible by {num_clusters} centroids; choose a divisor")
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    rng = np.random.default_rng(seed)
    # Farthest-point initialisation: each new centroid is the row least similar to those chosen so far.
    chosen = [int(rng.integers(v))]
    closest = x @ x[chosen[0]]
    for _ in range(num_clusters - 1):
        chosen.append(int(np.argmin(closest)))
        closest = np.maximum(closest, x @ x[chosen[-1]])
    cent = x[chosen].copy()
    for _ in range(iters):
        assign = (x @ cent.T).argmax(1)
        for c in range(num_clusters):
            members = x[assign == c]
            if len(members):
                cent[c] = members.mean(0)
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-8)
    scores = x @ cent.T
    cap = v // num_clusters
    order = np.argsort(-scores.max(1), kind="stable")
    fill = np.zeros(num_clusters, dtype=np.int64)
    clusters: list[list[int]] = [[] for _ in range(num_clusters)]
    for t in order:
        for c in np.argsort(-scores[t], kind="stable"):
            if fill[c] < cap:
                clusters[c].append(int(t))
                fill[c] += 1
                break
    return np.asarray([t for c in clusters for t in c], dtype=np.int64)


def assistant_for(target, opts: DistillOptions):
    """A fresh Gemma4AssistantForCausalLM shaped to read this target's store layers."""
    apply_transformers_shims()
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    t = target.config.get_text_config()
    sliding = t.per_layer_config[t.layer_types.index("sliding_attention")]
    full = t.per_layer_config[t.layer_types.index("full_attention")]
    text = Gemma4TextConfig(
        vocab_size=t.vocab_size, hidden_size=opts.hidden_size, intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_layers, num_attention_heads=opts.num_heads,
        num_key_value_heads=sliding.num_key_value_heads, head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        layer_types=["sliding_attention"] * (opts.num_layers - 1) + ["full_attention"],
        sliding_window=t.sliding_window, num_kv_shared_layers=opts.num_layers, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, final_logit_softcapping=None, use_double_wide_mlp=False,
        max_position_embeddings=t.max_position_embeddings, rope_parameters=t.rope_parameters,
        pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id, bos_token_id=t.bos_token_id,
    )
    cfg = Gemma4AssistantConfig(
        text_config=text.to_dict(), backbone_hidden_size=t.hidden_size,
        use_ordered_embeddings=bool(opts.num_centroids), num_centroids=opts.num_centroids or 2048,
        centroid_intermediate_top_k=opts.centroid_top_k, tie_word_embeddings=True,
    )
    torch.manual_seed(opts.seed)
    return Gemma4AssistantForCausalLM(cfg)


def _text_model(target):
    return target.model.language_model if hasattr(target.model, "language_model") else target.model


def burst_masks(t_len: int, k: int, window: int) -> dict[str, torch.Tensor]:
    """Query j starts a burst at position t=j+1 and sees keys [0, t) (sliding: [t-window, t))."""
    q = torch.arange(1, t_len - k + 1)[:, None]
    kv = torch.arange(t_len)[None, :]
    full = kv < q
    return {"full_attention": full[None, None], "sliding_attention": (full & (kv >= q - window))[None, None]}


def unrolled_loss(assistant, embed, ids, hidden, shared_kv, target_logp, k: int, masks,
                  starts: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """KL to the target over k unrolled draft steps; returns (loss, per-step greedy agreement).

    `starts`: which burst starts t (1..T-k) of each window to train on (all by default); a subset
    keeps the drafter's share of a step small while the target pass still covers the whole window.
    """
    b, t_len = ids.shape
    t = torch.arange(1, t_len - k + 1) if starts is None else starts
    n = len(t)
    positions = t[None].expand(b, n)
    masks = {kind: m[:, :, t - 1] for kind, m in masks.items()}
    tok = ids[:, t]
    h = hidden[:, t - 1]
    total = torch.zeros(())
    agree = []
    still = torch.ones(b, n, dtype=torch.bool)
    for i in range(1, k + 1):
        x = assistant.pre_projection(torch.cat([embed(tok), h], dim=-1))
        # output_hidden_states keeps transformers from slicing the (absent) per-layer inputs of S>1 queries.
        out = assistant.model(inputs_embeds=x, attention_mask=masks, position_ids=positions,
                              shared_kv_states=shared_kv, use_cache=False, output_hidden_states=True)
        last = out.last_hidden_state
        logits = assistant.lm_head(last)
        ref = target_logp[:, t + i - 1]  # the target's log-probs at position t+i-1
        total = total + F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="batchmean") / n
        pred = logits.argmax(-1)
        if assistant.masked_embedding is not None:
            me = assistant.masked_embedding
            clusters = torch.argsort(me.token_ordering).div(me.vocab_size_per_centroid, rounding_mode="floor")
            total = total + F.cross_entropy(me.centroids(last).flatten(0, 1), clusters[ref.argmax(-1)].flatten())
        still = still & (pred == ref.argmax(-1))
        agree.append(still.float().mean().item())
        tok, h = pred.detach(), assistant.post_projection(last)
    return total / k, agree


def _self_generated(target, ids: np.ndarray, opts: DistillOptions, seed: int) -> np.ndarray:
    """[n, seq_len] windows whose tail the target sampled itself, each from a 16-token text prefix."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    prefix, new, out = 16, opts.seq_len - 16, []
    while len(out) < opts.self_generated:
        n = min(16, opts.self_generated - len(out))
        starts = rng.integers(0, len(ids) - prefix, n)
        x = torch.from_numpy(np.stack([ids[s : s + prefix] for s in starts]))
        if opts.self_generated_temperature > 0:
            how = dict(do_sample=True, temperature=opts.self_generated_temperature, top_k=0, top_p=1.0)
        else:
            how = dict(do_sample=False)
        with torch.no_grad():
            seqs = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                   **how)
        out.extend(seqs[:, : opts.seq_len].numpy())
    return np.stack(out)


def distill(target: str, out: str | Path, data: str | Path | None = None, options: DistillOptions | None = None,
            resume: bool = True, progress: Callable[[int, int, dict], None] = lambda step, total, info: None) -> Path:
    """Train an assistant for `target`; writes an HF checkpoint to `out` (loadable by transformers and
    by `edgegen export`). Checkpoints every `checkpoint_every` steps; a rerun resumes from the last one."""
    from edgegen.export.loading import load_target

    opts = options or DistillOptions()
    out = Path(out).expanduser().absolute()
    _check_options(opts, out)
    target_model, target_dir = load_target(target)
    ids = tokenize(target_dir, read_corpus(Path(data) if data else None))
    if len(ids) < opts.seq_len * 4:
        raise EdgegenError(f"the training text has {len(ids)} tokens; give at least {opts.seq_len * 4}")
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    assistant = _initial_assistant(target_model, target_dir, opts)
    params = [p for p in assistant.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01, betas=(0.9, 0.95))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    start, rng = _resume(ckpt, assistant, optim, rng) if resume and ckpt.exists() else (0, rng)
    for p in target_model.parameters():
        p.requires_grad_(False)
    generated = _self_generated(target_model, ids, opts, seed=opts.seed) if opts.self_generated else None
    text_model = _text_model(target_model)
    masks = burst_masks(opts.seq_len, opts.draft_tokens, text_model.config.sliding_window)
    assistant.train()
    t0 = time.perf_counter()
    for step in range(start, opts.steps):
        for group in optim.param_groups:
            group["lr"] = _learning_rate(opts, step)
        batch = _batch(rng, ids, generated, opts)
        with torch.no_grad():
            t_out = target_model(input_ids=batch, return_shared_kv_states=True, output_hidden_states=True,
                                 use_cache=False)
            # The teacher may run in bf16 (as stored); the assistant trains in fp32.
            logp = F.log_softmax(t_out.logits.float(), -1)
            hidden = t_out.hidden_states[-1].float()
            shared = {name: tuple(x.float() for x in kv) for name, kv in t_out.shared_kv_states.items()}
        starts = None
        if opts.bursts_per_window and opts.bursts_per_window < opts.seq_len - opts.draft_tokens:
            pick = rng.choice(opts.seq_len - opts.draft_tokens, opts.bursts_per_window, replace=False)
            starts = torch.from_numpy(np.sort(pick) + 1)
        embed = lambda x: text_model.embed_tokens(x).float()  # noqa: E731 - the teacher may be bf16
        loss, agree = unrolled_loss(assistant, embed, batch, hidden, shared, logp, opts.draft_tokens, masks, starts)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        expected = 1 + sum(agree)  # tokens per target call if acceptance were exactly this agreement
        progress(step + 1, opts.steps, {"loss": loss.item(), "agree": agree, "tokens_per_call": expected,
                                        "elapsed_s": time.perf_counter() - t0})
        if (step + 1) % opts.checkpoint_every == 0 and step + 1 < opts.steps:
            _save_checkpoint(ckpt, assistant, optim, step + 1, rng, opts)
    _save_assistant(assistant, opts, out)
    ckpt.unlink(missing_ok=True)
    return out


def _learning_rate(opts: DistillOptions, step: int) -> float:
    """Linear warmup, then cosine decay to zero at opts.steps."""
    return opts.lr * min(1.0, (step + 1) / opts.warmup) * 0.5 * (1 + math.cos(math.pi * step / opts.steps))


def _check_options(opts: DistillOptions, out: Path) -> None:
    if opts.self_generated_temperature < 0:
        raise EdgegenError("--self-generated-temperature must be >= 0 (0 = greedy)")
    if opts.steps < 1 or opts.draft_tokens < 1 or opts.seq_len <= opts.draft_tokens + 1 or opts.batch_size < 1:
        raise EdgegenError("--steps, --draft-tokens and batch size must be >= 1, and seq_len > draft tokens + 1")
    if out.exists() and not out.is_dir():
        raise EdgegenError(f"'{out}' exists and is not a directory; choose another --out")
    if (out / "config.json").exists() and not (out / CHECKPOINT).exists():
        raise EdgegenError(f"'{out}' already holds a finished model; choose another --out")


def _initial_assistant(target_model, target_dir: Path, opts: DistillOptions):
    """The assistant training starts from: `opts.init`'s checkpoint, or a new one sized for the target whose
    centroid head (if any) clusters the target's embedding."""
    from edgegen.export.loading import load_assistant_for

    if opts.init:
        return load_assistant_for(opts.init, target_dir)
    assistant = assistant_for(target_model, opts)
    if assistant.masked_embedding is not None:
        emb = _text_model(target_model).embed_tokens.weight.detach().float().numpy()
        order = balanced_clusters(emb, opts.num_centroids, seed=opts.seed)
        assistant.masked_embedding.token_ordering.copy_(torch.from_numpy(order))
    return assistant


def _resume(ckpt: Path, assistant, optim, rng) -> tuple[int, np.random.Generator]:
    """Load a checkpoint into the assistant and optimizer; returns (its step, the generator it saved)."""
    state = torch.load(ckpt, weights_only=False)
    assistant.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    return state["step"], np.random.default_rng(state["np_seed"])


def _save_checkpoint(ckpt: Path, assistant, optim, step: int, rng: np.random.Generator, opts: DistillOptions) -> None:
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": assistant.state_dict(), "optim": optim.state_dict(), "step": step,
                "np_seed": int(rng.integers(2**62)), "options": asdict(opts)}, tmp)
    tmp.replace(ckpt)


def _batch(rng: np.random.Generator, ids: np.ndarray, generated: np.ndarray | None, opts: DistillOptions):
    """batch_size windows of seq_len tokens from the corpus; half from the target's own samples if given."""
    starts = rng.integers(0, len(ids) - opts.seq_len, opts.batch_size)
    rows = [ids[s : s + opts.seq_len] for s in starts]
    if generated is not None:
        picks = rng.integers(0, len(generated), opts.batch_size // 2)
        rows[: len(picks)] = list(generated[picks])
    return torch.from_numpy(np.stack(rows))


def _save_assistant(assistant, opts: DistillOptions, out: Path) -> None:
    """The trained assistant as an HF checkpoint that drafts `opts.draft_tokens` tokens a round."""
    assistant.eval()
    assistant.generation_config.num_assistant_tokens = opts.draft_tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    if opts.save_dtype == "bfloat16":
        assistant = assistant.to(torch.bfloat16)
    assistant.save_pretrained(out)
