"""grafting's error and warning classes: every failure names what and where."""

from __future__ import annotations


class GraftingError(Exception):
    """Base class of every error grafting raises on purpose."""


class ConfigError(GraftingError, ValueError):
    """A config field holds a value the method cannot use."""


class PluginError(GraftingError):
    """A plugin could not be loaded or registered."""


class PluginConflictError(PluginError):
    """Two plugins declare the same method."""

    def __init__(self, message: str, peft_types: list[str] | None = None) -> None:
        super().__init__(message)
        self.peft_types = list(peft_types or [])


class UnknownMethodError(GraftingError, KeyError):
    """No installed plugin provides the requested method."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TargetNotFoundError(GraftingError, ValueError):
    """The config's target modules match nothing in the model."""


class UnsupportedLayerError(GraftingError, TypeError):
    """A matched module is of a type no plugin can adapt for this method."""


class AdapterNotFoundError(GraftingError, KeyError, ValueError):
    """An adapter name that the model does not hold.

    A ``ValueError`` as PEFT raises there, and a ``KeyError`` as a name lookup.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterStateError(GraftingError, RuntimeError):
    """The requested operation conflicts with the adapters' current state."""


class MergeError(GraftingError, RuntimeError, ValueError):
    """Merging or unmerging would give wrong weights, so nothing was changed.

    PEFT raises ``RuntimeError`` (a bias to merge into is missing) or
    ``ValueError`` (non-finite merged weights) there; this is both.
    """


class AdapterLoadError(GraftingError, ValueError):
    """A saved adapter does not fit the model or is not an adapter at all."""


class StateDictKeyError(GraftingError, KeyError):
    """A state dict given to a save lacks a tensor of the adapter being saved."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FolderLockedError(GraftingError, TimeoutError):
    """Another process holds the folder's save lock for longer than grafting waits."""


class BaseStateDictError(GraftingError, RuntimeError):
    """A base-model state dict does not fit the model under the adapters (a RuntimeError, as load_state_dict's)."""


class ActiveAdaptersError(AdapterStateError, ValueError):
    """Adapters that cannot be active together (two copies of one ``modules_to_save`` module): PEFT's ValueError."""


class NotAvailableError(GraftingError, AttributeError):
    """An operation the model's adapters do not have (``unload`` of a prompt-learning model): PEFT's model lacks the attribute."""


class GraftingWarning(UserWarning):
    """Something worth knowing that does not stop the call (PEFT's ``PeftWarning`` plays this role)."""


class UnusedOptionWarning(GraftingWarning, RuntimeWarning):
    """An option had no effect (a ``rank_pattern`` key that matches no adapted module).

    A ``RuntimeWarning`` too, the category PEFT uses there, so existing filters keep working.
    """


class BeyondPeftWarning(GraftingWarning):
    """An adapter sits where PEFT's version of its method refuses to go (a layer type PEFT does not adapt).

    grafting trains, merges, saves and loads it; PEFT cannot load the saved folder. Raised once per
    ``add_adapter`` call, naming the modules; filter it to accept the difference.
    """


class TiedWeightsWarning(GraftingWarning):
    """Adapters on an embedding whose weight the output head shares are not tied (or nothing was tied),
    as PEFT warns around ``ensure_weight_tying``."""


class CombinationError(GraftingError, ValueError):
    """``add_weighted_adapter`` cannot combine the given adapters as asked."""


class SaveError(GraftingError, OSError):
    """A save could not be written (disk full, no permission, something in the way); the folder keeps its old save."""


class ExportError(GraftingError, TypeError, ValueError):
    """An adapter cannot be exported as asked (to plain LoRA, or for a serving stack); nothing was written.

    A ``TypeError`` and a ``ValueError``, as PEFT's ``convert_to_lora`` raises for layers and ranks."""
