"""Import the user's `package.module:attr` (a reward function, an environment class).

Only the named module is imported (with its parent packages, as Python does); nothing is
scanned, so code runs only from where the config points. The current directory is searched after
sys.path, as `python -m` would, so a `my_rewards.py` beside the config works.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from swallowctl.core.errors import ConfigError

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_attr(spec: str, *, where: str, kind: str, example: str) -> Any:
    """The object `spec` (`package.module:attr`, attr may be dotted) names.

    `where` (the config key) starts every message; `kind` ("function", "Class") and `example`
    fill the hint for a malformed spec.

    Raises:
        ConfigError: a malformed spec, a module that cannot be imported (missing, or failing
            inside), or a missing attribute.
    """
    spec = spec.strip()
    module_name, sep, attr = spec.partition(":")
    if not sep or not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise ConfigError(f"{where}: '{spec}' is not package.module:{kind}", hint=f"e.g. {example}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{where}: cannot import '{module_name}' for '{spec}': no module named '{missing}'",
                hint="run from the folder holding it, install its package, or set PYTHONPATH",
            ) from None
        raise ConfigError(
            f"{where}: importing '{module_name}' for '{spec}' failed: it needs '{missing}', "
            "which is not installed"
        ) from e
    except Exception as e:
        raise ConfigError(
            f"{where}: importing '{module_name}' for '{spec}' failed: {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: '{module_name}' has no '{attr}' (from '{spec}')")
        obj = getattr(obj, part)
    return obj
