"""NoProp-DT's block-parallel schedule: all T blocks updated on every batch in one vectorised step.

The blocks train independently (each on its own local loss, Algorithm 1), so one batch can update all
of them at once: :class:`~noprop_bench_plugins.parts.block_parallel.ParallelModules` evaluates the T
blocks with ``vmap`` over their stacked parameters, each block on its own noised label ``z_{t-1}``, and
every block's own optimiser then steps on its own gradient, exactly as T separate block updates on the
same batch and noise would. The shared classifier and embedding step once per batch, on the output
losses plus the sum of the T denoising terms.
"""

from typing import Dict, Optional

import torch
from torch import nn

from .block_parallel import ParallelModules


def _block_output(block: nn.Module, z_prev: torch.Tensor, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    return block(block.features(x), z_prev, embedding)


def parallel_runner(blocks) -> ParallelModules:
    return ParallelModules(blocks, _block_output)


def parallel_losses(method, runner: ParallelModules, x: torch.Tensor, y: torch.Tensor,
                    noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Every block's denoising loss at once (``denoise`` is their sum) and the output losses once.

    ``noise`` ``[T, B, dim]`` (default: drawn here) noises block t's input ``z_{t-1}`` with row t-1.
    """
    s = method.schedule
    W = method.embedding.weight
    u_y = W[y]
    T = method.T
    if noise is None:
        noise = torch.randn(T, *u_y.shape, device=u_y.device, dtype=u_y.dtype)
    with torch.no_grad():  # each block's input: no gradient may flow back through it
        abar_prev = s.abar[:-1].view(T, 1, 1)
        z_prev = abar_prev.sqrt() * u_y + (1 - abar_prev).sqrt() * noise
    u_hat = runner((z_prev,), (x, W))
    weights = 0.5 * T * method.params["eta"] * s.snr_delta
    per_block = weights * (u_hat - u_y).pow(2).sum(dim=2).mean(dim=1)
    terms = method.output_losses(u_y, y)
    denoise = per_block.sum()
    return {**terms, "loss": terms["ce"] + terms["kl"] + denoise, "denoise": denoise}


def parallel_step(method, runner: ParallelModules, x: torch.Tensor, y: torch.Tensor,
                  noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """One update of every block and of the shared parameters; returns the detached loss terms."""
    optimizers = (*method.block_optimizers, method.shared_optimizer)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    terms = parallel_losses(method, runner, x, y, noise)
    terms["loss"].backward()
    runner.write_back()
    for optimizer in optimizers:
        optimizer.step()
    return {key: value.detach() for key, value in terms.items()}
