"""How ``dealrec``'s typed options are declared and read: :func:`option` declares a field
(default, help text, aliases, the reuse-key rules), and the readers build a config dataclass
from defaults <- a YAML file's section <- command-line flags, refusing any key nobody reads.
The config classes themselves are in :mod:`jaxrec.config`. Standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import field
from pathlib import Path

import yaml

from jaxrec.errors import UserError

_UNSET = object()


def option(
    default: typing.Any,
    text: str,
    flag: str = "",
    since: str = "",
    keyed_as: typing.Any = _UNSET,
    aliases: tuple = (),
) -> typing.Any:
    """A documented option field: ``text`` is its ``--help`` text. A list or dict default is
    copied for every instance (``default_factory``). ``flag`` (solver options) names the
    ``InfluenceConfig`` field, and so the command-line flag, that sets it when that name
    differs from the option's own. ``since`` (a date) marks an option added after runs were
    archived whose default keeps the earlier behaviour: while it is at its default it is left
    out of the stage's reuse key (:func:`jaxrec.pipeline.key_options`), so archived runs stay
    valid; any other value is keyed as usual. ``keyed_as`` marks an option that does not
    change a stage's results (resume, a cache folder): a reuse key holds this value whatever
    the option's, namely the default archived keys were made with, so the option and its
    default may change without invalidating them (:func:`keyed_value`). ``aliases`` are
    earlier names of a renamed option: config files and flags still accept them
    (:func:`make_config`, :func:`add_config_arguments`), and the first is its archived name."""
    metadata = {
        "help": text,
        **({"flag": flag} if flag else {}),
        **({"since": since} if since else {}),
        **({"keyed_as": keyed_as} if keyed_as is not _UNSET else {}),
        **({"aliases": tuple(aliases)} if aliases else {}),
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def keyed_value(f: dataclasses.Field, value):
    """The value a reuse key records for option field ``f`` set to ``value``: its
    ``keyed_as`` (:func:`option`) when it has one, else ``value``."""
    return f.metadata.get("keyed_as", value)


def help_of(cls: typing.Any, name: str) -> str:
    """The help text of field ``name`` of the dataclass ``cls``."""
    return cls.__dataclass_fields__[name].metadata["help"]


# ----------------------------------------------------------------------------- JAX side


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--config FILE`` and one ``--flag`` per field of the dataclass ``cls``."""
    parser.add_argument(
        "config_file",
        nargs="?",
        default=None,
        metavar="CONFIG",
        help="YAML config file (see configs/), the same as --config",
    )
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    for f in dataclasses.fields(cls):
        flags = ["--" + n.replace("_", "-") for n in (f.name, *f.metadata.get("aliases", ()))]
        typ = _field_type(cls, f)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        text = f"{text} (default: {default!r})" if text else f"(default: {default!r})"
        if typ is bool:
            parser.add_argument(
                *flags, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text
            )
        elif typing.get_origin(typ) is list:
            parser.add_argument(
                *flags,
                dest=f.name,
                default=None,
                nargs="+",
                type=typing.get_args(typ)[0],
                help=text,
            )
        elif typing.get_origin(typ) is typing.Literal:
            parser.add_argument(
                *flags, dest=f.name, default=None, choices=typing.get_args(typ), help=text
            )
        else:
            parser.add_argument(*flags, dest=f.name, default=None, type=typ, help=text)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML config file into a dict of sections. A top-level ``base: FILE`` (relative to
    this file) is read first; this file's keys override it, section by section."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = load_config_file(path.parent / str(base))
    merged = {name: dict(section or {}) for name, section in parent.items()}
    for name, section in data.items():
        if not isinstance(section, dict):
            raise UserError(f"{path}: section {name!r} must be a mapping of keys")
        merged[name] = {**merged.get(name, {}), **section}
    return merged


