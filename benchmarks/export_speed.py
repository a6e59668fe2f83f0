"""Generation speed of the ONNX export against charlm's own decoder, same model, same run; file sizes.

    python benchmarks/export_speed.py                      # shakespeare-cpu's shape (2x512 LSTM), 1 thread
    python benchmarks/export_speed.py --browser --screenshot docs/img/export-web.png --sizes --markdown
    python benchmarks/export_speed.py --checkpoint run/best.safetensors --threads 2

Characters per second of sampling (temperature 1) at batch 1 and batch 64:
- charlm: `LanguageModel.generate` / `generate_many` (the packed step decoder), fp32, and bf16 and
  int8 where this CPU runs them;
- onnxruntime (CPU): the exported generate.py's own loop (numpy sampling included), on the fp32 file
  and on the int8-stored one (the same arithmetic after load: the figures should match);
- --browser: the exported page in headless Chromium (onnxruntime-web, WASM, 1 thread) as the page reports it.

The model is the preset's shape trained for one step on a text of Tiny Shakespeare's 65 symbols
(speed does not depend on the weights), or --checkpoint. Each figure is the median of --rounds
runs; ratios compare figures of the same run. Both runtimes get --threads threads (torch's and
onnxruntime's intra-op pools). --sizes adds the exported file size of every preset's shape per dtype.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import charlm
from charlm.config import list_presets, load_preset
from charlm.devices import cpu_has_bf16
from charlm.export import export
from charlm.export import generate as gen
from charlm.export.web import NPM_HINT, ORT_FILES

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65
PRIME = "The "


def corpus(path: Path, chars: int = 200_000) -> Path:
    """Random words over the 65 symbols (each appears), one line at a time."""
    rng = random.Random(0)
    letters = SYMBOLS[13:]
    lines = [SYMBOLS]
    while sum(map(len, lines)) < chars:
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words) + rng.choice(".,;:!?") + "\n")
    path.write_text("".join(lines))
    return path


def preset_checkpoint(preset: str, work: Path) -> Path:
    """A checkpoint of the preset's model shape: one training step (fp32) on the 65-symbol corpus."""
    text = corpus(work / "text.txt") if not (work / "text.txt").exists() else work / "text.txt"
    result = charlm.train(
        text,
        work / f"run-{preset}",
        preset=preset,
        max_steps=1,
        batch_size=2,
        seq_length=8,
        dtype="fp32",
        progress=False,
        overwrite=True,
        time_budget=None,
    )
    return result.best


