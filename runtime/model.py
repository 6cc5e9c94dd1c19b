"""A loaded bundle: sessions for the target and assistant graphs, the PLE table, the tokenizer files.

`open_session` is the one place a session is opened and `GraphSession.run` the one way a graph runs, for
every EP and profile. `Target.forward` and `Assistant.step` feed the graphs (the qnn profile overrides how
one call is fed: runtime/qnn.py); names come from the manifest contract (see manifest.py). KV buffers are
bound with IOBinding to both the past inputs and the present outputs, so the graphs update them in place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgegen.runtime import integrity, memory, osinfo, providers
from edgegen.runtime import manifest as names
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.kv import KVCache, cache_bytes
from edgegen.runtime.manifest import GraphSpec, Manifest, PLESpec, load_manifest


def session_options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    """edgegen's session options. spin: idle intra-op threads spin between the operators of a call and stop
    when the call returns (`session.force_spinning_stop`), so target and drafter calls, which alternate,
    never find the other session's threads spinning on their cores; False: they sleep whenever idle (each
    parallel operator then wakes them: slower on an idle machine, kinder to a loaded one)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


def open_session(bundle: Path, spec: GraphSpec, threads: int | None, ep: str = "cpu", strict: bool = False,
                 placements: dict | None = None, file: str | None = None, options: dict | None = None,
                 config: dict | None = None, spin: bool = True) -> ort.InferenceSession:
    """The one place a session is opened: one graph of `bundle` on `ep` (see providers.py). strict: fail if any
    node would fall back to the CPU EP. placements: if given, receives the graph's node placement under its
    file name. file: load this file instead of spec.file (a QNN EP context binary); options: provider options
    on top of the EP's own; config: session config entries (e.g. to write an EP context binary); spin: the
    thread policy (`session_options`)."""
    path = bundle / (file or spec.file)
    if not path.is_file():
        raise EdgegenError(f"bundle file '{path.name}' is missing from '{bundle}'; re-export the bundle")
    so = session_options(threads, spin)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    providers.add_to_session(so, ep, strict, options)  # EP errors are the user's to fix: raised before the try

    try:
        session = ort.InferenceSession(str(path), so)
    except Exception as exc:  # onnxruntime raises several types for a damaged model
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if strict and "fallback to CPU EP has been explicitly disabled" in first:
            raise EdgegenError(f"'{path.name}' has nodes that cannot run on {ep} (strict placement); "
                               f"export the bundle with --ep {ep} or run without strict placement") from None
        if ep != "cpu":
            raise EdgegenError(f"cannot load '{path.name}' on {ep} ({first}); export the bundle with --ep {ep}, "
                               "or run it with --ep cpu") from None
        raise EdgegenError(f"cannot load '{path.name}' from '{bundle}' ({first}); re-export the bundle") from None
    session.disable_fallback()  # a failing EP run must fail, not quietly rerun on the CPU
    memory.release_mapped(memory.weight_files(bundle))  # pre-packed weights' mapped originals (memory.py)
    if placements is not None:
        placements[spec.file] = providers.placement(session)
    return session


class PLETable:
    """Per-layer embeddings: memory-mapped on the host (E2B's table is ~2.3B values), gathered per step."""

    def __init__(self, bundle: Path, spec: PLESpec):
        self.spec = spec
        try:
            self.rows = osinfo.map_npy(bundle / spec.file)
            self.scales = osinfo.map_npy(bundle / spec.scales_file) if spec.scales_file else None
        except (OSError, ValueError) as exc:
            raise EdgegenError(f"per-layer embedding table in '{bundle}' is unreadable ({exc}); re-export") from None
        width = spec.num_layers * spec.dim // (8 // spec.bits if spec.bits else 1)
        if self.rows.ndim != 2 or self.rows.shape[1] != width or (
                self.scales is not None and self.scales.shape[0] != self.rows.shape[0]):
            raise EdgegenError(f"per-layer embedding table in '{bundle}' has shape {self.rows.shape}, which does "
                               "not match the manifest; re-export the bundle")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        flat = ids.reshape(-1)
        osinfo.prefetch_rows(self.rows, flat)
        if self.scales is not None:
            osinfo.prefetch_rows(self.scales, flat)
        rows = np.asarray(self.rows[flat])
        if self.spec.bits:
            from edgegen.runtime.quant import dequantize_rows

            rows = dequantize_rows(rows, np.asarray(self.scales[flat]), self.spec.bits, self.spec.block_size)
        return rows.reshape(1, len(flat), self.spec.num_layers, self.spec.dim).astype(np.float32, copy=False)


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # a failed run is reported once, as an EdgegenError, not also as an ORT log line


