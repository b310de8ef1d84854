"""`befund model bench DIR`: what a model costs, alone and inside the node, on this machine.

Three parts, one run, one report:
1. model only: throughput and p50/p95/p99 latency per batch size x callers in flight, raw
   onnxruntime (a session built as the node builds it) and the model service (`bentoml
   serve service.model_service:ModelService`, called through shared memory with
   service/shared_client.py) measured back to back per cell, so the ratio compares like with
   like on a shared machine;
2. arithmetic: the model's FLOPs per item (ONNX graph) times its best throughput, against
   this machine's measured sgemm rate (numpy matmul): how much of the cores the model uses;
3. end to end: a generated study of the model's kind through a node to a storescp PACS
   (service/model_tools/end_to_end.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.model_card import CardError, ModelCard, load_card
from service.model_tools.provenance import provenance, report_folder, usable_cores, write_json
from service.model_tools.providers import PROVIDERS, provider_problem
from service.model_tools.throughput import Timing, measure_async, measure_threads, sgemm_gflops


def run_bench(args: argparse.Namespace) -> int:
    problem = provider_problem(args.provider)
    if problem:
        print(f"befund: {problem}", file=sys.stderr)
        return 2
    try:
        card = load_card(args.folder)
    except CardError as exc:
        print(f"befund: {exc} (befund model check {args.folder} says more)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    threads = args.threads or usable_cores()
    out = report_folder(args.out, "bench", card.name)
    cells = len(args.batches) * len(args.concurrency)
    total = cells * (1 if args.skip_service else 2) + (0 if args.skip_e2e else args.e2e_runs + 1)
    with tqdm(total=total, unit="step", desc=f"bench {card.key}") as bar:
        sgemm_before = sgemm_gflops()
        model_only, providers_used = _model_only(card, args, threads, bar)
        arithmetic = _arithmetic(card, model_only, sgemm_before)
        e2e = None
        if not args.skip_e2e:
            from service.model_tools.end_to_end import time_to_result

            bar.set_postfix_str("end to end")
            e2e = time_to_result(card, args.provider, args.e2e_slices, args.e2e_runs, bar)
    report = {"command": "bench", "model": card.key, "provider": args.provider, "threads": threads,
              "seconds_per_cell": args.seconds, "model_only": model_only, "arithmetic": arithmetic,
              "end_to_end": e2e, "provenance": provenance(card, providers_used)}
    write_json(out / "bench.json", report)
    from service.model_tools.bench_plot import plot_bench

    plot_bench(report, out / "bench.png")
    _print_summary(report)
    print(f"report in {out}")
    return 0


def _model_only(card: ModelCard, args: argparse.Namespace, threads: int,
                bar: Any) -> tuple[list[dict[str, Any]], list[str]]:
    from service.onnx_sessions import Predictor, build_session

    session = build_session(card, args.provider, threads)
    used = session.get_providers()
    if used[0] != PROVIDERS[args.provider]:
        raise ValueError(f"onnxruntime ran {card.key} on {used[0]}, not {PROVIDERS[args.provider]}")
    raw = Predictor(card, session)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="befund-bench-") as tmp:
        service = None
        if not args.skip_service:
            from service.model_tools.local_peers import ModelServiceProcess, only_model

            bar.set_postfix_str("starting the model service")
            service = ModelServiceProcess(only_model(card.folder, Path(tmp) / "models"), Path(tmp) / "var",
                                          args.provider, threads).__enter__()
        try:
            for batch in args.batches:
                x = rng.standard_normal((batch, *card.input.shape[1:])).astype(np.float32)
                raw(x)  # warm-up: the first run of a shape plans its memory
                for concurrency in args.concurrency:
                    bar.set_postfix_str(f"batch {batch}, {concurrency} in flight")
                    # the machine's sgemm rate just before the raw cell: on a shared machine the
                    # rate the model reaches is compared with what the cores gave at that moment
                    sgemm_now = sgemm_gflops(n=1536, repeat=2)["gflops"]
                    timing = measure_threads(raw, x, concurrency, args.seconds)
                    row: dict[str, Any] = {"batch": batch, "concurrency": concurrency,
                                           "raw": timing.to_dict(), "sgemm_gflops": sgemm_now}
                    bar.update(1)
                    if service is not None:
                        timing = asyncio.run(_service_timing(service.url, card, x, concurrency, args.seconds))
                        row["service"] = timing.to_dict()
                        row["ratio_service_to_raw"] = round(timing.items_per_s / row["raw"]["items_per_s"], 3)
                        bar.update(1)
                    rows.append(row)
        finally:
            if service is not None:
                service.__exit__()
    return rows, used


async def _service_timing(url: str, card: ModelCard, x: np.ndarray, concurrency: int,
                          seconds: float) -> Timing:
    """`concurrency` callers, each with its batch in its own shared region, one lean client."""
    from service.shared_client import SharedInferClient
    from service.shared_tensors import SharedBuffer

    client = SharedInferClient(url)
    buffers = [SharedBuffer(x.nbytes) for _ in range(concurrency)]
    try:
        calls = []
        for buf in buffers:
            arr, ref = buf.tensor(x.shape, model=card.key)
            arr[...] = x

            async def call(ref=ref):  # noqa: ANN202 - one caller's request
                return await client.infer([ref])

            calls.append(call)
        await calls[0]()  # warm-up: connection, the service's first run of this shape
        return await measure_async(calls, len(x), seconds)
    finally:
        await client.close()
        for buf in buffers:
            buf.close()


def _arithmetic(card: ModelCard, rows: list[dict[str, Any]], sgemm_before: dict[str, Any]) -> dict[str, Any]:
    """The model's FLOP rate in each raw cell against the sgemm rate measured just before that
    cell (paired, as the load of a shared machine drifts), the median over the cells and the
    fastest cell; and the machine's sgemm rate (2048^2) before and after, the better one."""
    from service.model_tools.onnx_graph import flops_per_item

    sgemm_after = sgemm_gflops()
    sgemm = dict(max(sgemm_before, sgemm_after, key=lambda g: g["gflops"]))
    sgemm["gflops_before_and_after"] = [sgemm_before["gflops"], sgemm_after["gflops"]]
    try:
        graph = flops_per_item(card.model_path)
    except ImportError as exc:
        return {"sgemm": sgemm, "flops_per_item": None, "note": str(exc)}
    cells = []
    for r in rows:
        rate = graph["flops"] * r["raw"]["items_per_s"] / 1e9
        cells.append({"batch": r["batch"], "concurrency": r["concurrency"], "model_gflops": round(rate, 2),
                      "sgemm_gflops": r["sgemm_gflops"], "fraction": round(rate / r["sgemm_gflops"], 3)})
    best = max(cells, key=lambda c: c["model_gflops"])
    sgemm_best = max([sgemm["gflops"], *(c["sgemm_gflops"] for c in cells)])
    return {"sgemm": sgemm, "sgemm_best_gflops": sgemm_best, "flops_per_item": graph["flops"],
            "gflops_per_item": round(graph["flops"] / 1e9, 4),
            "flops_by_op": graph["by_op"], "parameters": graph["parameters"],
            "flops_left_out": graph["left_out"], "cells": cells, "best_cell": best,
            "model_gflops": best["model_gflops"],
            # the fastest cell against the best sgemm seen in the run: peak against peak
            "fraction_of_sgemm": round(best["model_gflops"] / sgemm_best, 3),
            "fraction_of_sgemm_paired_median": round(float(np.median([c["fraction"] for c in cells])), 3)}