def charlm_cases(ckpt: Path, dtype: str, length: int) -> dict:
    """charlm's decoder in `dtype`: batch 1 and batch 64, as (function, characters it makes)."""
    lm = charlm.load(ckpt, device="cpu", dtype=dtype)
    short = max(length // 4, 10)
    return {
        "batch1": (lambda: lm.generate(PRIME, length, seed=1), length),
        "batch64": (lambda: lm.generate_many([PRIME] * 64, short, seed=1), 64 * short),
    }


def onnx_cases(model: Path, threads: int, length: int) -> dict:
    """The exported generate.py's loop on onnxruntime: batch 1 and batch 64."""
    m = gen.Model(model, threads=threads)
    sampler = gen.Sampler(False, 1.0, None, None)
    short = max(length // 4, 10)

    def run(n: int, batch: int) -> None:
        for _ in gen.generate(m, PRIME, n, sampler, 1, batch):
            pass

    return {"batch1": (lambda: run(length, 1), length), "batch64": (lambda: run(short, 64), 64 * short)}


def step_times(ckpt: Path, model: Path, threads: int, reps: int = 300) -> dict:
    """One step alone, without the loop around it: charlm's decoder (LanguageModel.scorer.step) and one
    onnxruntime run, interleaved; microseconds, the minimum (the machine's best) and the median."""
    from charlm.export.check import session

    lm = charlm.load(ckpt, device="cpu", dtype="fp32")
    sess = session(str(model), threads)
    out: dict = {}
    for batch in (1, 64):
        state, ids = lm.scorer.start(batch), torch.zeros(batch, dtype=torch.long)
        feeds = {"ids": ids.numpy(), **{s.name: s_zero(s, batch) for s in sess.get_inputs() if s.name != "ids"}}
        ort_t, charlm_t = [], []
        for k in range(reps + 20):  # the first 20 warm up
            start = time.perf_counter()
            sess.run(None, feeds)
            mid = time.perf_counter()
            lm.scorer.step(ids, state)
            end = time.perf_counter()
            if k >= 20:
                ort_t.append(mid - start)
                charlm_t.append(end - mid)
        for name, t in (("charlm", charlm_t), ("onnxruntime", ort_t)):
            out.setdefault(name, {})[f"batch{batch}"] = {
                "min_us": round(min(t) * 1e6),
                "median_us": round(statistics.median(t) * 1e6),
            }
    return out


def s_zero(arg, batch: int):
    import numpy as np

    layers, _, size = arg.shape
    return np.zeros((layers, batch, size), dtype=np.float32)


def interleaved_rates(cases: dict[str, dict], rounds: int) -> dict[str, dict[str, float]]:
    """Characters per second of every case, the median of `rounds`; each round runs every case once, in
    turn, so a change of machine load during the run touches all of them alike (fairer ratios)."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, batches in cases.items():
            for batch, (fn, _chars) in batches.items():
                start = time.perf_counter()
                fn()
                times.setdefault((name, batch), []).append(time.perf_counter() - start)
    return {
        name: {batch: chars / statistics.median(times[(name, batch)]) for batch, (_fn, chars) in batches.items()}
        for name, batches in cases.items()
    }


def browser_rate(
    ckpt: Path, work: Path, ort_dist: Path, length: int, screenshot: Path | None, temperature: float, seed: int
) -> float:
    """The page's own characters/s (WASM, one thread) in headless Chromium, served on 127.0.0.1."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    site = work / "site"
    export([ckpt], web=site, ort_dist=ort_dist)
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        wait(driver)
        driver.execute_script(f"""
            document.getElementById('prime').value = {json.dumps(PRIME)};
            document.getElementById('length').value = {length};
            document.getElementById('temperature').value = {temperature};
            document.getElementById('seed').value = '{seed}';
            document.body.dataset.state = '';""")
        driver.find_element("id", "generate").click()
        wait(driver, timeout=600)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        return float(driver.find_element("id", "speed").get_attribute("data-chars-per-s"))
    finally:
        driver.quit()
        server.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def wait(driver, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = driver.execute_script("return document.body.dataset.state || ''")
        if state == "error":
            raise RuntimeError(driver.find_element("id", "status").text)
        if state:
            return
        time.sleep(0.1)
    raise RuntimeError("the page did not finish in time")


def sizes(work: Path) -> list[dict]:
    """The exported model.onnx's size per preset shape and stored dtype (65-symbol vocabulary)."""
    rows, seen = [], {}
    for preset in list_presets():
        p = load_preset(preset)
        shape = (p.get("cell", "lstm"), p.get("num_layers", 2), p.get("rnn_size", 256), p.get("embed_size", 64))
        if shape in seen:
            seen[shape]["presets"].append(preset)
            continue
        ckpt = preset_checkpoint(preset, work)
        row = {
            "presets": [preset],
            "shape": f"{shape[0]} {shape[1]}x{shape[2]}, embedding {shape[3]}",
            "checkpoint_mb": ckpt.stat().st_size / 1e6,
        }
        for dtype in ("fp32", "fp16", "int8"):
            out = work / f"size-{preset}-{dtype}"
            export([ckpt], onnx=out, dtype=dtype)
            row[dtype + "_mb"] = (out / "model.onnx").stat().st_size / 1e6
        seen[shape] = row
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare-cpu", help="the model shape to time (default: shakespeare-cpu, 2x512 LSTM)")
    ap.add_argument("--checkpoint", type=Path, help="time this checkpoint instead of a preset's shape")
    ap.add_argument("--length", type=int, default=1000, help="characters per batch-1 run (batch 64: a quarter of it per stream)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and for onnxruntime")
    ap.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    ap.add_argument("--browser-length", type=int, default=3000)
    ap.add_argument("--ort-dist", type=Path, default=ROOT / ".cache/npm/node_modules/onnxruntime-web/dist")
    ap.add_argument("--screenshot", type=Path, help="save the page after generating (with --browser)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the page's temperature")
    ap.add_argument("--seed", type=int, default=1, help="the page's seed")
    ap.add_argument("--sizes", action="store_true", help="also export every preset's shape and report the file sizes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown (docs/export.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "torch": torch.__version__, "length": args.length, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        work = Path(tmp)
        ckpt = args.checkpoint or preset_checkpoint(args.preset, work)
        lm = charlm.load(ckpt, device="cpu")
        result["model"] = f"{lm.config.cell} {lm.config.num_layers}x{lm.config.rnn_size}, {len(lm.vocab)} symbols" + (
            "" if args.checkpoint else f" ({args.preset}'s shape)"
        )
        files = {}
        for dtype in ("fp32", "int8"):
            files[dtype] = work / f"onnx-{dtype}"
            export([ckpt], onnx=files[dtype], dtype=dtype)
        cases = {}
        for dtype in ["fp32"] + (["bf16", "int8"] if cpu_has_bf16() else []):
            cases[f"charlm decoder, {dtype}"] = charlm_cases(ckpt, dtype, args.length)
        for dtype, folder in files.items():
            cases[f"onnxruntime CPU, {dtype} file"] = onnx_cases(folder / "model.onnx", args.threads, args.length)
        for batches in cases.values():  # warm up: first calls allocate and pack
            for fn, _chars in batches.values():
                fn()
        rows = interleaved_rates(cases, args.rounds)
        result["rows"] = {k: {b: round(v) for b, v in r.items()} for k, r in rows.items()}
        base, ort = rows["charlm decoder, fp32"], rows["onnxruntime CPU, fp32 file"]
        result["onnx_over_charlm"] = {b: round(ort[b] / base[b], 2) for b in base}
        result["step_us"] = step_times(ckpt, files["fp32"] / "model.onnx", args.threads)
        if args.browser:
            if not all((args.ort_dist / f).is_file() for f in ORT_FILES):
                sys.exit(f"--browser needs onnxruntime-web at {args.ort_dist}: {NPM_HINT}")
            rate = browser_rate(ckpt, work, args.ort_dist, args.browser_length, args.screenshot, args.temperature, args.seed)
            result["rows"]["browser (onnxruntime-web, WASM, 1 thread)"] = {"batch1": round(rate)}
        if args.sizes:
            result["sizes"] = sizes(work)
    if args.json:
        print(json.dumps(result))
    else:
        report(result, args.markdown)
    return result


def report(r: dict, markdown: bool) -> None:
    head = (
        f"{r['model']}, sampling at temperature 1, {r['threads']} thread(s), median of {r['rounds']} rounds, torch {r['torch']}"
    )
    print(head + "\n")
    if markdown:
        print("| decoder | batch 1 (chars/s) | batch 64 (chars/s, total) |\n|---|---:|---:|")
        for name, v in r["rows"].items():
            print(f"| {name} | {v['batch1']:,} | {v['batch64']:,} |" if "batch64" in v else f"| {name} | {v['batch1']:,} | |")
    else:
        for name, v in r["rows"].items():
            batch64 = f"   batch 64: {v['batch64']:>9,}" if "batch64" in v else ""
            print(f"  {name:<44} batch 1: {v['batch1']:>8,}{batch64}")
    ratio = r["onnx_over_charlm"]
    print(f"\nonnxruntime / charlm (fp32): {ratio['batch1']}x at batch 1, {ratio['batch64']}x at batch 64")
    steps = r["step_us"]
    print(
        "one step alone (fp32), microseconds, min / median: "
        + "; ".join(f"{name} batch {b[5:]}: {v[b]['min_us']} / {v[b]['median_us']}" for name, v in steps.items() for b in v)
    )
    if "sizes" in r:
        print("\n| presets | model | checkpoint (MB) | model.onnx fp32 | fp16 | int8 |\n|---|---|---:|---:|---:|---:|")
        for s in r["sizes"]:
            print(
                f"| {', '.join(s['presets'])} | {s['shape']} | {s['checkpoint_mb']:.1f} | {s['fp32_mb']:.1f} | {s['fp16_mb']:.1f} | {s['int8_mb']:.1f} |"
            )


if __name__ == "__main__":
    main()
