"""Registries: every name a user can type maps to what it builds, with one line of help.

A registry is a dict filled by `register` (a call or a decorator), as timm's `register_model` and open_clip's
`add_model_config` are. Configs check their choices against a registry when they are built, the CLI lists its
names in `--help`, and a new entry registered before a command runs works in every command at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind (samplers, losses, ...) mapped to their objects, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    @overload
    def register(self, name: str, obj: T, *, help: str = "", replace: bool = False) -> T: ...

    @overload
    def register(self, name: str, obj: None = None, *, help: str = "", replace: bool = False) -> Callable[[T], T]: ...

    def register(self, name: str, obj: T | None = None, *, help: str = "", replace: bool = False) -> Any:
        """Register `obj` under `name` (or return a decorator that does).

        Args:
            name: what users type.
            obj: the registered object (not None); omitted when used as `@REGISTRY.register("name", help=...)`.
            help: one line for `--help` and error messages.
            replace: allow replacing an existing entry (otherwise a second registration is a ValueError).
        """

        def add(item: T) -> T:
            if name in self._items and not replace:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = item
            self._help[name] = help
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove `name` (tests and plugins that register temporarily)."""
        self._items.pop(name, None)
        self._help.pop(name, None)

    def get(self, name: str) -> T:
        """The object registered as `name`.

        Raises:
            ValueError: an unknown name; the message lists the known ones.
        """
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}'; known: {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def help(self, name: str) -> str:
        """The help line of `name`."""
        return self._help.get(name, "")

    def describe(self) -> str:
        """`name: help; name: help`, for option help texts."""
        return "; ".join(f"{n}: {h}" if h else n for n, h in self._help.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


# Vocabularies shared by several stages, with no better home.
PRECISIONS: Registry[str] = Registry("precision")  # the torch dtype matmuls run in (float32: no autocast)
PRECISIONS.register("fp32", "float32", help="float32 everywhere")
PRECISIONS.register(
    "bf16",
    "bfloat16",
    help="bfloat16 matmuls (autocast), float32 weights (and, when training, loss and optimizer state); pays off on "
    "GPUs and CPUs with native bfloat16 (AVX-512-BF16, AMX), far slower on others",
)

SELECTIONS: Registry[str] = Registry("selection")
SELECTIONS.register(
    "best-val", "best-val", help="the epoch with the best val top-1, strictly better replaces (official)"
)
SELECTIONS.register("last", "last", help="the last epoch's weights")

DEVICES: Registry[str] = Registry("device")
DEVICES.register("auto", "auto", help="CUDA when torch sees a GPU, else CPU")
DEVICES.register("cpu", "cpu")
DEVICES.register("cuda", "cuda")
