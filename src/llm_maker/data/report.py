"""The data report: what went into the training tokens, and what was left out and why.

Built from two manifests, so it costs no pass over the data: the data stage's (documents read
per source, rows each source's filters dropped, selection drops by reason, kept per split) and
the pack stage's (tokens and shards per split, bytes per token, a histogram of document lengths
in tokens). The pack stage writes it beside its shards:

    data_report.json   every figure
    data_report.md     the same as tables
    doc_lengths.png    document length histogram (matplotlib, log-scaled token counts)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm_maker.artifacts import atomic_write_json, atomic_write_text

SELECTION_DROPS = {  # SelectionCounts field -> what it means
    "too_short": "shorter than data.min_chars",
    "not_selected": "outside data.fraction (keyed hash)",
    "duplicate": "exact duplicate of a kept document",
    "over_max_documents": "beyond data.max_documents",
}
PNG = "doc_lengths.png"


def histogram_quantile(edges: list[int], counts: list[int], q: float) -> Optional[int]:
    """The lower edge of the histogram bin holding the q-quantile (None for an empty histogram)."""
    total = sum(counts)
    if total == 0:
        return None
    idx = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return int(edges[min(idx, len(edges) - 1)])


def _source_label(entry: dict[str, Any]) -> str:
    if entry.get("type") == "fineweb-edu" and not entry.get("path"):
        return f"fineweb-edu {entry.get('repo_id')} {entry.get('config')}"
    return f"{entry.get('type')} {entry.get('path') or ''}".strip()


def build_data_report(data_manifest: dict[str, Any], pack: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the report from the data manifest and the pack manifest's fields."""
    counts = data_manifest.get("counts", {})
    sources = [{"source": _source_label(s), "documents_read": s.get("documents_read", 0),
                "dropped_by_source": s.get("dropped_by_source", {}), "files": len(s.get("files", [])),
                "file_bytes": sum(f.get("bytes", 0) for f in s.get("files", []))}
               for s in data_manifest.get("sources", [])]
    dropped: dict[str, int] = {}
    for s in sources:
        for reason, n in s["dropped_by_source"].items():
            dropped[f"source filter {reason}"] = dropped.get(f"source filter {reason}", 0) + n
    for field, meaning in SELECTION_DROPS.items():
        dropped[meaning] = counts.get(field, 0)
    edges = pack.get("doc_length", {}).get("edges", [])
    lengths = {}
    for split in ("train", "val"):
        docs, tokens = pack["documents"][split], pack[f"{split}_tokens"]
        hist = pack.get("doc_length", {}).get(split, {}).get("histogram", [])
        lengths[split] = {
            "mean": round((tokens - docs) / docs, 1) if docs else None,  # EOS excluded
            "median_at_least": histogram_quantile(edges, hist, 0.5),
            "p90_at_least": histogram_quantile(edges, hist, 0.9),
            "max": pack.get("doc_length", {}).get(split, {}).get("max"),
        }
    return {
        "sources": sources,
        "rows_seen": sum(s["documents_read"] for s in sources) + sum(
            n for s in sources for n in s["dropped_by_source"].values()),
        "documents_kept": {"train": counts.get("train_docs"), "val": counts.get("val_docs")},
        "dropped": dropped,
        "tokens": {"train": pack["train_tokens"], "val": pack["val_tokens"]},
        "shards": {split: len(entries) for split, entries in pack.get("shards", {}).items()},
        "text_bytes": pack.get("text_bytes"),
        "bytes_per_token": pack.get("bytes_per_token"),
        "doc_length_tokens": lengths,
    }


def report_markdown(report: dict[str, Any], png: Optional[str], no_png: str = "matplotlib is not installed") -> str:
    lines = ["# Data report", "", "## Sources", "",
             "| source | files | file bytes | documents read | dropped by the source's filters |",
             "| --- | ---: | ---: | ---: | --- |"]
    for s in report["sources"]:
        filters = ", ".join(f"{k}: {v:,}" for k, v in s["dropped_by_source"].items()) or "-"
        lines.append(f"| {s['source']} | {s['files']} | {s['file_bytes']:,} | {s['documents_read']:,} | {filters} |")
    lines += ["", "## Kept and dropped", "", "| | documents |", "| --- | ---: |"]
    lines.append(f"| rows seen | {report['rows_seen']:,} |")
    for reason, n in report["dropped"].items():
        lines.append(f"| dropped: {reason} | {n:,} |")
    for split, n in report["documents_kept"].items():
        lines.append(f"| kept: {split} | {n or 0:,} |")
    lines += ["", "## Tokens", "",
              "| split | tokens | shards | text bytes | mean doc tokens | median >= | p90 >= | max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for split in ("train", "val"):
        d = {k: "-" if v is None else v for k, v in report["doc_length_tokens"][split].items()}
        lines.append(f"| {split} | {report['tokens'][split]:,} | {report['shards'].get(split, 1)} | "
                     f"{(report['text_bytes'] or {}).get(split, 0):,} | {d['mean']} | {d['median_at_least']} | "
                     f"{d['p90_at_least']} | {d['max']} |")
    lines += ["", f"Bytes of text per token: **{report['bytes_per_token']}**", ""]
    lines.append(f"![document lengths]({png})" if png else f"(no length plot: {no_png})")
    return "\n".join(lines) + "\n"


def plot_lengths(pack: dict[str, Any], path: Path) -> Optional[str]:
    """Draw the document length histogram (share of documents per log-spaced bin), train and val;
    returns why not when it cannot."""
    if "doc_length" not in pack:
        return "the pack manifest has no length histogram (packed by an older llm-maker)"
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    edges = np.asarray(pack["doc_length"]["edges"], dtype=float)
    edges = np.append(edges, edges[-1] * 2)  # close the last, open-ended bin
    edges[0] = 0.5  # the bin of empty documents, placed where a log axis can show it
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("train", "val"):
        hist = np.asarray(pack["doc_length"][split]["histogram"], dtype=float)
        if hist.sum() == 0:
            continue
        used = np.flatnonzero(hist)
        lo, hi = used[0], used[-1] + 1  # draw only the bins between the shortest and longest document
        ax.stairs(hist[lo:hi] / hist.sum(), edges[lo:hi + 1], label=f"{split} ({int(hist.sum()):,} documents)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("share of documents")
    ax.set_title("Document lengths")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return None


def write_data_report(data_manifest: dict[str, Any], pack: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write data_report.{json,md} and doc_lengths.png into out_dir; returns the report."""
    out_dir = Path(out_dir)
    report = build_data_report(data_manifest, pack)
    why_not = plot_lengths(pack, out_dir / PNG)
    atomic_write_json(out_dir / "data_report.json", report)
    atomic_write_text(out_dir / "data_report.md", report_markdown(report, None if why_not else PNG, why_not or ""))
    return report
