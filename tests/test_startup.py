"""Start-up: `import merge_fast` and a folder merge through the CLI load only what the work
needs; numpy (and the config / cross-architecture machinery) are imported on first use."""
from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_does_not_load_numpy_or_config():
    mods = _modules_after("import merge_fast")
    assert "numpy" not in mods
    assert not {"yaml", "torch", "huggingface_hub", "merge_fast.config", "merge_fast.crossarch"} & mods


def test_lazy_names_resolve():
    mods = _modules_after(
        "import merge_fast as mf\n"
        "from merge_fast import run, svd, align\n"
        "assert run is mf.config.run and svd is mf.linalg.svd and align is mf.crossarch.align\n"
        "assert callable(mf.procrustes_absorb) and callable(mf.subspace_masks) and mf.lora.read_adapter\n"
        "assert set(mf.__all__) <= set(dir(mf))\n"
        "try:\n    mf.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    assert "numpy" in mods  # linalg needs it, once asked for


def test_cli_folder_merge_without_numpy(llama_f32, tmp_path):
    out = tmp_path / "out"
    mods = _modules_after(
        "from merge_fast.cli import main\n"
        f"assert main(['task-arithmetic', {str(llama_f32.base)!r}, {str(llama_f32.a)!r}, '-o', {str(out)!r}, '-q']) == 0\n"
    )
    assert (out / "model.safetensors").is_file()
    assert "numpy" not in mods
