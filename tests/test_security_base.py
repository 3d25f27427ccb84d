"""Base-model fingerprints block compose (issue 9, item 10).

tests/test_compose.py covers a config difference through the library. Here the difference is in
the TOKENIZER only (same config, same shapes, so no shape check can notice: two token ids are
swapped), and the user-facing commands are run: ``moemerge validate`` and ``moemerge compose``
exit 1 with one line showing both fingerprints and naming ``--allow-base-mismatch``, write nothing,
and pass with the flag (with a warning).
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_peft_adapter, run_cli

from mergekit_moe.base import config_fingerprint_fields, fingerprint_of, load_config
from mergekit_moe.registry import Registry


@pytest.fixture(scope="module")
def swapped_tokenizer_base(tiny_base, tmp_path_factory):
    """A copy of the tiny base whose tokenizer maps two tokens to each other's ids."""
    d = tmp_path_factory.mktemp("tok-variant") / "base"
    shutil.copytree(tiny_base, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


def test_the_variant_differs_only_in_the_tokenizer(tiny_base, swapped_tokenizer_base):
    assert config_fingerprint_fields(load_config(str(tiny_base))) == config_fingerprint_fields(load_config(str(swapped_tokenizer_base)))
    assert fingerprint_of(tiny_base) != fingerprint_of(swapped_tokenizer_base)


RECIPE = """base_model: ./base
experts:
  - {name: a, source: ./exp-a}
  - {name: b, source: tokx}
output: {path: ./out}
"""


@pytest.mark.slow
def test_compose_and_validate_block_a_tokenizer_mismatch_unless_allowed(tiny_base, swapped_tokenizer_base, tmp_path):
    (tmp_path / "base").symlink_to(tiny_base)
    make_peft_adapter(tiny_base, tmp_path / "exp-a", seed=1, scale=0.05)
    make_peft_adapter(swapped_tokenizer_base, tmp_path / "exp-b", seed=2, scale=0.05)
    Registry().import_adapter(tmp_path / "exp-b", name="tokx", task="t", base=str(swapped_tokenizer_base))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    ours, theirs = fingerprint_of(tiny_base), fingerprint_of(swapped_tokenizer_base)

    for cmd in ("validate", "compose"):
        p = run_cli(cmd, tmp_path / "recipe.yaml", cwd=tmp_path)
        assert p.returncode == 1, (cmd, p.stdout, p.stderr)
        err = " ".join(p.stderr.split())
        assert len(p.stderr.strip().splitlines()) == 1 or err.count("error:") == 1, p.stderr
        assert ours[:16] in err and theirs[:16] in err and "--allow-base-mismatch" in err and "experts[1]" in err, err
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()

    p = run_cli("compose", tmp_path / "recipe.yaml", "--allow-base-mismatch", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "allowed by --allow-base-mismatch" in " ".join((p.stdout + p.stderr).split())
    from mergekit_moe.checkpoint import load_checkpoint

    spec = load_checkpoint(tmp_path / "out")
    assert set(spec.experts) >= {"a", "b"} and spec.base_fingerprint == ours
