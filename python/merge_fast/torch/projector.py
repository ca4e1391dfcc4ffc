"""Gradient projection out of protected subspaces ("subspace mask").

A mask protects, per weight matrix ``W`` (stored layout, shape ``(out, in)`` for ``nn.Linear``),
a left subspace ``span(U)`` (``U``: ``(out, r)``) and optionally a right subspace ``span(V)``
(``V``: ``(in, r)``), typically the top-r singular vectors of ``W_IT - W_PT`` (computed by the
Rust side and written as safetensors with keys ``<param name>.U`` / ``<param name>.V``).

Exact definition (``P_U = U Uᵀ``, ``P_V = V Vᵀ``, columns orthonormalized with QR)::

    kept(G)      = (I - P_U) G (I - P_V)          # (I - P_V) dropped when no V is given
    in_subspace  = G - kept(G)  = P_U G + G P_V - P_U G P_V
    mode="project":     G' = kept(G)                           (strength is ignored)
    mode="scale_mask":  G' = G - strength * in_subspace(G)     (in-subspace part x (1 - strength))

So with ``V`` the projection is **two-sided**: ``G - U Uᵀ G`` and then ``G - G V Vᵀ``; the
resulting update ``ΔW`` satisfies ``Uᵀ ΔW = 0`` (no change of the outputs along ``U``) and
``ΔW V = 0`` (no change of how inputs along ``V`` are mapped). This is the complement of the
whole "cross" ``P_U G + G P_V - P_U G P_V``, not just of the block ``P_U G P_V``. 1-D
parameters (biases, norms) take ``U`` only (``G - U Uᵀ G``); parameters with more than two
dimensions are treated as ``(shape[0], prod(rest))``.

LoRA (PEFT): for a LoRA-wrapped linear layer the base weight is frozen and the update is
``ΔW = s · B A`` with ``B = lora_B`` ``(out, r_lora)`` and ``A = lora_A`` ``(r_lora, in)``.
``Uᵀ ΔW = s (Uᵀ B) A`` vanishes when ``Uᵀ B = 0``, and ``ΔW V = s B (A V)`` vanishes when
``A V = 0``. Hence B's gradient gets the **left** projection ``(I - P_U) G_B`` and A's gradient
the **right** projection ``G_A (I - P_V)``. PEFT initializes ``B = 0``, so the left side is
protected exactly from the first step; ``A`` starts random, so ``A V != 0`` at init and
``B (A V)`` can still move along ``V`` unless A's init is projected too
(``lora_project_init=True`` does that once at registration). For ``fan_in_fan_out`` layers
(GPT-2 ``Conv1D``; stored weight ``(in, out)``, ``ΔW_stored = (B A)ᵀ``) the roles of U and V
are swapped accordingly. A mask for ``X.weight`` is matched to the LoRA layer ``X`` of the
PEFT model (``base_model.model.X``) automatically.

Optimizers: with plain SGD (and SGD + momentum: the momentum buffer is a sum of projected
gradients) the gradient hooks are enough: the update lies in the projected space. Adam/AdamW
rescale each element by ``1/sqrt(v)``, which rotates an update back into the protected
subspace (and AdamW's weight decay shrinks the protected part of ``W`` as well). For them call
:meth:`SubspaceProjector.reproject_parameters` after every ``optimizer.step()``: it projects the
parameter change since the previous call (or registration) exactly like a gradient
(``W <- W_prev + transform(W - W_prev)``), so the accumulated change stays out of the
subspace (``project``) or has its in-subspace part scaled by ``(1 - strength)`` per step
(``scale_mask``). This needs a reference copy of each protected tensor
(``keep_reference=True``, the default; memory = the protected tensors once more).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Mapping, Optional, Union

import torch

__all__ = ["SubspaceProjector", "load_masks", "save_masks"]


def load_masks(path: Union[str, os.PathLike], device="cpu") -> Dict[str, Dict[str, torch.Tensor]]:
    """Read a mask file: safetensors with keys ``<param name>.U`` (``(out, r)``) and optionally
    ``<param name>.V`` (``(in, r)``). Returns ``{param name: {"U": ..., "V": ...}}``. Other
    suffixes (e.g. ``.S`` singular values) are kept under their suffix and ignored by the
    projector."""
    from safetensors import safe_open

    masks: Dict[str, Dict[str, torch.Tensor]] = {}
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            name, dot, suffix = key.rpartition(".")
            if not dot or not name:
                raise ValueError(f"{path}: key {key!r} is not of the form '<param>.U' / "
                                 f"'<param>.V'")
            masks.setdefault(name, {})[suffix] = f.get_tensor(key)
    for name, m in masks.items():
        if "U" not in m and "V" not in m:
            raise ValueError(f"{path}: mask for {name!r} has neither '.U' nor '.V' "
                             f"(keys: {sorted(m)})")
    return masks


def save_masks(masks: Mapping[str, Mapping[str, torch.Tensor]], path: Union[str, os.PathLike],
               metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write masks in the ``<name>.U`` / ``<name>.V`` safetensors layout (for tests/tools)."""
    from safetensors.torch import save_file

    flat = {f"{n}.{k}": t.detach().cpu().contiguous() for n, m in masks.items()
            for k, t in m.items()}
    save_file(flat, os.fspath(path), metadata=dict(metadata or {}))


