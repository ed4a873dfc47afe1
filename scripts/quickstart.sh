#!/usr/bin/env bash
# The main job, end to end on real data: set up, fetch the Debian data packages, build the
# Fashion-MNIST and emoji shards, train a CLIP model on each, train a captioner on each model and
# a vision-language model (SmolLM2-135M-Instruct behind a projector) on the emoji one, evaluate
# (zero-shot, retrieval, captioning), caption test images and ask the VLM about them, print a
# results table and write runs/quickstart-STAMP/report.html (curves, metrics, sample captions).
#   scripts/quickstart.sh          ~18 minutes on 2 cores (4 + 4 min contrastive, 2 + 2 min captioners, 2 min VLM)
#   scripts/quickstart.sh --fast   ~4 minutes (45 s + 45 s contrastive, 20 s + 20 s captioners, 20 s VLM)
# Re-running reuses the virtualenv and the shards; each run trains into a new runs/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIP_MIN=4 CAP_MIN=2
[ "${1:-}" = "--fast" ] && CLIP_MIN=0.75 CAP_MIN=0.33
source scripts/setup.sh "caption,vlm"  # extras: captioning metrics; the VLM's transformers, GGUF reading, SmolLM2

clipper data fetch
[ -f data/shards/fmnist/test/sizes.json ] || clipper data fashion-mnist --out data/shards/fmnist
[ -f data/shards/emoji/test/sizes.json ] || clipper data emoji --out data/shards/emoji

out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
for set in fmnist emoji; do
  preset=$([ $set = fmnist ] && echo fmnist-tiny || echo emoji-small)
  task=$([ $set = fmnist ] && echo zeroshot-fmnist || echo retrieval-emoji)
  echo "== training $preset for $CLIP_MIN minute(s) on data/shards/$set/train -> $out/$set"
  clipper train --preset "$preset" --minutes "$CLIP_MIN" --train-data "data/shards/$set/train" \
    --eval-data "data/shards/$set/test" --out "$out/$set" > /dev/null   # its summary: $out/$set/summary.json
  clipper eval --model "$out/$set/model" --task "$task" --data "data/shards/$set/test" > "$out/$set.eval.json"
  echo "== training the $set captioner for $CAP_MIN minute(s) on $out/$set/model -> $out/$set-captioner"
  # fmnist: the 10,000-image captioning evaluation is left to benchmarks/train_captioner.py
  captask=$([ $set = fmnist ] && echo none || echo captioning-emoji)
  clipper train-captioner --preset "$set-captioner" --init "$out/$set/model" --minutes "$CAP_MIN" \
    --train-data "data/shards/$set/train" --eval-task "$captask" --eval-data "data/shards/$set/test" \
    --out "$out/$set-captioner" > /dev/null
done
# the own captioner names emoji better at this budget (benchmarks/README.md, "A VLM trained on the
# emoji pairs"): the VLM is trained beside it, and the report shows its answers to a few questions
echo "== training the emoji VLM (SmolLM2 + projector, 3 retrieved names in the prompt) for $CAP_MIN minute(s)" \
     "-> $out/emoji-vlm"
clipper train-captioner --preset emoji-vlm --set decoder.retrieve=3 --init "$out/emoji/model" --minutes "$CAP_MIN" \
  --train-data data/shards/emoji/train --eval-task none --out "$out/emoji-vlm" > /dev/null

echo
echo "== results (this run)"
python -m clipper.report "$out"
