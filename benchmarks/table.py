"""Render benchmarks/results/*.json as the README's table (`--write` replaces it in README.md)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table() -> str:
    rows = ["| benchmark | open_clip | clipper | ratio / note |", "|---|---|---|---|"]
    if r := _load("embed_model"):
        for key, label in (("images", "images/s"), ("texts_prompts", "texts/s, prompts"),
                           ("texts_full_context", "texts/s, full 77 tokens")):
            rows.append(f"| embed-model {r['model']} b{r['batch']}: {label} | {r[key]['open_clip']} | "
                        f"{r[key]['clipper']} | {r[key]['ratio']}x |")
            others = [n for n in r[key].get("ratio_to_open_clip", {}) if n not in ("open_clip", "clipper", "transformers")]
            if others:  # --runtimes: clipper int8 / bf16 and its ONNX export on ONNX Runtime, same rounds
                rows.append(f"| embed-model {label}: " + " / ".join(others) + f" | {r[key]['open_clip']} | "
                            + " / ".join(str(r[key][n]) for n in others) + " | "
                            + " / ".join(f"{r[key]['ratio_to_open_clip'][n]}x" for n in others) + " |")
        rows.append(f"| embed-model: max cosine distance | | | {max(r['max_cosine_distance'].values()):.1e} |")
        if "transformers" in r:
            rows.append("| embed-model, transformers CLIPModel on the same weights: images/s, prompts, full | "
                        + " / ".join(str(r[k]["transformers"]) for k in ("images", "texts_prompts", "texts_full_context"))
                        + " (transformers) | " + " / ".join(str(r[k]["clipper"]) for k in
                                                             ("images", "texts_prompts", "texts_full_context"))
                        + " | " + " / ".join(f"{r[k]['ratio_to_transformers']}x" for k in
                                             ("images", "texts_prompts", "texts_full_context")) + " |")
    for path in sorted(RESULTS.glob("embed_model_*.json")):  # the other families (issue #16)
        r = json.loads(path.read_text())
        rows.append(f"| embed-model {r['model']} ({r['towers']['vision']}) b{r['batch']}: images/s; texts/s | "
                    f"{r['images']['open_clip']}; {r['texts_full_context']['open_clip']} | {r['images']['clipper']}; "
                    f"{r['texts_full_context']['clipper']} | {r['images']['ratio']}x; {r['texts_full_context']['ratio']}x |")
    if r := _load("zoo"):
        built = f"; {r['built']} built with random weights: max diff {r['max_abs_diff']:.1e}, exports exact " \
                f"{r['all_exports_exact']}" if "built" in r else ""
        rows.append(f"| model zoo: open_clip pretrained pairs clipper loads | {r['pretrained_pairs']} | "
                    f"{r['pairs_loading']} | {r['architectures_loading']} of {r['architectures']} architectures{built} |")
    if r := _load("train_step"):
        s = r["samples_per_s"]
        rows.append(f"| train-step (ViT 6x192 p4 @32, text 4x192, b256): samples/s | {s['open_clip']} | "
                    f"{s['clipper']} | {r['ratio']}x, first-step loss diff {r['loss_abs_diff']:.1e} |")
        m = r["peak_rss_mib"]
        rows.append(f"| train-step: peak RSS MiB | {m['open_clip']} | {m['clipper']} | |")
    if r := _load("train_step_bf16"):
        s, m = r["samples_per_s"], r["peak_rss_mib"]
        rows.append(f"| train-step, both under CPU bf16 autocast: samples/s | {s['open_clip']} | {s['clipper']} | "
                    f"{r['ratio']}x; peak RSS MiB {m['open_clip']} vs {m['clipper']} |")
    if r := _load("train_fmnist"):
        peer = r["open_clip_peer_reported"]
        first = r.get("first_at_or_above_88.6")
        rows.append(f"| train-e2e Fashion-MNIST, {r['minutes']:g} min: zero-shot top-1 | {peer['top1']} "
                    f"(reported) | {r['final']['top1']} | 88.6% first at "
                    f"{first['elapsed_s'] if first else 'never'} s |")
        rows.append(f"| train-e2e Fashion-MNIST: samples/s | {peer['samples_per_s']} (reported) | "
                    f"{r['samples_per_s']} | {r['samples_seen']} samples seen |")
    if r := _load("train_emoji"):
        peer, f = r["open_clip_peer_reported"], r["final"]
        trained = " (trained on Noto + Twemoji), Noto test" if r.get("data") == "emoji-styles" else ""
        rows.append(f"| emoji, {r['minutes']:g} min{trained}: t2i R@1 / R@5 / i2t R@1 | {peer['t2i_R@1']} / "
                    f"{peer['t2i_R@5']} / {peer['i2t_R@1']} (reported) | {f['t2i_R@1']} / {f['t2i_R@5']} / "
                    f"{f['i2t_R@1']} | {r['samples_per_s']} samples/s |")
        if by_style := r.get("final_by_style"):  # trained on Noto + Twemoji: the styles it never saw
            cells = "; ".join(f"{s} " + " / ".join(str(by_style[f"test_{s}"][k]) for k in ("t2i_R@1", "t2i_R@5", "i2t_R@1"))
                              for s in ("apple", "facebook"))
            cross = " / ".join(str(by_style[f"cross_noto_to_{s}"]["i2i_R@1"]) for s in ("apple", "facebook"))
            rows.append(f"| emoji, {r['minutes']:g} min, styles never trained on: test t2i R@1 / R@5 / i2t R@1 | | "
                        f"{cells} | Noto -> apple / facebook i2i R@1 {cross} |")
    for path in sorted(RESULTS.glob("emoji_styles*.json")):  # style robustness (issue #18), one row per recipe
        r = json.loads(path.read_text())
        budget = f"{r['minutes']:g} min" if "minutes" in r else f"{r['steps']} steps"
        for recipe, m in r["recipes"].items():
            styles = " / ".join(f"{m[f'test_{s}']['t2i_R@1']}" for s in ("noto", "twemoji", "apple", "facebook"))
            rows.append(f"| emoji styles ({path.stem}), {budget}, {recipe}: test t2i R@1 noto / twemoji / apple / "
                        f"facebook | | {styles} | val (never-trained styles) apple {m['val_apple']['t2i_R@1']}, "
                        f"facebook {m['val_facebook']['t2i_R@1']}; Noto -> apple i2i R@1 "
                        f"{m['cross_noto_to_apple']['i2i_R@1']} |")
    for path in sorted(RESULTS.glob("data_pipeline*.json")):
        r = json.loads(path.read_text())
        views = f", with {' '.join(r['overrides'])}" if r.get("overrides") else ""
        for data in ("fmnist", "emoji"):
            if data not in r:
                continue
            s = r[data]["samples_per_s"]
            no_cache = f"; {s['pipeline_0_workers_no_cache']} at 0 without the decoded-image cache" \
                if "pipeline_0_workers_no_cache" in s else ""
            rows.append(f"| data pipeline {data} ({r[data]['preset']}{views}): samples/s at 0/1/2 workers | | "
                        f"{s['pipeline_0_workers']} / {s['pipeline_1_workers']} / {s['pipeline_2_workers']} | "
                        f"{s['ratio_pipeline0_to_step']}x the training step alone ({s['train_step_only']}/s){no_cache} |")
    if r := _load("embed_e2e"):
        ips = r["images_per_s"]
        rows.append(f"| embed-e2e {r['images']} JPEGs 256 px, ViT-B-32, {r['workers']} worker: images/s fp32 | "
                    f"{ips['open_clip']} | {ips['clipper_fp32']} | {r['ratio_fp32']}x, max abs diff "
                    f"{r['fp32_max_abs_diff_vs_open_clip']:.1e} |")
        acc = r.get("int8_fmnist_zero_shot")
        for p in ("int8", "bf16"):
            if f"clipper_{p}" in ips:
                rows.append(f"| embed-e2e: images/s `--precision {p}` | {ips['open_clip']} | {ips[f'clipper_{p}']} | "
                            f"{r[f'ratio_{p}']}x, min cosine to open_clip {r[f'{p}_min_cosine_vs_open_clip']:.4f}"
                            + (f"; fmnist top-1 {acc['fp32_top1']} -> {acc['int8_top1']}" if acc and p == "int8"
                               else "") + " |")
    if r := _load("search"):
        for n, row in r["sizes"].items():
            cells = "; ".join(f"{kind} {m['p50_ms']} ms, R@10 {m['recall_at_10']}" for kind, m in row.items()
                              if isinstance(m, dict))
            rows.append(f"| search {int(n):,} x {r['dim']}-d, 1 query: p50 latency, recall@10 vs exact | | {cells} | |")
    if r := _load("decode"):
        t = r["tokens_per_s"]
        rows.append(f"| decode {r['new_tokens']} tokens x {r['batch']} images, decoder {r['decoder']}: tokens/s | "
                    f"{t.get('open_clip_coca', 'n/a')} (CoCa generate) | {t['clipper_kv_cache']} (KV cache), "
                    f"{t['clipper_recompute']} (recompute) | cache {r['cache_vs_recompute']}x recompute"
                    + (f", {r['cache_vs_open_clip_coca']}x CoCa" if "cache_vs_open_clip_coca" in r else "") + " |")
        if "captioner_vocab_size" in r:
            rows.append(f"| decode, same decoder with the emoji captioner's {r['captioner_vocab_size']}-token vocabulary: "
                        f"tokens/s | | {t['clipper_kv_cache_captioner_vocab']} (KV cache), "
                        f"{t['clipper_recompute_captioner_vocab']} (recompute) | cache "
                        f"{r['cache_vs_recompute_captioner_vocab']}x recompute |")
    for name in ("coca_ViT-B-32", "coca_ViT-L-14"):
        if not (r := _load(f"decode_{name}")):
            continue
        t = r["tokens_per_s"]
        for mode, label in (("greedy", "greedy"), ("beam3", "beam 3")):
            same = r.get(f"same_captions_{mode}")
            rows.append(f"| decode {name}, {r['new_tokens']} tokens x {r['images']} images, {label}: tokens/s | "
                        f"{t.get(f'open_clip_coca_{mode}', 'n/a')} (CoCa generate) | {t[f'clipper_kv_cache_{mode}']} "
                        f"(KV cache), {t[f'clipper_recompute_{mode}']} (recompute) | "
                        + (f"{r[f'cache_vs_open_clip_{mode}']}x open_clip, " if f"cache_vs_open_clip_{mode}" in r else "")
                        + f"{r[f'cache_vs_recompute_{mode}']}x recompute"
                        + ("" if same is None else f"; same captions: {'yes' if same else 'NO'}")
                        + (f"; peak RSS MB: clipper {r['peak_rss_mb']['clipper']}"
                           + (f", open_clip {r['peak_rss_mb']['open_clip']}" if "open_clip" in r["peak_rss_mb"] else "")
                           if mode == "beam3" else "")
                        + " |")
    if r := _load("train_captioner_emoji"):
        f = r["final"]
        rows.append(f"| captioner emoji, {r['minutes']:g} min (image tower frozen): exact / BLEU-4 / ROUGE-L / CIDEr-D | "
                    f"| {f['exact_match']} / {f['bleu4']} / {f['rouge_l']} / {f['cider_d']} | "
                    f"{r['samples_per_s']} samples/s, greedy, 748 test emoji |")
    if r := _load("train_captioner_fmnist"):
        f = r["final"]
        rows.append(f"| captioner Fashion-MNIST, {r['minutes']:g} min: captions naming the right class | | "
                    f"{f['class_named']}% | {r['samples_per_s']} samples/s, greedy, 10,000 test images |")
    if r := _load("serve"):
        cells = {m: " / ".join(f"{r[f'{m}_{c}_clients']['requests_per_s']}" for c in (1, 8, 32)) for m in ("text", "image")}
        p95 = {m: " / ".join(f"{r[f'{m}_{c}_clients']['p95_ms']}" for c in (1, 8, 32)) for m in ("text", "image")}
        for m in ("text", "image"):
            rows.append(f"| serve {r['model']} /v1/embeddings {m}: requests/s at 1 / 8 / 32 clients | | {cells[m]} | "
                        f"p95 ms {p95[m]} |")
    for path in sorted(RESULTS.glob("peer_eval_*.json")):  # clip_benchmark on clipper's exports (issue #17)
        r = json.loads(path.read_text())
        fp32, amp = r["clip_benchmark_fp32"], r["clip_benchmark_amp"]
        rows.append(f"| clip_benchmark on the exported model and set ({path.stem.removeprefix('peer_eval_')}, "
                    f"{r['samples']} images): zero-shot top-1 | {fp32['top1']:.2f} (fp32); {amp['top1']:.2f} (its "
                    f"default bf16 autocast) | {r['clipper']['top1']:.2f} | difference {fp32['top1_difference']:.1e} |")
    if r := _load("open_clip_trainer"):
        f = r["final"]
        rows.append(f"| open_clip_train.main on the Fashion-MNIST shards ({r['epochs']} epochs, "
                    f"{r['wall_s_incl_startup']:.0f} s): zero-shot top-1 | {f['top1']} | | "
                    f"{r['samples_per_s_incl_startup']} samples/s incl. startup |")
    return "\n".join(rows) + "\n\n" + machines() + " \"(reported)\": open_clip's figures as issue #4 gives them " \
        "for the AMD EPYC machine, not re-measured by these scripts; every other figure comes from the results JSON " \
        "of the script named in benchmarks/README.md. Compare ratios within a row: CPUs differ between runs."


def machines() -> str:
    """Which CPU each results file was measured on (the table mixes runs of different sessions)."""
    by_cpu: dict[str, list[str]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        m = json.loads(path.read_text()).get("machine", {})
        flags = f" ({' '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
        cpu = f"{m.get('cpu', '?')}{flags}, {m.get('torch_threads', '?')} threads, torch {m.get('torch', '?')}"
        by_cpu.setdefault(cpu, []).append(path.stem)
    return "Machines: " + "; ".join(f"{cpu}: {', '.join(names)}" for cpu, names in by_cpu.items()) + "."


def main() -> None:
    text = table()
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        content = readme.read_text()
        block = f"{BEGIN}\n{text}\n{END}"
        content = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S) \
            if BEGIN in content else content.replace("BENCHMARK_TABLE", block)
        readme.write_text(content)
    print(text)


if __name__ == "__main__":
    main()
