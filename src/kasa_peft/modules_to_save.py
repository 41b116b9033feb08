"""Fully trained modules (a task head, say) saved beside an adapter."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and one trainable copy per adapter.

    The forward pass uses the active adapter's copy, or the original while ``disabled``
    is set or no copy is active, so disabling adapters restores the original behaviour.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> nn.Module:
        """Create adapter ``name``'s copy, starting from the original module's values."""
        module_copy = copy.deepcopy(self.original_module)
        for parameter in module_copy.parameters():
            parameter.requires_grad_(True)
        self.copies[name] = module_copy
        return module_copy

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        del self.copies[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def current_module(self) -> nn.Module:
        """Return the module the forward pass uses right now."""
        if self.disabled or self.active_adapter is None or self.active_adapter not in self.copies:
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code may read attributes of the wrapped module (``out_features``, say).
            return getattr(super().__getattr__("original_module"), name)
