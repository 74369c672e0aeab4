"""Local paths versus Hugging Face hub ids: a string is a hub id only when it looks like one
(owner/name) and no local path can be meant, so that a typo in a local path says which path is
missing instead of trying the network."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")


def looks_like_hub_id(spec: str) -> bool:
    """owner/name, not a file name, and not inside an existing local folder (`runs/demoo` where
    runs/ exists is a local typo, not a hub repo)."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is None or spec.startswith("."):
        return False
    return not spec.endswith(TORCH_SUFFIXES) and not Path(spec).parent.is_dir()


def close_names(spec) -> list[str]:
    """The paths next to `spec` whose names are closest to its name (a typo's likely targets)."""
    path = Path(spec).expanduser()
    if not path.parent.is_dir():
        return []
    names = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=3)
    return [str(path.parent / name) for name in names]


def missing_path_message(spec, what: str = "path") -> str:
    """`WHAT SPEC does not exist`, with the closest names in its folder when there are some."""
    close = close_names(spec)
    return f"{what} {spec} does not exist" + (f" (did you mean {', '.join(close)}?)" if close else "")
