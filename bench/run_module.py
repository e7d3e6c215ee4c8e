"""Run a module of this package in a fresh process, the repository root loaded as the package from its
path (as tests/conftest.py does), so a benchmark's subprocess works whether or not the package is
installed and whatever the clone folder is called. A file, so `torchrun` can run it too:

    python bench/run_module.py PACKAGE ROOT MODULE [ARGS...]   (MODULE relative to PACKAGE, e.g. bench.speed)

`command(module, *args)` builds that command line for this interpreter.
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(module: str, *args: str) -> list[str]:
    """[python, this file, PACKAGE, ROOT, MODULE, *args]: runs `module` (e.g. "bench.speed") as __main__."""
    package = (__package__ or "comfyui_lora_trainer.bench").rsplit(".", 1)[0]
    return [sys.executable, __file__, package, str(ROOT), module, *args]


def _main() -> None:
    # Python put this file's folder first on the path; bench/profile.py there would shadow the standard library's
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    name, root, module = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location(name, root + "/__init__.py", submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    sys.argv = [f"{name}.{module}"] + sys.argv[4:]
    runpy.run_module(f"{name}.{module}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main()
