"""Execution providers: which one runs a bundle's graphs, and how it is attached to a session.

`cpu` is built into onnxruntime. `webgpu`, `openvino` and `qnn` are plugin EPs shipped as their own wheels
(`pip install 'edgegen[ep]'`): each is registered once per process with
`register_execution_provider_library` and attached per session with `add_provider_for_devices`. The old
`providers=[...]` way would silently run everything on the CPU.

OpenVINO's plugin offers a device only for hardware whose PCI vendor id is Intel's (0x8086): on an AMD or
other non-Intel CPU without an Intel GPU or NPU it lists none, though OpenVINO itself runs on such CPUs.
`available()` and `devices()` then say so in one line naming the CPU (`cpu_model()`), and `auto` skips it.

`placement()` asks onnxruntime which EP each node of a session was assigned to and says how many nodes each
EP got; `strict=True` makes session creation fail instead when any node would fall back to the CPU
(`session.disable_cpu_ep_fallback`).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgegen.runtime.errors import EdgegenError

if TYPE_CHECKING:
    import onnxruntime as ort

# The one list of execution-provider names: the CLI's choices (run, bench, export) come from it. Importing
# this module does not load onnxruntime, so the CLI's help stays quick; the functions that talk to it do.
EPS = ("cpu", "qnn", "webgpu", "openvino")
# `auto`: a bundle exported for an EP runs there when it loads (qnn bundles: the NPU, first). Otherwise a GPU
# before OpenVINO (another CPU backend on most machines). QNN is not tried for other bundles: its HTP runs
# only static-shape QDQ graphs, so a dynamic bundle would fall back to the CPU node by node.
AUTO_ORDER = ("webgpu", "openvino")
CPU_EP = "CPUExecutionProvider"


@dataclass(frozen=True)
class Plugin:
    module: str  # the Python package that ships the library and knows its path and EP name
    pip: str
    options: dict = field(default_factory=dict)  # provider options for add_provider_for_devices


PLUGINS = {
    "webgpu": Plugin("onnxruntime_ep_webgpu", "onnxruntime-ep-webgpu"),
    # OpenVINO's CPU device computes in bf16 by default on CPUs that have it (demo logits off by ~0.04):
    # f32 keeps them within ~1e-5 of ORT's CPU EP. Only `load_config` reaches the device; a bare
    # INFERENCE_PRECISION_HINT or precision=FP32 provider option is accepted and has no effect (measured).
    "openvino": Plugin("onnxruntime_ep_openvino", "onnxruntime-ep-openvino",
                       {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "f32"}})}),
    "qnn": Plugin("onnxruntime_qnn", "onnxruntime-qnn", {"backend_type": "htp", "htp_performance_mode": "burst"}),
}

_lock = threading.Lock()
_registered: dict[str, str] = {}  # edgegen EP name -> ORT EP name


def check_name(ep: str, allow_auto: bool = True) -> str:
    names = EPS + (("auto",) if allow_auto else ())
    if ep not in names:
        raise EdgegenError(f"execution provider '{ep}' is unknown; use one of {', '.join(names)}")
    return ep


def _register(ep: str) -> str:
    """Register a plugin EP library (once per process); returns its ORT name."""
    with _lock:
        if ep in _registered:
            return _registered[ep]
        plugin = PLUGINS[ep]
        try:
            module = importlib.import_module(plugin.module)
        except ImportError:
            raise EdgegenError(f"the {ep} execution provider is not installed; "
                               f"pip install {plugin.pip} (or pip install 'edgegen[ep]')") from None
        if ep == "webgpu":
            # Without a GPU the plugin offers no device unless a software adapter (lavapipe) is allowed.
            os.environ.setdefault("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", "1")
        import onnxruntime as ort

        ort_name = module.get_ep_name()
        try:
            ort.register_execution_provider_library(ort_name, module.get_library_path())
        except Exception as exc:
            if "already registered" not in str(exc):
                raise EdgegenError(f"cannot load the {ep} execution provider ({_first_line(exc)}); "
                                   f"reinstall {plugin.pip} for onnxruntime {ort.__version__}") from None
        _registered[ep] = ort_name
        return ort_name


def devices(ep: str) -> list:
    """The ORT EP devices of `ep` (registering its plugin first); raises EdgegenError if there are none."""
    import onnxruntime as ort

    check_name(ep, allow_auto=False)
    ort_name = CPU_EP if ep == "cpu" else _register(ep)
    found = [d for d in ort.get_ep_devices() if d.ep_name == ort_name]
    if not found:
        hint = {"webgpu": "no Vulkan adapter was found; install a Vulkan driver (Debian 12: "
                          "sudo bash scripts/setup-ep.sh installs Mesa >= 25 lavapipe)",
                "qnn": "no QNN device was found; check the onnxruntime-qnn install",
                "openvino": "OpenVINO found no device; check the onnxruntime-ep-openvino install"}
        why = (_not_intel() if ep == "openvino" else None) or hint.get(ep, "has no device")
        raise EdgegenError(f"the {ep} execution provider loaded but {why}")
    return found[:1]  # one device per EP: the first (WebGPU and QNN accept exactly one)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
    """This machine's CPU as (vendor, model), e.g. ("AuthenticAMD", "AMD EPYC"); "" where unknown.
    Linux has /proc/cpuinfo; elsewhere platform.processor() (Windows: "AMD64 Family 25 ..., AuthenticAMD")."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep and fields:
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if fields.get("vendor_id") or fields.get("model name"):
        return fields.get("vendor_id", ""), fields.get("model name", "")
    text = platform.processor()
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in text), ""), text


