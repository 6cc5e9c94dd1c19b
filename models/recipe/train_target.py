"""Step 2 of the demo build: train the demo target, a small Gemma 4 with every E2B structural feature.

    python models/recipe/train_target.py --minutes 40            # fresh run
    python models/recipe/train_target.py --minutes 40 --resume   # continue from build/demo-train/

Next-token cross-entropy on random 256-token windows of the training split (longer than the 128-token
sliding window, so sliding and full layers see different contexts). AdamW, linear warmup, cosine decay.
The schedule's progress is max(step / --steps, elapsed / --minutes): whichever budget runs out first,
the learning rate has fully decayed when it does. With a step budget that binds first, a run is
deterministic (fixed seeds, fixed thread count); with a wall-clock budget, the number of steps depends
on the machine. A checkpoint (weights, optimizer, step, elapsed time, RNG states) is written every
--checkpoint-minutes and at the end; the final weights go to --out in bfloat16 with config.json and
generation_config.json (the tokenizer files there come from step 1, models/recipe/tokenizer.py).

Threads: on a shared 2-core machine one thread is about twice as fast as two (two OpenMP threads
wait on each other whenever another process takes a core), hence --threads 1 by default.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import data
import numpy as np
import torch
import torch.nn.functional as F

from edgegen.export.testing import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID

DEFAULT_OUT = data.REPO / "models" / "demo" / "target"
CHECKPOINT = data.REPO / "build" / "demo-train" / "checkpoint.pt"
_SLIDING, _FULL = "sliding_attention", "full_attention"


def demo_target_config(vocab_size: int = 4096):
    """E2B's structure at ~8M parameters (about 15.5 MB in bfloat16).

    Layers 0-3 compute K/V (layer 2 is the sliding store layer, layer 3 the full one); layers 4-7 are
    KV-shared, reuse the store layers' K/V and have the double-wide MLP. Every 4th layer is full
    attention, so the last layer is full. One KV head; head dim 32 on sliding layers, 64 on full ones.
    """
    from transformers import Gemma4TextConfig

    num_layers = 8
    return Gemma4TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=64,
        layer_types=[_FULL if (i + 1) % 4 == 0 else _SLIDING for i in range(num_layers)],
        sliding_window=128,
        num_kv_shared_layers=num_layers // 2,
        hidden_size_per_layer_input=32,
        vocab_size_per_layer_input=vocab_size,
        final_logit_softcapping=30.0,
        use_double_wide_mlp=True,
        attention_k_eq_v=False,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=PAD_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        bos_token_id=BOS_ID,
    )


@dataclass
class Schedule:
    peak_lr: float
    warmup_steps: int
    final_fraction: float  # the learning rate decays to peak_lr * final_fraction

    def lr(self, step: int, progress: float) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.peak_lr * (self.final_fraction + (1 - self.final_fraction) * cosine)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_windows(ids: torch.Tensor, batch: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch` windows of `seq_len + 1` tokens (inputs and their next-token targets) at random offsets."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts])


def next_token_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's (softcapped) logits against the next token."""
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 8) -> float:
    was_training = model.training
    model.eval()
    losses = [next_token_loss(model, windows[i : i + batch]).item() for i in range(0, len(windows), batch)]
    model.train(was_training)
    return float(np.mean(losses))


def save_target(model, out: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID], pad_token_id=PAD_ID, do_sample=False
    )
    # Saved in bfloat16 (half the bytes); the training model itself stays in float32.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget (training time)")
    parser.add_argument("--steps", type=int, default=2000, help="step budget")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from edgegen.export.compat import apply_transformers_shims

    torch.set_num_threads(args.threads)
    apply_transformers_shims()
    from tokenizers import Tokenizer
    from transformers import Gemma4ForCausalLM

    tokenizer_path = args.out / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise SystemExit(f"no tokenizer at {tokenizer_path}; run models/recipe/tokenizer.py first")
    train = torch.from_numpy(data.train_ids(tokenizer_path).astype(np.int64))
    heldout = torch.from_numpy(data.heldout_ids(tokenizer_path).astype(np.int64))
    # A fixed held-out set: the same windows at every evaluation and in every run.
    heldout_windows = random_windows(heldout, args.eval_windows, args.seq_len, np.random.default_rng(12345))

    seed_everything(args.seed)
    config = demo_target_config(vocab_size=Tokenizer.from_file(str(tokenizer_path)).get_vocab_size())
    model = Gemma4ForCausalLM(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    schedule = Schedule(args.lr, args.warmup, final_fraction=0.1)
    rng = np.random.default_rng(args.seed)
    step, elapsed = 0, 0.0
    if args.resume:
        ckpt = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        rng.bit_generator.state = ckpt["numpy_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed at step {step}, {elapsed / 60:.1f} min trained", flush=True)

    def checkpoint() -> None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "elapsed": elapsed, "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "args": vars(args)}, tmp)
        tmp.replace(args.checkpoint)

    tokens_per_step = args.batch * args.seq_len
    print(f"target: {n_params / 1e6:.2f}M parameters; train {len(train):,} tokens, held-out {len(heldout):,}; "
          f"{tokens_per_step} tokens/step; ln(vocab) = {math.log(config.vocab_size):.3f}", flush=True)
    budget_s = args.minutes * 60
    last_checkpoint = time.perf_counter()
    window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
    while step < args.steps and elapsed < budget_s:
        t0 = time.perf_counter()
        lr = schedule.lr(step, max(step / args.steps, elapsed / budget_s))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = next_token_loss(model, random_windows(train, args.batch, args.seq_len, rng))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed += time.perf_counter() - t0
        window_loss += loss.item()
        window_steps += 1
        if step % args.log_every == 0:
            rate = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            print(f"step {step:5d}  loss {window_loss / window_steps:.3f}  lr {lr:.2e}  grad {grad_norm:.2f}  "
                  f"{rate:.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
            window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
        if step % args.eval_every == 0:
            print(f"step {step:5d}  held-out loss {heldout_loss(model, heldout_windows):.3f}", flush=True)
        if time.perf_counter() - last_checkpoint > args.checkpoint_minutes * 60:
            checkpoint()
            last_checkpoint = time.perf_counter()
    checkpoint()
    final_heldout = heldout_loss(model, heldout_windows)
    save_target(model, args.out)
    print(f"done: {step} steps, {step * tokens_per_step:,} tokens, {elapsed / 60:.1f} min, "
          f"{step * tokens_per_step / max(elapsed, 1e-9):.0f} tok/s; held-out loss {final_heldout:.3f}; "
          f"{n_params / 1e6:.2f}M parameters -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
