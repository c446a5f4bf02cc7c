"""Architecture adapters: the only code that knows a model family's module paths, weight
orientation, norms and embedding scale (:mod:`interp_edit.arch.families`), and the layer
stepper the fast paths run on (:mod:`interp_edit.arch.stepper`, reading the layers through
:mod:`interp_edit.arch.parts`). Tiny models of every family for tests and the support table:
:mod:`interp_edit.arch.tiny`."""

from interp_edit.arch.families import FAMILIES, Adapter, Family, adapter, hf_name, unwrap

__all__ = ["FAMILIES", "Adapter", "Family", "adapter", "hf_name", "unwrap"]
