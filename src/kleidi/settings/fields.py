"""Walking the settings models: which models a field's type stands for, the tag that selects a union
member (a backend's ``kind``, an auth method's ``method``), which settings accept null. Shared by the
loader, the error messages and the generated reference."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel

from kleidi.settings.model import KleidiSettings


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The settings models an annotation stands for (unwrapping Annotated and unions)."""
    if typing.get_origin(annotation) is Annotated:
        return models_in(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def tag_field(model: type[BaseModel]) -> str | None:
    """The discriminator field of a union member (``kind`` for a backend, ``method`` for an auth method)."""
    for name in ("kind", "method"):
        info = model.model_fields.get(name)
        if info is not None and typing.get_origin(info.annotation) is Literal:
            return name
    return None


def tag_of(model: type[BaseModel]) -> str | None:
    """The discriminator value of a backend or auth-method model (``local``, ``approle``), if it is one."""
    field = tag_field(model)
    return str(typing.get_args(model.model_fields[field].annotation)[0]) if field else None


def accepts_null(path: tuple[str, ...]) -> bool:
    """Whether the setting at ``path`` may be null (in any of the models a union stands for)."""
    candidates: list[type[BaseModel]] = [KleidiSettings]
    found: list[Any] = []
    for part in path:
        found = [model.model_fields[part] for model in candidates if part in model.model_fields]
        if not found:
            return False
        candidates = [m for info in found for m in models_in(info.annotation)]
    return any(allows_none(info.annotation) for info in found)


def allows_none(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        return allows_none(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(allows_none(arg) for arg in typing.get_args(annotation))
    return annotation is None or annotation is type(None)


def members_of(annotation: Any) -> list[Any]:
    """The types a union stands for (the annotation itself if it is none), without None."""
    if typing.get_origin(annotation) is Annotated:
        return members_of(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in members_of(arg)]
    return [] if annotation is None or annotation is type(None) else [annotation]
