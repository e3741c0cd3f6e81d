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
from typing import TYPE_CHECKING, TypeVar

import yaml

from jaxrec.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: A config dataclass (:func:`make_config` builds one of the class it is given).
ConfigT = TypeVar("ConfigT", bound="DataclassInstance")

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
    copied for every instance (``default_factory``). ``flag`` (the fields of an options
    dataclass that a config nests, :func:`nested`) is its flat name there, and so its
    command-line flag and reuse-key name, when that differs from the option's own. ``since``
    (a date) marks an option added after runs were archived whose default keeps the earlier
    behaviour: while it is at its default it is left
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


def nested(
    default: DataclassInstance, text: str, flat: dict | None = None, since: str = ""
) -> typing.Any:
    """A config field that holds a frozen options dataclass (a solver's, say
    :class:`~jaxrec.config.LissaOptions`): one typed object shared by the config classes and
    the Python API. Config files give it as a mapping (``lissa: {steps: 2000}``) or by the flat
    names of its fields (``steps: 2000``), the names flags and reuse keys use.

    Args:
      default: the options instance (frozen) the field defaults to.
      text: its ``--help`` text.
      flat: inner field name -> its flat name, or a tuple ``(name, *aliases)`` of earlier
        spellings (the first alias is its archived name, as :func:`option`'s ``aliases``);
        default: every field under its ``flag`` (:func:`option`) or own name. A flat name that
        is also a field of the config itself (``seed``, ``batch_size``) is that field: the
        config's ``__post_init__`` copies it in (:func:`tie`). Inner fields without a flat
        name are set in the mapping only, and keyed as ``field.inner`` when not at the default.
      since: as :func:`option`'s, for every flat name of the field but a tied one.
    """
    if flat is None:
        flat = {f.name: f.metadata.get("flag", f.name) for f in dataclasses.fields(default)}
    names = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in flat.items()}
    metadata = {"help": text, "nested": names, **({"since": since} if since else {})}
    return field(default_factory=lambda: default, metadata=metadata)


def _default(f: dataclasses.Field):
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _own_fields(cls) -> dict[str, dataclasses.Field]:
    """The fields of config ``cls`` that are not :func:`nested` sections."""
    return {f.name: f for f in dataclasses.fields(cls) if "nested" not in f.metadata}


def _nested_fields(cls) -> list[tuple[dataclasses.Field, dict[str, tuple[str, ...]]]]:
    """``[(field, {inner name: (flat name, *aliases)})]`` of the :func:`nested` fields of
    ``cls``."""
    return [(f, f.metadata["nested"]) for f in dataclasses.fields(cls) if "nested" in f.metadata]


def tie(cfg: DataclassInstance) -> None:
    """Copy each config field into the nested options whose flat name it is (:func:`nested`):
    ``InfluenceConfig.batch_size`` into ``cg.batch_size``, ``exact.batch_size``, ...; and
    refuse nested options that share a flat name with different values (one flag, one
    recorded value). Call it from the config's ``__post_init__``."""
    own = _own_fields(type(cfg))
    seen: dict[str, tuple[str, object]] = {}
    for f, names in _nested_fields(type(cfg)):
        tied = {inner: getattr(cfg, nm[0]) for inner, nm in names.items() if nm[0] in own}
        if tied and any(getattr(getattr(cfg, f.name), k) != v for k, v in tied.items()):
            setattr(cfg, f.name, dataclasses.replace(getattr(cfg, f.name), **tied))
        for inner, nm in names.items():
            if nm[0] in own:
                continue
            value = getattr(getattr(cfg, f.name), inner)
            other = seen.setdefault(nm[0], (f"{f.name}.{inner}", value))
            if other[1] != value:
                raise UserError(
                    f"{other[0]}={other[1]!r} and {f.name}.{inner}={value!r} share the option "
                    f"{nm[0]}: set them alike (or set {nm[0]})"
                )


