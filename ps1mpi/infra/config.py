"""Recipes: the pipeline's configuration, in TOML, as the IPP called them.

Defaults live in the package (``ps1mpi/recipes/<section>.toml``, one file per section). A
campaign may override any of them with its own TOML file of the same shape, and a command line
with ``--set section.key=value``. Everything is validated before a job starts: an unknown key
or a value of the wrong type is an error that names the key and where it came from.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Recipe", "RecipeError", "load_recipe", "default_recipe"]


class RecipeError(ValueError):
    """A recipe key or value is wrong; the message names the key and its source."""

    fault = 3  # configuration fault, as the IPP's


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in sorted(resources.files("ps1mpi.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            with entry.open("rb") as fh:
                try:
                    data = tomllib.load(fh)
                except tomllib.TOMLDecodeError as err:
                    raise RecipeError(f"packaged recipe {entry.name}: {err}") from err
            for section, values in data.items():
                if section in out:
                    raise RecipeError(f"packaged recipe {entry.name}: section [{section}] is "
                                      "defined in two files")
                out[section] = values
    return out


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _merge(base: dict, override: dict, source: str, prefix: str = "") -> None:
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            hint = difflib.get_close_matches(key, list(base), n=1)
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise RecipeError(f"{source}: unknown recipe key '{dotted}'{extra}")
        if isinstance(base[key], dict) and not _free_table(base[key]):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: '{dotted}' must be a table of keys")
            _merge(base[key], value, source, dotted + ".")
            continue
        if _kind(value) != _kind(base[key]):
            raise RecipeError(f"{source}: '{dotted}' must be a {_kind(base[key])}, "
                              f"got {_kind(value)} {value!r}")
        if isinstance(base[key], float) and isinstance(value, int):
            value = float(value)
        base[key] = value


def _free_table(table: dict) -> bool:
    """Tables marked ``_free = true`` accept any keys (e.g. per-filter colour terms)."""
    return bool(table.get("_free", False))


class Recipe:
    """Validated configuration. ``recipe.get("chip.threshold")`` or ``recipe["chip"]``."""

    def __init__(self, data: dict[str, Any], sources: list[str]):
        self._data = data
        self.sources = sources

    def get(self, dotted: str) -> Any:
        node: Any = self._data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise RecipeError(f"no recipe key '{dotted}'")
            node = node[part]
        return copy.deepcopy(node)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.get(section)

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare words are strings


def load_recipe(files: Iterable[str | Path] = (), overrides: Iterable[str] = (),
                data: dict | None = None) -> Recipe:
    """Defaults, then each campaign TOML file, then an override dict, then ``key=value`` strings."""
    merged = _defaults()
    sources = ["package defaults"]
    for path in files:
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                _merge(merged, tomllib.load(fh), str(path))
        except FileNotFoundError:
            raise RecipeError(f"{path}: recipe file not found") from None
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{path}: not valid TOML: {err}") from None
        sources.append(str(path))
    if data:
        _merge(merged, data, "campaign definition")
        sources.append("campaign definition")
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        node: dict = {}
        cur = node
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = _parse_value(text.strip())
        _merge(merged, node, f"--set {item}")
        sources.append(f"--set {item}")
    return Recipe(merged, sources)


def default_recipe() -> Recipe:
    return load_recipe()
