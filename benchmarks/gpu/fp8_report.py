"""The GPU suite's printed summary: the issue's goals first, then one table per section.

The goals table ends with one row per ZeROCache run: its largest per-step relative loss gap to
torch AdamW against the tolerance, both step times, and the peak bytes ZeROCache held per tier
(device, host, nvme) during its last step.

Speedups are eager (what a training loop gets) unless marked graphed (CUDA-graph replay: device
time alone) or compiled (both sides under torch.compile, as `train.compile` runs them); "4.13 ->
4.10" loss columns show the first and last step of each curve, "max gap" the largest relative
difference between the FP8 and bf16 losses at any step.
"""

from __future__ import annotations

from typing import Optional

from harness import format_table

GOALS = {"speedup_big": 1.6, "speedup_mid": 1.0, "e2e": 1.3, "cast_fraction": 0.8}


def _best(table: dict, get) -> Optional[tuple[str, float]]:
    scored = [(name, get(row)) for name, row in table.items()]
    return max(scored, key=lambda t: t[1]) if scored else None


def _best_linear(sections: dict, shape: str, mode: str, recipes) -> Optional[tuple[str, float]]:
    row = sections.get("linear", {}).get("shapes", {}).get(shape, {}).get(mode, {})
    return _best({rc: row[rc] for rc in recipes if rc in row}, lambda r: r["speedup"]["median"])


def _fmt(found: Optional[tuple[str, float]]) -> str:
    return "not measured" if found is None else f"{found[1]:.2f} ({found[0]})"


def goals(sections: dict, squares: list, recipes) -> list[list[str]]:
    """[goal, target, measured, met] rows: the best recipe per goal (the slowest cast for kernels)."""
    rows = []

    def add(label: str, target: float, found, extra: str = "") -> None:
        met = "-" if found is None else ("yes" if found[1] >= target else "NO")
        rows.append([label, f">= {target}", _fmt(found) + extra, met])
    compiled = sections.get("compiled", {})
    for shape, target in ((f"{squares[-1]}^3", GOALS["speedup_big"]), (f"{squares[1]}^3", GOALS["speedup_mid"])):
        graphed = _best_linear(sections, shape, "graphed", recipes)
        add(f"fp8 fwd+bwd speedup at {shape}", target, _best_linear(sections, shape, "eager", recipes),
            f"; graphed {_fmt(graphed)}" if graphed else "")
        row = compiled.get("shapes", {}).get(shape)
        if row:
            add(f"fp8 fwd+bwd speedup at {shape}, compiled", target,
                _best({rc: row[rc] for rc in recipes if rc in row}, lambda r: r["speedup"]["median"]))
    for label, section in (("", sections.get("e2e", {})), (", compiled", compiled.get("e2e", {}))):
        runs = section.get("recipes", {})
        learners = {rc: r for rc, r in runs.items() if r["fp8_learns"]}
        if runs and not learners:
            rows.append([f"end-to-end training speedup{label}", f">= {GOALS['e2e']}", "no FP8 model learns", "NO"])
        elif runs or not label:  # a speedup counts only where the FP8 model learns
            add(f"end-to-end training speedup{label}", GOALS["e2e"],
                _best(learners, lambda r: r["speedup"]["median"]))
    e2e = e2e_runs(sections)
    # The goal is the cast kernels' own: fp32 rows add torch's transpose of the codes (shown in the table).
    ker = {k: v for k, v in sections.get("kernels", {}).get("kernels", {}).items()
           if k != "amax" and "fp32" not in k}
    slowest = min(((k, v["fraction_of_copy"]) for k, v in ker.items()), key=lambda t: t[1], default=None)
    add("slowest cast kernel, fraction of copy", GOALS["cast_fraction"], slowest)
    stuck = [f"{rc} {r['loss']['fp8'][-1]:.3f} vs bf16 {r['loss']['bf16'][-1]:.3f}"
             for rc, r in e2e.items() if not r["fp8_learns"]]
    rows.append(["fp8 models learn like bf16 (e2e loss)", "all recipes",
                 "not measured" if not e2e else ("all" if not stuck else "NOT: " + "; ".join(stuck)),
                 "-" if not e2e else ("yes" if not stuck else "NO")])
    parity = sections.get("parity", {}).get("kernels_bit_exact", {})
    bad = [k for k, ok in parity.items() if not ok]
    rows.append(["Triton casts bit-exact on the device", "all", "not measured" if not parity else
                 ("all" if not bad else f"{len(bad)} differ"), "-" if not parity else ("yes" if not bad else "NO")])
    return rows + zerocache_rows(sections.get("zerocache", {}).get("runs", {}))


