"""Reading settings: flags first, then ``RUNLEDGER_*`` variables, then defaults.

Every service declares one frozen dataclass of settings. Each field carries a
``doc`` in its metadata, which the command line shows as help. Values from the
environment are converted to the field's type; a value of the wrong form
raises :class:`~core.errors.ConfigurationError` that names the variable and
the form it expects.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigurationError

SettingsT = TypeVar("SettingsT")

ENV_PREFIX = "RUNLEDGER_"


def setting(default: Any, doc: str) -> Any:
    """Declare a settings field with its default and a one-line description."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return ENV_PREFIX + field_name.upper()


def _convert(raw: str, annotation: Any, variable: str) -> Any:
    # Optional[X] is read as X; an empty string means "unset".
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw == "":
            return None
        annotation = members[0]

    try:
        if annotation is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is Path:
            return Path(raw).expanduser()
        return raw
    except ValueError:
        expected = getattr(annotation, "__name__", str(annotation))
        raise ConfigurationError(
            f"{variable}={raw!r} is not a valid {expected}; "
            f"set it to a {expected} value or unset it to use the default"
        ) from None


def load_settings(
    cls: type[SettingsT],
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """Build ``cls`` from flags (``overrides``), the environment, then defaults.

    ``overrides`` values that are ``None`` are ignored, so argparse results can
    be passed as they are. Raises ConfigurationError for a malformed value.
    """
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}

    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if overrides.get(field.name) is not None:
            values[field.name] = overrides[field.name]
            continue
        variable = env_name(field.name)
        if variable in environ:
            values[field.name] = _convert(
                environ[variable], hints[field.name], variable
            )

    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if callable(validate):
        validate()
    return settings
