"""Group-wise attention visibility for the parallel draft head (ParallelSpec).

A *packed sequence* holds ``S`` items: *context* items (the target's hidden states and the
root token, real things that were computed or emitted) and *mask* items, ``k`` per
*group*; a group is one anchor position whose ``k`` future tokens its masks predict. Who
may attend to whom (``visible[i, j]``: item ``i`` reads item ``j``):

* a context item reads the context items packed at or before it (causal), never a mask;
* a mask of group ``g`` reads the context items in ``g``'s window and every mask of group
  ``g`` (itself included), never a mask of another group.

Training packs one group per example (its window, then its ``k`` masks); inference is the
same layout for the current anchor. Because masks never see other groups and context
items never see masks, a group's outputs do not depend on what else is packed with it.
"""

from __future__ import annotations

import mlx.core as mx

#: ``group`` value of a context item.
CONTEXT = -1


def group_attention_mask(group: mx.array, window: mx.array) -> mx.array:
    """Visibility ``(..., S, S)`` bool of a packed sequence (module docstring).

    Args:
        group: ``(..., S)`` int32, :data:`CONTEXT` for a context item, else the group
            ``g`` in ``[0, G)`` of a mask item.
        window: ``(..., G, S)`` bool, ``window[g, j]``: group ``g``'s masks may read item
            ``j`` (entries at mask items are ignored).

    Returns:
        ``visible`` ``(..., S, S)``: ``visible[i, j]`` iff item ``i`` may attend to item
        ``j``. Every item sees itself, so no row is empty.
    """
    size, groups = group.shape[-1], window.shape[-2]
    is_context = group == CONTEXT
    index = mx.arange(size)
    causal = index[None, :] <= index[:, None]
    context_rows = is_context[..., :, None] & is_context[..., None, :] & causal
    is_mask = ~is_context
    same_group = is_mask[..., :, None] & (group[..., :, None] == group[..., None, :])
    one_hot = (group[..., :, None] == mx.arange(groups)).astype(mx.float32)
    row_window = (one_hot @ window.astype(mx.float32)) > 0
    mask_reads_context = is_mask[..., :, None] & is_context[..., None, :] & row_window
    return context_rows | same_group | mask_reads_context


def example_layout(valid: mx.array, num_masks: int) -> tuple[mx.array, mx.array]:
    """``(group (S,), window (..., 1, S))`` of one-group examples ``[C hidden, root, k masks]``.

    Args:
        valid: ``(..., C)`` bool, which hidden-state slots hold a real state (padding
            slots are read by no mask).
        num_masks: ``k``.

    Returns:
        ``group`` ``(S,)`` int32 and ``window`` ``(..., 1, S)`` bool, ``S = C + 1 + k``.
    """
    context = valid.shape[-1]
    group = mx.concatenate(
        [mx.full((context + 1,), CONTEXT, mx.int32), mx.zeros((num_masks,), mx.int32)]
    )
    lead = valid.shape[:-1]
    window = mx.concatenate(
        [
            valid.astype(mx.bool_),
            mx.ones((*lead, 1), mx.bool_),
            mx.zeros((*lead, num_masks), mx.bool_),
        ],
        axis=-1,
    )
    return group, window[..., None, :]