def _not_intel() -> str | None:
    """Why OpenVINO's plugin lists no device here when the CPU is known not to be Intel's (it matches
    devices by Intel's PCI vendor id); None on an Intel or unknown CPU, where no device means a bad install."""
    vendor, model = cpu_model()
    if not vendor or vendor == "GenuineIntel":
        return None
    return (f"lists devices only on Intel CPUs, GPUs and NPUs; this CPU is {vendor} ({model or platform.machine()}) "
            "and no Intel GPU or NPU was found; use --ep cpu")


def unsupported_hardware(ep: str) -> str | None:
    """The reason `ep` has no device when this machine's hardware is why (OpenVINO without any Intel device),
    else None: it has a device, or it should have one and a missing one is a broken install."""
    reason = _not_intel() if ep == "openvino" else None
    if reason is None:
        return None
    try:
        devices(ep)
    except EdgegenError as exc:
        return str(exc) if reason in str(exc) else None
    return None


def available() -> dict[str, str | None]:
    """Each EP -> None if it can be used here, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for ep in EPS:
        try:
            devices(ep)
            out[ep] = None
        except EdgegenError as exc:
            out[ep] = str(exc)
    return out


def _is_accelerator(ep: str) -> bool:
    """A GPU or NPU device. Emulated ones (the QNN HTP simulator, a software Vulkan adapter) and
    OpenVINO's CPU device report the CPU, and run slower than ORT's CPU EP."""
    import onnxruntime as ort

    return any(d.device.type != ort.OrtHardwareDeviceType.CPU for d in devices(ep))


def choose(ep: str, profile: str = "cpu") -> tuple[str, str]:
    """Resolve `auto` for a bundle exported with `profile`; returns (ep, why)."""
    check_name(ep)
    if ep != "auto":
        return ep, "requested"
    if profile != "cpu":
        try:
            devices(profile)
            return profile, f"the bundle was exported for {profile}"
        except EdgegenError as exc:
            return "cpu", f"the bundle was exported for {profile}, which cannot load here ({exc})"
    for name in AUTO_ORDER:
        try:
            if _is_accelerator(name):
                return name, f"{name} has a hardware device"
        except EdgegenError:
            continue
    return "cpu", "no GPU or NPU execution provider with a hardware device is available"


def add_to_session(so: ort.SessionOptions, ep: str, strict: bool = False, options: dict | None = None) -> None:
    """Attach `ep` to session options and record node placement. strict: fail session creation if any node
    would run on the CPU EP. options: provider options on top of the plugin's own (e.g. QNN's soc_model)."""
    so.add_session_config_entry(RECORD_PLACEMENT, "1")
    if ep == "cpu":
        return
    so.add_provider_for_devices(devices(ep), {**PLUGINS[ep].options, **(options or {})})
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")


# -- node placement --------------------------------------------------------------------------------------

# Makes a session keep which EP each node was assigned to (InferenceSession.get_provider_graph_assignment_info).
RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"


@dataclass
class Placement:
    """Nodes per EP after partitioning, as onnxruntime assigned them (a compiling EP such as OpenVINO or an EP
    context binary counts the nodes of the graph it was given)."""

    nodes: dict[str, int]
    cpu_ops: dict[str, int]  # op type -> count, for nodes left on the CPU EP

    def share(self, ort_name: str) -> float:
        total = sum(self.nodes.values())
        return self.nodes.get(ort_name, 0) / total if total else 0.0

    def as_dict(self, ort_name: str) -> dict:
        return {"nodes": dict(self.nodes), "share": round(self.share(ort_name), 4), "cpu_ops": dict(self.cpu_ops)}


def ort_name(ep: str) -> str:
    return CPU_EP if ep == "cpu" else _register(ep)


def placement(session: ort.InferenceSession) -> Placement:
    """Where `session`'s nodes run, from onnxruntime's graph-assignment API; the session must have been created
    with RECORD_PLACEMENT set (add_to_session does)."""
    nodes: dict[str, int] = {}
    cpu_ops: dict[str, int] = {}
    for sub in session.get_provider_graph_assignment_info():
        assigned = sub.get_nodes()
        nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(assigned)
        if sub.ep_name == CPU_EP:
            for node in assigned:
                cpu_ops[node.op_type] = cpu_ops.get(node.op_type, 0) + 1
    if not nodes:
        raise EdgegenError("onnxruntime recorded no node placement for this session; cannot report placement")
    return Placement(nodes, cpu_ops)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
