"""docs/recipes.md and the recipes shown in the docs must stay true to the recipe schema.

* every key table of recipes.md lists exactly the keys `recipe.py` accepts for that section;
* every YAML recipe shown in the docs (README, getting-started, recipes) passes the schema check.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergekit_moe import recipe as R

ROOT = Path(__file__).resolve().parents[1]
RECIPES_MD = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")

# section heading in recipes.md -> the keys the schema accepts there
SECTIONS = {
    "top level": R.TOP_KEYS,
    "`experts[i]` and `knowledge_expert`": R.EXPERT_KEYS,
    "`allocation`": R.ALLOCATION_KEYS,
    "`routing`": R.ROUTING_KEYS,
    "`calibration`": R.CALIBRATION_KEYS,
    "`output`": R.OUTPUT_KEYS,
}


def _table_keys(heading: str) -> set[str]:
    """Keys in the first column of the table under ``### heading`` (``a``, ``b`` cells count as two keys)."""
    m = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^##)", RECIPES_MD, re.S | re.M)
    assert m, f"recipes.md has no section '### {heading}'"
    keys: set[str] = set()
    for line in m.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        keys |= set(re.findall(r"`([a-z_]+)`", first))
    return keys


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_key_table_matches_the_schema(heading):
    documented = _table_keys(heading)
    accepted = set(SECTIONS[heading])
    assert documented == accepted, (f"recipes.md '{heading}': undocumented {sorted(accepted - documented)}, "
                                    f"documented but not accepted {sorted(documented - accepted)}")


def test_loss_weights_and_model_card_keys_are_documented():
    for key in R.LOSS_KEYS:
        assert re.search(rf"\b{key}: ", RECIPES_MD.split("`loss_weights`")[1].split("\n")[0]), key
    card_row = next(line for line in RECIPES_MD.splitlines() if line.startswith("| `model_card`"))
    for key in R.MODEL_CARD_KEYS:
        assert f"`{key}`" in card_row, key


def _yaml_blocks() -> list[tuple[str, int, str]]:
    out = []
    for doc in ("README.md", "docs/getting-started.md", "docs/recipes.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for i, m in enumerate(re.finditer(r"```yaml\n(.*?)```", text, re.S)):
            out.append((doc, i, m.group(1)))
    return out


@pytest.mark.parametrize("doc,i,text", _yaml_blocks(), ids=lambda v: v if isinstance(v, str) and "\n" not in v else None)
def test_every_recipe_shown_in_the_docs_passes_the_schema(doc, i, text, tmp_path):
    """Schema only (the same as `moemerge validate --schema-only`): keys, types, values, cross-field rules."""
    R.parse_recipe(text, file=f"{doc} yaml block {i}", root=str(tmp_path))


def test_the_docs_show_recipes():
    docs = {d for d, _, _ in _yaml_blocks()}
    assert {"docs/getting-started.md", "docs/recipes.md"} <= docs
