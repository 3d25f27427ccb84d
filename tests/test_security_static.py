"""Static safety scan of the package source (issue 9, item 16).

No ``pickle.load``/``loads``/``Unpickler`` (nor dill/joblib/marshal/shelve loaders), no ``torch.load``
without a literal ``weights_only=True``, no ``yaml.load``/``unsafe_load``/``full_load`` or unsafe
loader classes, no ``trust_remote_code`` set to anything but a literal ``False``, no ``numpy.load``
with ``allow_pickle=True``, no ``eval``/``exec`` builtins.

The scan works on the AST (comments and docstrings cannot trigger it, aliases such as
``import pickle as p`` or ``from torch import load`` cannot hide a call), and it is itself tested
on known-bad snippets so that a scanner that finds nothing cannot pass by accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_moe"

#: module -> functions of it that deserialize arbitrary objects
_UNSAFE_FUNCS = {
    "pickle": {"load", "loads", "Unpickler", "_load", "_loads"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"},
    "dill": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "joblib": {"load"},
    "marshal": {"load", "loads"},
    "shelve": {"open"},
    "yaml": {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader", "UnsafeLoader",
             "FullLoader"},
}


def _const_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _const_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str):
        self.filename = filename
        self.problems: list[str] = []
        self.modules: dict[str, str] = {}  # local alias -> real module ("p" -> "pickle")
        self.funcs: dict[str, tuple[str, str]] = {}  # local name -> (module, function)

    def _flag(self, node: ast.AST, msg: str) -> None:
        self.problems.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {msg}")

    # -- imports: remember aliases ------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = (node.module or "").split(".")[0]
        for a in node.names:
            local = a.asname or a.name
            self.funcs[local] = (node.module or "", a.name)
            if a.name in _UNSAFE_FUNCS.get(mod, set()):
                self._flag(node, f"imports {a.name} from {node.module}")
        self.generic_visit(node)

    # -- calls and references -----------------------------------------------------------------
    def _resolve(self, func: ast.AST) -> tuple[str, str] | None:
        """(module, attribute) for ``mod.attr(...)`` / ``alias.attr(...)`` / ``from mod import attr``."""
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return self.modules.get(func.value.id, func.value.id), func.attr
        if isinstance(func, ast.Name) and func.id in self.funcs:
            mod, name = self.funcs[func.id]
            return mod.split(".")[0], name
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            mod = self.modules.get(node.value.id, node.value.id)
            if node.attr in _UNSAFE_FUNCS.get(mod, set()) and mod in self.modules.values():
                self._flag(node, f"uses {mod}.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        target = self._resolve(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if target is not None:
            mod, name = target
            if mod == "torch" and name == "load" and not _const_true(kw.get("weights_only")):
                self._flag(node, "torch.load without weights_only=True")
            if mod in ("numpy", "np") and name == "load" and not _const_false(kw.get("allow_pickle", ast.Constant(False))):
                self._flag(node, "numpy.load with allow_pickle")
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in self.funcs:
            self._flag(node, f"builtin {node.func.id}()")
        if "trust_remote_code" in kw and not _const_false(kw["trust_remote_code"]):
            self._flag(node, "trust_remote_code is not a literal False")
        for k in node.keywords:  # **{"trust_remote_code": True}
            if k.arg is None and isinstance(k.value, ast.Dict):
                self._check_dict(k.value)
        self.generic_visit(node)

    def _check_dict(self, node: ast.Dict) -> None:
        for key, val in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not _const_false(val):
                self._flag(node, "trust_remote_code is not a literal False")

    def visit_Dict(self, node: ast.Dict) -> None:
        self._check_dict(node)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        # kw["trust_remote_code"] = True
        for t in node.targets:
            if (isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "trust_remote_code"
                    and not _const_false(node.value)):
                self._flag(node, "trust_remote_code is not a literal False")
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<snippet>") -> list[str]:
    s = _Scanner(filename)
    s.visit(ast.parse(source, filename=filename))
    return s.problems


def _package_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the package was not found"
    return files


def test_package_has_no_unsafe_deserialization_or_remote_code():
    problems = []
    for f in _package_files():
        problems += scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))
    assert problems == [], "\n".join(problems)


def test_package_has_no_trust_remote_code_true_even_in_strings():
    """Belt and braces: the literal text appears nowhere (an f-string or a config dict could smuggle it)."""
    hits = [str(f) for f in _package_files() if "trust_remote_code=True" in f.read_text(encoding="utf-8").replace(" ", "")]
    assert hits == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))\n",
    "import pickle as p\np.loads(b'')\n",
    "from pickle import loads\nloads(b'')\n",
    "import pickle\nclass U(pickle.Unpickler):\n    pass\n",
    "import dill\ndill.load(f)\n",
    "import joblib\njoblib.load('m.joblib')\n",
    "import torch\ntorch.load('x.pt')\n",
    "import torch\ntorch.load('x.pt', weights_only=False)\n",
    "import torch\nflag = True\ntorch.load('x.pt', weights_only=flag)\n",
    "from torch import load\nload('x.pt')\n",
    "import yaml\nyaml.load(text)\n",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)\n",
    "import yaml\nyaml.unsafe_load(text)\n",
    "import yaml\nyaml.full_load(text)\n",
    "from yaml import load\nload(text)\n",
    "import yaml\nclass L(yaml.UnsafeLoader):\n    pass\n",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)\n",
    "import transformers\nflag = True\ntransformers.AutoConfig.from_pretrained('x', trust_remote_code=flag)\n",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', **{'trust_remote_code': True})\n",
    "kw = {'trust_remote_code': True}\n",
    "kw = {}\nkw['trust_remote_code'] = True\n",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n",
    "eval('1 + 1')\n",
    "exec('import os')\n",
])
def test_scanner_catches_known_bad_code(snippet):
    assert scan_source(snippet), f"the scanner missed:\n{snippet}"


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)\n",
    "import yaml\nyaml.safe_load(text)\n",
    "import yaml\nclass L(yaml.SafeLoader):\n    pass\n",
    "import pickle\ndata = pickle.dumps({'a': 1})\nexc = pickle.UnpicklingError\n",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=False)\n",
    "model.eval()\n",
    "# pickle.load(f) and torch.load(x) in a comment\n'''yaml.load in a docstring'''\n",
    "import numpy as np\nnp.load('a.npy')\n",
])
def test_scanner_accepts_safe_code(snippet):
    assert scan_source(snippet) == []
