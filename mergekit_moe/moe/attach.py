"""Attach a ``MoeSpec`` onto a transformers causal LM (Llama, Mistral, Qwen2, Phi-3, GPT-2 families), and detach it.

``attach_moe`` replaces each target module by a :class:`~.layer.MoeLoraLinear` that keeps the
original module as ``base_layer`` (its weights are not touched), adds a :class:`~.layer.LayerRouter`
to each decoder layer (``<layer>.moe_router``) with a forward pre-hook that computes the layer's
mixture, and a pre-hook on the decoder stack that captures the attention mask and tells a new
sequence from a cached decode step. ``detach_moe`` puts the original modules back and removes
every hook, router and attribute, so the model is exactly the base again.

Sequence routing and ``generate``: the mixture is the router's softmax of the mean hidden state
over the non-padding prompt tokens. It is computed at the first forward of a ``generate`` call and
reused for every later step, with or without KV cache, so both give the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import nn

from ..arch import LAYER_RE
from ..errors import BaseMismatchError, CheckpointError, ValidationError
from .layer import LayerRouter, MoeLoraLinear, RoutingState, in_out_features
from .spec import LayerSpec, ModuleLora, MoeSpec

_RUNTIME_ATTR = "_moe_runtime"


@dataclasses.dataclass
class MoeRuntime:
    """What ``attach_moe`` changed on a model (enough to route, record, extract and undo)."""

    spec: MoeSpec
    state: RoutingState
    routers: dict[int, LayerRouter]
    modules: dict[str, MoeLoraLinear]
    originals: dict[str, nn.Module]
    layer_paths: dict[int, str]
    handles: list[Any]
    patched_generate: bool = False


def runtime_of(model: nn.Module) -> MoeRuntime:
    rt = model.__dict__.get(_RUNTIME_ATTR)
    if rt is None:
        raise CheckpointError("no Med-MoE-LoRA is attached to this model", hint="call attach_moe(model, checkpoint) first")
    return rt


def is_attached(model: nn.Module) -> bool:
    return _RUNTIME_ATTR in model.__dict__


def _layer_path(module_name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers.3``, ``model``) (decoder layer, decoder stack)."""
    m = LAYER_RE.search(module_name)
    if m is None:
        raise ValidationError("target module is not inside a decoder layer", where=module_name)
    layer = module_name[: m.end() - 1]
    stack = layer.rsplit(".", 2)[0] if layer.count(".") >= 2 else ""
    return layer, stack


def _hidden_size(config) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


def attach_moe(model: nn.Module, spec: MoeSpec, *, tokenizer=None) -> nn.Module:
    """Attach ``spec`` to ``model`` in place and return it, ready for ``forward`` and ``generate``.

    With ``tokenizer`` the base fingerprint is checked (``BaseMismatchError`` on a different base).
    Raises ``ValidationError`` naming the module when a target is missing or its shape does not fit.
    """
    if is_attached(model):
        raise CheckpointError("a Med-MoE-LoRA is already attached to this model", hint="detach_moe(model) first")
    spec.validate()
    cfg = getattr(model, "config", None)
    hs = _hidden_size(cfg) if cfg is not None else None
    if hs is not None and hs != spec.hidden_size:
        raise BaseMismatchError(f"checkpoint has hidden size {spec.hidden_size}, the model {hs}",
                                hint=f"use the base it was composed on ({spec.base_model})")
    if tokenizer is not None and cfg is not None and spec.base_fingerprint:
        from ..base import base_fingerprint

        fp = base_fingerprint(cfg, tokenizer)
        if fp != spec.base_fingerprint:
            raise BaseMismatchError(f"base fingerprint {fp[:12]} differs from the checkpoint's {spec.base_fingerprint[:12]}",
                                    hint=f"load the base it was composed on ({spec.base_model})")
    names = dict(model.named_modules())
    # check everything first: a failed attach leaves the model untouched
    layer_paths: dict[int, str] = {}
    stacks: set[str] = set()
    for mod_name, ml in spec.modules.items():
        target = names.get(mod_name)
        if target is None:
            raise ValidationError("target module not found in the model", where=mod_name,
                                  hint=f"the checkpoint was composed for {spec.base_model}")
        try:
            fin, fout = in_out_features(target)
        except TypeError as exc:
            raise ValidationError(str(exc), where=mod_name) from exc
        if ml.A.shape[1] != fin or ml.B.shape[0] != fout:
            raise ValidationError(f"factors A {tuple(ml.A.shape)}, B {tuple(ml.B.shape)} do not fit the module ({fin} -> {fout})",
                                  where=mod_name)
        layer, stack = _layer_path(mod_name)
        layer_paths[spec.layer_of(mod_name)] = layer
        stacks.add(stack)
    state = RoutingState()
    routers: dict[int, LayerRouter] = {}
    handles: list[Any] = []
    for L, path in sorted(layer_paths.items()):
        lay = spec.layers[L]
        block = names[path]
        dev = next(block.parameters()).device
        router = LayerRouter(L, lay.router_weight.to(dev), None if lay.router_bias is None else lay.router_bias.to(dev),
                             spec.routing, state)
        block.add_module("moe_router", router)
        routers[L] = router
        handles.append(block.register_forward_pre_hook(functools.partial(_layer_pre_hook, router), with_kwargs=True))
        handles.append(block.register_forward_hook(functools.partial(_layer_post_hook, router)))
    for stack in sorted(stacks):
        mod = names[stack]
        handles.append(mod.register_forward_pre_hook(functools.partial(_stack_pre_hook, state, _positional_index(mod)),
                                                     with_kwargs=True))
    modules: dict[str, MoeLoraLinear] = {}
    originals: dict[str, nn.Module] = {}
    for mod_name, ml in sorted(spec.modules.items()):
        parent_name, _, child = mod_name.rpartition(".")
        parent = names[parent_name] if parent_name else model
        original = names[mod_name]
        wrapped = MoeLoraLinear(original, ml.A, ml.B, ml.slot_of_rank, ml.rho, routers[spec.layer_of(mod_name)], name=mod_name)
        setattr(parent, child, wrapped)
        modules[mod_name], originals[mod_name] = wrapped, original
    rt = MoeRuntime(spec, state, routers, modules, originals, layer_paths, handles)
    if hasattr(model, "generate"):
        model.__dict__["generate"] = functools.partial(_generate, type(model).generate.__get__(model), state)
        rt.patched_generate = True
    model.__dict__[_RUNTIME_ATTR] = rt
    return model