def since_names(cls: type[DataclassInstance]) -> set[str]:
    """The flat names of the options of ``cls`` marked ``since`` (:func:`option`,
    :func:`nested`; a tied flat name is the config's own field's)."""
    own = _own_fields(cls)
    out = {name for name, f in own.items() if f.metadata.get("since")}
    for f, names in _nested_fields(cls):
        if f.metadata.get("since"):
            out |= {nm[0] for nm in names.values() if nm[0] not in own}
    return out


def flat_dests(cls: DataclassInstance | type[DataclassInstance]) -> list[str]:
    """The flat names of every option of ``cls`` that has a flag: its own fields, then each
    nested field's flat names (a tied one once, as the config's field)."""
    out = list(_own_fields(cls))
    for _, names in _nested_fields(cls):
        out += [nm[0] for nm in names.values() if nm[0] not in out]
    return out


def flat_values(cfg: DataclassInstance) -> dict:
    """``cfg`` as one flat dict: its own fields by name, each nested option by its flat name
    (an inner option without one as ``field.inner``, only when not at the nested default).
    The form of archived records (LDS settings, score manifests) from before the nesting."""
    own = _own_fields(type(cfg))
    out = {name: getattr(cfg, name) for name in own}
    for f, names in _nested_fields(type(cfg)):
        value, default = getattr(cfg, f.name), _default(f)
        for g in dataclasses.fields(value):
            nm = names.get(g.name)
            if nm is None:
                if getattr(value, g.name) != getattr(default, g.name):
                    out[f"{f.name}.{g.name}"] = getattr(value, g.name)
            elif nm[0] not in own:
                out.setdefault(nm[0], getattr(value, g.name))
    return out


def flat_options(cls: type[DataclassInstance], section: dict) -> dict:
    """Every option of config ``cls`` as a flat dict, as :func:`flat_values` names them:
    its defaults <- ``section`` (a config file's section: flat keys kept as given, a nested
    mapping's keys under their flat names). Values are not converted (``1`` stays an int),
    so reuse keys hash what the file says (:func:`jaxrec.pipeline.key_options`)."""
    out = flat_values(cls())
    nests = dict(_nested_fields(cls))
    by_name = {f.name: f for f in nests}
    own = _own_fields(cls)
    for key, value in section.items():
        if key not in by_name or not isinstance(value, dict):
            out[key] = value
            continue
        default = _default(by_name[key])
        for inner, v in value.items():
            nm = nests[by_name[key]].get(inner)
            if nm is None:
                if v != getattr(default, inner, _UNSET):
                    out[f"{key}.{inner}"] = v
            elif nm[0] not in own:  # a tied one is the config's own field (tie)
                out[nm[0]] = v
    return out


def archived_names(cls: type[DataclassInstance]) -> dict[str, str]:
    """Flat name -> the name archived records use: its first alias, else itself."""
    out = {f.name: (f.metadata.get("aliases") or (f.name,))[0] for f in dataclasses.fields(cls)}
    for _, names in _nested_fields(cls):
        out.update({nm[0]: (nm[1:] or nm)[0] for nm in names.values()})
    return out


def _gather_nested(cls, values: dict, source: str) -> dict:
    """``values`` with each nested field built from its mapping and its flat keys (which
    are consumed): an options instance, checked by :func:`make_config`."""
    own = _own_fields(cls)
    used: set[str] = set()
    for f, names in _nested_fields(cls):
        given = values.get(f.name, {})
        if isinstance(given, type(_default(f))):
            given = {g.name: getattr(given, g.name) for g in dataclasses.fields(given)}
        elif not isinstance(given, dict):
            raise UserError(f"{source}: {f.name} must be a mapping of keys")
        inner = dict(given)
        for name, nm in names.items():
            if nm[0] in own:
                if name in given and given[name] != values.get(nm[0], _default(own[nm[0]])):
                    raise UserError(
                        f"{source}: {f.name}.{name} is {nm[0]} here (one option): set {nm[0]}"
                    )
                continue
            present = [n for n in nm if n in values]
            if len(present) > 1 or (present and name in given):
                other = present[1] if len(present) > 1 else f"{f.name}.{name}"
                raise UserError(f"{source}: {present[0]} and {other} name one option: give one")
            if present:
                inner[name] = values[present[0]]
                used.add(present[0])
        defaults = {g.name: getattr(_default(f), g.name) for g in dataclasses.fields(_default(f))}
        values[f.name] = make_config(
            type(_default(f)), {**defaults, **inner}, f"{source} [{f.name}]"
        )
    return {k: v for k, v in values.items() if k not in used}


