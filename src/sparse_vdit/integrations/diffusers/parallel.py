"""Sparse attention under diffusers' context parallelism (Ulysses, ring) for every family.

Diffusers' context parallelism shards the sequence across ranks (``enable_parallelism`` with a
``ContextParallelConfig``; the model's ``_cp_plan`` says where to split and gather). A sparse
plan needs each head's whole sequence, so the processor exchanges q, k, v from (sequence shard,
all heads) to (whole sequence, this rank's heads) with diffusers' all-to-all, runs the patterns
of its global heads (``call.heads``) in one launch, and exchanges the output back
(:class:`HeadShards`). With a ``ring_degree`` the exchange runs over the whole context-parallel
mesh (ring x Ulysses ranks): the output is the same as ring attention's, each rank holding the
whole sequence of ``heads / (ring x ulysses)`` heads instead of rotating key chunks, since a
per-head block table needs the whole key sequence of its head.

Text tokens in self-attention (HunyuanVideo's suffix, CogVideoX's prefix) stay whole on every
rank: only the video tokens are sharded. Each rank takes its heads of the text q, k, v and
all-gathers the text output over heads. HunyuanVideo's text padding mask arrives whole under our
plan (diffusers builds it before the first block); one built from a rank's shard is all-gathered
over the video tokens (:meth:`HeadShards.gather_mask`). Diffusers 0.42 has no ``_cp_plan`` for
these models; :func:`context_parallel_plan` gives ours and :func:`enable_context_parallel` enables it. Under that
plan only sparse-vdit's processor computes the joint attention correctly (the stock processors
would see duplicated text): a forward without :func:`~sparse_vdit.apply` raises; use
``Plan.dense`` for a dense run.

SVG decides each rank's heads from the same sampled rows as one process would (same decisions);
with ``record=True`` a rank records its own heads only, so ``state.svg.to_plan()`` refuses there.
The offline search (``sparse_vdit.search``) is run on one process; its plan then runs on many.

Refused with a clear error: head counts the context-parallel degree does not divide, the
``ulysses_anything`` / ``ring_anything`` modes (uneven shards), HunyuanVideo's ``token_replace``
image conditioning (it modulates the first frame's tokens by position), and a text family under a
context-parallel plan other than :func:`context_parallel_plan`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from .families import Family, family_of, transformer_of

WHOLE_TEXT = "_sparse_vdit_whole_text"  # set on a ContextParallelConfig enabled with our plan


def context_parallel_plan(pipe_or_transformer: Any) -> dict:
    """The diffusers ``cp_plan`` for a supported transformer: the model's own where diffusers has
    one (Wan), else sparse-vdit's (HunyuanVideo, CogVideoX: video tokens split before the first
    block, rotary split with them, text whole on every rank, gathered at ``proj_out``)."""
    from diffusers.models._modeling_parallel import ContextParallelInput as Split
    from diffusers.models._modeling_parallel import ContextParallelOutput as Gather

    model = transformer_of(pipe_or_transformer)
    family = family_of(model)
    if family.name == "wan":
        return model._cp_plan
    video = {"hidden_states": Split(split_dim=1, expected_dims=3)}
    gather = Gather(gather_dim=1, expected_dims=3)
    if family.name == "hunyuan_video":
        first = "transformer_blocks.0" if len(model.transformer_blocks) else "single_transformer_blocks.0"
        rotary = Split(split_dim=0, expected_dims=2, split_output=True)
        return {"rope": {0: rotary, 1: rotary}, first: video, "proj_out": gather}
    plan = {"transformer_blocks.0": video, "proj_out": gather}
    if model.config.use_rotary_positional_embeddings:  # CogVideoX 5B / 1.5: the pipeline passes the tables in
        rotary = Split(split_dim=0, expected_dims=2)
        plan[""] = {"image_rotary_emb": [rotary, rotary]}
    return plan  # CogVideoX 2B: positions are added to the whole sequence before the first block


def enable_context_parallel(pipe_or_transformer: Any, config: Any) -> None:
    """``transformer.enable_parallelism`` with :func:`context_parallel_plan`, after sparse-vdit's checks.

    ``config``: a diffusers ``ContextParallelConfig`` (or a ``ParallelConfig`` holding one). Call it
    before or after :func:`~sparse_vdit.apply`, in every rank of an initialised process group.

    Example (``torchrun --nproc-per-node 2 ...``)::

        from diffusers import ContextParallelConfig
        sparse_vdit.enable_context_parallel(pipe, ContextParallelConfig(ulysses_degree=2))
        with sparse_vdit.sparse(pipe, plan):
            video = pipe(prompt="...").frames[0]
    """
    model = transformer_of(pipe_or_transformer)
    family = family_of(model)
    cp = getattr(config, "context_parallel_config", config)
    if cp is None or not hasattr(cp, "ulysses_degree"):
        raise TypeError(f"enable_context_parallel needs a diffusers ContextParallelConfig, got {type(config).__name__}")
    check_supported(model, family, cp)
    setattr(cp, WHOLE_TEXT, True)
    model.enable_parallelism(config=config, cp_plan=context_parallel_plan(model))
    if family.text_position != "none":
        model.register_forward_pre_hook(_require_sparse_processors)


def _require_sparse_processors(model: Any, args: Any) -> None:
    """Forward pre-hook of a text family under our plan: the stock processors would compute wrongly."""
    family = family_of(model)
    if type(family.attention_modules(model)[0].processor).__name__ != "SparseAttnProcessor":
        raise RuntimeError(f"sparse-vdit: this {type(model).__name__} runs sparse-vdit's context-parallel plan "
                           "(text whole on every rank), which diffusers' own processors do not compute; call "
                           "sparse_vdit.apply first (Plan.dense for dense attention)")  # fmt: skip


CP_FAMILIES = ("wan", "hunyuan_video", "cogvideox")  # the families whose context parallelism is tested


def check_supported(model: Any, family: Family, cp: Any) -> None:
    """Raise for a context-parallel setting sparse-vdit does not run on ``model``."""
    if family.name not in CP_FAMILIES:
        raise NotImplementedError(f"sparse-vdit: context parallelism on {type(model).__name__} is not supported yet "
                                  f"(families: {', '.join(CP_FAMILIES)})")  # fmt: skip
    _check_degree(cp, model.config.num_attention_heads)
    if family.name == "hunyuan_video" and getattr(model.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError("sparse-vdit: HunyuanVideo token_replace image conditioning under context "
                                  "parallelism is not supported (it modulates the first frame's tokens by position)")  # fmt: skip


def _check_degree(cp: Any, heads: int) -> int:
    """The context-parallel degree (ring x Ulysses); raises where ranks would not own whole heads."""
    degree = (cp.ring_degree or 1) * (cp.ulysses_degree or 1)
    if cp.ulysses_anything or cp.ring_anything:
        raise NotImplementedError("sparse-vdit: ulysses_anything / ring_anything (uneven shards) are not supported")
    if heads % degree:
        raise ValueError(f"sparse-vdit: {heads} attention heads are not divisible by the context-parallel degree "
                         f"{degree} (ring {cp.ring_degree} x Ulysses {cp.ulysses_degree}); each rank must own "
                         "whole heads")  # fmt: skip
    return degree


class HeadShards:
    """The exchange of one context-parallel group: sequence shards <-> (whole sequence, own heads)."""

    def __init__(self, cp: Any, heads: int) -> None:
        import torch.distributed as dist

        self.group = cp._flattened_mesh.get_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        local = heads // self.world
        self.heads = range(self.rank * local, (self.rank + 1) * local)  # this rank's global heads
        self.whole_text = getattr(cp, WHOLE_TEXT, False)

    def gather(self, q, k, v, text: int, position: str):
        """``(B, N/n [+ T], H, D)`` -> ``(B, N [+ T], H/n, D)``, text where ``position`` puts it."""
        if text and not self.whole_text:
            raise NotImplementedError("sparse-vdit: text tokens in self-attention under context parallelism need "
                                      "sparse-vdit's plan: enable it with sparse_vdit.enable_context_parallel(model, "
                                      "config)")  # fmt: skip
        return tuple(self._gather(t, text, position) for t in (q, k, v))

    def gather_mask(self, key_mask: torch.Tensor | None, local: int, text: int, position: str) -> torch.Tensor | None:
        """A ``[B, 1, 1, N]`` key mask for the whole sequence, before :meth:`gather` of a ``local``-token shard.

        A whole mask (diffusers builds HunyuanVideo's before the first block, where our plan splits)
        is returned as it is; a mask of this rank's tokens (a plan that splits before the mask is
        built) is all-gathered over the video tokens, its text part (whole on every rank) kept.
        """
        if key_mask is None:
            return None
        tokens = key_mask.shape[-1]
        if tokens == (local - text) * self.world + text:
            return key_mask
        if tokens != local:
            raise RuntimeError(f"sparse-vdit: a key mask of {tokens} tokens for a sequence shard of {local} "
                               f"({self.world} ranks, {text} text tokens)")  # fmt: skip
        video, words = _split(key_mask.reshape(key_mask.shape[0], tokens), text, position)
        import torch.distributed as dist

        carrier = video.to(torch.uint8) if video.dtype == torch.bool else video  # gloo has no bool
        parts = [torch.empty_like(carrier) for _ in range(self.world)]
        dist.all_gather(parts, carrier.contiguous(), group=self.group)
        video = torch.cat(parts, dim=1).to(key_mask.dtype)
        whole = video if words is None else _join(video, words, position)
        return whole.reshape(*key_mask.shape[:-1], whole.shape[1])

    def scatter(self, out: torch.Tensor, text: int, position: str) -> torch.Tensor:
        """The inverse of :meth:`gather` for the attention output (text all-gathered over heads)."""
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

        video, words = _split(out, text, position)
        video = _all_to_all_dim_exchange(video.contiguous(), 1, 2, self.group)
        if not text:
            return video
        import torch.distributed as dist

        parts = [torch.empty_like(words) for _ in range(self.world)]
        dist.all_gather(parts, words.contiguous(), group=self.group)
        return _join(video, torch.cat(parts, dim=2), position)

    def _gather(self, t: torch.Tensor, text: int, position: str) -> torch.Tensor:
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

        video, words = _split(t, text, position)
        video = _all_to_all_dim_exchange(video.contiguous(), 2, 1, self.group)
        if not text:
            return video
        return _join(video, words[:, :, self.heads.start : self.heads.stop], position)


def head_shards(parallel_config: Any, heads: int) -> HeadShards | None:
    """The exchange of a diffusers ``ParallelConfig`` (None without context parallelism)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or _check_degree(cp, heads) <= 1:
        return None
    if cp._flattened_mesh is None:
        raise RuntimeError("sparse-vdit: the context parallel config has no device mesh (enable_parallelism not run?)")
    return HeadShards(cp, heads)


def _split(t: torch.Tensor, text: int, position: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not text:
        return t, None
    if position == "prefix":
        return t[:, text:], t[:, :text]
    return t[:, :-text], t[:, -text:]


def _join(video: torch.Tensor, text: torch.Tensor, position: str) -> torch.Tensor:
    return torch.cat([text, video] if position == "prefix" else [video, text], dim=1)