def detach_moe(model: nn.Module) -> nn.Module:
    """Undo ``attach_moe``: original modules back, routers, hooks and the generate wrapper removed."""
    rt = runtime_of(model)
    names = dict(model.named_modules())
    for mod_name, original in rt.originals.items():
        parent_name, _, child = mod_name.rpartition(".")
        setattr(names[parent_name] if parent_name else model, child, original)
    for h in rt.handles:
        h.remove()
    for path in rt.layer_paths.values():
        block = names[path]
        if "moe_router" in block._modules:
            del block._modules["moe_router"]
    if rt.patched_generate:
        model.__dict__.pop("generate", None)
    del model.__dict__[_RUNTIME_ATTR]
    return model


def moe_parameters(model: nn.Module, *, rho: bool = True) -> list[nn.Parameter]:
    """The calibration parameters (router weights and biases, and ``rho`` if asked), set trainable.

    LoRA factors and base weights stay frozen.
    """
    rt = runtime_of(model)
    params: list[nn.Parameter] = []
    for r in rt.routers.values():
        for p in r.parameters():
            p.requires_grad_(True)
            params.append(p)
    for m in rt.modules.values():
        m.rho.requires_grad_(rho)
        if rho:
            params.append(m.rho)
    return params


def extract_spec(model: nn.Module) -> MoeSpec:
    """A copy of the attached spec with the model's current routers and ``rho`` (after calibration). CPU float32."""
    rt = runtime_of(model)
    spec = rt.spec
    layers = {}
    for L, lay in spec.layers.items():
        r = rt.routers.get(L)
        w = lay.router_weight if r is None else r.linear.weight.detach()
        b = lay.router_bias if r is None else (None if r.linear.bias is None else r.linear.bias.detach())
        layers[L] = LayerSpec([dataclasses.replace(s, members=list(s.members)) for s in lay.slots],
                              w.float().cpu().clone(), None if b is None else b.float().cpu().clone())
    modules = {}
    for name, ml in spec.modules.items():
        m = rt.modules.get(name)
        rho = ml.rho if m is None else m.rho.detach()
        modules[name] = ModuleLora(ml.A, ml.B, ml.slot_of_rank, rho.float().cpu().clone())
    return dataclasses.replace(spec, layers=layers, modules=modules, experts=dict(spec.experts), metrics=dict(spec.metrics))


# ---- hooks -----------------------------------------------------------------------------------
def _layer_pre_hook(router: LayerRouter, module: nn.Module, args: tuple, kwargs: dict):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None:
        raise RuntimeError(f"decoder layer {router.layer} was called without hidden states")
    router.compute(hidden)
    return None


def _layer_post_hook(router: LayerRouter, module: nn.Module, args: tuple, output: Any):
    # drop the mixture once the layer is done: no stale routing, no autograd graph kept alive
    router.pi = None
    return None


def _positional_index(stack: nn.Module) -> dict[str, int]:
    """Positions of ``attention_mask`` / ``cache`` in the stack's forward, for callers that pass them positionally."""
    try:
        params = list(inspect.signature(stack.forward).parameters)
    except (TypeError, ValueError):
        return {}
    return {k: i for i, k in enumerate(params) if k in ("attention_mask", "cache", "past_key_values")}


def _arg(name: str, args: tuple, kwargs: dict, pos: dict[str, int]):
    if name in kwargs:
        return kwargs[name]
    i = pos.get(name)
    return args[i] if i is not None and i < len(args) else None


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # an exotic cache object: treat as a continuing sequence only if it says so
        return 0


def _stack_pre_hook(state: RoutingState, pos: dict[str, int], module: nn.Module, args: tuple, kwargs: dict):
    mask = _arg("attention_mask", args, kwargs, pos)
    if mask is not None and mask.dim() != 2:
        mask = None  # a prepared 4-D mask: we cannot tell padding from it; fall back to all tokens
    state.attention_mask = mask
    if state.freeze_seq:
        new_sequence = not state.gen_started
        state.gen_started = True
    else:
        cache = _arg("cache", args, kwargs, pos)
        new_sequence = _cache_len(cache if cache is not None else _arg("past_key_values", args, kwargs, pos)) == 0
    if new_sequence:
        state.seq_cache.clear()
        state.seq_mask = mask
    return None


def _generate(orig_generate, state: RoutingState, *args: Any, **kwargs: Any):
    # one sequence mixture per generate call: computed at the first forward, reused by every step
    prev = (state.freeze_seq, state.gen_started)
    state.freeze_seq, state.gen_started = True, False
    try:
        return orig_generate(*args, **kwargs)
    finally:
        state.freeze_seq, state.gen_started = prev
