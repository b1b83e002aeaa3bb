"""Contract checks for a mixer, runnable in one line on your own class or a registered name.

>>> from mixerzoo.testing import check_mixer
>>> check_mixer(MyMixer)                    # doctest: +SKIP  (a class built as cls(d, layer_idx=i))
>>> check_mixer("loglinear_adaptive")       # doctest: +SKIP  (a registry name)
>>> check_mixer(lambda d, i: MyMixer(d, layer_idx=i, kernel=3))   # doctest: +SKIP

``check_mixer`` raises :class:`MixerContractError` (an ``AssertionError``, so pytest shows it
as a plain test failure) at the first property that does not hold; its ``property`` attribute
names the property (one of :data:`PROPERTIES`) and the message carries the numbers.

The properties, in the order they are checked:

- ``module``: the factory returns an ``nn.Module``.
- ``meta``: the factory also runs under ``with torch.device("meta")`` and gives the same
  parameter count there, because parameter matching builds every mixer on the meta device.
- ``shape``: forward maps ``[B, T, D]`` to ``[B, T, D]`` of the input dtype, finite for
  finite input.
- ``causality``: replacing the inputs at positions ``>= t`` by large values leaves the outputs
  at positions ``< t`` unchanged.
- ``causality_nonfinite``: the same with ``inf`` / ``nan`` in the future; the outputs before
  ``t`` must stay finite and unchanged. Padded or packed batches can hold such values there;
  a masked matmul (``0 * inf = nan``) or an additive ``-inf`` mask (``nan + -inf = nan``)
  carries them into the past. Skip it with ``skip=("causality_nonfinite",)`` where a mixer
  only promises causality for finite input.
- ``step``: with ``init_state`` / ``step``, stepping token by token from ``init_state``
  equals forward (skipped when they raise ``NotImplementedError``, and with a warning when the
  module has no such methods: a plain causal ``nn.Module`` is a mixer that does not decode).
- ``prefill``: ``prefill`` of ``x[:, :split]`` from ``init_state``, then ``prefill`` of the
  rest, and steps of the rest, equal forward.
- ``state_size``: ``state_size(T)`` equals the elements actually held in the state after
  ``T`` tokens, per sequence (see :func:`state_numel`), for the states reached by steps and
  by prefills.
- ``gradients``: ``forward(x).sum().backward()`` gives finite gradients for ``x`` and every
  parameter that requires one, and at least one nonzero parameter gradient.
- ``forward_normed``: for a :class:`~mixerzoo.mixers.base.Mixer` (the block calls its
  ``forward_normed(x, norm)``), it equals ``forward(norm(x))`` for the block's RMSNorm (with
  a random gain), outputs and the gradients of ``x`` and the gain. Any other module passes: the
  block calls ``forward(norm(x))`` on it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["MixerContractError", "PROPERTIES", "check_mixer", "mixer_factory", "state_numel"]

PROPERTIES = (
    "module",
    "meta",
    "shape",
    "causality",
    "causality_nonfinite",
    "step",
    "prefill",
    "state_size",
    "gradients",
    "forward_normed",
)

# The small options a registered name (or a class) is built with when its constructor names
# them: the "tiny" size's defaults, and the torch path, so the checks run on the CPU without
# GPU kernels and in seconds.
CHECK_SIZE = "tiny"
CHECK_OPTIONS = {"backend": "torch"}

# How far the future is pushed in the causality check: a leak of even a small weight shows up
# far above any tolerance.
LARGE = 1e4


class MixerContractError(AssertionError):
    """A mixer broke the contract; ``property`` names which part (see ``PROPERTIES``)."""

    def __init__(self, prop: str, message: str):
        self.property = prop
        super().__init__(f"{prop}: {message}")


class _NotSupported(Exception):
    """The mixer does not implement an optional part of the contract (recurrent decoding)."""


# --- building ------------------------------------------------------------------------------


def mixer_factory(
    factory: Callable[..., Any] | type | str, options: dict[str, Any] | None = None
) -> tuple[Callable[[int, int], Any], str]:
    """``(build(d_model, layer_idx), label)`` for a name, a class or a callable.

    A registered name is built with its registry options; a name or a class gets the check's
    small options (``CHECK_SIZE``'s mixer defaults, ``backend="torch"``) where the constructor
    names them, under ``options``; a plain callable is called as ``factory(d_model, layer_idx)``.
    """
    from .models.sizes import get_size, size_defaults
    from .registry import construct_mixer, get_mixer_spec, resolve_mixer_class

    if isinstance(factory, str):
        spec = get_mixer_spec(factory)
        cls = resolve_mixer_class(factory, spec)
        base, name = {**spec.options, **(options or {})}, factory
    elif isinstance(factory, type):
        cls, base, name = factory, dict(options or {}), factory.__name__
    elif callable(factory):
        if options:
            raise TypeError("check_mixer: options= applies to a mixer name or class, not to a callable")
        label = getattr(factory, "__qualname__", repr(factory))
        return (lambda d, i: factory(d, i)), label
    else:
        raise TypeError(
            f"check_mixer: expected a registered mixer name, a mixer class or a callable "
            f"(d_model, layer_idx) -> nn.Module, got {type(factory).__name__}"
        )
    small = _small_options(cls, size_defaults(cls, get_size(CHECK_SIZE), {}))
    built = {**small, **base}
    return (lambda d, i: construct_mixer(cls, d, i, built, name)), f"{name} {built}"


def _small_options(cls: type, size_opts: dict[str, Any]) -> dict[str, Any]:
    from .registry import accepted_options

    named, _ = accepted_options(cls)
    return {**size_opts, **{k: v for k, v in CHECK_OPTIONS.items() if k in named}}


# --- state counting ------------------------------------------------------------------------


def state_numel(state: Any, batch: int) -> int:
    """Elements held by a decoding state, per sequence: every tensor found in ``state``
    (tensors, dataclasses, named/plain tuples, lists, dicts, objects' attributes), each tensor
    object counted once, the total divided by ``batch``. Python numbers (a position counter)
    and ``None`` hold no elements. Tensors are counted as allocated, so preallocated but
    still unused slots count too, as they do in memory.
    """
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, path: str) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel()
        elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            return
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                visit(getattr(obj, f.name), f"{path}.{f.name}")
        elif isinstance(obj, (tuple, list)):
            for i, item in enumerate(obj):
                visit(item, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for key, item in obj.items():
                visit(item, f"{path}[{key!r}]")
        elif hasattr(obj, "__dict__"):
            for key, item in vars(obj).items():
                visit(item, f"{path}.{key}")
        else:
            raise TypeError(f"cannot count the elements of state part {path} ({type(obj).__name__})")

    visit(state, "state")
    if total % batch:
        raise ValueError(f"the state holds {total} elements, not a multiple of the batch {batch}")
    return total // batch


# --- comparisons ---------------------------------------------------------------------------


def _diff(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str | None:
    """None when close; else where and by how much, for the failure message.

    ``actual`` / ``expected`` are ``[B, T, D]``; non-finite entries on either side count as
    mismatches unless both are the same non-finite value.
    """
    a, e = actual.detach().double(), expected.detach().double()
    close = torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bool(close.all()):
        return None
    bad = ~close
    per_pos = bad.any(dim=0).any(dim=-1) if bad.dim() == 3 else bad.reshape(-1)
    first = int(per_pos.nonzero()[0]) if per_pos.any() else -1
    err = (a - e).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    ref = e.abs().max().item()
    return (
        f"{int(bad.sum())} of {bad.numel()} elements differ, first at position {first} of the compared span; "
        f"max |diff| = {err.max().item():.3g} (|expected| max {ref:.3g}, atol={atol:g}, rtol={rtol:g})"
    )


def _fail(prop: str, label: str, message: str) -> MixerContractError:
    return MixerContractError(prop, f"{label}: {message}")


class _Checker:
    def __init__(self, build, label, d_model, batch, seq_len, split, dtype, device, atol, rtol, seed, skip=()):
        self.build, self.label, self.skip = build, label, frozenset(skip)
        self.d, self.B, self.T, self.split = d_model, batch, seq_len, split
        self.dtype, self.device = dtype, torch.device(device)
        self.atol, self.rtol = atol, rtol
        self.gen = torch.Generator().manual_seed(seed)

    def fail(self, prop: str, message: str) -> MixerContractError:
        return _fail(prop, self.label, message)

    def randn(self, *shape: int) -> torch.Tensor:
        # A fresh draw for every check, reproducible through the one seeded generator.
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)

    def run(self, prop: str, fn, *args):
        """Call the mixer; an exception it raises is a failure of the property being checked."""
        try:
            return fn(*args)
        except MixerContractError:
            raise
        except NotImplementedError as e:
            raise _NotSupported(str(e)) from e
        except Exception as e:
            raise self.fail(prop, f"raised {type(e).__name__}: {e}") from e

    # --- properties ------------------------------------------------------------------------

    def module(self) -> nn.Module:
        try:
            mixer = self.build(self.d, 0)
        except Exception as e:
            raise self.fail("module", f"construction as (d_model={self.d}, layer_idx=0) raised "
                                      f"{type(e).__name__}: {e}") from e
        if not isinstance(mixer, nn.Module):
            raise self.fail("module", f"the factory returned a {type(mixer).__name__}, not an nn.Module")
        with torch.no_grad():
            # Parameters initialised to exactly zero (an output layer that starts switched
            # off) get small random values, so the paths behind them take part in the checks.
            for p in mixer.parameters():
                if p.is_floating_point() and not bool(p.any()):
                    p.copy_(0.1 * torch.randn(p.shape, generator=self.gen).to(p))
        # eval: dropout and other train-only randomness would make two forwards differ.
        return mixer.to(self.device, self.dtype).eval()

    def meta(self, mixer: nn.Module) -> None:
        try:
            with torch.device("meta"):
                on_meta = self.build(self.d, 0)
        except Exception as e:
            raise self.fail(
                "meta",
                f"construction under `with torch.device('meta')` raised {type(e).__name__}: {e}. "
                "Parameter counting builds mixers on the meta device: the constructor must not "
                "read tensor values (.item(), .tolist(), data-dependent branches)",
            ) from e
        if not isinstance(on_meta, nn.Module):
            raise self.fail("meta", f"on the meta device the factory returned a {type(on_meta).__name__}")
        n_meta = sum(p.numel() for p in on_meta.parameters())
        n_real = sum(p.numel() for p in mixer.parameters())
        if n_meta != n_real:
            raise self.fail("meta", f"{n_meta} parameters when built on the meta device, {n_real} otherwise")

    def shape(self, mixer: nn.Module) -> None:
        x = self.randn(self.B, self.T, self.d)
        with torch.no_grad():
            y = self.run("shape", mixer, x)
        if not isinstance(y, torch.Tensor):
            raise self.fail("shape", f"forward returned a {type(y).__name__}, not a tensor")
        if tuple(y.shape) != tuple(x.shape):
            raise self.fail("shape", f"forward mapped [B, T, D] = {list(x.shape)} to {list(y.shape)}")
        if y.dtype != x.dtype:
            raise self.fail("shape", f"forward returned {y.dtype} for {x.dtype} input")
        if not bool(torch.isfinite(y).all()):
            n = int((~torch.isfinite(y)).sum())
            raise self.fail("shape", f"{n} non-finite outputs for finite random input")

    def cut_points(self) -> list[int]:
        return sorted({t for t in (1, self.split, self.T - 1) if 0 < t < self.T})

    def causality(self, mixer: nn.Module, nonfinite: bool) -> None:
        prop = "causality_nonfinite" if nonfinite else "causality"
        x = self.randn(self.B, self.T, self.d)
        with torch.no_grad():
            y = self.run(prop, mixer, x)
            for t in self.cut_points():
                if nonfinite:
                    # inf, -inf and nan in turn over the future positions and channels.
                    future = torch.tensor([math.inf, -math.inf, math.nan], dtype=x.dtype)
                    idx = torch.arange((self.T - t) * self.d).reshape(self.T - t, self.d) % 3
                    fill = future[idx].to(self.device).expand(self.B, -1, -1)
                    what = "inf/-inf/nan"
                else:
                    fill = LARGE * self.randn(self.B, self.T - t, self.d)
                    what = f"random values of scale {LARGE:g}"
                x2 = x.clone()
                x2[:, t:] = fill
                y2 = self.run(prop, mixer, x2)
                past = y2[:, :t]
                if nonfinite and not bool(torch.isfinite(past).all()):
                    bad = (~torch.isfinite(past)).any(dim=0).any(dim=-1).nonzero().flatten().tolist()
                    raise self.fail(
                        prop,
                        f"with {what} at positions >= {t} of T = {self.T}, the outputs at "
                        f"positions {bad} (< {t}) became non-finite",
                    )
                diff = _diff(past, y[:, :t], self.atol, self.rtol)
                if diff:
                    raise self.fail(
                        prop,
                        f"replacing the inputs at positions >= {t} of T = {self.T} by {what} "
                        f"changed the outputs before {t}: {diff}",
                    )

    def init(self, mixer: nn.Module):
        return mixer.init_state(self.B, self.device, self.dtype)

    def steps(self, mixer, x, state, prop):
        ys = []
        for t in range(x.shape[1]):
            out = self.run(prop, mixer.step, x[:, t], state)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise self.fail(prop, f"step must return (y_t, state), got {type(out).__name__}")
            y_t, state = out
            if not isinstance(y_t, torch.Tensor) or tuple(y_t.shape) != (self.B, self.d):
                got = list(y_t.shape) if isinstance(y_t, torch.Tensor) else type(y_t).__name__
                raise self.fail(prop, f"step returned y_t {got}, expected [B, D] = {[self.B, self.d]}")
            ys.append(y_t)
        return torch.stack(ys, dim=1), state

    def state_size(self, mixer, state, T: int, how: str) -> None:
        if "state_size" in self.skip:
            return
        try:
            held = state_numel(state, self.B)
        except (TypeError, ValueError) as e:
            raise self.fail("state_size", f"after {how}: {e}") from e
        try:
            claimed = mixer.state_size(T)
        except NotImplementedError:
            raise self.fail("state_size", "the mixer decodes (init_state/step) but does not implement state_size")
        except Exception as e:
            raise self.fail("state_size", f"state_size({T}) raised {type(e).__name__}: {e}") from e
        if claimed != held:
            raise self.fail(
                "state_size",
                f"state_size({T}) = {claimed}, but the state after {how} holds {held} elements per "
                f"sequence (every tensor in it, as allocated, / batch {self.B})",
            )

    def decoding(self, mixer: nn.Module) -> bool:
        """step, prefill and state_size; False when the mixer does not decode."""
        missing = [m for m in ("init_state", "step") if not callable(getattr(mixer, m, None))]
        if missing:
            # any causal nn.Module is a mixer; decoding is the optional part of the contract
            warnings.warn(f"{self.label}: no {' / '.join(missing)}, so the decoding checks (step, prefill, "
                          "state_size) were skipped; subclass mixerzoo.mixers.base.Mixer to decode", stacklevel=3)
            return False
        x = self.randn(self.B, self.T, self.d)
        a = self.split
        with torch.no_grad():
            y = self.run("step", mixer, x)
            try:
                state0 = self.run("step", self.init, mixer)
                self.state_size(mixer, state0, 0, "init_state")
                ys, state = self.steps(mixer, x, state0, "step")
            except _NotSupported:
                return False
            diff = None if "step" in self.skip else _diff(ys, y, self.atol, self.rtol)
            if diff:
                raise self.fail("step", f"{self.T} steps from init_state vs forward: {diff}")
            self.state_size(mixer, state, self.T, f"{self.T} steps")
            if "prefill" in self.skip:
                return True
            try:
                out = self.run("prefill", mixer.prefill, x[:, :a], self.init(mixer))
            except _NotSupported:
                return True
            y_a, state_a = self._prefill_out(out, a)
            diff = _diff(y_a, y[:, :a], self.atol, self.rtol)
            if diff:
                raise self.fail("prefill", f"prefill of x[:, :{a}] from init_state vs forward: {diff}")
            self.state_size(mixer, state_a, a, f"a prefill of {a} tokens")
            # The state is reused by both continuations: a mixer must not change it in place.
            y_b, state_b = self._prefill_out(self.run("prefill", mixer.prefill, x[:, a:], state_a), self.T - a)
            diff = _diff(y_b, y[:, a:], self.atol, self.rtol)
            if diff:
                raise self.fail("prefill", f"prefill of x[:, {a}:] after a prefill of {a} tokens vs forward: {diff}")
            self.state_size(mixer, state_b, self.T, f"prefills of {a} and {self.T - a} tokens")
            ys_b, _ = self.steps(mixer, x[:, a:], state_a, "prefill")
            diff = _diff(ys_b, y[:, a:], self.atol, self.rtol)
            if diff:
                raise self.fail("prefill", f"steps of x[:, {a}:] after a prefill of {a} tokens vs forward: {diff}")
        return True

    def _prefill_out(self, out, T: int):
        if not (isinstance(out, tuple) and len(out) == 2):
            raise self.fail("prefill", f"prefill must return (y, state), got {type(out).__name__}")
        y, state = out
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (self.B, T, self.d):
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise self.fail("prefill", f"prefill returned y {got}, expected [B, T, D] = {[self.B, T, self.d]}")
        return y, state

    def gradients(self, mixer: nn.Module) -> None:
        x = self.randn(self.B, self.T, self.d).requires_grad_(True)
        params = [(n, p) for n, p in mixer.named_parameters() if p.requires_grad]
        for _, p in params:
            p.grad = None
        with torch.enable_grad():
            y = self.run("gradients", mixer, x)
            self.run("gradients", lambda: y.sum().backward())
        if x.grad is None:
            raise self.fail("gradients", "forward(x).sum() has no gradient with respect to x")
        if not bool(torch.isfinite(x.grad).all()):
            raise self.fail("gradients", f"{int((~torch.isfinite(x.grad)).sum())} non-finite entries in the gradient of x")
        missing = [n for n, p in params if p.grad is None]
        if missing:
            raise self.fail(
                "gradients",
                f"parameters that require grad but get none from forward: {missing} "
                "(unused in forward; DDP without find_unused_parameters fails on them)",
            )
        bad = {n: int((~torch.isfinite(p.grad)).sum()) for n, p in params if not bool(torch.isfinite(p.grad).all())}
        if bad:
            raise self.fail("gradients", f"non-finite gradient entries per parameter: {bad}")
        if params and not any(bool(p.grad.any()) for _, p in params):
            raise self.fail("gradients", f"all {len(params)} parameter gradients are zero")
        mixer.zero_grad(set_to_none=True)

    def forward_normed(self, mixer: nn.Module) -> None:
        from .mixers.base import Mixer
        from .models.backbone import RMSNorm

        if not isinstance(mixer, Mixer):
            return  # the block calls forward(norm(x)) on any other module

        norm = RMSNorm(self.d, kernels=getattr(mixer, "kernels", "reference")).to(self.device, self.dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * self.randn(self.d))
        x, g = self.randn(self.B, self.T, self.d), self.randn(self.B, self.T, self.d)
        outs, grads = [], []
        for fn in (lambda v: mixer(norm(v)), lambda v: mixer.forward_normed(v, norm)):
            v = x.clone().requires_grad_(True)
            norm.weight.grad = None
            with torch.enable_grad():
                y = self.run("forward_normed", fn, v)
                self.run("forward_normed", lambda: (y * g).sum().backward())
            outs.append(y.detach())
            grads.append((v.grad, norm.weight.grad))
        mixer.zero_grad(set_to_none=True)
        for what, a, b in (("output", outs[1], outs[0]), ("gradient of x", grads[1][0], grads[0][0]),
                           ("gradient of the norm's gain", grads[1][1], grads[0][1])):
            if a is None or b is None:
                raise self.fail("forward_normed", f"{what}: missing on one side")
            diff = _diff(a, b, self.atol, self.rtol)
            if diff:
                raise self.fail("forward_normed", f"forward_normed(x, norm) differs from forward(norm(x)) in the {what}: {diff}")


def check_mixer(
    factory: Callable[..., Any] | type | str,
    *,
    d_model: int = 32,
    batch: int = 2,
    seq_len: int = 23,
    split: int = 9,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    atol: float = 1e-4,
    rtol: float = 1e-4,
    options: dict[str, Any] | None = None,
    skip: tuple[str, ...] | list[str] = (),
    seed: int = 0,
) -> None:
    """Check the mixer contract; raise :class:`MixerContractError` at the first failure.

    ``factory``: a callable ``(d_model, layer_idx) -> nn.Module``, a mixer class (built as
    ``cls(d_model, layer_idx=i, **options)``), or a registered mixer name. A name or a class
    gets small options where its constructor names them (the ``tiny`` size's ``head_dim``,
    ``d_state``, ``lambda_hidden`` and ``backend="torch"``); ``options`` overrides them.
    Inputs are ``[batch, seq_len, d_model]`` of ``dtype`` on ``device``; ``split`` is where
    the prefill check cuts the sequence. Tolerances apply to every output comparison.
    ``skip`` names properties (from ``PROPERTIES``) not to check, e.g. a known limitation.
    The global torch RNG is left as it was; the checks draw from a generator seeded by ``seed``.
    """
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    unknown = sorted(set(skip) - set(PROPERTIES))
    if unknown or "module" in skip:
        raise ValueError(f"skip: {unknown or ['module']} cannot be skipped; choose from {PROPERTIES[1:]}")
    if not 0 < split < seq_len:
        raise ValueError(f"need 0 < split < seq_len, got split={split}, seq_len={seq_len}")
    build, label = mixer_factory(factory, options)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Constructors draw their initial weights from the global RNG: seed it for
        # reproducible parameters without disturbing the caller's stream.
        torch.manual_seed(seed)
        c = _Checker(build, label, d_model, batch, seq_len, split, dtype, device, atol, rtol, seed, skip)
        mixer = c.module()
        if "meta" not in skip:
            c.meta(mixer)
        if "shape" not in skip:
            c.shape(mixer)
        if "causality" not in skip:
            c.causality(mixer, nonfinite=False)
        if "causality_nonfinite" not in skip:
            c.causality(mixer, nonfinite=True)
        if not {"step", "prefill", "state_size"} <= set(skip):
            c.decoding(mixer)
        if "gradients" not in skip:
            c.gradients(mixer)
        if "forward_normed" not in skip:
            c.forward_normed(mixer)