def e2e_runs(sections: dict) -> dict:
    """Every end-to-end training pair: the eager ones by recipe, then the compiled ones."""
    compiled = sections.get("compiled", {}).get("e2e", {}).get("recipes", {})
    return {**sections.get("e2e", {}).get("recipes", {}), **{f"compiled {rc}": r for rc, r in compiled.items()}}


def zerocache_rows(runs: dict) -> list[list[str]]:
    """[goal, target, measured, met] per ZeROCache run (see zerocache_check.py)."""
    rows = []
    for name, run in runs.items():
        peaks = " ".join(f"{tier} {run['ledger'][tier]['peak'] / 2**20:.1f}" for tier in ("device", "host", "nvme"))
        rows.append([f"ZeROCache {name} = torch AdamW", f"loss <= {run['tolerance']:.0e}",
                     f"gap {run['max_rel_loss_gap']:.1e}, {run['steps']} steps; {run['zerocache_step_ms']:.1f} vs "
                     f"{run['torch_step_ms']:.1f} ms/step; peak MiB {peaks}", "yes" if run["matched"] else "NO"])
    return rows


def _parity_line(par: dict) -> Optional[str]:
    if "kernels_bit_exact" not in par:
        return None
    bad = []
    for name, ok in par["kernels_bit_exact"].items():
        if ok:
            continue
        reports = [r for r in par["kernel_diffs"].get(name, []) if "values" in r]
        counts = ", ".join(f"{r.get('mismatches', '?')}/{r['values']} values, max {r.get('max_ulps', 0)} ulp, "
                           f"{r.get('signed_zero_only', 0)} sign-of-zero, {r.get('scale_mismatches', 0)} scales"
                           for r in reports)
        bad.append(f"{name} [{counts}]")
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in par.get("blockwise_gemm_max_rel_diff", {}).items() if v is not None)
    return (f"kernel parity: {'all bit-exact' if not bad else 'MISMATCH ' + '; '.join(bad)}; "
            f"blockwise GEMM max rel diff: {diffs}")


