"""A FineTuneJob as a person reads it (`kubetune status`): pure formatting."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    lines = [
        f"FineTuneJob {meta.get('namespace', '?')}/{meta.get('name', '?')}",
        f"  phase:      {status.get('phase') or '(not reconciled yet)'}",
    ]
    if status.get("message"):
        lines.append(f"  message:    {status['message']}")
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and generation != observed:
        lines.append(f"  note:       spec generation {generation}, last reconciled {observed}")
    progress = status.get("progress") or {}
    if progress:
        parts = []
        if progress.get("step") is not None:
            total = progress.get("totalSteps")
            parts.append(f"step {progress['step']}" + (f"/{total}" if total else ""))
        if progress.get("percent") is not None:
            parts.append(f"{progress['percent']}%")
        for key, label in (("loss", "loss"), ("evalLoss", "eval loss"), ("tokensPerSecond", "tok/s"), ("etaSeconds", "eta s")):
            if progress.get(key) is not None:
                parts.append(f"{label} {_fmt(progress[key])}")
        lines.append("  progress:   " + ", ".join(parts))
        checkpoint = progress.get("lastCheckpoint") or {}
        if checkpoint.get("uri"):
            lines.append(f"  checkpoint: step {checkpoint.get('step')} {checkpoint['uri']}")
    conditions = status.get("conditions") or []
    if conditions:
        lines.append("  conditions:")
        for c in conditions:
            lines.append(f"    {c.get('type', '?'):<10} {c.get('status', '?'):<8} {c.get('reason', '')}: {c.get('message', '')}")
    evaluation = status.get("evaluation") or {}
    if evaluation:
        lines.append(f"  evaluation: {evaluation.get('message') or evaluation.get('reason', '')}")
    artifacts = status.get("artifacts") or {}
    if artifacts:
        lines.append("  artifacts:")
        for key in sorted(artifacts):
            lines.append(f"    {key:<17} {artifacts[key]}")
    endpoint = status.get("endpoint") or {}
    if endpoint.get("url"):
        served = f", revision {status['servingRevision']}" if status.get("servingRevision") else ""
        lines.append(f"  endpoint:   {endpoint['url']} (model {endpoint.get('model')}{served})")
    history = status.get("revisions") or []
    if history:
        lines.append("  revisions (oldest first):")
        for r in history:
            mark = "*" if r.get("id") == status.get("servingRevision") else " "
            evaluation = (r.get("evaluation") or {}).get("message") or ""
            served = ""
            if r.get("servedFrom"):
                served = f"served {r['servedFrom']} .. {r.get('servedUntil') or 'now'}"
            lines.append(f"   {mark}{r.get('id', '?'):<11} gen {r.get('generation', '?'):<3} {r.get('phase', ''):<11} "
                         f"{served}{'; ' if served and evaluation else ''}{evaluation}".rstrip())
            merged = (r.get("artifacts") or {}).get("merged") or (r.get("artifacts") or {}).get("adapter")
            if merged:
                lines.append(f"     {merged}")
    return "\n".join(lines)
