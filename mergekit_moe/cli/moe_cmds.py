"""CLI commands for Med-MoE-LoRA checkpoints: inspect, generate, export-peft, export-merged."""

from __future__ import annotations

import click

_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _kv(title: str, rows):
    from ._console import kv_table

    return kv_table(title, [(k, str(v)) for k, v in rows])


@click.command("inspect")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
def inspect_cmd(ckpt: str) -> None:
    """Summarise a composed checkpoint (experts, slots per layer, parameters, files) and verify its hashes."""
    from ..checkpoint import inspect_checkpoint
    from rich.markup import escape

    from ._console import fmt_value, human_size, layer_ranges, out_console, table

    s = inspect_checkpoint(ckpt)  # raises IntegrityError on any mismatch
    spec, counts = s.spec, s.spec.parameter_counts()
    r = spec.routing
    out_console.print(_kv("Med-MoE-LoRA checkpoint", [
        ("path", s.path), ("base model", spec.base_model), ("base fingerprint", spec.base_fingerprint[:16] or "-"),
        ("routing", f"{r.granularity}-level, temperature {r.temperature:g}, top-k {r.top_k or 'all'}"),
        ("layers / modules", f"{len(spec.layers)} routed layers, {len(spec.modules)} target modules"),
        ("parameters", f"{counts['total']:,} (LoRA {counts['lora']:,}, router {counts['router']:,}, rho {counts['rho']:,})"),
        ("created by", s.config.get("created_by", "?"))]))
    out_console.print(table("Experts", ["name", "role", "source", "sha256"],
                            [(e.name, e.role, e.source or "-", (e.sha256 or "-")[:16]) for e in spec.experts.values()]))
    rows = []
    for L, lay in sorted(spec.layers.items()):
        ranks = spec.slot_ranks(L)
        cells = []
        for sl in lay.slots:  # a slot named after its members ("a+b") needs no member list
            members = "+".join(sl.members)
            label = sl.name if sl.name == members else f"{sl.name}[{members}]"
            cells.append(f"{label} r={sum(ranks[sl.name].values())}")
        rows.append((L, lay.n_slots, escape("   ".join(cells))))
    out_console.print(table("Slots per layer (slot = one expert or a merged cluster; r = total rank over the layer's modules)",
                            ["layers", "slots", "slots and ranks"], layer_ranges(rows)))
    out_console.print(table("Files", ["file", "size", "sha256", "check"],
                            [(n, human_size(m["size"]), m["sha256"][:16], "[green]ok[/]") for n, m in sorted(s.files.items())]))
    if spec.metrics:
        out_console.print(table("Metrics", ["metric", "value"], sorted((k, fmt_value(v)) for k, v in spec.metrics.items())))
    out_console.print("[green]✓[/] all file hashes verified")


def _layer_groups(layers: list[int], n_groups: int = 4) -> list[list[int]]:
    """Split sorted layer indices into up to ``n_groups`` consecutive groups (depth quarters)."""
    n = len(layers)
    k = min(n_groups, n)
    return [layers[i * n // k:(i + 1) * n // k] for i in range(k)]


@click.command("generate")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096), help="Tokens to generate.")
@click.option("--show-routing", is_flag=True, help="Print the mixture weights per layer group.")
@click.option("--base", metavar="MODEL", help="Base model to load instead of the one in moe_config.json (fingerprint-checked).")
@click.option("--raw", is_flag=True, help="Do not apply the chat template; feed the prompt as is.")
@click.option("--weights", metavar="NAME=W,...", help="Force a fixed expert mixture, e.g. diagnosis=1.")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Model dtype (default float32).")
def generate_cmd(ckpt, prompt, max_new_tokens, show_routing, base, raw, weights, dtype) -> None:
    """Generate a completion for PROMPT with a composed checkpoint (greedy)."""
    import contextlib

    import torch

    from ..checkpoint import load_moe_model
    from ..export import parse_weights
    from ..moe.routing import force_mixture, record_routing
    from ._console import out_console, table

    mix = parse_weights(weights) if weights else None
    model, tok, spec = load_moe_model(ckpt, base=base, dtype=_dtype(dtype))
    if raw or not getattr(tok, "chat_template", None):
        text = prompt
    else:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=raw)
    with contextlib.ExitStack() as stack:
        if mix is not None:
            stack.enter_context(force_mixture(model, mix))
        rec = stack.enter_context(record_routing(model))
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    completion = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    out_console.print(completion, highlight=False, markup=False)
    if show_routing:
        means = rec.expert_means()
        experts = list(spec.experts)
        rows = []
        for g in _layer_groups(sorted(means)):
            avg = {e: sum(means[L][e] for L in g) / len(g) for e in experts}
            rows.append([f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0])] + [f"{avg[e]:.3f}" for e in experts])
        src = "forced" if mix is not None else f"{spec.routing.granularity}-level router"
        out_console.print(table(f"Mixture weights per layer group ({src}, mean over prompt and generated tokens)",
                                ["layers"] + experts, rows))


@click.command("export-peft")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--weights", required=True, metavar="NAME=W,...", help="Fixed expert mixture, e.g. diagnosis=0.7,ddi=0.3.")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Adapter dtype (default float32).")
@click.option("--keep-ranks", is_flag=True,
              help="Keep each module's own rank (PEFT rank_pattern) instead of zero-padding to one rank for vLLM/LoRAX.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export_peft_cmd(ckpt, out, weights, dtype, keep_ranks, force) -> None:
    """Export a fixed mixture as a standard PEFT LoRA adapter (exact rank concatenation)."""
    from ..checkpoint import load_checkpoint
    from ..export import export_peft, parse_weights
    from ._console import out_console

    mix = parse_weights(weights)
    spec = load_checkpoint(ckpt)
    path = export_peft(spec, mix, out, dtype=_dtype(dtype), overwrite=force, uniform_rank=not keep_ranks)
    out_console.print(f"[green]✓[/] PEFT LoRA for {weights} written to {path} "
                      f"(load with PeftModel.from_pretrained(base, '{path}'); servable by vLLM/LoRAX)")


@click.command("export-merged")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--weights", required=True, metavar="NAME=W,...", help="Fixed expert mixture, e.g. diagnosis=0.7,ddi=0.3.")
@click.option("--base", metavar="MODEL", help="Base model to merge into (default: the one in moe_config.json; fingerprint-checked).")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Saved dtype (default float32).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export_merged_cmd(ckpt, out, weights, base, dtype, force) -> None:
    """Export a fixed mixture merged into the base weights: a plain transformers model directory."""
    from ..checkpoint import load_checkpoint
    from ..export import export_merged, parse_weights
    from ._console import out_console

    mix = parse_weights(weights)
    spec = load_checkpoint(ckpt)
    path = export_merged(spec, base, mix, out, dtype=_dtype(dtype), overwrite=force)
    out_console.print(f"[green]✓[/] merged model for {weights} written to {path} (a plain transformers directory)")


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""
    for cmd in (inspect_cmd, generate_cmd, export_peft_cmd, export_merged_cmd):
        group.add_command(cmd)