class GraphSession:
    """One graph's session and the one way it is run: feeds and the cache's K/V buffers bound with IOBinding
    (in place where the cache holds OrtValues), present outputs bound to the buffers the manifest names."""

    quantized: dict = {}  # tensors the graph takes or gives quantized (the qnn profile's host-side Q/DQ)

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec):
        self.session, self.spec = session, spec
        self.input_names = {i.name for i in session.get_inputs()}
        self.plain_outputs = [o.name for o in session.get_outputs() if o.name not in spec.kv_aliases]

    def run(self, feeds: dict[str, np.ndarray], cache: KVCache) -> dict[str, np.ndarray]:
        b = self.session.io_binding()
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        for name, value in cache.inputs(self).items():
            if isinstance(value, ort.OrtValue):
                b.bind_ortvalue_input(name, value)
            else:
                b.bind_cpu_input(name, value)
        for out, buf in self.spec.kv_aliases.items():
            b.bind_ortvalue_output(out, cache.values[buf])
        for out in self.plain_outputs:
            b.bind_output(out)
        try:
            self.session.run_with_iobinding(b, _QUIET)
        except Exception as exc:  # onnxruntime's own types: a graph that does not fit its manifest, or bad data
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise EdgegenError(f"running '{self.spec.file}' failed ({first}); the bundle is damaged or does not "
                               "match its manifest, re-export it") from None
        values = b.get_outputs()
        # Bound outputs come back in binding order: aliases first, then the plain outputs.
        return {n: v.numpy() for n, v in zip(self.plain_outputs, values[len(self.spec.kv_aliases):], strict=True)}


