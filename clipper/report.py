"""The quickstart's results: a table on stdout and a self-contained report.html (training curves,
the metrics, sample captions of test images) from a folder of runs.

    python -m clipper.report runs/quickstart-STAMP

The folder holds one run folder per job (fmnist, emoji, fmnist-captioner, emoji-captioner, and
emoji-vlm where the quickstart trained a vision-language model), each
with its summary.json (what `clipper train` writes at the end) and, beside it, the `clipper eval`
output (NAME.eval.json) where there is one.
"""

import base64
import html
import io
import json
import sys
from pathlib import Path

JOBS = [("fmnist", "Fashion-MNIST contrastive", "fmnist"), ("emoji", "emoji contrastive", "emoji"),
        ("fmnist-captioner", "Fashion-MNIST captioner", "fmnist"), ("emoji-captioner", "emoji captioner", "emoji"),
        ("emoji-vlm", "emoji VLM (SmolLM2-135M-Instruct)", "emoji")]
# what a vision-language model's report asks each shown image, beside its caption
QUESTIONS = ("Which Unicode group is this emoji in?", "Give some keywords for this emoji.")
SHOWN = ("top1", "top5", "t2i_R@1", "t2i_R@5", "i2t_R@1", "exact_match", "bleu4", "rouge_l", "cider_d", "class_named")


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rows(folder: Path) -> list[dict]:
    out = []
    for name, title, data in JOBS:
        summary = _json(folder / name / "summary.json")
        if summary is None:
            continue
        metrics = _json(folder / f"{name}.eval.json") or summary.get("eval") or {}
        out.append({"name": name, "title": title, "data": data, "train_seconds": summary["train_seconds"],
                    "samples": summary["samples"], "samples_per_s": summary["samples_per_s"],
                    "metrics": {k: metrics[k] for k in SHOWN if isinstance(metrics.get(k), (int, float))}})
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'job':18s} {'train s':>8s} {'samples':>9s} {'samples/s':>10s}  test metrics (%)"]
    for r in rows:
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in r["metrics"].items())
        lines.append(f"{r['name']:18s} {r['train_seconds']:8.0f} {r['samples']:9d} {r['samples_per_s']:10.0f}  {metrics}")
    return "\n".join(lines)


def sample_captions(model_dir: Path, shards: Path, n: int = 8) -> list[dict]:
    """Captions of the first `n` test images, with the images (PNG, base64) and their references."""
    from .data.pipeline import IMAGE_EXTS, list_shards, read_tar
    from .factory import load
    from .generate import caption
    from .images import decode_image

    model = load(model_dir)
    readable = (s for shard in list_shards(shards) for s in read_tar(shard) if isinstance(s, dict) and "txt" in s)
    samples = []
    for s in readable:
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        if ext:
            samples.append((decode_image(s[ext], s["__key__"]), s["txt"].decode("utf-8", "replace").strip()))
        if len(samples) == n:
            break
    images = [im for im, _ in samples]
    captions = caption(model, images, num_beams=3)
    # a vision-language model also answers questions about them
    asked = {q: caption(model, images, prompt=q) for q in QUESTIONS} if model.config.decoder.kind == "llava" else {}
    out = []
    for i, ((im, ref), cap) in enumerate(zip(samples, captions)):
        buf = io.BytesIO()
        im.resize((64, 64)).save(buf, format="PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode(), "reference": ref, "caption": cap,
                    "answers": {q: a[i] for q, a in asked.items()}})
    return out


def write_html(folder: Path, rows: list[dict], samples: dict[str, list[dict]]) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>clipper quickstart report</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             ".s{display:inline-block;width:150px;margin:6px;text-align:center;font-size:13px;vertical-align:top}"
             ".s img{width:64px;height:64px;image-rendering:pixelated}.ref{color:#777}</style>",
             f"<h1>clipper quickstart: {html.escape(folder.name)}</h1>",
             "<p>Every figure below comes from this run (2 CPU cores unless the machine says otherwise).</p>",
             "<table><tr><th>job</th><th>train s</th><th>samples</th><th>samples/s</th><th>test metrics (%)</th></tr>"]
    for r in rows:
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in r["metrics"].items())
        parts.append(f"<tr><td>{html.escape(r['title'])}</td><td>{r['train_seconds']:.0f}</td><td>{r['samples']}</td>"
                     f"<td>{r['samples_per_s']:.0f}</td><td>{html.escape(metrics)}</td></tr>")
    parts.append("</table>")
    for r in rows:
        curves = folder / r["name"] / "curves.png"
        if curves.is_file():
            data = base64.b64encode(curves.read_bytes()).decode()
            parts.append(f"<h2>{html.escape(r['title'])}: training curves</h2><img src='data:image/png;base64,{data}'>")
    for name, items in samples.items():
        parts.append(f"<h2>{html.escape(name)}: captions of test images (beam 3), reference below</h2>")
        for s in items:
            answers = "".join(f"<br><i>{html.escape(q)}</i> {html.escape(a)}" for q, a in s["answers"].items())
            parts.append(f"<div class='s'><img src='data:image/png;base64,{s['image']}'><br><b>{html.escape(s['caption'])}"
                         f"</b><br><span class='ref'>{html.escape(s['reference'])}</span>{answers}</div>")
    out = folder / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m clipper.report RUNS_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    found = rows(folder)
    print(table(found))
    samples = {}
    for r in found:
        if r["name"].endswith(("captioner", "vlm")) and (folder / r["name"] / "model").is_dir():
            samples[r["title"]] = sample_captions(folder / r["name"] / "model", Path("data/shards") / r["data"] / "test")
            print(f"\n{r['title']}, first test images (caption <- reference):")
            for s in samples[r["title"]]:
                print(f"  {s['caption']!r:40s} <- {s['reference']!r}"
                      + "".join(f"\n      {q} {a!r}" for q, a in s["answers"].items()))
    print(f"\nreport: {write_html(folder, found, samples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
