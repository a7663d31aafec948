"""What every params.yaml section shares: the bounds and patterns of its fields, the strict types,
:class:`ConfigError`, and the :func:`_section` decorator that turns a pydantic validation error into
``section.key = value: why`` (value cut to :data:`MAX_REPR` characters). :mod:`diffprune.config`
holds the sections themselves and re-exports these names.
"""

import dataclasses
import functools
from typing import Annotated, Any, Callable, Literal

from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass

MAX_PARAMS_BYTES = 1 << 20   # a params.yaml is ~5 KB; 1 MiB leaves room and bounds parse time
MAX_YAML_NODES = 10_000      # nodes once aliases are expanded (params.yaml: ~300): no "billion laughs"
MAX_EVAL_BYTES = 8 << 30     # estimated evaluation memory refused above 8 GiB
MAX_REPR = 200               # characters of a value shown in an error

# Bounds shared by many fields, each refused above because it can exhaust memory or time.
STEPS = 10_000_000           # optimisation steps: 1e7 is ~100x the longest run we plan
BATCH = 65_536               # items per batch: one batch of 64k 32x32x3 images is already ~800 MB
TIMESTEPS = 100_000          # diffusion timesteps (100x the usual 1000): schedules, DDIM loops
WIDTH = 4_096                # channels / hidden units of one layer: weights grow with its square
PATH_LEN = 4_096             # characters of a path or Hub id (PATH_MAX on Linux)
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # registry names: stricter than MLflow ('/', ':' only)

Int = Annotated[int, Strict()]        # strict: a bool or 2.5 is not an int, "3" is not a number
Float = Annotated[float, Strict()]    # strict, but an int is a number (1 -> 1.0); inf/nan refused
Str = Annotated[str, Strict()]
Seed = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]  # numpy's seed range
Name = Annotated[str, Strict(), Field(pattern=NAME)]
Fraction = Annotated[float, Strict(), Field(gt=0.0, le=1.0)]
Decay = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]
Weight01 = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Strict(), Field(gt=0.0)]
Steps = Annotated[int, Strict(), Field(ge=1, le=STEPS)]
Batch = Annotated[int, Strict(), Field(ge=1, le=BATCH)]
Channels = Annotated[int, Strict(), Field(ge=1, le=WIDTH)]
Precision = Annotated[Literal["no", "bf16", "fp16"], BeforeValidator(lambda v: "no" if v is False else v)]  # YAML `no`

DEVICE = r"^(cpu|mps|cuda(:\d{1,2})?)$"
ALIAS = r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$"  # registry aliases (diffprune.registry.ALIAS_PATTERN)
_PATTERNS = {NAME: "expected letters, digits, '.', '_' or '-' (a letter or digit first, at most 100)",
             r"\S": "must not be empty", DEVICE: "expected cpu, cuda, cuda:N or mps",
             ALIAS: "expected letters, digits, '_' or '-' (a letter or '_' first, at most 100)"}


class ConfigError(ValueError):
    """A params.yaml value is missing, mistyped or out of range (the message names key and value)."""


def _one_or_three(channels: int) -> int:
    if channels not in (1, 3):  # a Literal[1, 3] would take True and 1.0
        raise ValueError("expected 1 (grey) or 3 (RGB)")
    return channels


def _r(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_REPR` characters so an error never embeds a huge value."""
    text = repr(value)
    return text if len(text) <= MAX_REPR else f"{text[:MAX_REPR]}... ({len(text)} characters)"


SECTION_CLASSES: dict[str, type] = {}  # section name -> its class (filled by diffprune.config)


def _section(name: str) -> Callable[[type], type]:
    """Make ``cls`` the frozen, validated config of section ``name``: direct construction and
    ``dataclasses.replace`` raise :class:`ConfigError` (``name.key = value: why``) too."""

    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise _config_error(e, cls, name) from None
        cls.__init__ = __init__
        return cls

    return wrap


_WHY = {  # pydantic error type -> reason (fields from the error's ctx)
    "int_type": "expected an integer", "float_type": "expected a number", "finite_number": "expected a finite number",
    "bool_type": "expected true or false", "string_type": "expected a string", "list_type": "expected a list",
    "dataclass_type": "expected a mapping", "literal_error": "expected one of {expected}",
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}", "too_short": "needs at least {min_length} item(s)",
    "too_long": "needs at most {max_length} item(s)", "string_too_long": "at most {max_length} characters",
    "value_error": "{error}"}


def _config_error(exc: ValidationError, cls: type, prefix: str) -> ConfigError:
    """Turn the first error of a pydantic validation into ``key = value: why`` (value truncated)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    kind, ctx = err["type"], err.get("ctx", {})
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or str(p).isidentifier())  # no union member tags
    if isinstance(ctx.get("error"), ConfigError):  # a cross-field check: its message names the keys
        return ConfigError(str(ctx["error"]))
    alt = [e["ctx"]["expected"] for e in errors[1:] if e["type"] == "literal_error" and e["loc"][:len(loc)] == loc]
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else f"{key}.{part}" if key else str(part)
    key = key[:MAX_REPR] or "params"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = SECTION_CLASSES[loc[0]] if len(loc) > 1 and loc[0] in SECTION_CLASSES else cls
        known = sorted(f.name for f in dataclasses.fields(owner))
        return ConfigError(f"{key}: unknown key (known: {', '.join(known)})")
    why = _PATTERNS.get(ctx.get("pattern")) or (_WHY[kind].format(**ctx) if kind in _WHY else str(err["msg"]))
    return ConfigError(f"{key} = {_r(err['input'])}: {why}" + (f" (or {alt[0]})" if alt and loc != err["loc"] else ""))
