"""Which source layer each target layer takes its knowledge from, and whether that pairing can be mapped.

Target conv j pairs with source conv j, target hidden j with source hidden j, output with output; a
deeper target's extra hidden layers become identities over the last source hidden layer's units.
``check_pair`` refuses a pair whose target layer does not read the features its source layer reads.
"""

from __future__ import annotations

from typing import Optional

from .layer_chain import Layer

NEW, IDENTITY = "new", "identity"


def pair_layers(src: list[Layer], tgt: list[Layer]) -> list[tuple[str, Optional[int]]]:
    """Per target layer: ("copy", source index), (IDENTITY, source index whose units it spans) or (NEW, None)."""
    s_conv = [i for i, l in enumerate(src) if l.section == "conv"]
    s_hidden = [i for i, l in enumerate(src) if l.section == "hidden"]
    pairs: list[tuple[str, Optional[int]]] = []
    n_conv = n_hidden = 0
    for t in tgt:
        if t.section == "conv":
            pairs.append(("copy", s_conv[n_conv]) if n_conv < len(s_conv) else (NEW, None))
            n_conv += 1
        elif t.section == "hidden":
            if n_hidden < len(s_hidden):
                pairs.append(("copy", s_hidden[n_hidden]))
            elif s_hidden:
                pairs.append((IDENTITY, s_hidden[-1]))
            else:
                pairs.append((NEW, None))
            n_hidden += 1
        else:
            pairs.append(("copy", len(src) - 1))
    return pairs


def check_pair(
    t: Layer,
    s: Optional[Layer],
    rel: str,
    si: Optional[int],
    in_space: Optional[int],
    src: list[Layer],
    src_reads: list[int],
) -> tuple[bool, str]:
    """(ok, note): can target layer ``t`` be mapped from ``s`` given what its inputs are (``in_space``: the
    source layer whose units the previous target layer holds, -1 for the raw input, None when not mapped)?"""
    tw = t.module.weight
    note = ""
    ok = rel != NEW and in_space is not None
    if rel == NEW:
        why = " (conv layers are followed by pooling, so there is no identity to insert)" if t.kind == "conv" else ""
        note = "no source layer of this role; keeps its random init" + why
    elif in_space is None:
        note = "its inputs come from a layer that was not transferred, so its weights cannot be mapped"
    elif rel == "copy":
        expected = src_reads[si]
        if in_space != expected:
            ok = False
            got = "the raw input" if in_space == -1 else f"source layer {src[in_space].name}'s units"
            want = "the raw input" if expected == -1 else f"source layer {src[expected].name}'s units"
            note = (
                f"reads {got} but the paired source layer {s.name} reads {want}; not mapped (the models differ in "
                "depth or layer types here)"
            )
        elif t.kind != s.kind:
            ok = False
            note = f"cannot map a {s.kind} layer into a {t.kind} layer"
        elif t.kind == "conv" and (
            tw.shape[2:] != s.module.weight.shape[2:]
            or t.module.stride != s.module.stride
            or t.module.padding != s.module.padding
            or t.module.dilation != s.module.dilation
        ):
            ok = False
            note = (
                f"kernel/stride/padding differ ({tuple(s.module.weight.shape[2:])}, stride {s.module.stride} -> "
                f"{tuple(tw.shape[2:])}, stride {t.module.stride}); not mapped"
            )
        elif t.grid != s.grid:
            ok = False
            note = (
                f"reads a flattened {t.grid}-position grid per channel but the source reads {s.grid}; not mapped "
                "(conv depth or input size differs)"
            )
        elif in_space == -1 and t.in_shape != s.in_shape:
            ok = False
            note = f"input shape {t.in_shape} differs from the source's {s.in_shape}; not mapped"
    elif rel == IDENTITY and (t.kind != "linear" or in_space != si):
        ok = False
    return ok, note
