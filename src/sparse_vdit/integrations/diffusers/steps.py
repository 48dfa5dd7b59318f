"""Step tracking: which denoising step the transformer is at, and the latent grid of its input.

Diffusers does not tell attention processors the step. A forward pre-hook on the transformer
reads the timestep and the latent shape of every call:

- the first call, and any call whose timestep is *higher* than the previous one, starts a new
  generation at step 0 (diffusion timesteps only decrease within one generation);
- a call with the same timestep as the previous one is the same step (the second pass of
  classifier-free guidance run separately; a batched pass is one call anyway);
- a lower timestep is the next step.

With a pipeline, ``scheduler.set_timesteps`` (called at the start of every generation) also
resets the count, so a generation that starts at a lower timestep is still counted from 0.

The hook is one module-level function that finds the model's state on the model itself
(``model._sparse_vdit_state``), so ``copy.deepcopy`` of a patched model gives a copy whose hook
tracks the copy. Under ``torch.export`` the hook reads no number from the timestep: it hands the
timestep tensor and the latent grid to the processors (``StepTracker.traced``), which pass them to
the opaque attention op; the op counts the step at run time, in its first layer. Under
``torch.compile(mode="reduce-overhead")`` the hook runs outside the CUDA graphs, every call, and the
attention op between them (``processor.py``); a hand-made ``torch.cuda.graph`` capture is refused
(a replay would run no Python: the step and the plan's patterns would stay those of the capture).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class StepTracker:
    """Current step and generation, the last timestep, and the latent grid of the last call."""

    step: int = 0
    generation: int = 0
    forwards: int = 0  # transformer calls seen (also keys per-forward caches)
    last_timestep: float | None = None
    grid: tuple[int, int, int] | None = None  # (frames, height, width) after patchify
    num_steps: int | None = None  # from the scheduler, where a pipeline was given
    # (timestep tensor, grid) of the forward being traced by torch.export, else None
    traced: tuple[Any, tuple[int, int, int] | None] | None = field(default=None, repr=False)
    _fresh: bool = field(default=True, repr=False)

    def scheduler_steps(self) -> int | None:
        """Steps of the current generation per the scheduler (None if unknown)."""
        return self.num_steps

    def reset(self) -> None:
        """Make the next call step 0 of a new generation."""
        self._fresh = True
        self.last_timestep = None

    def observe(self, timestep: float, grid: tuple[int, int, int] | None = None) -> int:
        """Record one transformer call; returns its step."""
        last = self.last_timestep
        if self._fresh or last is None or timestep > last:
            if self.forwards:
                self.generation += 1
            self.step, self._fresh = 0, False
        elif timestep < last:
            self.step += 1
        self.last_timestep = timestep
        self.forwards += 1
        if grid is not None:
            self.grid = grid
        return self.step


def timestep_value(timestep: Any) -> float:
    """One number for a timestep argument: a scalar, or the largest entry of a tensor (one sync)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max()) if timestep.numel() else 0.0
    return float(timestep)


STATE_ATTR = "_sparse_vdit_state"  # the SparseState on a patched transformer


@functools.lru_cache(maxsize=64)
def _argument_names(cls: type) -> tuple[str, ...]:
    names = tuple(n for n in inspect.signature(cls.forward).parameters if n != "self")
    for needed in ("hidden_states", "timestep"):
        if needed not in names:
            raise TypeError(f"{cls.__name__}.forward has no {needed!r} argument; cannot track steps")
    return names


@torch.compiler.disable
def step_hook(module, args, kwargs):
    """The forward pre-hook: record the step and latent grid on ``module``'s own state."""
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        return
    inputs = dict(zip(_argument_names(type(module)), args))
    inputs.update(kwargs)
    hidden_states, timestep = inputs.get("hidden_states"), inputs.get("timestep")
    family, tracker = state.family, state.steps
    grid = family.latent_grid(module, hidden_states, inputs) if isinstance(hidden_states, torch.Tensor) else None
    state.check_processors(module)
    if torch.compiler.is_exporting():  # no host number from a traced tensor: the op counts at run time
        if timestep is not None and not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(float(timestep))
        tracker.traced = (timestep, grid)
        if grid is not None:
            tracker.grid = grid
        return
    tracker.traced = None
    if _capturing(timestep):
        raise RuntimeError(
            f"sparse-vdit: a patched {type(module).__name__} cannot be captured in a CUDA graph by hand "
            "(torch.cuda.graph): its step and plan are decided on the host every call, and a replay would "
            'freeze them; use torch.compile(model, mode="reduce-overhead"), whose CUDA graphs run the '
            "sparse attention between them at the current step"
        )
    tracker.observe(0.0 if timestep is None else timestep_value(timestep), grid)


def _capturing(timestep: Any) -> bool:
    """Whether a CUDA graph capture is running on the timestep's device (the hook must not read it)."""
    return isinstance(timestep, torch.Tensor) and timestep.is_cuda and torch.cuda.is_current_stream_capturing()


def install_step_hook(model: torch.nn.Module):
    """Register :func:`step_hook` on ``model`` (its state must be set as ``STATE_ATTR``)."""
    _argument_names(type(model))  # raises for a forward without hidden_states / timestep
    return model.register_forward_pre_hook(step_hook, with_kwargs=True)


def remove_step_hook(model: torch.nn.Module) -> None:
    """Remove every :func:`step_hook` from ``model`` (a deep copy's hooks included)."""
    for key, fn in list(model._forward_pre_hooks.items()):
        if fn is step_hook:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def wrap_scheduler(pipe: Any, tracker: StepTracker) -> Callable[[], None] | None:
    """Reset ``tracker`` whenever ``pipe.scheduler.set_timesteps`` runs; returns the undo function."""
    scheduler = getattr(pipe, "scheduler", None)
    original = getattr(scheduler, "set_timesteps", None)
    if original is None:
        return None
    had_own = "set_timesteps" in vars(scheduler)
    previous = vars(scheduler).get("set_timesteps")

    @functools.wraps(original)  # keeps the signature: pipelines inspect it for `timesteps` / `sigmas`
    def set_timesteps(*args, **kwargs):
        tracker.reset()
        result = original(*args, **kwargs)
        timesteps = getattr(scheduler, "timesteps", None)
        tracker.num_steps = None if timesteps is None else len(timesteps)
        return result

    scheduler.set_timesteps = set_timesteps

    def undo() -> None:
        if vars(scheduler).get("set_timesteps") is set_timesteps:
            if had_own:
                scheduler.set_timesteps = previous
            else:
                del scheduler.set_timesteps

    return undo