def _orthonormal(M: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(M.float(), mode="reduced")
    return Q


class _Target:
    __slots__ = ("name", "param", "left", "right", "kind", "ref", "handle")

    def __init__(self, name, param, left, right, kind):
        self.name = name
        self.param = param
        self.left = left    # (rows, r) or None
        self.right = right  # (cols, r) or None
        self.kind = kind    # "plain" | "lora_A" | "lora_B"
        self.ref = None
        self.handle = None


class SubspaceProjector:
    """Register gradient hooks that remove (``mode="project"``) or scale down
    (``mode="scale_mask"``, by ``1 - strength``) the component of each masked parameter's
    gradient that lies in its protected subspace. See the module docstring for the math.

    Args:
      model: ``nn.Module`` (plain model or PEFT ``PeftModel``/``LoraModel``).
      masks: ``{param name: {"U": (out, r) tensor, optional "V": (in, r) tensor}}`` keyed by the
        base model's parameter names (e.g. ``model.layers.0.self_attn.q_proj.weight``); a path
        to a mask safetensors file is accepted too (see :func:`load_masks`).
      mode: ``"project"`` or ``"scale_mask"``.
      strength: fraction of the in-subspace component removed in ``scale_mask`` mode.
      adapter_name: LoRA adapter(s) to hook (default: the layer's active adapters).
      strict: unknown mask names raise ``KeyError`` (else: warning, skipped).
      orthonormalize: QR-orthonormalize U and V (keep True unless they already are).
      keep_reference: keep a copy of each protected tensor for :meth:`reproject_parameters`.
      lora_project_init: for LoRA layers with a V mask, project A's current value out of
        ``span(V)`` once at registration (mode "project" only), making ``ΔW V = 0`` exact.

    Usage::

        with SubspaceProjector(model, load_masks("masks.safetensors")) as proj:
            for batch in data:
                loss = model(**batch).loss; loss.backward()
                opt.step(); proj.reproject_parameters(); opt.zero_grad()
    """

    def __init__(self, model: torch.nn.Module,
                 masks: Union[str, os.PathLike, Mapping[str, Mapping[str, torch.Tensor]]],
                 mode: str = "project", strength: float = 1.0, *,
                 adapter_name: Union[None, str, List[str]] = None, strict: bool = True,
                 orthonormalize: bool = True, keep_reference: bool = True,
                 lora_project_init: bool = False):
        if mode not in ("project", "scale_mask"):
            raise ValueError(f"mode must be 'project' or 'scale_mask', got {mode!r}")
        if not (0.0 <= float(strength) <= 1.0):
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if isinstance(masks, (str, os.PathLike)):
            masks = load_masks(masks)
        self.model = model
        self.mode = mode
        self.strength = 1.0 if mode == "project" else float(strength)
        self.targets: List[_Target] = []
        self._orth = orthonormalize
        self._removed = False

        params = dict(model.named_parameters(remove_duplicate=False))
        modules = dict(model.named_modules())
        try:
            for name, m in masks.items():
                U = m.get("U")
                V = m.get("V")
                if U is None and V is None:
                    raise ValueError(f"mask for {name!r} has neither 'U' nor 'V'")
                found = self._resolve(name, U, V, params, modules, adapter_name)
                if not found:
                    msg = (f"mask {name!r} matches no parameter or LoRA layer of the model")
                    if strict:
                        raise KeyError(msg)
                    warnings.warn(msg + "; skipped")
                    continue
                for t in found:
                    self._add(t, keep_reference)
                    if (lora_project_init and t.kind == "lora_A" and t.right is not None
                            and self.mode == "project"):
                        with torch.no_grad():
                            W = t.param
                            W.copy_(self._transform(W.float(), t.left, t.right, 1.0).to(W.dtype))
                            if t.ref is not None:
                                t.ref.copy_(W)
        except BaseException:
            self.remove()  # no hook left behind on a bad mask
            raise

    # ------------------------------------------------------------------ resolution
    def _check(self, name, what, M, dim, pname):
        if M is None:
            return None
        if M.dim() != 2 or M.shape[0] != dim:
            raise ValueError(f"mask {name!r}: {what} has shape {tuple(M.shape)}, expected "
                             f"({dim}, r) for parameter {pname!r}")
        return M

    def _prep(self, M, device):
        if M is None:
            return None
        M = _orthonormal(M) if self._orth else M.float()
        return M.to(device)

    def _resolve(self, name, U, V, params, modules, adapter_name) -> List[_Target]:
        # 1. a LoRA layer whose base weight is `name`
        mod_path = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod_path is not None:
            lora_mods = [(mn, mod) for mn, mod in modules.items()
                         if (mn == mod_path or mn.endswith("." + mod_path))
                         and hasattr(mod, "lora_A") and hasattr(mod, "lora_B")
                         and isinstance(getattr(mod, "lora_A"), torch.nn.ModuleDict)]
            if len(lora_mods) > 1:
                raise ValueError(f"mask {name!r} matches several LoRA layers: "
                                 f"{[mn for mn, _ in lora_mods]}")
            if lora_mods:
                return self._lora_targets(name, U, V, *lora_mods[0], adapter_name)
        # 2. a plain parameter (exact name, or unique suffix match, e.g. under a wrapper)
        if name in params:
            pname = name
        else:
            cands = [pn for pn in params if pn.endswith("." + name)]
            if len(cands) > 1:
                raise ValueError(f"mask {name!r} matches several parameters: {cands}")
            if not cands:
                return []
            pname = cands[0]
        p = params[pname]
        if p.dim() == 0:
            raise ValueError(f"mask {name!r}: parameter {pname!r} is a scalar")
        rows = p.shape[0]
        cols = p[0].numel() if p.dim() > 1 else None
        self._check(name, "U", U, rows, pname)
        if V is not None:
            if cols is None:
                raise ValueError(f"mask {name!r}: V given for 1-D parameter {pname!r}")
            self._check(name, "V", V, cols, pname)
        if not p.requires_grad:
            warnings.warn(f"mask {name!r}: parameter {pname!r} does not require grad; "
                          f"hook not registered")
            return [_Target(pname, p, None, None, "frozen")]
        return [_Target(pname, p, self._prep(U, p.device), self._prep(V, p.device), "plain")]

    def _lora_targets(self, name, U, V, mn, mod, adapter_name) -> List[_Target]:
        if adapter_name is None:
            adapters = list(getattr(mod, "active_adapters", None) or mod.lora_A.keys())
        elif isinstance(adapter_name, str):
            adapters = [adapter_name]
        else:
            adapters = list(adapter_name)
        fan_in_fan_out = bool(getattr(mod, "fan_in_fan_out", False))
        # mask U/V are over the rows/cols of the *stored* base weight; map to (out, in)
        left, right = (V, U) if fan_in_fan_out else (U, V)
        out = []
        for a in adapters:
            if a not in mod.lora_A:
                continue
            A = mod.lora_A[a].weight  # (r, in)
            B = mod.lora_B[a].weight  # (out, r)
            if A.dim() != 2 or B.dim() != 2:
                raise ValueError(f"mask {name!r}: LoRA layer {mn!r} adapter {a!r} is not a "
                                 f"linear LoRA (lora_A {tuple(A.shape)}, lora_B "
                                 f"{tuple(B.shape)})")
            self._check(name, "U" if not fan_in_fan_out else "V", left, B.shape[0],
                        f"{mn}.lora_B.{a}.weight")
            self._check(name, "V" if not fan_in_fan_out else "U", right, A.shape[1],
                        f"{mn}.lora_A.{a}.weight")
            if left is not None:
                out.append(_Target(f"{mn}.lora_B.{a}.weight", B, self._prep(left, B.device),
                                   None, "lora_B"))
            if right is not None:
                out.append(_Target(f"{mn}.lora_A.{a}.weight", A, None,
                                   self._prep(right, A.device), "lora_A"))
        return out

    def _add(self, t: _Target, keep_reference: bool):
        if t.kind == "frozen":
            return
        for o in self.targets:
            if o.param is t.param:  # tied weights: one hook per tensor, never two
                raise ValueError(f"masks for {o.name!r} and {t.name!r} target the same (tied) "
                                 f"tensor; give one mask per shared tensor")
        if keep_reference:
            t.ref = t.param.detach().clone()
        t.handle = t.param.register_hook(self._make_hook(t))
        self.targets.append(t)

    # ------------------------------------------------------------------ math
    @staticmethod
    def _transform(G: torch.Tensor, left, right, s: float) -> torch.Tensor:
        """G - s * (G - (I - P_left) G (I - P_right)), in float32, G's shape."""
        shape = G.shape
        K = G.float()
        K = K.reshape(shape[0], -1) if K.dim() > 1 else K.reshape(-1, 1)
        kept = K
        if left is not None:
            kept = kept - left @ (left.T @ kept)
        if right is not None:
            kept = kept - (kept @ right) @ right.T
        if s == 1.0:
            out = kept
        else:
            out = K - s * (K - kept)
        return out.reshape(shape)

    def _make_hook(self, t: _Target):
        def hook(g):
            return self._transform(g, t.left, t.right, self.strength).to(g.dtype)

        return hook

    def project_gradient(self, name: str, G: torch.Tensor) -> torch.Tensor:
        """Apply this projector's transform to ``G`` as if it were the gradient of the target
        ``name`` (a name from :attr:`target_names`)."""
        for t in self.targets:
            if t.name == name:
                return self._transform(G, t.left, t.right, self.strength).to(G.dtype)
        raise KeyError(name)

    @property
    def target_names(self) -> List[str]:
        """Names of the hooked parameters (LoRA: ``...lora_B.<adapter>.weight`` etc.)."""
        return [t.name for t in self.targets]

    # ------------------------------------------------------------------ Adam support
    @torch.no_grad()
    def reproject_parameters(self) -> None:
        """Project the parameter change since the previous call (or registration) like a
        gradient: ``W <- W_prev + transform(W - W_prev)``. Call after each
        ``optimizer.step()`` with Adam/AdamW (see module docstring). Needs
        ``keep_reference=True``."""
        for t in self.targets:
            if t.ref is None:
                raise RuntimeError("reproject_parameters needs keep_reference=True")
            W = t.param
            D = W.detach().float() - t.ref.float()
            newW = t.ref.float() + self._transform(D, t.left, t.right, self.strength)
            W.copy_(newW.to(W.dtype))
            t.ref.copy_(W)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Remove all hooks and drop the reference copies. Idempotent."""
        for t in self.targets:
            if t.handle is not None:
                t.handle.remove()
                t.handle = None
            t.ref = None
        self._removed = True

    def __enter__(self) -> "SubspaceProjector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"SubspaceProjector(mode={self.mode!r}, strength={self.strength}, "
                f"targets={len(self.targets)})")
