"""Every shipped recipe starts with a comment block saying what it does and how to run it, and its data exists."""

from pathlib import Path

import pytest

from mergekit_moe.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_three_kinds_of_recipe_ship():
    names = {p.name for p in RECIPES}
    assert {"medical-demo.yaml", "minimal-two-experts.yaml", "community-hub.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_and_data(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{path.name} must start with a comment block"
    assert any("moemerge " in h or "make " in h for h in header), f"{path.name}: say the command to run it"
    recipe = load_recipe(path)
    for exp in list(recipe.experts) + ([recipe.knowledge_expert] if recipe.knowledge_expert else []):
        if exp.train:
            assert recipe.resolve_path(exp.train["data"]).exists(), f"{path.name}: {exp.name} data missing"
    if recipe.calibration and recipe.calibration.general_data:
        assert recipe.resolve_path(recipe.calibration.general_data).exists()
