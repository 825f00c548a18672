"""Density routing: each expert carries a generative model of the inputs it was trained on.

Why: a learned gate must learn which expert owns an input, and in class-incremental learning it
sees old tasks only through a small replay buffer, so it generalizes poorly on them and drifts
towards the newest expert. A density model fit on an expert's own training data when the expert
is finished needs no replay and is never changed by later tasks; adding an expert only adds a
competitor. This is Expert Gate's idea (Aljundi et al. 2017, one autoencoder per expert) with the
autoencoder replaced by its closed-form probabilistic version.

Each expert's density is a mixture over its classes of probabilistic PCA Gaussians
(Tipping & Bishop 1999): for class c with mean m, top-k principal directions W (k x D) with
variances lam and isotropic residual variance s2,

    log N(x) = -1/2 [ sum_j z_j^2 / lam_j + sum_j log lam_j + r / s2 + (D - k) log s2 + D log 2 pi ]

with z = W (x - m) and r = |x - m|^2 - |z|^2. The expert's log density is the log-sum-exp over its
classes plus log class priors, and the routing weights are the posterior over experts:
w_i(x) = softmax_i(log p_i(x) / tau).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ModuleMeshError
from .routers import Router


PPCA_FIELDS = ("mean", "components", "variances", "noise")


def fit_ppca(x: torch.Tensor, k: int, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Closed-form PPCA of rows of ``x`` (N, D): mean, top-k directions, their variances, residual variance."""
    n, d = x.shape
    if n < 2:
        raise ModuleMeshError("a density component needs at least 2 examples of its class")
    k = max(1, min(k, n - 1, d - 1))
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    lam = s.pow(2) / (n - 1)
    total = xc.pow(2).sum() / (n - 1)
    s2 = ((total - lam[:k].sum()) / (d - k)).clamp_min(eps)
    return {"mean": mu.float(), "components": vh[:k].float(), "variances": (lam[:k] + eps).float(), "noise": s2.float().reshape(1)}


