"""Registries: a method or test-time adapter is one module plus one `register` line."""
from __future__ import annotations

from typing import Callable


class Registry:
    """Name -> class, names lower-case; aliases resolve to the canonical name."""

    def __init__(self, kind: str, attribute: str = "method"):
        self.kind, self.attribute = kind, attribute
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[type], type]:
        def add(cls: type) -> type:
            for key in (name, *aliases):
                if key != key.lower() or key in self._aliases:
                    raise ValueError(f"{self.kind} name {key!r} must be lower-case and unique")
                self._aliases[key] = name
            self._classes[name] = cls
            setattr(cls, self.attribute, name)
            return cls
        return add

    def get(self, name: str) -> type:
        key = self._aliases.get(name.lower())
        if key is None:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._classes[key]

    def names(self) -> list[str]:
        return sorted(self._classes)


METHODS = Registry("method")
ADAPTERS = Registry("test-time adapter")
OBJECTIVES = Registry("objective", attribute="name")
register_method = METHODS.register
register_adapter = ADAPTERS.register
register_objective = OBJECTIVES.register


def list_methods() -> list[str]:
    """Names of all registered prompt-learning methods."""
    _load_builtin()
    return METHODS.names()


def create_learner(name: str, clip, classnames, **kwargs):
    """Builds the learner registered as `name` on `clip` for `classnames`."""
    _load_builtin()
    return METHODS.get(name)(clip, classnames, **kwargs)


def list_objectives() -> list[str]:
    """Names of all registered objectives (loss terms and gradient rules any learner can take)."""
    _load_builtin()
    return OBJECTIVES.names()


def create_objective(item):
    """An objective from a name, `(name, {keywords})` or an instance (returned as is)."""
    _load_builtin()
    from .objectives import Objective

    if isinstance(item, Objective):
        return item
    name, kwargs = (item, {}) if isinstance(item, str) else (item[0], dict(item[1]) if len(item) > 1 else {})
    return OBJECTIVES.get(name)(**kwargs)


def list_adapters() -> list[str]:
    """Names of all registered test-time adapters."""
    _load_builtin()
    return ADAPTERS.names()


def create_adapter(name: str, learner, dataset: str | None = None, **kwargs):
    """Builds the test-time adapter registered as `name` on `learner`. With `dataset` (e.g. "imagenet_a"),
    the authors' settings for that dataset are the defaults (`promptkit.tta.defaults`); `kwargs` override."""
    _load_builtin()
    from .tta.defaults import adapter_defaults

    cls = ADAPTERS.get(name)
    return cls(learner, **{**adapter_defaults(cls.method, dataset), **kwargs})


def _load_builtin() -> None:
    from . import learners, objectives, tta  # noqa: F401  (registers the built-in methods, objectives, adapters)