class Target(GraphSession):
    def __init__(self, session, spec: GraphSpec, ple: PLETable | None, max_chunk: int = 0, min_rows: int = 1,
                 even_rows: bool = False):
        super().__init__(session, spec)
        self.ple = ple
        # Calls of fewer rows are padded to `min_rows` (the pad rows' outputs are dropped and their K/V rows,
        # past the cache length, are overwritten later). MatMulNBits with fp32 compute (accuracy_level 0)
        # takes another path for a single row on the CPU, so with 2 a decode step computes its row with the
        # same bits as a verify call (with row-exact attention, benchmarks/row_exactness.py); Bundle sets it
        # from the manifest (_row_rule). int8 compute (level 4, block 32) needs no padding.
        self.min_rows = min_rows
        # Calls of an odd number of rows get one pad row: at blocks over 32 MatMulNBits computes a lone or
        # trailing row on another path than rows in pairs, and a row in a pair the same whatever the others.
        self.even_rows = even_rows
        # webgpu profile: feed at most `max_chunk` tokens a call, in power-of-two chunks. Each new input
        # length compiles shaders, so few lengths is faster; and the WebGPU EP's GroupQueryAttention gives
        # wrong results for 32 or more new tokens in full-attention layers (plugin 0.4.0, measured).
        self.max_chunk = max_chunk
        # A multimodal target's text calls feed no soft tokens (M = 0): built once, not per decode step.
        self._no_soft: dict[str, np.ndarray] = {}
        if self.takes_soft_tokens:
            hidden = next(t.shape[-1] for t in spec.inputs if t.name == names.SOFT_EMBEDS)
            self._no_soft = {names.SOFT_ROWS: np.zeros((0, 1), np.int64),
                             names.SOFT_EMBEDS: np.zeros((0, hidden), np.float32)}

    @property
    def takes_soft_tokens(self) -> bool:
        """Whether the graph takes embeddings at placeholder rows (a multimodal export; runtime/prompt.py)."""
        return names.SOFT_ROWS in self.input_names

    def forward(self, cache: KVCache, ids: list[int] | np.ndarray, logits_to_keep: int = 1,
                soft: tuple[np.ndarray, np.ndarray] | None = None, pad_id: int = 0):
        """Run ids at positions cache.length.. ; returns (logits [N,V], hidden [N,H]) for the last N.
        Calls are split where one call may not write all rows: the webgpu chunks, and ring buffers
        (cache.max_rows: a call writing more would overwrite keys its own first rows still need).
        soft: (rows of ids [M], embeddings [M, H]) that replace those rows' token embeddings; their ids are
        fed as `pad_id` (prompt.soft_rows; only where takes_soft_tokens)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if soft is not None:
            ids = ids.copy()
            ids[0, soft[0]] = pad_id
        s = ids.shape[1]
        if cache.length + s > cache.max_context:
            raise EdgegenError(
                f"context full: {cache.length + s} positions exceed the bundle's max context {cache.max_context}"
            )
        whole = not self.max_chunk or (s <= self.max_chunk and (logits_to_keep == s or not s & (s - 1)))
        if whole and (not cache.max_rows or self._rows(s) <= cache.max_rows):
            return self._forward(cache, ids, logits_to_keep, soft)
        logits, hidden, start = [], [], 0
        while start < s:
            n = s - start
            if self.max_chunk:
                n = min(self.max_chunk, 1 << (n.bit_length() - 1))
            if cache.max_rows:
                n = min(n, cache.max_rows - (self._rows(cache.max_rows) - cache.max_rows))  # pad rows included
            wanted = min(n, logits_to_keep - (s - start - n))  # this chunk's share of the last N positions
            lo, hi = self._forward(cache, ids[:, start:start + n], max(wanted, 1), _chunk(soft, start, start + n))
            if wanted > 0:
                logits.append(lo[-wanted:])
                hidden.append(hi[-wanted:])
            start += n
        return np.concatenate(logits), np.concatenate(hidden)

    def _rows(self, s: int) -> int:
        """The rows a call of `s` tokens runs, pad rows included."""
        rows = max(s, self.min_rows)
        return rows + (rows % 2 if self.even_rows else 0)

    def _forward(self, cache: KVCache, ids: np.ndarray, logits_to_keep: int, soft=None):
        past, s = cache.length, ids.shape[1]
        rows = self._rows(s)
        pad = rows - s if past + rows <= cache.max_context else 0
        if pad > 0:  # repeat the last token: any id will do, its row is dropped
            ids = np.concatenate([ids, np.repeat(ids[:, -1:], pad, axis=1)], axis=1)
            logits, hidden = self._run(cache, ids, logits_to_keep + pad, soft)
            cache.length = past + s
            return logits[:-pad], hidden[:-pad]
        return self._run(cache, ids, logits_to_keep, soft)

    def _soft_feeds(self, soft) -> dict[str, np.ndarray]:
        """soft_rows / soft_embeds: the call's soft tokens, or none (M = 0) for a text call."""
        if not self.takes_soft_tokens:
            if soft is not None:
                raise EdgegenError(NO_SOFT_TOKENS)
            return {}
        if soft is None:
            return self._no_soft
        return {names.SOFT_ROWS: soft[0].reshape(-1, 1), names.SOFT_EMBEDS: soft[1]}

    def _run(self, cache: KVCache, ids: np.ndarray, logits_to_keep: int, soft=None):
        past, s = cache.length, ids.shape[1]
        feeds = {
            names.INPUT_IDS: ids,
            names.POSITION_IDS: np.arange(past, past + s, dtype=np.int64).reshape(1, -1),
            names.SEQLENS_K: np.array([past + s - 1], dtype=np.int32),
            names.TOTAL_SEQUENCE_LENGTH: np.array(past + s, dtype=np.int32),
        }
        if names.LOGITS_START in self.input_names:  # the webgpu profile takes the slice start, -N
            feeds[names.LOGITS_START] = np.array([-logits_to_keep], dtype=np.int64)
        else:
            feeds[names.LOGITS_TO_KEEP] = np.array(logits_to_keep, dtype=np.int64)
        if self.ple is not None:
            feeds[names.PER_LAYER_INPUTS] = self.ple(ids)
        feeds.update(self._soft_feeds(soft))
        out = self.run(feeds, cache)
        cache.length = past + s
        cache.wrote(past + s)
        return out[names.LOGITS][0], out[names.LAST_HIDDEN][0]


