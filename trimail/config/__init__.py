"""The effective configuration: ``load`` reads main.cf and ``-o``; ``Config`` answers.

The package: ``registry.py`` names, types, defaults and documents every parameter
(``trimail config`` and the docs are generated from it, ``generate.py``);
``syntax.py`` reads main.cf's lines and expands ``$name``; ``values.py`` holds the
parsers; this module puts them together.  Values are stored raw, exactly as
written, and expanded only when used (Postfix's lazy expansion), so
``mydestination = $myhostname`` follows a later ``-o myhostname=...``.  Read a
parameter as ``config.NAME`` (typed, see ``typed.py``; a misspelt NAME raises
``UnknownParameter`` with the closest name) or ``config["NAME"]``.

Syntax (postconf(5)): ``name = value`` logical lines; a line that starts with
white space continues the previous logical line; blank lines and lines whose first
non-blank character is ``#`` are comments.  ``$name``, ``${name}`` and
``$(name)`` expand recursively with loop detection; ``${name?text}`` is *text*
when *name* is non-empty and ``${name:text}`` when it is empty; Postfix 3.0's
``${name?{text1}:{text2}}`` is *text1* when *name* is non-empty, else *text2*,
and ``${{text} == {text} ? {a} : {b}}`` compares (``trimail/config/syntax.py``).
That form makes values depend on ``stress``, which serve sets for sessions that
run while the SMTP service is under stress (``smtpd_timeout =
${stress?{10}:{300}}s``, Postfix's STRESS_README).

Errors name the file and line as Postfix does (``/etc/trimail/main.cf, line 12:
...``), in Postfix's words for numbers, times and booleans (``bad numerical
configuration: message_size_limit = 10MB``; ``invalid NAME parameter value -1 <
0`` below a parameter's minimum).  A parameter that is not in the registry and
not referenced by another value only warns, and so does a ``$name`` that nothing
defines (``main.cf: undefined parameter: NAME``), as postconf(1) does.

Security notes: the file is parsed as plain text; no value is ever evaluated or
passed to a shell.

Parameters: every one, by name (``Config`` is how the rest of trimail reads them);
it derives the defaults of myhostname and mydomain itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from trimail.config import syntax
from trimail.config.param import Param
from trimail.config.registry import (
    PARAMETERS,
    derived_domain,
    derived_hostname,
    development_defaults,
    suggest,
)
from trimail.config.syntax import ConfigError, Setting, parse_main_cf, parse_override
from trimail.config.typed import TypedParameters
from trimail.config.values import BadValue

T = TypeVar("T")

DEFAULT_CONFIG_FILE = Path("/etc/trimail/main.cf")


# ---------------------------------------------------------------------------
# the effective configuration

class UnknownParameter(AttributeError, KeyError):
    """A read of a name that is no parameter (not in the registry, not in main.cf):
    a bug where it is read, named with the closest registered name.  An
    AttributeError for ``config.NAME`` (so ``getattr`` with a default and
    ``hasattr`` work) and a KeyError for ``config["NAME"]``."""

    def __init__(self, name: str):
        super().__init__(f"unknown parameter {name}{suggest(name)}", name=name)

    def __str__(self) -> str:
        return str(self.args[0])  # not KeyError's quoted repr


class Config(TypedParameters):
    """An immutable effective configuration: raw settings over registry defaults.

    Read a parameter as an attribute (``config.smtpd_timeout``, typed by
    ``TypedParameters``) or by name (``config["smtpd_timeout"]``, ``config.get``:
    these also take a name main.cf sets that the registry does not know, as text).
    A name that is neither raises ``UnknownParameter``."""

    # the start-time warnings (check.warnings) when already found for these settings:
    # a test MTA's, found once per set of options (trimail.testing.testmode)
    start_warnings: list[str] | None = None

    def __init__(self, settings: Mapping[str, Setting], source: str, warnings: Iterable[str] = ()):
        self._settings = dict(settings)
        self.source = source
        self.path: Path | None = None  # the main.cf read, for reload
        self.overrides: list[str] = []  # the -o options given, for reload
        self.warnings = list(warnings)
        self._expanded: dict[str, str] = {}
        self._typed: dict[str, Any] = {}
        self._undefined: dict[str, None] = {}  # $names expanded that nothing defines, in order
        hostname = self._settings.get("myhostname")
        self._derived = {"myhostname": derived_hostname()}
        self._derived["mydomain"] = derived_domain(
            self._expand_text(hostname.value, ("myhostname",)) if hostname else self._derived["myhostname"]
        )
        self._expanded.clear()  # made while mydomain was not derived yet

    # -- raw and expanded text

    def is_set(self, name: str) -> bool:
        return name in self._settings

    def explicit_names(self) -> list[str]:
        return sorted(self._settings)

    def where(self, name: str) -> str:
        setting = self._settings.get(name)
        return setting.where if setting else "default"

    def is_defined(self, name: str) -> bool:
        """Set in main.cf or with -o, derived (myhostname, mydomain) or in the registry."""
        return name in self._settings or name in self._derived or name in PARAMETERS

    def raw(self, name: str) -> str:
        """The value as written (or the default), before ``$name`` expansion."""
        if name in self._settings:
            return self._settings[name].value
        if name in self._derived:
            return self._derived[name]
        param = PARAMETERS.get(name)
        return param.default if param else ""

    def expand(self, name: str) -> str:
        return self._expand_name(name, ())

    def _expand_name(self, name: str, stack: tuple[str, ...]) -> str:
        if name in self._expanded:  # a value does not depend on who refers to it
            return self._expanded[name]
        if name in stack:
            chain = " -> ".join((*stack, name))
            raise ConfigError(f"{self.where(stack[0])}: parameter {stack[0]}: expansion loop: {chain}")
        if len(stack) >= syntax.MAX_NESTING:
            raise ConfigError(f"{self.where(stack[0])}: parameter {stack[0]}: unreasonable macro call nesting: "
                              f"{' -> '.join(stack[:3])} -> ...")
        if not self.is_defined(name):
            self._undefined[name] = None
            return ""
        value = self._expand_text(self.raw(name), (*stack, name))
        self._expanded[name] = value
        return value

    def _expand_text(self, text: str, stack: tuple[str, ...]) -> str:
        """*text* (the value of ``stack[-1]``) expanded; a syntax error in it is fatal
        with that parameter's file and line."""
        if "$" not in text:
            return text
        try:
            return syntax.expand(text, lambda name: self._expand_name(name, stack))
        except syntax.MacroError as exc:
            raise ConfigError(f"{self.where(stack[-1])}: parameter {stack[-1]}: {exc}") from None

    # -- typed values

    def get(self, name: str) -> Any:
        if name not in self._typed:
            param = PARAMETERS.get(name)
            if param is None and not self.is_defined(name):
                raise UnknownParameter(name)
            text = self.expand(name)
            if param is None:
                self._typed[name] = text
            else:
                try:
                    value = param.parse(text)
                except BadValue as exc:
                    raise ConfigError(f"{self.where(name)}: {exc.render(name)}") from None
                except ValueError as exc:
                    raise ConfigError(f"{self.where(name)}: parameter {name}: {exc}") from None
                self._check_bounds(param, value)
                self._typed[name] = value
        return self._typed[name]

    def _check_bounds(self, param: Param, value: Any) -> None:
        """Postfix's check_mail_conf_int/_long/_time, in its words."""
        where, name = self.where(param.name), param.name
        is_time = param.is_time
        low, high = param.minimum, param.maximum
        if low is not None and value < low and not (is_time and value > 0):
            raise ConfigError(f"{where}: invalid {name}: {_num(value)} (min {_num(low)})" if is_time
                              else f"{where}: invalid {name} parameter value {value} < {_num(low)}")
        if high is not None and value > high:
            raise ConfigError(f"{where}: invalid {name}: {_num(value)} (max {_num(high)})" if is_time
                              else f"{where}: invalid {name} parameter value {value} > {_num(high)}")

    __getitem__ = get

    if not TYPE_CHECKING:  # mypy sees only TypedParameters' annotations: a misspelt name is an error

        def __getattr__(self, name: str) -> Any:
            """The first read of a parameter as an attribute: parse it, then keep it in the
            instance's ``__dict__``, so every later read is a plain attribute read (the
            configuration never changes; a reload or ``-o`` makes a new ``Config``)."""
            if name.startswith("_"):
                raise AttributeError(name)
            if name not in PARAMETERS:
                raise UnknownParameter(name)
            value = self.get(name)
            self.__dict__[name] = value
            return value

    def validate(self) -> None:
        """Expand and convert every parameter so bad values fail now, with file:line
        (the settings in file order first, so the first bad line is the one named)."""
        for name in [*self._settings, *PARAMETERS]:
            self.get(name)
        referenced: dict[str, Setting | None] = {}
        for setting in self._settings.values():
            for name in self._references(setting):
                referenced.setdefault(name, setting)
        for param in PARAMETERS.values():
            referenced.update((name, None) for name in syntax.references(param.default)
                              if name not in referenced)
        for name, setting in self._settings.items():
            if name not in PARAMETERS and name not in referenced:
                self.warnings.append(f"{setting.where}: unused parameter: {name}={setting.value}")
        # Postfix's postconf: a $name in any branch of any value that nothing defines
        undefined = [name for name, setting in referenced.items()
                     if setting is not None and not self.is_defined(name)]
        for name in dict.fromkeys([*undefined, *self._undefined]):  # in file order, each once
            self.warnings.append(f"{self._file_of(referenced.get(name))}: undefined parameter: {name}")

    def _references(self, setting: Setting) -> list[str]:
        try:
            return syntax.references(setting.value)
        except syntax.MacroError:
            return []  # a value that is used was expanded above and is fine; an unused one stays unused

    def _file_of(self, setting: Setting | None) -> str:
        """Where an undefined-parameter warning points: the file (Postfix names no
        line), or the -o option."""
        if setting is not None and setting.where.startswith("-o "):
            return setting.where
        return self.source

    def memo(self, key: str, make: Callable[[], T], keeps: tuple[str, ...] = ()) -> T:
        """The value *make* builds from this configuration, made once (a Config never
        changes) and kept in ``_memo``.  The test MTAs with the same options share one
        ``_memo`` (trimail.testing.testmode.load_config): a value must name no file or
        directory of this instance, so *keeps* names the parameters whose text the
        value keeps (a restriction list's table names, a banner); when one of them
        names this instance's directory (``_own``: a test MTA's ``$queue_directory``
        in it), the value is made for this instance alone."""
        own: frozenset[str] = self.__dict__.get("_own", frozenset())
        shared = not own or own.isdisjoint(keeps)
        memo: dict[str, Any] = self.__dict__.setdefault("_memo" if shared else "_own_memo", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def with_overrides(self, overrides: Mapping[str, str], origin: str = "-o") -> Config:
        """A copy with *overrides* set; errors in them name ``ORIGIN NAME``."""
        settings = dict(self._settings)
        for name, value in overrides.items():
            settings[name] = Setting(value, f"{origin} {name}")
        config = Config(settings, self.source, self.warnings)
        config.path = self.path
        config.overrides = self.overrides
        return config


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


RESTART_ONLY = ("queue_directory",)  # a running serve's queue is where its lock, control socket and processes are


def refuse_restart_only_changes(running: Config, fresh: Config) -> None:
    """ConfigError when *fresh* changes a parameter that only a stop and a start of
    serve can change (Postfix: ``postfix stop; postfix start`` after a new
    queue_directory): new workers would commit into a queue no qmgr serves, and the
    control socket would be looked for where none is."""
    for name in RESTART_ONLY:  # paths: the same directory written with a trailing slash is no change
        if os.path.normpath(str(fresh.get(name))) != os.path.normpath(str(running.get(name))):
            raise ConfigError(f"{name} cannot change while serve runs ({running.get(name)} -> {fresh.get(name)}): "
                              "stop serve and start it again")


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Which main.cf to read: -c, then $TRIMAIL_CONFIG, then /etc/trimail/main.cf."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("TRIMAIL_CONFIG")
    if env:
        return Path(env)
    if DEFAULT_CONFIG_FILE.exists():
        return DEFAULT_CONFIG_FILE
    return None


def load(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (), *,
         text: str | None = None) -> Config:
    """Load and validate the effective configuration (raises ConfigError).  With
    *text*, that is main.cf's content as read by someone else (a worker in the jail
    gets it from the master), and *path* only names it."""
    chosen = config_path(path)
    if chosen is not None and text is not None:
        settings, warnings = parse_main_cf(text, str(chosen))
        source = str(chosen)
    elif chosen is None:
        settings = {k: Setting(v, "built-in development default") for k, v in development_defaults().items()}
        warnings = []
        source = "built-in development default"
    else:
        try:
            text = chosen.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{chosen}: cannot read configuration: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{chosen}: not UTF-8 text: {exc.reason}") from None
        settings, warnings = parse_main_cf(text, str(chosen))
        source = str(chosen)
    for item in overrides:
        name, setting = parse_override(item)
        settings[name] = setting
    config = Config(settings, source, warnings)
    config.path = chosen
    config.overrides = list(overrides)
    config.validate()
    return config
