"""TRM's carry across denoising steps: each position's refiner latent, kept from one model call to the next.

Inside one model call the slot refiner carries its working representation u from each of its K steps to the
next (`RefinerState.prev`; the refinement slot reads the change u - sg(u_prev)). Without a carry every call
starts from nothing: at its first step u_prev is None and the slot reads a zero change, so each denoising step
refines from scratch. A `RefinerCarry` keeps, per refiner kind, the last u of every position the refiner
refined, detached, and the next call's first step takes it as u_prev (`Refiner.resume_state`): the change
since the last denoising step. A refiner whose step reads no previous state (the MLP baseline) carries
nothing, and runs as without a carry.

Positions are indexed by absolute position in the whole sequence, so a KV-cache window (a slice of the
sequence at some offset) reads and writes its own positions whatever its offset. The caller (the hybrid)
decides what is written (the positions it refined; others keep theirs) and what is dropped (`reset`: a
position whose token is committed has nothing left to refine).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llada_trm.refiners.base import Refiner, RefinerState


class RefinerCarry:
    """Per refiner kind, a latent [B, T, D] and a validity mask [B, T] over absolute positions 0..T-1.

    Storage grows on demand to the furthest position written; the batch size is fixed by the first write
    (the sampler's, doubled under classifier-free guidance). An empty carry reads as nothing.
    """

    def __init__(self) -> None:
        self.latents: dict[str, Tensor] = {}
        self.valid: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        held = {kind: int(v.sum()) for kind, v in self.valid.items()}
        return f"RefinerCarry(positions held per kind: {held})"

    def _check_batch(self, kind: str, batch: int) -> None:
        stored = self.valid[kind].shape[0]
        if batch != stored:
            raise ValueError(
                f"RefinerCarry holds a batch of {stored} rows but was given {batch}; use one carry per "
                "generation batch (a new RefinerCarry for each call of the sampler)"
            )

    def start(self, kind: str, refiner: Refiner, h: Tensor, offset: int = 0) -> RefinerState:
        """The state of `refiner`'s first step on the window `h` [B, L, D] at `offset`: resumed from the
        window's carried latents, or `init_state` where the window holds none."""
        window = self.read(kind, offset, h.shape[1], h.shape[0])
        return refiner.init_state(h) if window is None else refiner.resume_state(h, *window)

    def keep(
        self, kind: str, refiner: Refiner, state: RefinerState, refined: Tensor, offset: int = 0
    ) -> None:
        """Carry `refiner`'s latents from its last `state` at the window positions it `refined` [B, L]."""
        latent = refiner.carried(state)
        if latent is not None and bool(refined.any()):
            self.write(kind, offset, latent, refined)

    def read(self, kind: str, offset: int, length: int, batch: int) -> tuple[Tensor, Tensor] | None:
        """`(latent [B, length, D], valid [B, length])` of positions offset..offset+length-1, or None when
        none of them holds a latent (the refiner then starts from nothing, exactly as without a carry)."""
        if kind not in self.valid:
            return None
        self._check_batch(kind, batch)
        valid = self.valid[kind][:, offset : offset + length]
        if not bool(valid.any()):
            return None
        latent = self.latents[kind][:, offset : offset + length]
        short = length - valid.shape[1]  # positions past the storage hold nothing
        if short:
            valid = torch.cat((valid, valid.new_zeros(batch, short)), dim=1)
            latent = torch.cat((latent, latent.new_zeros(batch, short, latent.shape[-1])), dim=1)
        return latent, valid

    def write(self, kind: str, offset: int, latent: Tensor, where: Tensor) -> None:
        """Keep `latent` [B, L, D] (detached) at the window positions `where` [B, L] (offset: the window's
        first absolute position); every other position keeps what it held."""
        batch, length = where.shape
        end = offset + length
        if kind not in self.valid:
            self.valid[kind] = torch.zeros(batch, end, dtype=torch.bool, device=where.device)
            self.latents[kind] = latent.new_zeros(batch, end, latent.shape[-1])
        self._check_batch(kind, batch)
        self._grow(kind, end)
        stored = self.latents[kind]
        if stored.shape[-1] != latent.shape[-1]:
            raise ValueError(
                f"RefinerCarry[{kind!r}] holds latents of width {stored.shape[-1]}, got {latent.shape[-1]}"
            )
        window = slice(offset, end)
        keep = where.unsqueeze(-1)
        stored[:, window] = torch.where(keep, latent.detach().to(stored.dtype), stored[:, window])
        self.valid[kind][:, window] |= where

    def reset(self, positions: Tensor, offset: int = 0) -> None:
        """Drop the latents of `positions` [B, L] (bool, True = drop) at absolute offset..offset+L-1."""
        for kind, valid in self.valid.items():
            self._check_batch(kind, positions.shape[0])
            drop = positions[:, : max(0, valid.shape[1] - offset)].to(device=valid.device, dtype=torch.bool)
            window = slice(offset, offset + drop.shape[1])
            valid[:, window] &= ~drop
            held = self.latents[kind][:, window]
            self.latents[kind][:, window] = torch.where(drop.unsqueeze(-1), torch.zeros_like(held), held)

    def held(self, kind: str) -> Tensor | None:
        """[B, T] positions holding a latent for `kind` (None before its first write)."""
        return self.valid.get(kind)

    def _grow(self, kind: str, end: int) -> None:
        valid, latent = self.valid[kind], self.latents[kind]
        extra = end - valid.shape[1]
        if extra > 0:
            self.valid[kind] = torch.cat((valid, valid.new_zeros(valid.shape[0], extra)), dim=1)
            self.latents[kind] = torch.cat(
                (latent, latent.new_zeros(latent.shape[0], extra, latent.shape[-1])), dim=1
            )
