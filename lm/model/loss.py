"""Cross-entropy of the output head without the whole tokens x vocab logits (`model.loss_chunk`).

`linear_cross_entropy(hidden, weight, targets, chunk)` equals
`F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)` (the mean over the targets that
are not ignored) in value and in its gradients for `hidden` and `weight`, but it goes through the tokens
`chunk` at a time, so at most chunk x vocab logits ever exist. As in Liger-Kernel's fused linear
cross-entropy, the gradient is computed in the forward pass, while each chunk's logits are at hand:

    logits_c = hidden_c @ weight.T               in the compute dtype (autocast's, else the inputs')
    logits_c -> fp32; loss += sum(logsumexp(logits_c) - logits_c[target])
    g_c      = softmax(logits_c) - onehot(target)  (fp32, in place; 0 on ignored rows), cast to compute
    grad_hidden[c] = g_c @ weight / n               grad_weight += g_c.T @ hidden_c  (fp32 accumulator)

The backward only scales the two stored gradients by the incoming grad_output. Between forward and
backward the step holds grad_hidden (tokens x C, the size of the final norm's output that the plain path
saves instead) and grad_weight (V x C fp32) rather than the fp32 log-probs and their gradient (3 x tokens x V
fp32): lm/training/plan.py counts both. Without gradients (evaluation, no_grad) only the loss is computed.

The tied head: `weight` is `lm_head.weight`, the token embedding's Parameter, so its gradient adds to the
embedding's like any other use of it. Under FSDP2 the root module's parameters are all-gathered (bf16 with
the mixed-precision policy) for the forward and stay so until the backward: this function sees a plain
tensor and returns its gradient in that tensor's dtype for FSDP to reduce-scatter.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # as F.cross_entropy: targets equal to it contribute neither loss nor gradient


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)  # what F.linear would compute in under autocast
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunked(hidden, weight, targets, chunk: int, compute: torch.dtype, ignore_index: int,
             need_hidden: bool, need_weight: bool):
    """(loss, grad_hidden | None, grad_weight | None) with the gradients already divided by the count of
    targets that are not ignored (the mean's gradient for grad_output 1)."""
    N, C = hidden.shape
    V = weight.size(0)
    h = hidden.to(compute)
    w = weight.to(compute)
    valid = targets != ignore_index
    scale = 1.0 / valid.sum().to(torch.float32)  # a tensor (no host sync); all targets ignored: nan, as
    # F.cross_entropy's mean
    safe = torch.where(valid, targets, 0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # fp16's range would lose small gradients: keep grad_hidden in fp32 there, else in hidden's dtype
    grad_h = torch.empty(N, C, dtype=torch.float32 if hidden.dtype == torch.float16 else hidden.dtype,
                         device=hidden.device) if need_hidden else None
    grad_w = torch.zeros(V, C, dtype=torch.float32, device=hidden.device) if need_weight else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        loss_sum += _chunk(h[start:end], safe[start:end, None], valid[start:end, None], w, compute, scale,
                           grad_h[start:end] if need_hidden else None, grad_w, need_hidden or need_weight)
    if grad_w is not None:
        grad_w.mul_(scale)
    return loss_sum * scale, grad_h, grad_w


def _chunk(hc, tc, vc, w, compute, scale, grad_h, grad_w, need_grad: bool) -> torch.Tensor:
    """One chunk: returns its summed loss; writes its rows of grad_h, adds its share to grad_w. Its
    temporaries die on return, before the next chunk's logits exist."""
    logits = (hc @ w.T).float()  # (n, V) fp32; the compute-dtype product is freed here
    target_logit = logits.gather(1, tc)
    top = logits.amax(dim=1, keepdim=True)
    logits.sub_(top).exp_()  # in place: exp(logits - max)
    total = logits.sum(dim=1, keepdim=True)
    loss = ((total.log() + top - target_logit) * vc).sum()
    if not need_grad:
        return loss
    logits.div_(total)  # softmax, in place
    logits.scatter_add_(1, tc, -vc.to(logits.dtype))  # minus the one-hot of the target
    logits.mul_(vc)  # ignored rows: no gradient
    g = logits.to(compute)  # the unscaled softmax - onehot lies in [-1, 1]: safe in any dtype
    del logits  # (in bf16: only the bf16 copy stays for the matmuls)
    if grad_h is not None:
        grad_h.copy_((g @ w).float().mul_(scale))  # one rounding to grad_h's dtype
    if grad_w is not None:
        if compute == torch.float32:
            grad_w.addmm_(g.T, hc)
        else:
            grad_w += g.T @ hc  # the product in the compute dtype, accumulated over chunks in fp32
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss as one autograd node: forward computes the loss and both gradients, backward
    scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute, ignore_index):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen explicitly
            loss, grad_h, grad_w = _chunked(hidden, weight, targets, chunk, compute, ignore_index,
                                            need_hidden, need_weight)
        ctx.hidden_dtype, ctx.weight_dtype, ctx.chunk = hidden.dtype, weight.dtype, chunk
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        # in place: these buffers exist only for this backward (a second backward through the same graph
        # is refused by autograd's version check on the saved tensors)
        if grad_h is not None:
            if grad_h.dtype == torch.float32:
                grad_h.mul_(grad_output)
            else:  # bf16: scale in fp32 (as the plain loss's backward does), a chunk of rows at a time
                for rows in grad_h.split(ctx.chunk):
                    rows.copy_(rows.float().mul_(grad_output))
            grad_h = grad_h.to(ctx.hidden_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_output.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` ((N, C) @ (C, V)) against `targets` (N,),
    `chunk` tokens at a time (see the module docstring). Returns a 0-dim fp32 loss."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1) \
            or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, C), weight (V, C), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    compute = _compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk, compute, ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked(hidden, weight, targets, chunk, compute, ignore_index, False, False)[0]
