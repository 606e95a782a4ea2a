"""Helpers shared by the op families: autocast handling, optional outputs, the 2-D view."""

from __future__ import annotations

import contextlib

import torch

# Custom ops cannot return None; an unneeded gradient travels as this empty tensor.
def empty_result(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def maybe(t: torch.Tensor) -> torch.Tensor | None:
    """The inverse of empty_result: None for a 0-element placeholder."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def no_autocast(device_type: str):
    """Inside an op implementation the dtypes were settled by the caller: autocast must not recast."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # device types without autocast support
        pass
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(x, weight, bias) in the autocast dtype when autocast is on for x's device, as an
    nn.Linear would see them; unchanged otherwise."""
    cast = autocast_dtype(x.device.type)
    if cast is None:
        return x, weight, bias
    return x.to(cast), weight.to(cast), None if bias is None else bias.to(cast)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., F] -> contiguous [N, F] (a view when x is already contiguous).

    The linear ops call it inside their autograd boundary, not before, and hand back gradients of
    x's own shape (rows_as): an input that is a view of x puts a ViewBackward between the op and x,
    whose output autograd cannot accumulate into in place, so an x feeding several adapters
    (q/k/v, gate/up) would hold one more x-sized gradient at the peak of backward (F.linear on 3-D
    input pays exactly that)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def rows_as(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t [N, F] -> ``shape`` as a plain tensor, not a view: sharing t's storage without keeping t
    as its base, so autograd may accumulate another gradient into it in place, and a caller may
    modify an output in place."""
    return t if t.shape == shape else t.view(shape).detach()


def eager_twin(forward_impl, setup_context, backward, tensor_lists: tuple[int, ...] = ()
               ) -> type[torch.autograd.Function]:
    """An autograd.Function running a custom op's own body, setup_context and backward.

    torch.library's Python dispatch costs ~170 us per forward + backward of one layer on CPU,
    more than a small layer's compute; outside torch.compile the ops run through this twin
    instead (see ``run``). ``ctx.eager`` tells the shared backward to call the backward
    implementation directly rather than through its op.

    tensor_lists: the positions of ``Tensor[]`` inputs whose elements take gradients (the grouped
    op's adapters). autograd.Function tracks only tensors passed as arguments, so the twin's apply
    passes their elements one by one and regroups them, so that forward_impl, setup_context and
    backward see the op's own structure: the lists, a list output's gradients as one list,
    ctx.needs_input_grad with a tuple of flags per list, and a list of gradients per list back.
    """
    if not tensor_lists:
        def forward(ctx, *inputs):
            output = forward_impl(*inputs)
            setup_context(ctx, inputs, output)
            ctx.eager = True
            return output

        return type(f"{forward_impl.__name__}_eager", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def regroup(flat, lengths):
        """flat arguments (or their flags) -> the op's structure, a tuple per Tensor[] position."""
        sizes = dict(zip(tensor_lists, lengths))
        out, start = [], 0
        for i in range(len(flat) - sum(lengths) + len(lengths)):
            n = sizes.get(i)
            out.append(flat[start] if n is None else tuple(flat[start:start + n]))
            start += 1 if n is None else n
        return out

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, lengths, *flat):
            inputs = regroup(flat, lengths)
            inputs = tuple(list(v) if i in tensor_lists else v for i, v in enumerate(inputs))
            output = forward_impl(*inputs)
            setup_context(ctx, inputs, output)
            ctx.eager, ctx.twin_list_output = True, isinstance(output, list)
            ctx.needs_input_grad = tuple(regroup(ctx.needs_input_grad[1:], lengths))  # as the op's ctx has it
            return tuple(output) if ctx.twin_list_output else output

        @staticmethod
        def backward(ctx, *grads):
            grads = backward(ctx, *((list(grads),) if ctx.twin_list_output else grads))
            flat = []
            for i, g in enumerate(grads):
                if i in tensor_lists:
                    flat.extend(g)
                else:
                    flat.append(None if isinstance(g, (list, tuple)) else g)  # an untracked list: no gradient
            return None, *flat

        @classmethod
        def apply(cls, *args):
            lengths = tuple(len(args[i]) for i in tensor_lists)
            flat = [t for i, a in enumerate(args) for t in (a if i in tensor_lists else (a,))]
            return super().apply(lengths, *flat)

    return type(f"{forward_impl.__name__}_eager", (Twin,), {})  # named at creation, as its backward node


def run(op, twin: type[torch.autograd.Function], *args):
    """The registered op while torch.compile / torch.export trace, else its eager twin. A quantized
    base weight (fusedpeft.quantized.QuantizedWeight, args[1]) is not a tensor, which a custom op's
    schema cannot take: it always runs through the twin (the grouped op's args[1] is a list of
    dense weights: quantized bases are not grouped)."""
    quantized = not isinstance(args[1], (torch.Tensor, list))
    return op(*args) if torch.compiler.is_compiling() and not quantized else twin.apply(*args)


def save_weight(ctx, weight):
    """What save_for_backward gets for the base weight: the tensor, or None for a quantized weight
    (kept on ctx: its packed storage only, the dequantized matrix is rebuilt in backward)."""
    ctx.quantized_weight = None if isinstance(weight, torch.Tensor) else weight
    return None if ctx.quantized_weight is not None else weight


def saved_weight(ctx, saved):
    """The base weight save_weight stored."""
    quantized = getattr(ctx, "quantized_weight", None)
    return saved if quantized is None else quantized


def run_backward(ctx, op, implementation, *args):
    """A backward op from the shared backward: direct when the forward ran eagerly (the twin)."""
    return implementation(*args) if getattr(ctx, "eager", False) else op(*args)