def keyed_value(f: dataclasses.Field, value: typing.Any) -> typing.Any:
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


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[DataclassInstance]) -> None:
    """Add ``--config FILE`` and one ``--flag`` per field of the dataclass ``cls``."""
    parser.add_argument(
        "config_file",
        nargs="?",
        default=None,
        metavar="CONFIG",
        help="YAML config file (see configs/), the same as --config",
    )
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    for f in _own_fields(cls).values():
        flags = ["--" + n.replace("_", "-") for n in (f.name, *f.metadata.get("aliases", ()))]
        _add_flag(parser, flags, f.name, _field_type(cls, f), _default(f), f.metadata)
    own, added = _own_fields(cls), set()
    for f, names in _nested_fields(cls):  # one group per options object, its flat flags
        inner = type(_default(f))
        group = parser.add_argument_group(f"{f.name}: {f.metadata['help']}")
        for g in dataclasses.fields(inner):
            nm = names.get(g.name)
            if nm is None or nm[0] in own or nm[0] in added:
                continue
            added.add(nm[0])
            flags = ["--" + n.replace("_", "-") for n in nm]
            default = getattr(_default(f), g.name)
            _add_flag(group, flags, nm[0], _field_type(inner, g), default, g.metadata)


def _add_flag(
    parser: argparse._ActionsContainer, flags: list[str], dest: str, typ, default, metadata
) -> None:
    """One option's ``--flag`` (``default=None``: unset flags do not override the file)."""
    text = metadata.get("help", "")
    text = f"{text} (default: {default!r})" if text else f"(default: {default!r})"
    if typ is bool:
        parser.add_argument(
            *flags, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=text
        )
    elif typing.get_origin(typ) is list:
        parser.add_argument(
            *flags, dest=dest, default=None, nargs="+", type=typing.get_args(typ)[0], help=text
        )
    elif typing.get_origin(typ) is typing.Literal:
        parser.add_argument(
            *flags, dest=dest, default=None, choices=typing.get_args(typ), help=text
        )
    else:
        parser.add_argument(*flags, dest=dest, default=None, type=typ, help=text)


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


def make_config(cls: type[ConfigT], values: dict | None = None, source: str = "config") -> ConfigT:
    """Build ``cls`` from a dict, checking keys and types (an unknown key is an error)."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    for f in names.values():
        for alias in f.metadata.get("aliases", ()):
            if alias in values:
                if f.name in values:
                    raise UserError(f"{source}: {alias} and {f.name} name one option: give one")
                values[f.name] = values.pop(alias)
    values = _gather_nested(cls, values, source)
    unknown = sorted(set(values) - set(names))
    if unknown:
        known = ", ".join(dict.fromkeys([*names, *flat_dests(cls)]))
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {known})")
    for key, value in values.items():
        if "nested" in names[key].metadata:
            continue
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


def config_from_args(
    cls: type[ConfigT], args: argparse.Namespace, section: str, classes: dict | None = None
) -> ConfigT:
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
    for name in flat_dests(cls):
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    return make_config(cls, values, source)


def flag_words(message: str, cls: DataclassInstance | type[DataclassInstance]) -> str:
    """A library message for the command line: ``name=`` of a field of the config class
    ``cls`` becomes its flag, ``"increase damping="`` -> ``"increase --damping"``,
    ``"out='x'"`` -> ``"--out x"``; other names are left as they are."""
    names = flat_dests(cls)
    if not names:
        return message

    def sub(m):
        value = m.group(2).strip("'")
        return "--" + m.group(1).replace("_", "-") + (f" {value}" if value else "")

    pattern = r"(?<![\w.\-])(" + "|".join(map(re.escape, names)) + r")=('[^']*'|[\w.+\-]*)"
    return re.sub(pattern, sub, message)


def to_dict(cfg: DataclassInstance) -> dict:
    return dataclasses.asdict(cfg)
