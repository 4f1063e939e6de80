"""LLaDA's forward (noising) process: mask each answer token independently with probability t.

`forward_process` draws a batch from one generator. `draw_noise` draws each row from its own generator,
seeded by (seed, example, draw): what live training and the phase-1 feature cache share, so that a cached
step sees exactly the masks the live step would have drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def prompt_mask(prompt_lengths: Tensor | None, batch_size: int, seq_len: int, device: torch.device) -> Tensor:
    """[B, L] bool, True at positions < prompt_length (the conditioning that is never noised)."""
    if prompt_lengths is None:
        return torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    prompt_lengths = torch.as_tensor(prompt_lengths, device=device).reshape(-1)
    if prompt_lengths.numel() != batch_size:
        raise ValueError(
            f"prompt_lengths has {prompt_lengths.numel()} entries but the batch has {batch_size} rows; "
            "pass one prompt length per sequence"
        )
    positions = torch.arange(seq_len, device=device)
    return positions[None, :] < prompt_lengths[:, None]


def answer_lengths_from_prompt(prompt_lengths: Tensor | None, batch_size: int, seq_len: int) -> Tensor:
    """[B] answer lengths as LLaDA counts them: everything after the prompt, padded EOS included."""
    if prompt_lengths is None:
        return torch.full((batch_size,), seq_len, dtype=torch.long)
    return seq_len - torch.as_tensor(prompt_lengths).reshape(-1).long()


def forward_process(
    input_ids: Tensor,
    prompt_lengths: Tensor | None,
    mask_id: int,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample x_t ~ q(x_t | x_0) for a batch, as LLaDA's pre-training / SFT code does.

    Per sequence ``t ~ U(0, 1)`` and ``p_mask = (1 - eps) t + eps`` (eps keeps the 1/p_mask loss weight
    bounded); every token after the prompt is replaced by ``mask_id`` independently with probability
    ``p_mask``. ``prompt_lengths=None`` (or all zeros) is the pre-training flavour: the whole row is noised.

    Random draws happen in LLaDA's order (``t`` first, then the [B, L] uniforms), so a seeded run reproduces
    the reference. Pass ``t`` ([B] in [0, 1]) to fix the noise level, e.g. for evaluation at chosen t.

    Returns ``(noisy_ids [B, L] long, masked [B, L] bool, p_mask [B, L] float32)``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    batch_size, seq_len = input_ids.shape
    device = input_ids.device

    if t is None:
        t = torch.rand(batch_size, device=device, generator=generator)
    else:
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() != batch_size:
            raise ValueError(f"t has {t.numel()} entries for {batch_size} rows; give one t per row")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError("t must lie in [0, 1]")
    p_mask = ((1 - eps) * t + eps)[:, None].expand(batch_size, seq_len)

    masked = torch.rand((batch_size, seq_len), device=device, generator=generator) < p_mask
    masked &= ~prompt_mask(prompt_lengths, batch_size, seq_len, device)
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy_ids, masked, p_mask.contiguous()


def noise_seed(seed: int, example: int, draw: int) -> int:
    """The generator seed of one (example, draw): a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"llada-trm/noise/{seed}/{example}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_for_epoch(epoch: int, n_draws: int) -> int:
    """Which of `n_draws` stored noise draws epoch `epoch` trains on."""
    return epoch % n_draws


def draw_noise(
    input_ids: Tensor,
    prompt_lengths: Tensor,
    mask_id: int,
    *,
    seed: int,
    examples: Sequence[int],
    draws: int | Sequence[int],
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """LLaDA's forward process with one CPU generator per row, seeded by (seed, example, draw).

    The noise of an example is thereby independent of its batch, its position in it and the device, which is
    what lets the cache store it and a live step reproduce it. Returns `(noisy_ids, masked, p_mask)` on the
    device of `input_ids`, as `forward_process` does.
    """
    batch = input_ids.shape[0]
    draws = [draws] * batch if isinstance(draws, int) else list(draws)
    if len(examples) != batch or len(draws) != batch:
        raise ValueError(f"draw_noise: {batch} rows but {len(examples)} example ids and {len(draws)} draws")
    ids, prompts = input_ids.cpu(), torch.as_tensor(prompt_lengths).reshape(-1).cpu()
    rows = []
    for row, (example, draw) in enumerate(zip(examples, draws, strict=True)):
        generator = torch.Generator().manual_seed(noise_seed(seed, int(example), int(draw)))
        rows.append(forward_process(ids[row : row + 1], prompts[row : row + 1], mask_id, eps, generator))
    noisy, masked, p_mask = (torch.cat(parts).to(input_ids.device) for parts in zip(*rows, strict=True))
    return noisy, masked, p_mask
