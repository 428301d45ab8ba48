"""Which row of a prompt-tuned classifier scores each class name (plain Python: the ONNX runtime uses it too)."""

from __future__ import annotations

from collections.abc import Sequence


def classifier_rows(class_names: Sequence[str] | None, classes: int, names: Sequence[str]) -> list[int] | None:
    """The classifier-prompt row of each of ``names``.

    ``classes`` is the classifier's row count (0: no classifier prompt) and ``class_names`` the name of each row,
    as training recorded them. None when there is no classifier prompt, or no names were recorded (older
    bundles, official checkpoints) and so rows go by position, which needs exactly ``classes`` names in training
    order. Names match case-insensitively; a name recorded twice gives its rows in order. A name the classifier
    has no row for is refused: its logits would lack the classifier's part.
    """
    if not classes:
        return None
    if class_names is None:
        if len(names) != classes:
            raise ValueError(f"the model's classifier prompt scores {classes} classes by position and records "
                             f"no class names: give exactly those {classes} labels in training order, "
                             f"not {len(names)}")
        return None
    free: dict[str, list[int]] = {}
    for row, name in enumerate(class_names):
        free.setdefault(name.lower(), []).append(row)
    rows, unknown = [], []
    for name in names:
        left = free.get(name.lower())
        if left:
            rows.append(left.pop(0))
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3
                                                            else "")
        raise ValueError(f"the model's classifier prompt has no logits for {shown}: it knows only the "
                         f"{classes} classes it was trained on ({', '.join(class_names[:5])}"
                         f"{', ...' if classes > 5 else ''})")
    return rows
