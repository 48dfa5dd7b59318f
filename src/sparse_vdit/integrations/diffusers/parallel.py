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

Text tokens in self-attention (HunyuanVideo's and HunyuanVideo 1.5's suffix, Mochi's suffix,
CogVideoX's prefix) stay whole on every rank: only the video tokens are sharded. Each rank takes
its heads of the text q, k, v and all-gathers the text output over heads. HunyuanVideo's text
padding mask arrives whole under our plan (diffusers builds it before the first block), HunyuanVideo
1.5's and Mochi's key masks are built whole from their text mask; one built from a rank's shard is
all-gathered over the video tokens (:meth:`HeadShards.gather_mask`). Diffusers 0.42 has a
``_cp_plan`` for Wan only (LTX-Video's splits the prompt and its mask, which its cross-attention
then fails on with a mask): :func:`context_parallel_plan` gives diffusers' for Wan (and Wan VACE,
its control blocks added) and ours (:data:`OWN_PLANS`, one line per family) for the others, and
:func:`enable_context_parallel` enables it. Under our plan every other attention (cross-attention,
text refiners) runs on each rank's own tokens against the whole text, and only sparse-vdit's
processor computes the joint attention correctly (the stock processors would see duplicated
text): a forward of a text family without :func:`~sparse_vdit.apply` raises; use ``Plan.dense``
for a dense run.

SVG decides each rank's heads from the same sampled rows as one process would (same decisions);
with ``record=True`` a rank records its own heads only, so ``state.svg.to_plan()`` refuses there.
The offline search (``sparse_vdit.search``) is run on one process; its plan then runs on many.

