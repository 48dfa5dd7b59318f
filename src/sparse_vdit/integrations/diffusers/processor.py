"""One attention processor for every family, and the state its layers share.

:class:`SparseAttnProcessor` is installed on each self-attention layer with its layer index; the
family adapter computes q, k, v exactly as diffusers does, and :class:`SparseState` decides and
runs the attention: it builds the layout from the sequence length and the latent grid the step
hook recorded, asks its ``pattern_source`` for one pattern per head (a plan by default), and runs
the dense kernel (cuDNN / FlashAttention-4) or :func:`~sparse_vdit.sparse_attention`.

Hook points for search and online methods:

- ``state.pattern_source(call) -> patterns | BlockTable | HeadChoice | None``: called once per layer
  call with an :class:`AttentionCall` (step, layer, q, k, v, layout); ``None`` means dense; a
  :class:`~sparse_vdit.block_table.BlockTable` of the call's layout runs as it is (e.g. an
  oracle's block masks, :func:`~sparse_vdit.block_table.table_from_mask`); a
  :class:`~sparse_vdit.patterns.HeadChoice` (SVG) is a choice made on the device. ``call.dense_output()``
  and ``call.output(patterns)`` compute candidates on the same fast path.
- ``state.observers``: ``fn(call, patterns, out)`` after every layer call.

Under diffusers' context parallelism (Ulysses or ring, before or after :func:`apply`), the
processor exchanges q, k, v from sequence shards to (full sequence, this rank's heads), runs the
patterns of its global heads (``call.heads``) in one launch, and exchanges the output back; see
``parallel.py``.

Fused rotary (``state.fuse_rotary``): on one GPU the family's rotary embedding is not applied in
``project`` but handed to the attention step (``rotary.py``; through the compiled op too): in
inference and training, with a plan and no observers, it is applied in the same pass that writes
token-major heads in their order (:func:`~sparse_vdit.kernels.head_order.attention_in_head_order`;
the backward's passes likewise), otherwise first, in one pass. ``None`` (the default): fused on CUDA for every family with
a rotary convention (``rotary.fused_by_default``: Wan, HunyuanVideo, CogVideoX; faster on an H200,
issue 21), the model's own rotary on the CPU; ``False`` keeps the model's torch rotary in ``project``,
``True`` forces fusion.
``state.rotary_float32 = True``: float64 tables (Wan's) are cast to float32 once per set of tables
and the fused pass computes in float32 (off by default, as it is not bitwise the model's float64
rotary; on an H200 -0.01 to +0.10 block efficiency on Wan at 5-40%, BENCHMARKS.md).

Under ``torch.compile`` the attention step is one opaque custom op, so the graph has no break
inside a block and the Python decisions run eagerly at run time; the op is tagged
``cudagraph_unsafe``, so under CUDA graphs (``mode="reduce-overhead"``, Inductor's graph partition)
it runs between the captured graphs, every call, at the current step. The op is differentiable: on the
call's route (``SparseState.lse_route``: a plan's table on a backend with an LSE, triton or fa4, through head
order; dense layers by cuDNN) its backward runs from the call's output and LSE; elsewhere (observers, online
choices, several prompt lengths) it replays the call (same step and patterns) under autograd, one extra
attention forward. Eager training differentiates :func:`~sparse_vdit.sparse_attention` directly.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ...block_table import DEFAULT_BLOCK, BlockTable, all_dense
from ...kernels import dense as dense_kernels
from ...kernels import registry, resolve_backend, sparse_attention
from ...kernels.api import needs_grad
from ...kernels.head_order import Rotary, attention_in_head_order, fused_pass_runs, in_float32, rotate
from ...kernels.head_order_op import backward_from_lse, forward_with_lse, rotary_of
from ...layout import VideoLayout
from ...kernels import select_attention
from ...methods.protocol import AttentionCall, Observer, PatternSource, plan_source
from ...patterns import HeadChoice, Pattern, compile_layer
from ...plan import ModelSpec, Plan
from ...timing import clock, seconds_per_step
from . import compiled_op
from .families import Family, set_processor
from .parallel import head_shards
from .rotary import fusable, fused_by_default, rotary_parts
from .steps import StepTracker


class LseRoute(NamedTuple):
    """How a compiled call runs so that its backward needs only its output and LSE (:meth:`SparseState.lse_route`)."""

    table: BlockTable | None  # None: dense, by cuDNN
    rotary: Rotary | None  # still to apply to q and k (fused into the head-order pass)
    layout: VideoLayout
    backend: str  # the table's backend ("cudnn" when dense)


class SparseState:
    """What every layer of one patched model shares: pattern source, backend, step, timings."""

    def __init__(
        self,
        family: Family,
        spec: ModelSpec,
        *,
        plan: Plan | None = None,
        pattern_source: PatternSource | None = None,
        backend: str = "auto",
        block_size: int | None = None,
    ) -> None:
        if plan is None and pattern_source is None:
            raise ValueError("give a plan or a pattern_source")
        self.family, self.spec, self.backend = family, spec, backend
        self.plan = plan
        self.pattern_source: PatternSource = pattern_source or plan_source(plan)
        self.block_size = block_size or (plan.block_size if plan is not None else DEFAULT_BLOCK)
        self.steps = StepTracker()
        self.observers: list[Observer] = []
        self.timing = False
        # True: the rotary embedding goes to the attention step, fused with the token-major permutation
        # where fuses_rotary(device); False: the model's rotary in torch in project, then sparse_attention
        # (before issue 21); None: the family's measured default on CUDA (rotary_fused(device))
        self.fuse_rotary: bool | None = None
        self.rotary_float32 = False  # fused pass: float64 tables cast to float32 (once per set of tables)
        self._timings: list[tuple[int, Any, Any]] = []
        self._memo: dict = {}
        self._valid: tuple = (None, None)  # (key, groups) of the last key mask read
        self.last_layout: VideoLayout | None = None  # of the last call, padding included
        self._foreign: frozenset = frozenset()  # layers whose processor someone else replaced (warned)
        self._backend_warned = False
        self.handle = compiled_op.register(self)

    def __deepcopy__(self, memo):
        """An independent state (own handle, steps, caches) for a deep copy of the patched model."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        memo[id(self.family)] = self.family  # stateless adapters are shared
        for key, value in self.__dict__.items():
            setattr(new, key, {} if key == "_memo" else copy.deepcopy(value, memo))
        new.handle = compiled_op.register(new)
        return new

    def check_processors(self, model) -> None:
        """Keep sparse attention after ``set_attn_processor`` / ``fuse_qkv_projections``: a layer that
        got a stock processor of this family gets ours back around it (``remove`` hands that one
        back); any other processor stays, with one loud warning naming the layers."""
        foreign = []
        for i, module in enumerate(self.family.attention_modules(model)):
            processor = module.processor
            if isinstance(processor, SparseAttnProcessor) and processor.state is self:
                continue
            if type(processor).__name__ in self.family.processor_classes:
                set_processor(module, SparseAttnProcessor(self.family, i, self, processor))
            else:
                foreign.append((i, type(processor).__name__))
        if foreign and frozenset(foreign) != self._foreign:
            names = sorted({name for _, name in foreign})
            warnings.warn(f"sparse-vdit: {len(foreign)} self-attention layer(s) ({', '.join(str(i) for i, _ in foreign[:8])}"
                          f"{'...' if len(foreign) > 8 else ''}) now run {', '.join(names)}, set after sparse_vdit.apply: "
                          "they are no longer sparse; sparse_vdit.remove() leaves them as they are",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        self._foreign = frozenset(foreign)

    def backend_changed(self, backend) -> None:
        """``model.set_attention_backend`` reached a sparse layer: say once what it changes."""
        if backend is None or self._backend_warned:
            return
        self._backend_warned = True
        name = getattr(backend, "value", backend)
        warnings.warn(f"sparse-vdit: set_attention_backend({name!r}) does not change the self-attention layers "
                      f"sparse-vdit runs (backend={self.backend!r}, dense parts on cuDNN / FlashAttention-4); it "
                      "applies to the other layers and to the processors sparse_vdit.remove() restores",
                      RuntimeWarning, stacklevel=3)  # fmt: skip

    # --- configuration ------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The current denoising step (0-based) of the current generation."""
        return self.steps.step

    def set_plan(self, plan: Plan) -> None:
        """Switch to another plan for the same model (validated first); keeps the step count."""
        plan.check(self.spec)
        self.plan, self.pattern_source, self.block_size = plan, plan_source(plan), plan.block_size
        self._memo.clear()

    # --- the attention step -------------------------------------------------------------------

    def layout(self, seq_len: int) -> VideoLayout:
        """Layout of a self-attention sequence of ``seq_len`` tokens at the recorded latent grid."""
        key = ("layout", seq_len, self.steps.grid)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        grid = self.steps.grid
        if grid is None:
            raise RuntimeError(
                "sparse-vdit: no latent shape recorded; call the transformer itself (its forward "
                "records the video size), not its blocks, or set state.steps.grid = (frames, height, width)"
            )
        frames, height, width = grid
        text = seq_len - frames * height * width
        position = self.family.text_position if text else "none"
        if text < 0 or (text and position == "none"):
            raise RuntimeError(
                f"sparse-vdit: a self-attention sequence of {seq_len} tokens does not fit the latent grid "
                f"{frames} x {height} x {width} of the {self.family.name} transformer's input"
            )
        layout = VideoLayout(frames, height, width, text, position)
        self._memo[key] = layout
        return layout

    def rotary_fused(self, device: torch.device) -> bool:
        """``fuse_rotary`` where set, else the family's default (``rotary.fused_by_default``) on CUDA: on the
        CPU the pass would run in Triton's interpreter, far slower than the model's own rotary."""
        if self.fuse_rotary is None:
            return fused_by_default(self.family.name) and device.type == "cuda"
        return bool(self.fuse_rotary)

    def fuses_rotary(self, device: torch.device) -> bool:
        """Whether :meth:`attend` applies a call's rotary in the pass that permutes token-major heads
        (fusion on, a plan and no observers: nothing reads q or k before the kernel; also in training)."""
        return (self.rotary_fused(device) and not self.observers and self.plan is not None
                and getattr(self.pattern_source, "plan", None) is self.plan)  # the plan's own source  # fmt: skip

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None, heads: range | None = None, observe: bool = True,
               rotary: Rotary | None = None) -> torch.Tensor:  # fmt: skip
        """Attention of one layer call: layout, text padding, patterns, kernel, timing, observers.

        ``heads``: the global indices of q's heads when they are a slice of the layer's (Ulysses);
        a pattern source may then return patterns for all heads (a plan) or for q's heads only.
        ``observe=False``: no timing and no observers (the compiled path's backward replays a call).
        ``rotary``: q and k are given before their rotary embedding; where :meth:`fuses_rotary` it is
        applied in the pass that permutes the token-major heads, else first (differentiably under autograd).
        """
        if rotary is not None and not self.fuses_rotary(q.device):
            q, k, rotary = *rotate(q, k, rotary), None
        elif rotary is not None and self.rotary_float32:
            rotary = self._float32_rotary(rotary)
        with self._timed(q, observe):
            layout, lengths = self._call_layout(q, key_mask)
            if lengths is None:
                out = self._attend(layer, q, k, v, layout, heads, observe, rotary)
            else:  # samples with different prompt lengths: one call per length
                q, k = rotate(q, k, rotary)
                out = torch.empty_like(q)
                for count, samples in lengths.items():
                    index = torch.tensor(samples, device=q.device)
                    out[index] = self._attend(layer, q[index], k[index], v[index], self._padded(layout, count), heads,
                                              observe)  # fmt: skip
        self.last_layout = layout
        return out

    def lse_route(self, layer: int, q, k, v, key_mask, rotary: Rotary | None) -> LseRoute | None:
        """How this call runs in the compiled op so that its backward needs only the call's output and LSE
        (:meth:`attend_keeping_lse`): a table on a backend with ``run_with_lse`` and ``run_backward`` through
        head order (``forward_with_lse``: triton, fa4), or dense patterns by cuDNN; None where the op's
        backward replays the call instead (observers, a rotary that cannot be fused, several prompt lengths,
        an online method's choice, all heads skipped, no such kernel). Asks the pattern source, as
        :meth:`attend` does."""
        if self.observers or (rotary is not None and not self.fuses_rotary(q.device)):
            return None
        layout, lengths = self._call_layout(q, key_mask)
        if lengths is not None:
            return None
        patterns = self.pattern_source(AttentionCall(self.steps.step, layer, q, k, v, layout, self, None))
        if rotary is not None:
            if not fused_pass_runs(q, rotary):
                return None
            rotary = self._float32_rotary(rotary) if self.rotary_float32 else rotary
        heads = q.shape[2]
        if patterns is None or (isinstance(patterns, Sequence) and len(patterns) == heads and all_dense(patterns)):
            return LseRoute(None, rotary, layout, "cudnn") if dense_kernels.lse_serves(q, k, v) else None
        if isinstance(patterns, BlockTable) and patterns.layout == layout and patterns.num_heads == heads:
            table = patterns
        elif isinstance(patterns, Sequence) and len(patterns) == heads:
            table = compile_layer(tuple(patterns), layout, self.block_size, q.device)  # cached by value
        else:
            return None
        name = registry.choose(self.backend, q, table).name
        module = registry.get(name).module
        if table.all_skip or not (hasattr(module, "run_with_lse") and hasattr(module, "run_backward")):
            return None
        if table.token_major_heads and not fused_pass_runs(q):
            return None
        return LseRoute(table, rotary, layout, name)

    def attend_keeping_lse(self, layer: int, q, k, v, key_mask, rotary: Rotary | None):
        """:meth:`attend` of the compiled op: ``(out, lse)``, the LSE (float32 [B, H, N]) where the call
        takes a :meth:`lse_route`, else None (the op's backward then replays the call)."""
        route = self.lse_route(layer, q, k, v, key_mask, rotary)
        if route is None:
            return self.attend(layer, q, k, v, key_mask, rotary=rotary), None
        scale = q.shape[-1] ** -0.5
        with self._timed(q):
            if route.table is None:
                q, k = rotate(q, k, route.rotary)
                out, lse = dense_kernels.forward_with_lse(q, k, v, kv_len=route.layout.kv_len, softmax_scale=scale)
            else:
                out, lse = forward_with_lse(q, k, v, route.table, scale, route.rotary, route.backend)
        self.last_layout = route.layout
        return out, lse

    def lse_backward(self, route: LseRoute, grad, q, k, v, out, lse):
        """``(dq, dk, dv)`` of :meth:`attend_keeping_lse`'s call along ``route`` from its output and LSE."""
        scale = q.shape[-1] ** -0.5
        if route.table is not None:
            return backward_from_lse(grad, q, k, v, out, lse, route.table, scale, route.rotary, route.backend)
        q, k = rotate(q, k, route.rotary)
        dq, dk, dv = dense_kernels.backward_from_lse(grad, q, k, v, out, lse, kv_len=route.layout.kv_len,
                                                     softmax_scale=scale)  # fmt: skip
        return (*rotate(dq, dk, route.rotary, transpose=True), dv)

    def _call_layout(self, q: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[VideoLayout, dict | None]:
        """``(layout, lengths)`` of a call: its layout padded to the prompt length where every sample has one,
        lengths None; where samples' prompt lengths differ, the unpadded layout and the samples by length."""
        layout = self.layout(q.shape[1])
        valid = self._text_valid(key_mask, layout, q.shape[0])
        if valid is None:
            return layout, None
        if len(valid) == 1:
            return self._padded(layout, next(iter(valid))), None
        return layout, valid

    def _attend(self, layer, q, k, v, layout, heads=None, observe=True, rotary=None) -> torch.Tensor:
        call = AttentionCall(self.steps.step, layer, q, k, v, layout, self, heads)
        patterns = self.pattern_source(call)
        if heads is not None and isinstance(patterns, Sequence) and len(patterns) != q.shape[2]:
            patterns = self._sliced(patterns, heads)
        out = self.compute(q, k, v, layout, patterns, rotary)
        for observer in self.observers if observe else ():
            observer(call, patterns, out)
        return out

    def compute(self, q, k, v, layout: VideoLayout, patterns: Sequence[Pattern] | BlockTable | HeadChoice | None,
                rotary: Rotary | None = None) -> torch.Tensor:  # fmt: skip
        """Attention of ``(B, N, H, D)`` tensors at ``layout`` with one pattern per head (``None``: dense),
        a compiled table of that layout, or a :class:`~sparse_vdit.patterns.HeadChoice` (each
        (sample, head) its chosen candidate). ``rotary``: q and k still need it (fused path)."""
        if rotary is not None:
            if isinstance(patterns, Sequence) and len(patterns) == q.shape[2] and not all_dense(patterns):
                table = compile_layer(tuple(patterns), layout, self.block_size, q.device)  # cached by value
                return attention_in_head_order(q, k, v, table, backend=self.backend, rotary=rotary)
            q, k = rotate(q, k, rotary)
        if isinstance(patterns, BlockTable):
            if patterns.layout != layout or patterns.num_heads != q.shape[2]:
                raise ValueError(f"a block table of {patterns.num_heads} heads at {patterns.layout.describe()} for a "
                                 f"call of {q.shape[2]} heads at {layout.describe()}")  # fmt: skip
            return sparse_attention(q, k, v, patterns, backend=self.backend)
        if hasattr(patterns, "attend"):  # a method's own runner (methods.cluster.PermutedTable: permuted per head)
            return patterns.attend(q, k, v, self.backend)
        if isinstance(patterns, HeadChoice):
            table = patterns.table(layout, self.block_size, q.device)  # cached by value
            return select_attention(q, k, v, table, patterns.selected, backend=self.backend)
        if patterns is not None and len(patterns) != q.shape[2]:
            raise ValueError(f"{len(patterns)} patterns for {q.shape[2]} heads")
        if patterns is None or all_dense(patterns):
            needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            use_fa4 = q.is_cuda and self.backend != "reference" and not needs_grad and resolve_backend(self.backend, q) == "fa4"
            return dense_kernels.forward(q, k, v, kv_len=layout.kv_len, softmax_scale=q.shape[-1] ** -0.5,
                                         use_fa4=use_fa4)  # fmt: skip
        table = compile_layer(tuple(patterns), layout, self.block_size, q.device)  # cached by value
        return sparse_attention(q, k, v, table, backend=self.backend)

    def _sliced(self, patterns: Sequence[Pattern], heads: range) -> tuple[Pattern, ...]:
        """The patterns of global ``heads``."""
        if heads.stop > len(patterns):
            raise ValueError(f"{len(patterns)} patterns for global heads {heads.start}..{heads.stop - 1}")
        return tuple(patterns[heads.start : heads.stop])

    def _float32_rotary(self, rotary: Rotary) -> Rotary:
        """``rotary`` with float32 tables, cast once per set of tables (every layer of a step shares
        them); the sources are held with the cast, so their memory cannot pass to other tables."""
        cos = rotary.cos
        key = (cos.device, cos.data_ptr(), rotary.sin.data_ptr(), tuple(cos.shape), cos.stride(0), cos.dtype, rotary.start,
               rotary.pairs, _version(cos), _version(rotary.sin))  # fmt: skip
        hit = self._memo.get("rotary_float32")
        if hit is None or hit[0] != key:
            hit = (key, rotary, in_float32(rotary))
            self._memo["rotary_float32"] = hit
        return hit[2]

    def _remember(self, key, value) -> None:
        if len(self._memo) > 4096:
            self._memo.clear()
        self._memo[key] = value

    def _padded(self, layout: VideoLayout, valid: int) -> VideoLayout:
        """``layout`` with ``valid`` real text tokens (padding after them), memoised."""
        if valid >= layout.text:
            return layout
        key = ("padded", layout, valid)
        hit = self._memo.get(key)
        if hit is None:
            hit = layout.with_text_valid(valid)
            self._remember(key, hit)
        return hit

    def _text_valid(self, key_mask: torch.Tensor | None, layout: VideoLayout, batch: int) -> dict[int, list[int]] | None:
        """Samples grouped by their number of real text tokens, from a ``[B, 1, 1, N]`` key mask.

        Read once per forward (one device-to-host copy); the mask must keep every video token and
        the first text tokens, as diffusers builds it.
        """
        if key_mask is None or not self.family.uses_key_mask or layout.text == 0:
            return None
        key = (self.steps.forwards, key_mask.data_ptr(), tuple(key_mask.shape), layout.num_tokens)
        if self._valid[0] == key:
            return self._valid[1]
        keep = key_mask.reshape(key_mask.shape[0], -1)
        keep = keep if keep.dtype == torch.bool else keep == 0  # additive masks: 0 keeps a key
        if keep.shape[1] != layout.num_tokens:
            raise RuntimeError(f"key mask of {keep.shape[1]} tokens for a sequence of {layout.num_tokens}")
        text = keep[:, layout.text_start :]
        counts = text.sum(-1)
        prefix = torch.arange(layout.text, device=text.device)[None, :] < counts[:, None]
        checks = torch.stack([(text == prefix).all(), keep[:, : layout.text_start].all()])
        values = torch.cat([counts.long(), checks.long()]).tolist()
        if not all(values[-2:]):
            raise RuntimeError("sparse-vdit: the attention mask must keep every video token and the first "
                               "text tokens, padding last (as diffusers builds it)")  # fmt: skip
        counts = values[:-2] * (batch if len(values) == 3 else 1)  # a mask of batch 1 broadcasts
        groups: dict[int, list[int]] = {}
        for sample, count in enumerate(counts):
            groups.setdefault(count, []).append(sample)
        self._valid = (key, groups)
        return groups

    # --- timing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _timed(self, like: torch.Tensor, on: bool = True):
        """Records the time of the call's attention inside it (with :attr:`timing` and ``on``)."""
        start = clock(like) if self.timing and on else None
        yield
        if start is not None:
            self._timings.append((self.steps.step, start, clock(like)))

    def attention_seconds(self) -> dict[int, float]:
        """Seconds spent in attention per step since the last :meth:`reset_timings` (synchronises)."""
        return seconds_per_step(self._timings)

    def reset_timings(self) -> None:
        self._timings.clear()

    def __repr__(self) -> str:
        source = "plan" if self.plan is not None and getattr(self.pattern_source, "plan", None) is self.plan else "custom"
        return (f"SparseState({self.spec.describe()}, patterns from {source}, backend={self.backend!r}, "
                f"block={self.block_size}, step={self.step}, generation={self.steps.generation})")  # fmt: skip


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class SparseAttnProcessor:
    """Diffusers attention processor of one self-attention layer (any supported family).

    Calls that are not the self-attention this family sparsifies go to ``original``.
    """

    def __init__(self, family: Family, layer: int, state: SparseState, original: Any) -> None:
        self.family, self.layer, self.state, self.original = family, layer, state, original
        # a tensor, not an int: torch.compile then does not specialise one block graph per layer
        self.layer_index = torch.tensor(layer)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ):
        family = self.family
        if not family.supports(attn, encoder_hidden_states, attention_mask):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # one GPU: the rotary goes to the attention step, which applies it in the pass that permutes
        # token-major heads where the call allows (state.fuses_rotary), else first, in one pass
        fuse = (self._parallel_config is None and self.state.rotary_fused(hidden_states.device)
                and fusable(family.name, attn, image_rotary_emb))  # fmt: skip
        projected = family.project(attn, hidden_states, encoder_hidden_states, None if fuse else image_rotary_emb)
        q, k, v = projected.q, projected.k, projected.v
        parts = rotary_parts(family.name, image_rotary_emb, projected.text, q.shape[-1], q.device) if fuse else None
        shards = head_shards(self._parallel_config, q.shape[2])  # None without context parallelism
        tokens = q.shape[1] if shards is None else shards.whole_tokens(q.shape[1], projected.text)
        key_mask = family.key_mask(attention_mask, tokens) if family.uses_key_mask else None
        heads = None
        if shards is not None:  # sequence shards -> (full sequence, this rank's heads)
            key_mask = shards.gather_mask(key_mask, q.shape[1], projected.text, family.text_position)
            q, k, v = shards.gather(q, k, v, projected.text, family.text_position)
            heads = shards.heads
        if torch.compiler.is_compiling():
            if heads is not None:
                raise NotImplementedError("sparse-vdit: torch.compile with context parallelism is not supported yet")
            timestep, grid = self.state.steps.traced or (None, None)  # set under torch.export only
            keep_lse = needs_grad(q, k, v)  # traced for training
            out = compiled_op.attention(q, k, v, key_mask, self.layer_index, self.state.handle,
                                        *(parts or (None, None, 0, "")), keep_lse, timestep,
                                        None if grid is None else list(grid))[0]  # fmt: skip
        else:
            out = self.state.attend(self.layer, q, k, v, key_mask, heads, rotary=rotary_of(*parts) if parts else None)
        if shards is not None:
            out = shards.scatter(out, projected.text, family.text_position)
        return family.finish(attn, out, projected)

    # diffusers' enable_parallelism sets ``processor._parallel_config`` on every processor that has
    # one; ours forwards it to the original, so remove() hands back correctly configured processors
    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.original._parallel_config = config

    # diffusers' set_attention_backend sets ``_attention_backend`` on every processor that has one:
    # it goes to the original (other calls, and after remove()), and the state warns once
    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        if hasattr(self.original, "_attention_backend"):
            self.original._attention_backend = backend
        self.state.backend_changed(backend)

    def __repr__(self) -> str:
        return f"SparseAttnProcessor({self.family.name}, layer={self.layer})"