NO_SOFT_TOKENS = ("this bundle's target takes no image or audio embeddings; export it from a multimodal "
                  "checkpoint with the cpu profile")


def _chunk(soft: tuple[np.ndarray, np.ndarray] | None, start: int, stop: int):
    """The part of soft rows that falls in ids[start:stop], relative to start; None if none does."""
    if soft is None:
        return None
    keep = (soft[0] >= start) & (soft[0] < stop)
    return (soft[0][keep] - start, soft[1][keep]) if keep.any() else None


def _draft_feeds(cache: KVCache, token: int, hidden: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of a draft step at the constant position P = cache.length (see manifest.py)."""
    p = cache.length
    return {
        names.TOKEN: np.array([[token]], dtype=np.int64),
        names.HIDDEN: np.asarray(hidden, dtype=np.float32).reshape(1, 1, -1),
        names.POSITION_IDS: np.array([[p]], dtype=np.int64),
        names.SEQLENS_K: np.array([p - 1], dtype=np.int32),
        names.TOTAL_SEQUENCE_LENGTH: np.array(p, dtype=np.int32),
    }


class Assistant(GraphSession):
    def step(self, cache: KVCache, token: int, hidden: np.ndarray):
        """One draft step at position cache.length; returns (logits [V], next_token, projected hidden [H])."""
        out = self.run(_draft_feeds(cache, token, hidden), cache)
        return out[names.LOGITS][0, 0], int(out[names.NEXT_TOKEN].reshape(-1)[0]), out[names.PROJECTED_HIDDEN][0, 0]


class DraftRound(GraphSession):
    """`steps` draft steps in one call (the `draft_round` graph; `steps` is fixed at export). A round of
    k < steps drafts is the same call cut to its first k: each step reads only the shared cache and the step
    before it, so those are the drafts k single steps would give."""

    samples = True  # it also drafts by temperature-only sampling (inv_temperature and Gumbel noise inputs)

    def __init__(self, session, spec: GraphSpec):
        super().__init__(session, spec)
        self.steps = next(o.shape[1] for o in spec.outputs if o.name == names.TOKENS)
        self.vocab = next(o.shape[1] for o in spec.outputs if o.name == names.LOGITS)
        self._zeros = np.zeros((self.steps, self.vocab), np.float32)

    def run_round(self, cache: KVCache, token: int, hidden: np.ndarray, inv_temperature: float = 1.0,
                  gumbel: np.ndarray | None = None, k: int | None = None):
        """Returns (tokens [k], logits [k, V]), k <= steps (default: steps). Greedy: no noise; sampling:
        Gumbel noise [steps, V], one row a step."""
        k = self.steps if k is None else k
        if not 0 < k <= self.steps:
            raise ValueError(f"a round of {k} drafts does not fit the fused round's {self.steps} steps")
        out = self._call(cache, token, hidden, inv_temperature,
                         self._zeros if gumbel is None else gumbel.astype(np.float32, copy=False))
        return [int(t) for t in out[names.TOKENS].reshape(-1)[:k]], out[names.LOGITS][:k]

    def _call(self, cache: KVCache, token: int, hidden: np.ndarray, inv_temperature: float,
              gumbel: np.ndarray) -> dict[str, np.ndarray]:
        """The round's one session call (the qnn profile feeds it from the host: runtime/qnn.py)."""
        feeds = _draft_feeds(cache, token, hidden)
        feeds[names.INV_TEMPERATURE] = np.array(inv_temperature, dtype=np.float32)
        feeds[names.GUMBEL] = gumbel
        return self.run(feeds, cache)


class Bundle:
    """Everything loaded from a bundle directory. Sessions are safe to share across threads; a KVCache
    (one per conversation) is not."""

    def __init__(self, path: str | Path, threads: int | None = None, ep: str = "cpu", strict: bool = False,
                 report_placement: bool = False, hashes: str = "cached", spin: bool = True):
        """ep: cpu, qnn, webgpu, openvino or auto (the bundle's own profile if its EP loads here, else an
        accelerator, else cpu; `ep_reason` says why). strict: every node must run on the EP.
        report_placement: fill `placement` (graph file -> Placement) from onnxruntime's graph assignment.
        hashes: check files' sha256 "cached" (once per file change, see integrity.py), "always" or "never"
        (sizes only). Paths are always checked before any file is opened. spin: idle threads spin during a
        call (fastest when the cores are free) or sleep (`session_options`)."""
        self.path = Path(path)
        self.manifest: Manifest = load_manifest(self.path)
        m = self.manifest
        integrity.check_bundle(self.path, m, hashes)
        if ep == "qnn" and m.ep_profile != "qnn":
            raise EdgegenError(f"bundle '{self.path}' was exported for {m.ep_profile}; export it with --ep qnn "
                               "to run on the QNN HTP")
        self.ep, self.ep_reason = providers.choose(ep, m.ep_profile)
        self.placement: dict[str, providers.Placement] | None = {} if report_placement else None
        ple = PLETable(self.path, m.model.ple) if m.model.ple else None

        def session(spec: GraphSpec, **kwargs):
            return open_session(self.path, spec, threads, self.ep, strict, self.placement, spin=spin, **kwargs)

        # Graphs opened on first use (`_opened`): the single-step assistant, the vision and audio encoders.
        self._openers: dict[str, Callable[[], object]] = {}
        self._open: dict[str, object] = {}
        self._open_lock = threading.Lock()
        if m.ep_profile == "qnn":  # static shapes, host-side K/V (runtime/qnn.py)
            from edgegen.runtime.qnn import open_qnn

            self.target, assistant, self.draft_round = open_qnn(m, self.ep, ple, session)
            if assistant is not None:
                self._open["assistant"] = assistant
            return

        self.target = Target(session(m.graphs["target"]), m.graphs["target"], ple,
                             16 if "webgpu" in (self.ep, m.ep_profile) else 0,
                             *(_row_rule(m.graphs["target"]) if self.ep == m.ep_profile == "cpu" else (1, False)))
        self.draft_round = None
        if "draft_round" in m.graphs:
            self.draft_round = DraftRound(session(m.graphs["draft_round"]), m.graphs["draft_round"])

        def vision():
            from edgegen.runtime.vision import VisionEncoder

            return VisionEncoder(session(m.graphs["vision"]), m.vision)

        def audio():
            from edgegen.runtime.audio import AudioEncoder

            return AudioEncoder(session(m.graphs["audio"]), m.audio)

        if "vision" in m.graphs:
            self._openers["vision"] = vision
        if "audio" in m.graphs and m.audio:
            self._openers["audio"] = audio
        if "assistant" in m.graphs:
            spec = m.graphs["assistant"]
            self._openers["assistant"] = lambda: Assistant(session(spec), spec)
            # With a fused round the single-step session is opened on first use only (see `assistant`);
            # strict placement is checked for every graph up front.
            if self.draft_round is None or strict:
                self._opened("assistant")

    def _opened(self, kind: str):
        """The graph `kind` of this bundle, opened on first use (once, whichever thread asks first); None
        if the bundle has no such graph."""
        if kind not in self._open and kind in self._openers:
            with self._open_lock:
                if kind not in self._open:
                    self._open[kind] = self._openers[kind]()
        return self._open.get(kind)

    @property
    def has_assistant(self) -> bool:
        return "assistant" in self._openers or "assistant" in self._open

    @property
    def assistant(self) -> Assistant | None:
        """The single-step drafter, opened on first use when the bundle has a fused round: greedy and
        temperature-only drafting of up to `draft_round.steps` tokens runs in the round, only top-k/top-p
        sampling and longer drafts need single steps. Each session holds its own prepacked copy of the drafter's
        weights: an unused one cost 328 MiB of RSS at E2B size (measured at load, when each graph also still held
        a copy of the tied embedding table; export/onnx_graph.py Graph.alias)."""
        return self._opened("assistant")

    @property
    def vision(self):
        """The image encoder (runtime/vision.py) of a bundle with a vision graph, opened on first use (a text
        prompt never pays for the tower's weights); None without one."""
        return self._opened("vision")

    @property
    def audio(self):
        """The audio encoder (runtime/audio.py) of a bundle with an audio graph, opened on first use; None
        without one."""
        return self._opened("audio")

    def placement_report(self) -> dict:
        """{graph file: {"nodes": {ORT EP: count}, "share": share on this bundle's EP, "cpu_ops": {...}}}."""
        if self.placement is None:
            return {}
        name = providers.ort_name(self.ep)
        return {f: p.as_dict(name) for f, p in self.placement.items()}

    def new_cache(self, max_context: int | None = None) -> KVCache:
        if self.manifest.ep_profile == "qnn":
            from edgegen.runtime import qnn

            return qnn.new_cache(self.manifest)
        model = self.manifest.model
        max_context = max_context or model.max_context
        need = cache_bytes(model.kv_buffers, max_context)
        if need > _physical_memory():
            raise EdgegenError(
                f"the KV cache for {max_context} positions needs {need / 2**30:.1f} GiB "
                f"({', '.join(sorted({b.dtype for b in model.kv_buffers}))}), more than this machine's "
                f"{_physical_memory() / 2**30:.1f} GiB; use a smaller max context, or export the bundle with a "
                "smaller --max-context or with --kv-dtype fp16")
        # Checked in full although np.zeros commits pages only as rows are written: a long conversation must
        # not run out of memory halfway.
        return KVCache(model.kv_buffers, max_context, model.sliding_window)


def _row_rule(spec: GraphSpec) -> tuple[int, bool]:
    """(min_rows, even_rows) for a target's calls, so a decode row has the bits of the same row in a verify call
    and greedy speculation stays exact. MatMulNBits computes a single row on another path than several:
    - fp32 compute (`export --compute exact`) at block 32: one-row decode calls are padded to two rows
      (measured at E2B shapes: 40 of 40 rows bit-equal with the padding, 0 of 40 without, max |dlogits|
      2.8e-3); it costs a two-row call per decode step.
    - blocks over 32 (either compute): a lone or trailing row differs from rows in pairs, which agree for any
      even row count, so every odd call gets a pad row (tests/test_row_exact.py).
    int8 compute at block 32 computes rows alike and needs neither. CPU EP only: row exactness is measured there."""
    q = spec.quantization
    if q.get("kind", "fp32") == "fp32":
        return 1, False
    if int(q.get("block_size", 32)) > 32:
        return 1, True
    return (2 if q.get("compute") == "exact" else 1), False


def _physical_memory() -> int:
    return osinfo.physical_memory() or 1 << 62  # unknown: skip the check (allocation reports real shortage)
