"""Constructor keywords as data: recorded for save/load, renamed with a deprecation warning."""
from __future__ import annotations

import functools
import inspect
import warnings


def record_keywords(cls, attribute: str, extra=None) -> None:
    """Wraps `cls.__init__` so that the outermost constructor call stores its keyword arguments (defaults
    applied, JSON-able) in `self.<attribute>`; a subclass without its own `__init__` records its parent's.

    `extra(self, call_init, args, kw)`, if given, runs the constructor instead (to take keywords of its own).

    Raises:
        TypeError: at class definition, for an `__init__` with `**kwargs`: keywords it passes on could not
            be recorded, and the object would come back from a save with different settings.
    """
    if "__init__" not in cls.__dict__:
        return
    init, signature = cls.__init__, inspect.signature(cls.__init__)
    loose = [f"{'**' if p.kind is p.VAR_KEYWORD else '*'}{p.name}" for p in signature.parameters.values()
             if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if loose:
        raise TypeError(f"{cls.__name__}.__init__ takes {', '.join(loose)}: spell out every keyword (with its "
                        f"default), so save_pretrained can record it and load_pretrained rebuild the same object")
    n_positional = 3 if attribute == "hparams" else 1  # (self, clip, classnames) or (self,)

    renames = getattr(init, "renamed_keywords", {})

    def run(self, args, kw):
        kw = _rename(type(self).__name__, renames, kw)
        outermost = not self.__dict__.get("_constructing", False)
        self.__dict__["_constructing"] = True
        try:
            init(self, *args, **kw)
        finally:
            if outermost:
                del self.__dict__["_constructing"]
        if outermost:
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            object.__setattr__(self, attribute, {k: jsonable(v) for k, v in
                                                 list(bound.arguments.items())[n_positional:]})

    @functools.wraps(init)
    def recording_init(self, *args, **kw):
        if extra is not None and not self.__dict__.get("_constructing", False):
            return extra(self, lambda *a, **k: run(self, a, k), args, kw)
        run(self, args, kw)

    cls.__init__ = recording_init


def renamed(**old_to_new: str):
    """Decorator for `__init__`: old keyword names still work, with a DeprecationWarning naming the new one."""

    def wrap(init):
        @functools.wraps(init)
        def renaming_init(self, *args, **kw):
            return init(self, *args, **_rename(type(self).__name__, old_to_new, kw))

        renaming_init.renamed_keywords = old_to_new
        return renaming_init

    return wrap


def _rename(owner: str, old_to_new: dict, kw: dict) -> dict:
    for old, new in old_to_new.items():
        if old in kw:
            warnings.warn(f"{owner}: keyword {old!r} is now {new!r}", DeprecationWarning, stacklevel=4)
            if new in kw:
                raise TypeError(f"{owner}: pass {new!r} only, not also its old name {old!r}")
            kw = {**kw, new: kw[old]}
            del kw[old]
    return kw


def jsonable(value):
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"keyword value {value!r} cannot be saved in a JSON config; pass plain numbers, strings or lists")
