"""Which keyword hands a cache to a ``transformers`` model: ``cache=`` or ``past_key_values=``.

transformers 5.24 renamed the cache argument of every model's ``forward`` and of ``generate`` from
``past_key_values`` to ``cache`` (the old name warns with a ``FutureWarning`` and is removed in 5.40); releases
before 5.24 know only ``past_key_values``. Everything in tokenmem that calls a model passes the memory through
:func:`cache_kwargs`, which picks the keyword the installed transformers and the model take:

>>> out = model(input_ids=ids, **tokenmem.cache_kwargs(model, memory), use_cache=True)
>>> out = model.generate(ids, **tokenmem.cache_kwargs(model, memory), max_new_tokens=32)

A user may pass a :class:`~tokenmem.TokenMemory` either way: transformers >= 5.24 still accepts the old name
(with its warning); before 5.24, ``cache=`` would be ignored by the model, and the tokenmem attention refuses it
with a :class:`~tokenmem.TokenmemError` (see :func:`check_cache_kwarg`).
"""

from __future__ import annotations

import inspect

from .errors import TokenmemError

NEW, OLD = "cache", "past_key_values"
_by_class: dict[type, str] = {}
_installed: str | None = None


def installed_keyword() -> str:
    """``"cache"`` when the installed transformers names the cache ``cache`` (5.24 and later; its model outputs
    carry a ``cache`` field), else ``"past_key_values"``."""
    global _installed
    if _installed is None:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        _installed = NEW if NEW in BaseModelOutputWithPast.__dataclass_fields__ else OLD
    return _installed


def cache_keyword(model=None) -> str:
    """The keyword that hands a cache to ``model``'s ``forward`` (and ``generate``): ``"cache"`` or
    ``"past_key_values"``, read from the signature of the model class's ``forward`` (a model that names
    neither, e.g. one taking only ``**kwargs``, gets the installed transformers' name)."""
    if model is None:
        return installed_keyword()
    cls = type(model)
    name = _by_class.get(cls)
    if name is None:
        forward = getattr(cls, "forward", None)
        try:
            params = inspect.signature(forward).parameters if forward is not None else {}
        except (TypeError, ValueError):  # a builtin or an object without a readable signature
            params = {}
        # transformers >= 5.24 names the parameter ``cache`` (some functions also expose the old name beside it)
        name = NEW if NEW in params else OLD if OLD in params else installed_keyword()
        _by_class[cls] = name
    return name


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(..., **cache_kwargs(model, cache))`` or ``model.generate(...)``."""
    return {cache_keyword(model): cache}


def returned_cache(output):
    """The cache a model's output carries (``output.cache`` from 5.24 on, ``output.past_key_values`` before),
    read without transformers' deprecation notice."""
    return output.get(installed_keyword())


def check_cache_kwarg(attention_kwargs: dict, claimed) -> None:
    """Called by the tokenmem attention when no memory claimed the call (``claimed`` is None): a cache that
    reached the attention as a plain ``cache`` keyword was passed as ``cache=`` to a transformers that takes
    ``past_key_values=``, and the model ignored it; say so instead of silently running without the memory."""
    if claimed is not None:
        return
    stray = attention_kwargs.get(NEW)
    if stray is None or installed_keyword() == NEW:
        return
    import transformers

    if isinstance(stray, transformers.Cache):
        raise TokenmemError(
            f"a {type(stray).__name__} was passed as `cache=`, which transformers {transformers.__version__} does "
            "not know (it takes `past_key_values=`; `cache=` arrived in 5.24), so the model ignored it; pass "
            "`**tokenmem.cache_kwargs(model, memory)` (it picks the keyword the installed transformers takes) or "
            "`past_key_values=memory`"
        )