def ppca_log_density(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    d = x.shape[1]
    k = p["components"].shape[0]
    xc = x - p["mean"]
    z = xc @ p["components"].t()
    resid = (xc.pow(2).sum(1) - z.pow(2).sum(1)).clamp_min(0)
    s2 = p["noise"][0]
    return -0.5 * ((z.pow(2) / p["variances"]).sum(1) + p["variances"].log().sum() + resid / s2
                   + (d - k) * s2.log() + d * math.log(2 * math.pi))


class DensityRouter(Router):
    """Routes by the posterior over experts of per-expert PPCA-mixture densities of the input.

    An expert whose density is not fit yet (the one being trained) gets the best fitted expert's
    log density, so while it trains it shares the weight instead of being shut out.
    """

    def __init__(self, num_experts: int = 0, components: int = 10, temperature: float = 1.0):
        super().__init__(num_experts)
        self.components, self.temperature = components, temperature
        self.densities: list[Optional[list[dict[str, torch.Tensor]]]] = [None] * num_experts
        self.counts: list[Optional[torch.Tensor]] = [None] * num_experts  # examples behind each component

    def add_expert(self) -> None:
        super().add_expert()
        self.densities.append(None)
        self.counts.append(None)

    def remove_expert(self, index: int) -> None:
        super().remove_expert(index)
        del self.densities[index]
        del self.counts[index]

    @torch.no_grad()
    def fit_expert(self, index: int, x: torch.Tensor, y: torch.Tensor, append: bool = False) -> None:
        """Fit expert ``index``'s density on its training inputs ``x`` (float) with labels ``y``.

        ``append=True`` adds components for a new domain the expert now also serves (the
        continual protocol reusing an expert) instead of replacing its density.
        """
        x = x.flatten(1).float()
        comps, counts = [], []
        for c in torch.unique(y).tolist():
            rows = x[y == c]
            comps.append(fit_ppca(rows, self.components))
            counts.append(rows.shape[0])
        counts_t = torch.tensor(counts, dtype=torch.float32, device=x.device)
        if append and self.densities[index] is not None:
            comps = self.densities[index] + comps
            counts_t = torch.cat([self.counts[index].to(x.device), counts_t])
        self.densities[index] = comps
        self.counts[index] = counts_t

    def expert_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) log p_i(x); NaN for experts not fit yet."""
        x = x.flatten(1).float()
        out = x.new_full((x.shape[0], self.num_experts), float("nan"))
        for i, comps in enumerate(self.densities):
            if comps is not None:
                per_class = torch.stack([ppca_log_density(x, p) for p in comps], 1)
                log_prior = (self.counts[i] / self.counts[i].sum()).log().to(x.device)
                out[:, i] = torch.logsumexp(per_class + log_prior, 1)
        return out

    def forward(self, x, expert_logits=None, task_ids=None):
        ld = self.expert_log_density(x)
        unfit = torch.isnan(ld)
        if bool(unfit.all()):
            return torch.full_like(ld, 1.0 / self.num_experts), None
        best = torch.where(unfit, torch.full_like(ld, float("-inf")), ld).max(1, keepdim=True).values
        ld = torch.where(unfit, best.expand_as(ld), ld)
        return F.softmax(ld / self.temperature, dim=1), ld

    # Densities are a list of variable-size tensors; flatten them into a plain tensor dict.
    def export_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, comps in enumerate(self.densities):
            if comps is None:
                continue
            state[f"expert{i}.counts"] = self.counts[i]
            for c, p in enumerate(comps):
                for name, t in p.items():
                    state[f"expert{i}.class{c}.{name}"] = t
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self.densities = [None] * self.num_experts
        self.counts = [None] * self.num_experts
        for key, t in state.items():
            parts = key.split(".")
            i = int(parts[0][6:])
            if parts[1] == "counts":
                self.counts[i] = t
                continue
            c = int(parts[1][5:])
            comps = self.densities[i] if self.densities[i] is not None else []
            while len(comps) <= c:
                comps.append({})
            comps[c][parts[2]] = t
            self.densities[i] = comps

    def export_expert_state(self, index: int) -> dict[str, torch.Tensor]:
        """``counts`` (examples per class component, the class prior) and ``class{c}.{mean,components,
        variances,noise}`` per component; {} while the expert's density is not fit."""
        self._check_index(index)
        comps = self.densities[index]
        if comps is None:
            return {}
        state = {"counts": self.counts[index].detach().cpu().clone()}
        for c, p in enumerate(comps):
            state.update({f"class{c}.{name}": t.detach().cpu().clone() for name, t in p.items()})
        return state

    def import_expert_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        self._check_index(index)
        if not state:
            self.densities[index], self.counts[index] = None, None
            return
        counts = state.get("counts")
        if counts is None or counts.ndim != 1:
            raise ModuleMeshError(f"density state for expert {index} lacks a 1-d 'counts' tensor")
        device = self._state_device()
        comps = []
        for c in range(counts.numel()):
            p = {name: state.get(f"class{c}.{name}") for name in PPCA_FIELDS}
            if any(t is None for t in p.values()):
                raise ModuleMeshError(f"density state for expert {index} lacks class{c}.* tensors ({', '.join(PPCA_FIELDS)})")
            comps.append({k: t.to(device, torch.float32) for k, t in p.items()})
        self.densities[index], self.counts[index] = comps, counts.to(device, torch.float32)

    def _state_device(self) -> torch.device:
        return next((c.device for c in self.counts if c is not None), torch.device("cpu"))

    def _apply(self, fn, recurse=True):
        # Follow .to(device) like registered buffers would.
        super()._apply(fn, recurse)
        self.densities = [None if comps is None else [{k: fn(v) for k, v in p.items()} for p in comps] for comps in self.densities]
        self.counts = [None if c is None else fn(c) for c in self.counts]
        return self