def make_config(cls, values: dict | None = None, source: str = "config"):
    """Build ``cls`` from a dict, checking keys and types (an unknown key is an error)."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    for f in names.values():
        for alias in f.metadata.get("aliases", ()):
            if alias in values:
                if f.name in values:
                    raise UserError(f"{source}: {alias} and {f.name} name one option: give one")
                values[f.name] = values.pop(alias)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(names)})")
    for key, value in values.items():
        typ = _field_type(cls, names[key])
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif typing.get_origin(typ) is list:
            if not isinstance(value, list):
                raise UserError(f"{source}: {key} must be a list")
        elif typing.get_origin(typ) is typing.Literal:
            if value not in typing.get_args(typ):
                choices = ", ".join(map(str, typing.get_args(typ)))
                raise UserError(f"{source}: {key} must be one of {choices}, got {value!r}")
        elif typ in (int, float, str, bool) and not isinstance(value, typ):
            raise UserError(f"{source}: {key} must be {typ.__name__}, got {value!r}")
    try:
        return cls(**values)
    except UserError as e:  # a range check of the class (``__post_init__``)
        raise UserError(f"{source}: {e}") from None


def check_sections(data: dict, source: str, section: str, classes: dict) -> None:
    """Refuse a config file whose sections a command would silently ignore.

    Args:
      data: the file's sections (:func:`load_config_file`).
      source: the file's name, for messages.
      section: the section the command reads; it must be present (a file without it would
        run every default).
      classes: every section name a config file may hold -> its config class, or ``None``
        when the command cannot check it (``pipeline``, ``experiment``: ``dealrec run`` /
        ``experiment`` do). A name ``STAGE:KIND`` (a pipeline's score stage, e.g.
        ``influence:grand``) counts as ``STAGE``.

    Raises :class:`UserError` on an unknown section (with the closest known name), a missing
    ``section``, or an unknown key or bad value in any section whose class is known."""
    known = sorted(classes)
    unknown = sorted(name for name in data if str(name).partition(":")[0] not in classes)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"{source}: unknown section {unknown[0]!r}{hint}; known: {', '.join(known)}"
        )
    if section not in data:
        have = ", ".join(map(str, data)) or "none"
        raise UserError(
            f"{source}: no {section!r} section, the one this command reads (sections: {have}); "
            f"add '{section}:' or give the options as flags without the file"
        )
    for name, values in data.items():
        if values is not None and not isinstance(values, dict):
            raise UserError(f"{source}: section {name!r} must be a mapping of keys")
        cls = classes[str(name).partition(":")[0]]
        if cls is not None and name != section:
            make_config(cls, values or {}, f"{source} [{name}]")


def config_from_args(cls, args: argparse.Namespace, section: str, classes: dict | None = None):
    """Defaults <- section of the config file (``CONFIG`` or ``--config``) <- command-line
    flags. The file is checked by :func:`check_sections` against ``classes`` (default: only
    ``section``, of ``cls``)."""
    values: dict = {}
    path = getattr(args, "config", None)
    positional = getattr(args, "config_file", None)
    if path and positional and path != positional:
        raise UserError(f"two config files, {positional} and --config {path}: give one")
    path = path or positional
    if path:
        data = load_config_file(path)
        check_sections(data, str(path), section, classes or {section: cls})
        values.update(data.get(section) or {})
        source = f"{path} [{section}]"
    else:
        source = "config"
    for f in dataclasses.fields(cls):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    return make_config(cls, values, source)


def flag_words(message: str, cls) -> str:
    """A library message for the command line: ``name=`` of a field of the config class
    ``cls`` becomes its flag, ``"increase damping="`` -> ``"increase --damping"``,
    ``"out='x'"`` -> ``"--out x"``; other names are left as they are."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not names:
        return message

    def sub(m):
        value = m.group(2).strip("'")
        return "--" + m.group(1).replace("_", "-") + (f" {value}" if value else "")

    pattern = r"(?<![\w.\-])(" + "|".join(map(re.escape, names)) + r")=('[^']*'|[\w.+\-]*)"
    return re.sub(pattern, sub, message)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