def _print_summary(report: dict[str, Any]) -> None:
    print(f"{'batch':>5} {'in flight':>9} {'raw items/s':>12} {'p95 ms':>8} {'service items/s':>16} "
          f"{'p95 ms':>8} {'ratio':>6}")
    for r in report["model_only"]:
        svc = r.get("service") or {}
        print(f"{r['batch']:>5} {r['concurrency']:>9} {r['raw']['items_per_s']:>12.1f} "
              f"{r['raw']['p95_ms']:>8.1f} "
              f"{svc.get('items_per_s', float('nan')):>16.1f} {svc.get('p95_ms', float('nan')):>8.1f} "
              f"{r.get('ratio_service_to_raw', float('nan')):>6.2f}")
    a = report["arithmetic"]
    if a.get("flops_per_item"):
        print(f"model: {a['gflops_per_item']} GFLOP per item; {a['model_gflops']} GFLOP/s in the "
              f"fastest cell = {a['fraction_of_sgemm']:.2f} of the best sgemm rate of the run "
              f"({a['sgemm_best_gflops']} GFLOP/s); per cell against the sgemm measured beside it: median "
              f"{a['fraction_of_sgemm_paired_median']:.2f}")
    e2e = report.get("end_to_end")
    if e2e and e2e.get("median_complete_to_delivered_s") is not None:
        print(f"end to end ({e2e['study']}): series complete -> result at the PACS, median "
              f"{e2e['median_complete_to_delivered_s']} s")
    elif e2e:
        print(f"end to end: {e2e.get('skipped') or [r.get('reason') for r in e2e['runs']]}")
