"""Merge one run's JAX throughput JSON with the PyTorch peer's, measured on the same card.

Writes ``<dir>/<date>-<card>.json`` (the form committed as ``benchmarks/results/``) with the
top-level fields ``card``, ``train_ratio_vs_torch_compile`` and ``predict_ratio_vs_torch_compile``
(bfloat16 at the headline case, our full fine-tune / predict over the peer's
``bf16_cl_compile``), every other target of the performance issue with pass/fail, each
candidate lever's rate against the code as it is and the peer (``variants``), and both
inputs whole. Prints a comparison table last. Needs only the standard library.

    python benchmarks/merge_results.py --jax $OUT/jax_throughput.json \\
        --torch $OUT/peer_torch.json --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

# The issue's targets: (name, threshold, higher is better).
TARGETS = {
    "train_ratio_vs_torch_compile": (1.2, True),
    "predict_ratio_vs_torch_compile": (1.3, True),
    "frozen_over_full": (2.0, True),
    "pipeline_over_synthetic": (0.9, True),
    "warm_cache_first_step_s": (15.0, False),
}
TORCH_MODES = ("fp32", "bf16_cl", "bf16_cl_compile")


def card_slug(card: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in card.lower()).strip("-") or "unknown"


def ours(jax_result: dict, task: str, dtype: str, mode: str | None, case: str) -> dict | None:
    """Our row for one measurement of the code as it is (no variant); the non-sweep row when
    both exist."""
    rows = [r for r in jax_result.get("results", []) if "images_per_s" in r
            and not r.get("variant") and r["task"] == task and r["dtype"] == dtype
            and r["mode"] == mode and r["case"] == case]
    rows.sort(key=lambda r: r.get("sweep", False))
    return rows[0] if rows else None


def theirs(torch_rows: list[dict], task: str, mode: str, case: str) -> dict | None:
    """The peer's row (task 'train' or 'infer')."""
    b, h, w = (int(v) for v in case.split("x"))
    for r in torch_rows:
        if (r.get("task") == task and r.get("mode") == mode and "img_s" in r
                and (r.get("bs"), r.get("h"), r.get("w")) == (b, h, w)):
            return r
    return None


def _ratio(a: dict | None, a_key: str, b: dict | None, b_key: str) -> float | None:
    if not a or not b or not b.get(b_key):
        return None
    return a[a_key] / b[b_key]


