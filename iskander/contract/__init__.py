"""The schema contract: Arrow columns <-> model tensors, checked and compiled once at model load.

It is compiled against the backend's neutral signature (``backends.TensorSpec``); what a model
format calls its types stays in the backend, quoted here only in messages (``type_label``).

At request time the contract only looks up columns (cached per incoming schema), checks nulls and
hands numpy views to the backend; it never guesses shapes or types.

Modules: ``manifest`` (the TOML beside a model), ``compile`` (manifest + signature -> Contract),
``contract`` (Contract), ``bindings`` (what columns bind to), ``inputs`` (requests -> feeds),
``outputs`` (results -> answers), ``transforms`` (label, select, rank outputs). Import from here;
the manifest from ``iskander.contract.manifest``.
"""

from iskander.contract.bindings import FromTensor, InputBinding, OutputBinding, Part, TensorOutput
from iskander.contract.compile import compile_contract
from iskander.contract.contract import Contract
from iskander.contract.inputs import Prepared, types_compatible
from iskander.contract.transforms import LabelOutput, RankOutput, SelectOutput

__all__ = [
    "Contract", "compile_contract", "Prepared", "Part", "InputBinding", "OutputBinding", "FromTensor",
    "TensorOutput", "LabelOutput", "SelectOutput", "RankOutput", "types_compatible",
]
