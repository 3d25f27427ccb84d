"""What ``moemerge eval`` evaluates: the bare base, an expert bundle / PEFT adapter, or a composed checkpoint.

A :class:`Target` holds one loaded model and knows how to make it behave as its base model
(``base_mode``: PEFT's ``disable_adapter``, or zero mixture weights for a composed checkpoint),
so retention compares base and target on one copy of the weights, and how to record routing
weights (composed checkpoints only).

A base given with ``--base`` must be the one the target was built on: the base fingerprints
(config architecture fields + tokenizer vocabulary) must match, else a one-line
``BaseMismatchError``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from .errors import BaseMismatchError, EvalError, ModelLoadError, UnsafeFileError
from .progress import Reporter, ensure

BASE, BUNDLE, PEFT, CHECKPOINT = "base", "bundle", "peft", "checkpoint"


@dataclass
class Target:
    """A loaded evaluation target. ``model`` is a transformers causal LM (possibly PEFT-wrapped or MoE-attached)."""

    kind: str                      # base | bundle | peft | checkpoint
    name: str                      # what the user passed (or the base ref for a bare base)
    base_ref: str                  # the base model actually loaded
    model: Any
    tokenizer: Any
    adapter_params: int = 0        # trainable-delta parameters on top of the base (LoRA factors, routers, rho)
    spec: Any = None               # MoeSpec for checkpoints
    #: expert name -> the task it serves (for routing accuracy); the knowledge expert maps to "general"
    expert_tasks: dict[str, str] = field(default_factory=dict)
    _base_mode: Callable[[], ContextManager] | None = None
    _recorder: Callable[[], ContextManager] | None = None

    def base_mode(self) -> ContextManager:
        """Context in which ``model`` computes exactly its base model's outputs."""
        return self._base_mode() if self._base_mode else contextlib.nullcontext()

    @property
    def device(self):
        """The device the model's weights are on (inputs are moved there)."""
        return next(self.model.parameters()).device

    @property
    def has_routing(self) -> bool:
        return self._recorder is not None

    def record_routing(self) -> ContextManager:
        """Context yielding a routing recorder (checkpoints only); see :func:`expert_weights`."""
        if self._recorder is None:
            raise EvalError(f"{self.kind} targets have no router", where=self.name)
        return self._recorder()


def _classify(target: str) -> tuple[str, Path | None]:
    p = Path(target).expanduser()
    if p.is_dir():
        if (p / "moe_config.json").is_file():
            return CHECKPOINT, p
        if (p / "expert.json").is_file():
            return BUNDLE, p
        if (p / "adapter_config.json").is_file():
            return PEFT, p
        if (p / "config.json").is_file() or any(p.glob("*.gguf")):
            return BASE, p
        raise EvalError("not a composed checkpoint, expert bundle, PEFT adapter or model directory", where=str(p),
                        hint="a checkpoint has moe_config.json, a bundle expert.json, an adapter adapter_config.json")
    if p.is_file() and p.suffix == ".gguf":
        return BASE, p
    if p.exists():
        raise EvalError("not a directory", where=str(p), hint="pass a checkpoint / bundle / adapter directory or a registry name")
    return BUNDLE, None  # a registry reference ("name", "name@version", "sha256:...")


def check_base(target: str, recorded_model: str, recorded_fp: str | None, base: str | None) -> str:
    """The base to load: ``base`` if given (its fingerprint must match ``recorded_fp``), else the recorded one."""
    from .base import fingerprint_of

    if base is None:
        return recorded_model
    if recorded_fp:
        fp = fingerprint_of(base)
        if fp != recorded_fp:
            raise BaseMismatchError(
                f"built on base {recorded_model!r} (fingerprint {recorded_fp[:12]}), but --base {base!r} has fingerprint {fp[:12]}",
                where=target, hint="pass the base it was trained on, or omit --base to use the recorded one")
    return base


def _load_base(ref: str, dtype, target: str, given: str | None = None, device: str | None = None):
    """Load a base (moved to ``device``); when it was recorded in the target (not given), say so in the error."""
    from .base import load_base

    try:
        model, tok = load_base(ref, dtype=dtype)
    except ModelLoadError as exc:
        if given is not None and str(given) == str(ref):
            raise
        raise ModelLoadError(f"cannot load the base model {ref!r} recorded in {target}: {exc.what}",
                             hint="pass --base with a local copy of that base") from exc
    if device and device != "cpu":
        model.to(device)  # before PEFT / MoE attach, so adapter tensors and routers land on the same device
    return model, tok


def _lora_params(adapter_dir: Path) -> int:
    from .lora import read_adapter

    return sum(f.A.numel() + f.B.numel() for f in read_adapter(adapter_dir).factors.values())