def merge(jax_result: dict, torch_rows: list[dict], headline: str | None = None) -> dict:
    cases = [f"{b}x{h}x{w}" for b, h, w in jax_result.get("args", {}).get("cases", [])]
    headline = headline or (cases[-1] if cases else "32x480x640")
    comparisons = []
    for case in cases or [headline]:
        for dtype, torch_mode in (("bfloat16", "bf16_cl_compile"), ("bfloat16", "bf16_cl"),
                                  ("float32", "fp32")):
            for task, torch_task, mode in (("train", "train", "full"), ("predict", "infer", None)):
                a, b = ours(jax_result, task, dtype, mode, case), theirs(torch_rows, torch_task, torch_mode, case)
                if a or b:
                    comparisons.append({
                        "case": case, "task": task, "jax": f"{dtype}{' ' + mode if mode else ''}",
                        "torch": torch_mode, "jax_images_per_s": a and a["images_per_s"],
                        "torch_images_per_s": b and b["img_s"],
                        "ratio": _ratio(a, "images_per_s", b, "img_s")})

    def cmp(case, task, torch_mode):
        return next((c["ratio"] for c in comparisons if c["case"] == case and c["task"] == task
                     and c["torch"] == torch_mode), None)

    frozen_over_full = {}
    for case in cases:
        for dtype in ("bfloat16", "float32"):
            full = ours(jax_result, "train", dtype, "full", case)
            frozen = ours(jax_result, "train", dtype, "frozen", case)
            if full and frozen:
                frozen_over_full[f"{dtype} {case}"] = frozen["images_per_s"] / full["images_per_s"]
    pipeline = jax_result.get("pipeline") or {}
    warm = (jax_result.get("compile_cache") or {}).get("warm") or {}
    cold = (jax_result.get("compile_cache") or {}).get("cold") or {}
    values = {
        "train_ratio_vs_torch_compile": cmp(headline, "train", "bf16_cl_compile"),
        "predict_ratio_vs_torch_compile": cmp(headline, "predict", "bf16_cl_compile"),
        "frozen_over_full": frozen_over_full.get(f"bfloat16 {headline}",
                                                 frozen_over_full.get(f"float32 {headline}")),
        "pipeline_over_synthetic": pipeline.get("ratio_to_synthetic"),
        "warm_cache_first_step_s": warm.get("first_step_s"),
    }
    targets = {}
    for name, (threshold, higher) in TARGETS.items():
        v = values[name]
        targets[name] = {"value": v, "target": f"{'>=' if higher else '<='} {threshold}",
                         "met": None if v is None else (v >= threshold if higher else v <= threshold)}
    variants = []  # candidate levers measured in the same run: against the code as it is
    for r in jax_result.get("results", []):
        if r.get("variant") and "images_per_s" in r and r["case"] == headline and not r.get("sweep"):
            current = ours(jax_result, r["task"], r["dtype"], r["mode"], headline)
            peer = theirs(torch_rows, "train" if r["task"] == "train" else "infer",
                          "bf16_cl_compile" if r["dtype"] == "bfloat16" else "fp32", headline)
            variants.append({"variant": r["variant"], "task": r["task"], "dtype": r["dtype"],
                             "images_per_s": r["images_per_s"], "compile_s": r.get("compile_s"),
                             "over_current": _ratio(r, "images_per_s", current, "images_per_s"),
                             "ratio_vs_torch_compile": _ratio(r, "images_per_s", peer, "img_s")
                             if r["dtype"] == "bfloat16" else None,
                             "vs_code": r.get("vs_code")})
    card = jax_result.get("card") or "unknown"
    return {
        "date": jax_result.get("date") or datetime.date.today().isoformat(),
        "card": card,
        "headline_case": headline,
        "train_ratio_vs_torch_compile": values["train_ratio_vs_torch_compile"],
        "predict_ratio_vs_torch_compile": values["predict_ratio_vs_torch_compile"],
        "frozen_over_full": frozen_over_full,
        "pipeline_over_synthetic": values["pipeline_over_synthetic"],
        "compile_cache_first_step_s": {"cold": cold.get("first_step_s"), "warm": warm.get("first_step_s")},
        "targets": targets,
        "comparisons": comparisons,
        "variants": variants,
        "jax": jax_result,
        "torch": torch_rows,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _agreement(check: dict | None) -> str:
    """How far the variant's result is from the code's (throughput.py's ``vs_code``), beside the
    code's from itself."""
    if not check:
        return ""
    if "error" in check:
        return ", not compared with the code's"
    ours, itself = ((check["maps_difference"], check["code_maps_difference"])
                    if "maps_difference" in check
                    else (check["update_difference"], check["code_update_difference"]))
    note = f" ({check['differs_by_design']} by design)" if "differs_by_design" in check else ""
    return (f", result {_fmt(ours['max'], '.1e')} off the code's (itself "
            f"{_fmt(itself['max'], '.1e')}){note}")


def print_summary(merged: dict) -> None:
    print()
    print(f"mlnet_jax vs PyTorch peer on {merged['card']} (same run), headline {merged['headline_case']}")
    print(f"{'case':>12} {'task':8} {'jax':15} {'torch':16} {'jax img/s':>10} {'torch img/s':>11} {'ratio':>6}")
    for c in merged["comparisons"]:
        print(f"{c['case']:>12} {c['task']:8} {c['jax']:15} {c['torch']:16} "
              f"{_fmt(c['jax_images_per_s'], '10.1f'):>10} {_fmt(c['torch_images_per_s'], '11.1f'):>11} "
              f"{_fmt(c['ratio'], '6.2f'):>6}")
    if merged.get("variants"):
        print(f"variants at {merged['headline_case']} (same run):")
        for v in merged["variants"]:
            name = f"[{v['variant']}]"
            compiled = "" if v.get("compile_s") is None else f", compiled in {v['compile_s']:.0f} s"
            print(f"  {v['task']:8} {v['dtype']:9} {name:26} {v['images_per_s']:10.1f} img/s"
                  f"  x{_fmt(v['over_current'], '.3f')} the code as it is, "
                  f"x{_fmt(v['ratio_vs_torch_compile'], '.3f')} "
                  f"torch.compile{compiled}{_agreement(v.get('vs_code'))}")
    print("targets:")
    for name, t in merged["targets"].items():
        v = t["value"]
        status = "n/a (not measured)" if v is None else ("MET" if t["met"] else "missed")
        print(f"  {name:32} {_fmt(v, '.3f'):>8}  target {t['target']:8} {status}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jax", required=True, help="benchmarks/throughput.py's JSON")
    p.add_argument("--torch", default=None, help="torch_peer.py's peer_torch.json (a list)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--headline", default=None, help="BxHxW; default: the last case of the run")
    args = p.parse_args(argv)
    jax_result = json.loads(Path(args.jax).read_text())
    torch_rows = []
    if args.torch and Path(args.torch).exists():
        try:
            torch_rows = json.loads(Path(args.torch).read_text())
        except json.JSONDecodeError as e:  # the peer killed while rewriting its file
            print(f"{args.torch} is cut short ({e}): ratios are null", file=sys.stderr)
    else:
        print(f"no PyTorch peer results at {args.torch}: ratios are null", file=sys.stderr)
    merged = merge(jax_result, torch_rows, args.headline)
    out = Path(args.out_dir) / f"{merged['date']}-{card_slug(merged['card'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print_summary(merged)
    print(f"merged: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
