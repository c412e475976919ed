"""The README's API list and ``jaxquant/__init__.py`` name the same things."""
import re
import types
from pathlib import Path

import jaxquant

README = Path(__file__).resolve().parents[1] / "README.md"


def _public_names() -> set[str]:
    return {n for n, v in vars(jaxquant).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}


def _readme_names() -> set[str]:
    text = README.read_text()
    section = text.split("<!-- api-list -->")[1].split("<!-- /api-list -->")[0]
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section))


def test_readme_lists_exactly_the_public_api():
    public, listed = _public_names(), _readme_names()
    assert not public - listed, f"exported but not in the README: {sorted(public - listed)}"
    assert not listed - public, f"in the README but not exported: {sorted(listed - public)}"


def test_every_public_function_has_a_docstring():
    missing = [n for n in _public_names()
               if callable(getattr(jaxquant, n)) and not (getattr(jaxquant, n).__doc__ or "").strip()]
    assert not missing, f"public callables without a docstring: {sorted(missing)}"
