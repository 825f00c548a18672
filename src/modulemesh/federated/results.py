"""Results of a federated run on disk: per-round JSON/CSV, plots, resumable state (all atomic)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..checkpoint import load_module, read_manifest, save_module
from ..errors import CheckpointError, ConfigError
from ..io import atomic_save, atomic_write_json, atomic_write_text, atomic_write_yaml, previous_fields

RESULTS = "results.json"
STATE = "state"


def resume_point(out: Path, cfg: dict, overwrite: bool = False) -> tuple[list[dict], Optional[dict]]:
    """Finished rounds and the saved tensors to continue from (``[], None`` for a fresh run)."""
    path = out / RESULTS
    if overwrite or not path.exists():
        return [], None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON; rerun with --overwrite to start over") from None
    if not isinstance(saved, dict):  # harden: valid JSON of another shape is as damaged as invalid JSON
        raise CheckpointError(f"{path} is not a federate results file; rerun with --overwrite to start over")
    if saved.get("config") != cfg:
        raise ConfigError(f"{out} holds a run with a different config; use another --out or --overwrite to replace it")
    history = list(saved.get("history", []))
    if len(history) >= cfg["federation"]["rounds"] and saved.get("complete"):
        return history, None
    if not history:
        return [], None
    try:
        done = int(read_manifest(out / STATE).get("round", 0))
        state, _ = load_module(out / STATE)
    except CheckpointError as e:
        print(f"cannot resume from {out} ({e}); starting over")
        return [], None
    return history[:done], state if done else None


def save_round(out: Path, cfg: dict, history: list[dict], state: dict) -> None:
    """After each round: the history first, then the tensors (resume truncates to the older)."""
    atomic_write_json(out / RESULTS, {"config": cfg, "complete": False, "history": history})
    save_module(
        out / STATE,
        state,
        {"kind": "modulemesh.federate.state", "round": len(history), "mode": cfg["federation"]["mode"]},
    )


def summarize(history: Sequence[dict], cfg: dict) -> dict[str, Any]:
    accs = [h["accuracy"] for h in history if h["accuracy"] == h["accuracy"]]
    last_clients = next((h["client_accuracy"] for h in reversed(history) if h["client_accuracy"]), [])
    return {
        "mode": cfg["federation"]["mode"],
        "rounds": len(history),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "bytes_total": history[-1]["bytes_cumulative"] if history else 0,  # every transfer counted once
        "bytes_received_total": sum(h["bytes_received"] for h in history),
        "bytes_per_round_mean": (history[-1]["bytes_cumulative"] / len(history)) if history else 0,
        "bytes_basis": next((h["bytes_basis"] for h in history if "bytes_basis" in h), "measured"),
        "client_accuracy_final": last_clients,
        "seconds_total": round(sum(h["seconds"] for h in history), 3),
    }


def write_outputs(
    out: Path, cfg: dict, history: list[dict], final: bool = True, data=None, runner=None, extra: Optional[dict] = None
) -> dict:
    # A rerun of a finished run has no runner: keep the fields only it could compute (membership_auc).
    summary = {
        **previous_fields(out / RESULTS, "summary", {"config": cfg, "history": history}),
        **summarize(history, cfg),
    }
    fed = cfg["federation"]
    if runner is not None and data is not None and hasattr(runner, "predict") and fed.get("membership_references", 4):
        from types import SimpleNamespace

        from .membership import membership_audit

        summary.update(
            membership_audit(
                runner.predict,
                data,
                SimpleNamespace(**fed),
                seed=cfg.get("seed", 0),
                references=fed.get("membership_references", 4),
            )
        )
    summary.update(extra or {})
    atomic_write_yaml(out / "config.yaml", cfg)
    atomic_write_json(out / RESULTS, {"config": cfg, "complete": final, "summary": summary, "history": history})
    atomic_write_text(out / "rounds.csv", rounds_csv(history))
    plot_all(out, history, cfg)
    return summary


def update_summary(out: Path, summary: dict) -> None:
    """Rewrite results.json's summary (after outputs computed from the finished run, e.g. the mesh)."""
    saved = json.loads((out / RESULTS).read_text())
    atomic_write_json(out / RESULTS, {**saved, "summary": summary})