Refused with a clear error: head counts the context-parallel degree does not divide, the
``ulysses_anything`` / ``ring_anything`` modes (uneven shards), HunyuanVideo's ``token_replace``
image conditioning (it modulates the first frame's tokens by position), SkyReels-V2's causal block
attention (``num_frame_per_block > 1``: its whole-sequence mask runs in diffusers' processor, which
cannot split it; checked again at each forward, as its pipeline sets it per call), and a text
family under a context-parallel plan other than :func:`context_parallel_plan`'s.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .families import Family, family_of, transformer_of

WHOLE_TEXT = "_sparse_vdit_whole_text"  # set on a ContextParallelConfig enabled with our plan


class OwnPlan(NamedTuple):
    """sparse-vdit's context-parallel plan of a family: ``blocks``: block lists, the first present
    one's first block gets the video split; ``rotary``: the module whose output tables (cos, sin)
    are split with the video, as (module, split dim, tensor dims); ``per_token``: forward inputs
    split along the tokens when 2-D (per-token timesteps, ``(B, N)``); ``per_block``: block inputs
    split in every block of the first list when they have the given dims, as name -> (split dim,
    dims); ``gather``: where the video is gathered (``"last_block"``: after the last block, so the
    output layers run whole on every rank)."""

    blocks: tuple[str, ...]
    rotary: tuple[str, int, int] | None = None
    per_token: tuple[str, ...] = ()
    per_block: dict[str, tuple[int, int]] = {}
    gather: str = "proj_out"


# the families without a usable diffusers ``_cp_plan`` (diffusers 0.42 ships none for them, and
# LTX-Video's splits the prompt and its mask, which its cross-attention then fails on): text whole
# on every rank, the output gathered at ``proj_out``; Wan uses diffusers' own plan
OWN_PLANS: dict[str, OwnPlan] = {
    "hunyuan_video": OwnPlan(("transformer_blocks", "single_transformer_blocks"), ("rope", 0, 2)),
    "hunyuan_video15": OwnPlan(("transformer_blocks",), ("rope", 0, 2)),
    "mochi": OwnPlan(("transformer_blocks",), ("rope", 0, 3)),
    # Wan's tables (1, N, 1, D); diffusion forcing: per-token modulation (B, 6, N, C) in every block
    # and per-token output modulation, so the video is gathered before the output layers
    "skyreels_v2": OwnPlan(("blocks",), ("rope", 1, 4), per_block={"temb": (2, 4)}, gather="last_block"),
    "ltx_video": OwnPlan(("transformer_blocks",), ("rope", 1, 3), per_token=("timestep",)),
    "cogvideox": OwnPlan(("transformer_blocks",)),  # its rotary tables are a forward input (below)
}
# families run under a diffusers model class's own ``_cp_plan`` (Wan2.1 / 2.2: the rotary tables,
# the video before ``blocks.0``, per-token timesteps); models that add inputs to split: the VACE
# control blocks (run before the Wan blocks) get the video and the control tokens split too
DIFFUSERS_PLANS = {"wan": "WanTransformer3DModel"}
VIDEO_INPUTS = {"WanVACETransformer3DModel": {"vace_blocks.0": ("hidden_states", "control_hidden_states")}}


def context_parallel_plan(pipe_or_transformer: Any) -> dict:
    """The diffusers ``cp_plan`` for a supported transformer: diffusers' own where it has a usable
    one (Wan, with VACE's control blocks added), else sparse-vdit's (:data:`OWN_PLANS`: video tokens split before the first
    block, rotary split with them, text whole on every rank, gathered at ``proj_out``)."""
    from diffusers.models._modeling_parallel import ContextParallelInput as Split
    from diffusers.models._modeling_parallel import ContextParallelOutput as Gather

    model = transformer_of(pipe_or_transformer)
    family = family_of(model)
    if family.name in DIFFUSERS_PLANS:
        import diffusers

        plan = dict(getattr(diffusers, DIFFUSERS_PLANS[family.name])._cp_plan)
        for module, names in VIDEO_INPUTS.get(type(model).__name__, {}).items():
            plan[module] = {name: Split(split_dim=1, expected_dims=3) for name in names}
        return plan
    if family.name not in OWN_PLANS:
        raise NotImplementedError(f"sparse-vdit: no context-parallel plan for the {family.name} family")
    own = OWN_PLANS[family.name]
    blocks = next(name for name in own.blocks if len(getattr(model, name, ())))
    plan: dict = {f"{blocks}.0": {"hidden_states": Split(split_dim=1, expected_dims=3)}}
    if own.per_block:
        plan[f"{blocks}.*"] = {name: Split(split_dim=d, expected_dims=n) for name, (d, n) in own.per_block.items()}
    gather = f"{blocks}.{len(getattr(model, blocks)) - 1}" if own.gather == "last_block" else own.gather
    plan[gather] = Gather(gather_dim=1, expected_dims=3)
    if own.rotary is not None:
        module, dim, dims = own.rotary
        table = Split(split_dim=dim, expected_dims=dims, split_output=True)
        plan[module] = {0: table, 1: table}
    inputs = {name: Split(split_dim=1, expected_dims=2) for name in own.per_token}
    if family.name == "cogvideox" and model.config.use_rotary_positional_embeddings:
        table = Split(split_dim=0, expected_dims=2)  # CogVideoX 5B / 1.5: the pipeline passes the tables in
        inputs["image_rotary_emb"] = [table, table]
    if inputs:
        plan[""] = inputs
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
    if family.name in OWN_PLANS:
        _other_attention_local(model, family)
    model.register_forward_pre_hook(_check_forward)


def _other_attention_local(model: Any, family: Family) -> None:
    """Under sparse-vdit's plan the text is whole on every rank, so every attention but the
    sparsified self-attention (cross-attention: SkyReels-V2's stock processor would run diffusers'
    context-parallel attention on it; text refiners) is exact on each rank's own tokens: its
    processor's context-parallel config is cleared."""
    sparsified = {id(module) for module in family.attention_modules(model)}
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if id(module) not in sparsified and getattr(processor, "_parallel_config", None) is not None:
            processor._parallel_config = None


def _check_forward(model: Any, args: Any) -> None:
    """Forward pre-hook under :func:`enable_context_parallel`: settings changed since (SkyReels-V2's
    causal blocks are set by its pipeline's call) and, for a text family under our plan, the stock
    processors (they would compute wrongly) are refused."""
    family = family_of(model)
    _check_settings(model, family)
    if family.text_position != "none" and type(family.attention_modules(model)[0].processor).__name__ != "SparseAttnProcessor":
        raise RuntimeError(f"sparse-vdit: this {type(model).__name__} runs sparse-vdit's context-parallel plan "
                           "(text whole on every rank), which diffusers' own processors do not compute; call "
                           "sparse_vdit.apply first (Plan.dense for dense attention)")  # fmt: skip


CP_FAMILIES = ("wan", "hunyuan_video", "cogvideox", "hunyuan_video15", "skyreels_v2", "ltx_video", "mochi")  # tested


def check_supported(model: Any, family: Family, cp: Any) -> None:
    """Raise for a context-parallel setting sparse-vdit does not run on ``model``."""
    if family.name not in CP_FAMILIES:
        raise NotImplementedError(f"sparse-vdit: context parallelism on {type(model).__name__} is not supported yet "
                                  f"(families: {', '.join(CP_FAMILIES)})")  # fmt: skip
    _check_degree(cp, model.config.num_attention_heads)
    _check_settings(model, family)


def _check_settings(model: Any, family: Family) -> None:
    """Raise for a model setting that cannot run under context parallelism."""
    config = model.config
    if family.name == "hunyuan_video" and getattr(config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError("sparse-vdit: HunyuanVideo token_replace image conditioning under context "
                                  "parallelism is not supported (it modulates the first frame's tokens by position)")  # fmt: skip
    if family.name == "skyreels_v2" and (getattr(config, "num_frame_per_block", 1) or 1) > 1:
        raise NotImplementedError("sparse-vdit: SkyReels-V2's causal block attention (num_frame_per_block > 1, the "
                                  "diffusion-forcing pipeline's causal_block_size) under context parallelism is not "
                                  "supported (its whole-sequence mask runs in diffusers' processor, which cannot "
                                  "split it); diffusion forcing without it is")  # fmt: skip


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

    def whole_tokens(self, local: int, text: int) -> int:
        """Tokens of the whole sequence whose rank shard holds ``local`` (``text`` whole on every rank)."""
        return (local - text) * self.world + text

    def gather_mask(self, key_mask: torch.Tensor | None, local: int, text: int, position: str) -> torch.Tensor | None:
        """A ``[B, 1, 1, N]`` key mask for the whole sequence, before :meth:`gather` of a ``local``-token shard.

        A whole mask (diffusers builds HunyuanVideo's before the first block, where our plan splits;
        HunyuanVideo 1.5's and Mochi's come from their whole text's mask) is returned as it is; a mask of this rank's tokens (a plan that splits before the mask is
        built) is all-gathered over the video tokens, its text part (whole on every rank) kept.
        """
        if key_mask is None:
            return None
        tokens = key_mask.shape[-1]
        if tokens == self.whole_tokens(local, text):
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