def summary(results: dict, squares: list, recipes, elapsed_s: float) -> str:
    s = results["sections"]
    lines = [f"FP8 GPU suite ({'DRY RUN on CPU' if results['dry_run'] else 'GPU'}), {elapsed_s:.0f}s"]
    env = s.get("env", {})
    if "copy_GBps" in env:
        lines.append(f"{env.get('device')} | torch {env.get('torch')} triton {env.get('triton')} | copy "
                     f"{env['copy_GBps']:.0f} GB/s, bf16 {env['bf16_TFLOPs']:.0f} TFLOP/s, FP8 _scaled_mm "
                     f"{env['fp8_TFLOPs']:.0f} ({env['fp8_fast_accum_TFLOPs']:.0f} fast accum) TFLOP/s "
                     f"at {env['ceiling_shape']}^3")
        if "blockwise_triton_TFLOPs" in env:
            cublas = env.get("blockwise_cublas_TFLOPs")
            lines.append(f"blockwise GEMM (1x128 x 128x128) at {env['ceiling_shape']}^3: Triton "
                         f"{env['blockwise_triton_TFLOPs']:.0f} TFLOP/s, cuBLASLt "
                         + (f"{cublas:.0f} TFLOP/s" if cublas else "not available")
                         + "; cuBLASLt used for: "
                         + (", ".join(k for k, ok in env["blockwise_native"].items() if ok) or "none"))
        if env.get("fast_accum_speedup"):
            lines.append("FP8 GEMM, fast accumulation vs promoted (speedup): " + ", ".join(
                f"{label} {r['median']:.2f}x" for label, r in env["fast_accum_speedup"].items()))
    parity = _parity_line(s.get("parity", {}))
    if parity:
        lines.append(parity)
    lines += ["", format_table(["goal (H100)", "target", "measured", "met"], goals(s, squares, recipes))]
    for name, sec in s.items():
        for key in ("error", "skipped", "skipped_from"):
            if key in sec:
                lines.append(f"{name}: {key}: {sec[key].strip().splitlines()[-1]}")
        failures = dict(sec.get("errors", {}))
        failures.update({f"e2e {what}": why for what, why in sec.get("e2e", {}).get("errors", {}).items()})
        for label, row in sec.get("shapes", {}).items():
            failures.update({f"{label} {what}": why for what, why in row.get("errors", {}).items()})
        lines += [f"{name}: {what} failed: {why.strip().splitlines()[-1]}" for what, why in failures.items()]

    over = s.get("overhead", {})
    if over.get("calls"):
        rows = [[name, f"{c['host_us']:.0f}", f"{c['wall_us']:.0f}", f"{c['device_ops']:.0f}", f"{c['device_us']:.0f}"]
                for name, c in over["calls"].items()]
        lines += ["", f"One fwd+bwd at {over['shape'][0]}^3: host issue time vs device work (us per call)",
                  format_table(["layer", "host", "wall", "device ops", "device"], rows)]
        if over.get("host_costs_us"):
            lines.append("host us per call: " + ", ".join(f"{k} {v:.0f}" for k, v in over["host_costs_us"].items()))
        for name, c in over["calls"].items():
            top = ", ".join(f"{k['kernel'][:48]} {k['us']:.1f}" for k in c.get("device_kernels", [])[:6])
            lines += [f"{name} device us: {top}"] if top else []
            hot = ", ".join(f"{f['function']} {f['own_us']:.0f}" for f in c.get("top_python", [])[:5])
            lines += [f"{name} python own us: {hot}"] if hot else []
    bound = over.get("device_bound", {})
    if bound.get("calls"):
        lines += ["", f"One fwd+bwd at {bound['shape'][0]}^3, bound by the device: us per call, in all and by kernel "
                      "(launches)"]
        for name, c in bound["calls"].items():
            top = ", ".join(f"{k['kernel'][:48]} {k['us']:.0f} ({k['launches']:.0f})" for k in c["device_kernels"][:6])
            lines.append(f"{name} {c['device_us']:.0f}: {top or 'no device kernels traced'}")
    lin = s.get("linear", {}).get("shapes", {})
    if lin:
        def cell(r: dict, rc: str) -> str:
            eager, graph = r.get("eager", {}).get(rc), r.get("graphed", {}).get(rc)
            if eager is None:
                return "error"
            text = f"{eager['speedup']['median']:.2f}x ({eager['TFLOPs']:.0f})"
            return text + (f" g{graph['speedup']['median']:.2f}x" if graph else "")
        rows = [[label, f"{r['eager']['bf16']['TFLOPs']:.0f}" if "eager" in r else "-"]
                + [cell(r, rc) for rc in recipes] for label, r in lin.items()]
        lines += ["", "Float8Linear fwd+bwd: eager speedup vs bf16 (TFLOP/s), g = graphed speedup",
                  format_table(["shape", "bf16 TF/s", *recipes], rows)]
    comp = s.get("compiled", {}).get("shapes", {})
    if comp:
        names = [rc for rc in recipes if any(rc in r for r in comp.values())]
        rows = [[label, f"{r['bf16']['TFLOPs']:.0f}"] + [f"{r[rc]['speedup']['median']:.2f}x ({r[rc]['TFLOPs']:.0f})"
                                                          if rc in r else "-" for rc in names]
                for label, r in comp.items() if "bf16" in r]
        lines += ["", "Under torch.compile: FP8 fwd+bwd speedup vs compiled bf16 (TFLOP/s)",
                  format_table(["shape", "bf16 TF/s", *names], rows)]
    ker = s.get("kernels", {}).get("kernels", {})
    if ker:
        rows = [[name, f"{k['GBps']:.0f}", f"{k['fraction_of_copy']:.0%}"] for name, k in ker.items()]
        lines += ["", "Cast kernels vs device copy", format_table(["kernel", "GB/s", "of copy"], rows)]
    runs = e2e_runs(s)
    if runs:
        e2e = s["e2e"] if "params" in s.get("e2e", {}) else s["compiled"]["e2e"]
        rows = [[rc, f"{r['bf16_tokens_per_s']:.0f}", f"{r['fp8_tokens_per_s']:.0f}", f"{r['speedup']['median']:.2f}x",
                 f"{r['fp8_mfu']:.1%}" if r["fp8_mfu"] is not None else "-",
                 f"{r['loss']['bf16'][0]:.2f} -> {r['loss']['bf16'][-1]:.3f}",
                 f"{r['loss']['fp8'][0]:.2f} -> {r['loss']['fp8'][-1]:.3f}", f"{r['max_rel_loss_gap']:.1%}",
                 "yes" if r["fp8_learns"] else "NO"]
                for rc, r in runs.items()]
        lines += ["", f"Llama {e2e['params'] / 1e9:.2f}B training, {e2e['steps']} steps of {e2e['batch']}x{e2e['seq']} "
                      "tokens (same weights, same batches; compiled: both models' blocks)",
                  format_table(["recipe", "bf16 tok/s", "fp8 tok/s", "speedup", "fp8 MFU", "loss bf16", "loss fp8",
                                "max gap", "learns"], rows)]
    return "\n".join(lines)