def rewrite_finished(out: Path, cfg: dict, history: list[dict]) -> dict:
    """A rerun of a finished run: regenerate the outputs, keeping every summary field already computed."""
    saved = json.loads((out / RESULTS).read_text()).get("summary") or {}
    summary = {**saved, **write_outputs(out, cfg, history, final=True)}
    update_summary(out, summary)
    return summary


def rounds_csv(history: Sequence[dict]) -> str:
    buf = io.StringIO()
    cols = [
        "round",
        "accuracy",
        "mean_client_accuracy",
        "bytes_sent",
        "bytes_received",
        "bytes_cumulative",
        "failed",
        "seconds",
    ]
    extra = sorted({k for h in history for k in h if k not in cols and not isinstance(h[k], list)})
    w = csv.writer(buf)
    w.writerow(cols + extra)
    for h in history:
        ca = h.get("client_accuracy") or []
        row = [
            h["round"],
            h["accuracy"],
            sum(ca) / len(ca) if ca else "",
            h["bytes_sent"],
            h["bytes_received"],
            h["bytes_cumulative"],
            len(h.get("failed", [])),
            h["seconds"],
        ]
        w.writerow(row + [h.get(k, "") for k in extra])
    return buf.getvalue()


def plot_all(out: Path, history: Sequence[dict], cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fed = cfg["federation"]
    title = f"{fed['mode']} - K={fed['clients']}, {fed['partition']} alpha={fed['alpha']}"
    rounds = [h["round"] for h in history]
    acc = [h["accuracy"] for h in history]

    def save(fig, name):
        atomic_save(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(rounds, acc, marker="o", ms=3)
    ax.set(xlabel="round", ylabel="test accuracy", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_rounds.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    mb = [max(h["bytes_cumulative"], 1) / 1e6 for h in history]
    ax.plot(mb, acc, marker="o", ms=3)
    ax.set_xscale("log")
    ax.set(xlabel="MB sent (cumulative, each transfer once)", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3, which="both")
    save(fig, "accuracy_vs_bytes.png")

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    per = [(h["round"], h["client_accuracy"]) for h in history if h.get("client_accuracy")]
    if per:
        k = len(per[-1][1])
        for i in range(min(k, 50)):
            ax.plot([r for r, a in per], [a[i] for r, a in per], lw=0.8, alpha=0.7)
        ax.plot([r for r, a in per], [sum(a) / len(a) for r, a in per], color="black", lw=2, label="mean over clients")
        ax.legend(loc="lower right")
    ax.set(xlabel="round", ylabel="client model test accuracy", title=f"per-client accuracy ({title})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    save(fig, "client_accuracy.png")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """Per-round progress with rich (a bar plus one line per round); a no-op when disabled."""

    def __init__(self, total: int, done: int, label: str, enabled: bool = True):
        self.enabled, self.total, self.done, self.label = enabled, total, done, label
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RP

            self._p = RP(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, completed=self.done)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def update(self, rec: dict) -> None:
        if self._p is None:
            return
        ca = rec.get("client_accuracy") or []
        clients = f"  clients {sum(ca) / len(ca):.4f}" if ca else ""
        failed = f"  failed {len(rec['failed'])}" if rec.get("failed") else ""
        self._p.console.print(
            f"round {rec['round']:>3}/{self.total}  acc {rec['accuracy']:.4f}{clients}  "
            f"sent {_fmt_bytes(rec['bytes_sent'])}  total {_fmt_bytes(rec['bytes_cumulative'])}"
            f"{failed}  {rec['seconds']:.1f}s"
        )
        self._p.advance(self._task)


def print_summary(summary: dict, out: Path) -> None:
    from ..tables import result_console

    c = result_console()
    line = (
        f"[bold]{summary['mode']}[/bold]: final accuracy {summary['final_accuracy']:.4f} "
        f"(best {summary['best_accuracy']:.4f}) after {summary['rounds']} rounds, "
        f"{_fmt_bytes(summary['bytes_total'])} sent"
        + (" (modelled)" if summary.get("bytes_basis") == "modelled" else "")
    )
    if "membership_auc" in summary:
        line += f", membership-inference AUC {summary['membership_auc']:.3f} (calibrated attack)"
    c.print(line)
    c.print(
        f"results in {out}/ (results.json, rounds.csv, accuracy_vs_rounds.png, accuracy_vs_bytes.png, "
        "client_accuracy.png" + (", mesh/" if "mesh" in summary else "") + ")"
    )