def _attach_peft(model, adapter_dir: Path, where: str):
    from peft import PeftModel

    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UnsafeFileError("no adapter_model.safetensors", where=str(adapter_dir),
                              hint="only safetensors adapters are loaded; convert with `moemerge import --convert-pickle`")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch / unknown modules: the wrong base
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaseMismatchError(f"adapter does not fit the base model: {msg[:300]}", where=where,
                                hint="pass the base the adapter was trained on with --base") from exc


def load_target(target: str | None, *, base: str | None = None, registry=None, dtype=None, device: str | None = None,
                reporter: Reporter | None = None) -> Target:
    """Load an evaluation target. ``target`` None (or a model directory) means the bare base ``base``.

    ``device``: where the model runs (``cpu`` default, ``cuda``, ``cuda:1``...).
    """
    rep = ensure(reporter)
    kind, path = (BASE, None) if target is None else _classify(target)
    if kind == BASE:
        ref = base if target is None else target
        if ref is None:
            raise EvalError("nothing to evaluate", hint="pass a TARGET (checkpoint, bundle, adapter) or --base MODEL")
        model, tok = _load_base(ref, dtype, ref, ref, device)
        return Target(BASE, str(ref), str(ref), model, tok)

    if kind == CHECKPOINT:
        return _load_checkpoint_target(str(target), path, base=base, dtype=dtype, device=device, reporter=rep)

    if kind == BUNDLE:
        from .bundle import read_bundle

        if path is None:
            from .registry import Registry

            bundle = (registry or Registry()).bundle(str(target))
        else:
            bundle = read_bundle(path)
        bundle.verify()
        meta = bundle.meta
        base_ref = check_base(str(target), meta.base_model, meta.base_fingerprint, base)
        adapter_dir, tasks = Path(bundle.path), {meta.name: meta.task}
    else:  # a plain PEFT adapter directory: no recorded fingerprint, PEFT's shape checks catch a wrong base
        from .lora import read_adapter_config

        cfg = read_adapter_config(path)
        base_ref = base or cfg.get("base_model_name_or_path")
        if not base_ref:
            raise EvalError("the adapter does not name its base model", where=str(path), hint="pass --base MODEL")
        adapter_dir, tasks = path, {}
    model, tok = _load_base(base_ref, dtype, str(target), base, device)
    model = _attach_peft(model, adapter_dir, str(target))
    model.eval()
    rep.info(f"loaded {kind} {target} on base {base_ref}")
    return Target(kind, str(target), str(base_ref), model, tok, adapter_params=_lora_params(adapter_dir),
                  expert_tasks=tasks, _base_mode=model.disable_adapter)


def _load_checkpoint_target(target: str, path: Path, *, base, dtype, device, reporter: Reporter) -> Target:
    from .checkpoint import load_checkpoint
    from .moe.attach import attach_moe
    from .moe.routing import force_mixture, record_routing

    spec = load_checkpoint(path)
    base_ref = check_base(target, spec.base_model, spec.base_fingerprint, base)
    model, tok = _load_base(base_ref, dtype, target, base, device)
    model = attach_moe(model, spec, tokenizer=tok)
    model.eval()
    tasks = {}
    for name, info in spec.experts.items():
        prov = info.provenance or {}
        task = prov.get("task") or (prov.get("train") or {}).get("task")
        tasks[name] = "general" if info.role == "knowledge" else str(task or name)
    reporter.info(f"loaded checkpoint {target} ({len(spec.experts)} experts) on base {base_ref}")

    @contextlib.contextmanager
    def base_mode() -> Iterator[None]:
        # all-zero expert weights: every gate is 0, so y = W x exactly (the base model)
        with force_mixture(model, {name: 0.0 for name in spec.experts}):
            yield

    # a single merged LoRA (one slot per layer) has nothing to route: no routing analysis
    routed = any(lay.n_slots > 1 for lay in spec.layers.values())
    return Target(CHECKPOINT, target, str(base_ref), model, tok, adapter_params=int(spec.parameter_counts()["total"]),
                  spec=spec, expert_tasks=tasks, _base_mode=base_mode,
                  _recorder=(lambda: record_routing(model)) if routed else None)


def expert_weights(spec, layer: int, slot_weights) -> "Any":
    """Aggregate slot weights of one layer to expert weights.

    ``slot_weights`` (..., n_slots) -> (..., n_experts) in ``spec.experts`` order; a merged slot's weight
    is split equally among its members (the router cannot tell them apart there).
    """
    import torch

    names = list(spec.experts)
    lay = spec.layers[layer]
    M = torch.zeros(lay.n_slots, len(names), dtype=torch.float32)
    for s, slot in enumerate(lay.slots):
        for m in slot.members:
            M[s, names.index(m)] = 1.0 / len(slot.members)
    return slot_weights.float() @ M
