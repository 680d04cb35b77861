"""The headline figure of each bench JSON in a folder, as a table on stdout and one summary.json.

python bench/report.py bench/out/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _extract(r: dict[str, Any]) -> str:
    rates, mem = r["images_per_s"], r["memory"]
    peak = mem["peak_rss_mib"][str(max(map(int, mem["peak_rss_mib"])))]
    return (
        f"{rates['ballad_extract']:.0f} / {rates['bare_encode_loop']:.0f} = {r['ratio']:.2f}; "
        f"decode {rates['decode_only']:.0f}, encode {rates['encode_only']:.0f} (bound by {r['bound_by']}); "
        f"peak RSS +{peak} MiB extracting a {mem['split_fp32_mib']:.0f} MiB split"
    )


# bench name prefix -> (figure, how to read it from the record)
HEADLINES: dict[str, tuple[str, Any]] = {
    "extract": ("extraction img/s (ballad / bare encode loop; decode-only, encode-only)", lambda r: _extract(r)),
    "extract_views": (
        "extraction rows/s at K views / encode only: before, after, +draft, on device, device+draft",
        lambda r: (
            ", ".join(f"{v:.2f}" for v in r["ratio_to_encode_only"].values())
            + f" of {r['rows_per_s']['encode only']:.0f} ({r['model']}, {r['data']}, K = {r['views']})"
        ),
    ),
    "finetune_step": (
        "finetune step img/s (ballad / re-tokenize + full context)",
        lambda r: (
            f"{r['images_per_s']['ballad']:.1f} / {r['images_per_s']['reference']:.1f} = {r['speedup']:.2f}x"
            f" (context {r['context']['ballad']} vs {r['context']['reference']}, {r['classes']} classes)"
        ),
    ),
    "phase_a_methods": (
        "phase-A methods: trainable share, memory and step vs full, MFU",
        lambda r: "; ".join(
            f"{x['method']} {x['share_of_image_tower_pct']:.2f}% mem {x['memory_vs_full']:.2f}x step "
            f"{x['step_vs_full']:.2f}x" + (f" MFU {x['mfu']:.2f}" if "mfu" in x else "")
            for x in r["records"]
            if x.get("applies")
        ),
    ),
    "adapter": (
        "fit-adapter FLOP/s / torch.mm FLOP/s",
        lambda r: (
            f"{r['fraction_of_mm']:.2f} ({r['wall_s']} s for {r['epochs']} epoch(s) of {r['rows']} rows, "
            f"peak {r['peak_mem_mib']} MiB)"
            + (
                f"; bf16 / fp32 speed {r['bf16_vs_fp32']['speedup']}x ({r['bf16_vs_fp32']['cpu_capability']})"
                if r.get("bf16_vs_fp32")
                else ""
            )
        ),
    ),
    "cache_read": (
        "cached split load: verified (hashed) / unverified",
        lambda r: f"{r['ratio']:.2f}x ({r['verified_s']} s vs {r['unverified_s']} s for {r['mib']} MiB)",
    ),
    "sweep": (
        "16-point sweep: separate / batched",
        lambda r: f"{r['speedup']:.2f}x ({r['separate_s']} s vs {r['batched_s']} s)",
    ),
    "phase_b": (
        "phase-B epoch: encoder every step / cache",
        lambda r: (
            f"{r['speedup_per_epoch']:.0f}x ({r['epoch_s']['official_encoder_every_step']} s vs "
            f"{r['epoch_s']['cache']} s); extraction once {r['extraction_once_s']} s; 10 epochs incl. extraction "
            f"{r['ten_epochs_speedup_incl_extraction']}x"
        ),
    ),
    "predict": (
        "predict img/s (ballad predict / bare decode+encode loop)",
        lambda r: (
            f"{r['images_per_s']['ballad_predict']:.0f} / {r['images_per_s']['bare_decode_encode']:.0f} = "
            f"{r['ratio']:.2f} ({r['images']} images, {r['classes']} classes)"
        ),
    ),
    "knn": (
        "kNN queries/s: faiss / torch matmul+topk",
        lambda r: (
            f"{r['queries_per_s']['faiss']} / {r['queries_per_s']['torch_matmul_topk']} "
            f"(faiss GPU: {r['faiss_gpu']}; same prediction {r['same_prediction']:.3f})"
        ),
    ),
}


def headline(record: dict[str, Any]) -> tuple[str, str]:
    """(figure, value) for one bench record."""
    name = record["bench"]
    for prefix in sorted(HEADLINES, key=len, reverse=True):
        if name.startswith(prefix):
            figure, fmt = HEADLINES[prefix]
            try:
                return f"{figure} [{name}]", fmt(record)
            except (KeyError, TypeError, ValueError) as exc:
                return f"{figure} [{name}]", f"(unreadable record: {exc})"
    return name, json.dumps({k: v for k, v in record.items() if k not in ("bench", "machine")})[:200]


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "out")
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "summary.json"]
    if not records:
        sys.exit(f"no bench results in {folder}")
    rows = [headline(r) for r in records]
    width = max(len(f) for f, _ in rows)
    print(f"machine: {records[0]['machine']}")
    for figure, value in rows:
        print(f"{figure:<{width}}  {value}")
    (folder / "summary.json").write_text(json.dumps({"records": records, "table": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
