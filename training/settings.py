"""Settings declared once: a configuration section is a frozen dataclass whose fields are made by :func:`setting`.

Each field carries its default, help, flag spelling (and old spellings) and allowed range. From those declarations
come the command-line flags (:func:`add_section`), the ``--config`` YAML keys (:class:`SettingsParser`), the range
checks (:func:`check_section`), the typed objects (:func:`build_section`) and the saved record
(:func:`section_values`): adding a setting is adding one field.

A setting's *name* (its ``dest``) is the flag without ``--`` and with ``_`` for ``-``; it is the ``--config`` key and
the key in ``args.json``. The field may be named otherwise (``EmaConfig.decay`` is ``model_ema_decay``).
"""

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from utils import NumberRange, UserError

__all__ = ["EXPLICIT", "SettingsParser", "add_section", "build_section", "check_section", "declarations",
           "optional_str", "same_as", "section_values", "setting"]

EXPLICIT = "explicit_flags"  # the namespace attribute holding the names of the settings the user gave
_KEY = "setting"  # the dataclass field metadata entry of a declaration


@dataclass(frozen=True)
class Declaration:
    """What :func:`setting` records about one field besides its default."""

    help: str
    name: str | None  # the setting's name where it differs from the field's
    aliases: tuple[str, ...]
    allowed: NumberRange | None
    required: bool
    options: Mapping[str, Any]  # further argparse options: choices, metavar, nargs, const, type


def setting(default: Any = None, help: str = "", *, name: str | None = None, aliases: Sequence[str] = (),
            allowed: NumberRange | None = None, required: bool = False, factory: Callable[[], Any] | None = None,
            **options: Any) -> Any:
    """A dataclass field declaring one setting: its default (``factory``: a default computed when a parser or an
    object is made, e.g. from the cores this process may use), help, name (default: the field's), old flag
    spellings (``aliases``, with their dashes), allowed range and further argparse options."""
    declaration = Declaration(help, name, tuple(aliases), allowed, required, MappingProxyType(options))
    if factory is not None:
        return field(default_factory=factory, metadata={_KEY: declaration})
    return field(default=default, metadata={_KEY: declaration})


def same_as(section: type, field_name: str, *, aliases: Sequence[str] = (), **changes: Any) -> Any:
    """The declaration of ``section``'s field ``field_name``, reused by another section (declared once): ``aliases``
    are added to its old spellings; ``changes`` (``default``, ``help``, ``required``) replace what differs."""
    item = section.__dataclass_fields__[field_name]
    declaration = item.metadata[_KEY]
    declaration = dataclasses.replace(declaration, aliases=declaration.aliases + tuple(aliases),
                                      **{key: value for key, value in changes.items() if key != "default"})
    if "default" in changes or item.default is not dataclasses.MISSING:
        return field(default=changes.get("default", item.default), metadata={_KEY: declaration})
    return field(default_factory=item.default_factory, metadata={_KEY: declaration})


def optional_str(value: str) -> str | None:
    """An argparse ``type``: ``none`` or an empty value is None."""
    return None if value.lower() in ("", "none") else value


def declarations(section: type) -> Iterator[tuple[dataclasses.Field, str, Declaration]]:
    """``(field, setting name, declaration)`` of every declared field of a section class."""
    for item in dataclasses.fields(section):
        declaration = item.metadata.get(_KEY)
        if declaration is not None:
            yield item, declaration.name or item.name, declaration


def _argparse_type(hint: Any) -> dict[str, Any]:
    """``type`` / ``nargs`` / ``action`` from a field's annotation (``int | None`` -> ``type=int``...)."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] if isinstance(
        hint, types.UnionType) else [hint]
    kind = kinds[0]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        return {"type": items[0], "nargs": "+" if items[-1] is Ellipsis else len(items)}
    return {"type": kind} if kind in (int, float) else {}


def add_section(parser: argparse.ArgumentParser, section: type, title: str) -> argparse.ArgumentParser:
    """The flags of ``section``'s settings, as one argument group of ``parser``."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(section)
    for item, name, declaration in declarations(section):
        options = {**_argparse_type(hints[item.name]), **declaration.options}
        if declaration.required:
            options["required"] = True
        flag = "--" + name.replace("_", "-")
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        group.add_argument(flag, *declaration.aliases, dest=name, default=default, help=declaration.help,
                           **options)
    return parser


def build_section(section: type, values: Mapping[str, Any]) -> Any:
    """``section`` from settings by name (lists become tuples, so the object stays hashable); unnamed fields keep
    their defaults."""
    kwargs = {}
    for item, name, _ in declarations(section):
        if name in values:
            value = values[name]
            kwargs[item.name] = tuple(value) if isinstance(value, list) else value
    return section(**kwargs)


def section_values(obj: Any) -> dict[str, Any]:
    """A section object's settings by name (the inverse of :func:`build_section`)."""
    return {name: getattr(obj, item.name) for item, name, _ in declarations(type(obj))}


def check_section(section: type, values: Mapping[str, Any]) -> None:
    """Every setting of ``section`` within its declared range: one clear error for the first that is not."""
    for _, name, declaration in declarations(section):
        value = values.get(name)
        if declaration.allowed is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            problem = declaration.allowed.problem(item)
            if problem:
                raise UserError(f"--{name.replace('_', '-')} {problem}")


class SettingsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``--config FILE.yaml``: the file's values replace the defaults, flags win.

    The parsed namespace carries ``explicit_flags``: the names of the settings given on the command line or in
    the file.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--config", default=None, metavar="YAML",
                          help="YAML file of settings (flag names without --, - or _); command-line flags win")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        config_path = pre.parse_known_args(args)[0].config
        from_file = self._read_config(config_path) if config_path else {}
        saved = {action.dest: (action.default, action.required) for action in self._actions}
        try:
            for action in self._actions:  # the file's values are the defaults (they satisfy required flags)
                action.default = from_file.get(action.dest, saved[action.dest][0])
                action.required = saved[action.dest][1] and action.dest not in from_file
            parsed, extras = super().parse_known_args(args, namespace)
            for action in self._actions:  # what the command line sets: parsed again with no defaults at all
                action.default, action.required = argparse.SUPPRESS, False
            given = vars(super().parse_known_args(args, argparse.Namespace())[0])
        finally:
            for action in self._actions:
                action.default, action.required = saved[action.dest]
        setattr(parsed, EXPLICIT, frozenset(given) | frozenset(from_file))
        return parsed, extras

    def _read_config(self, path: str) -> dict[str, Any]:
        """The ``--config`` YAML file as ``{dest: value}``; an unreadable file or unknown key is a usage error."""
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            self.error(f"--config {path} is not a readable YAML file ({str(err).splitlines()[0]})")
        if not isinstance(values, dict):
            self.error(f"--config {path} must hold a mapping such as 'epochs: 100'")
        known = {action.dest for action in self._actions if action.dest not in ("help", "config")}
        values = {str(key).lstrip("-").replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            self.error(f"--config {path}: unknown settings {', '.join(unknown)}; use the flag names of --help")
        return values
