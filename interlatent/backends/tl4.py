"""TransformerLens 4 ``TransformerBridge``: the same hook names as TransformerLens 3 (the bridge
keeps them as aliases of its own ``hook_in`` / ``hook_out`` points), ``run_with_hooks`` with
``stop_at_layer``, and the model's hook context for rewrites.

The bridge reports its own names to hook functions (``blocks.0.hook_out`` for
``blocks.0.hook_resid_post``), so captures are keyed by the requested point, never by
``hook.name``. Points the bridge gates behind a ``set_use_*`` call are refused when the flag is off,
as on TransformerLens 3.
"""

from __future__ import annotations

from interlatent.backends.tl3 import HookedBackend


class TL4Backend(HookedBackend):
    """A TransformerLens 4 ``TransformerBridge``."""

    kind = "TransformerBridge"
