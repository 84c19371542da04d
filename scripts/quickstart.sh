#!/usr/bin/env bash
# The main job end to end on the embedded default, on CPU: train a SuperBPE tokenizer on the bundled sample corpus
# and tokenize it into Megatron shards, train the tiny EXAONE-MoE model on 4 processes (tensor + sequence,
# pipeline and expert parallel) through two curriculum stages, checkpoint, export to Hugging Face format and check
# the export with transformers, and draw the run's figures. A tenth of the corpus's documents is held out and
# evaluated every 10 steps and at each stage end. Extra arguments are Hydra overrides for exaone-train (e.g.
# trainer.max_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
run_dir=${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
echo "Training the tiny model on 4 CPU processes (tp2 x pp2 x ep2) into $run_dir"
launch/local.sh 4 experiment=cpu_tiny run_dir="$run_dir" +eval.holdout.sample=0.1 eval.interval=10 "$@"
echo "Exporting the newest checkpoint to Hugging Face format"
.venv/bin/exaone-convert to-hf "$run_dir/checkpoints" "$run_dir/hf" --dtype fp32 --verify
echo "Drawing the run's figures"
.venv/bin/exaone-plot "$run_dir"
cat <<TXT

Done. Everything is under $run_dir:
  config       $run_dir/config.yaml        (the resolved recipe)
  metrics      $run_dir/metrics.jsonl      (one line per optimizer step and per evaluation)
  plots        $run_dir/plots/             (loss, LR, grad norm, throughput, evaluation, expert imbalance)
  data         $run_dir/data/              (SuperBPE tokenizer and the Megatron .bin/.idx shards)
  checkpoints  $run_dir/checkpoints/       (DCP, reshardable; 'latest' names the newest)
  hf           $run_dir/hf/                (transformers: AutoModelForCausalLM.from_pretrained("$run_dir/hf"))
TXT
