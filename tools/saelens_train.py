"""Train a SAELens TopK SAE with SAELens's own SAETrainer on stored activations (peers' python).

    /work/peers-venv/bin/python tools/saelens_train.py ROWS.npy ORDER.bin OUT_DIR \
        --d_sae 4096 --k 32 --batch 1024 --lr 1e-3 --warmup 50 --dead_feature_window 195

SAETrainer takes its data as an iterator of activation batches (its `data_provider`),
so this feeds it the rows of ROWS.npy (raw activations) in the order of ORDER.bin
(int32 row numbers, made by tools/bench_quality.py), `batch` rows a step, and
leaves the rest to SAELens: TopKTrainingSAEConfig's defaults (decoder-norm
rescaling, decoder init norm 0.1, AuxK coefficient 1, no activation
normalisation), Adam, and the learning rate warmed up over `warmup` steps then
decayed linearly to 0 over the remaining ones (lr_scheduler 'constant' with
lr_decay_steps). The SAE is saved with `save_inference_model` in OUT_DIR/sae.
"""
import argparse
import os

import numpy as np
import torch

from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

import peers_data


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  peers_data.add_arguments(parser)
  parser.add_argument('--d_sae', type=int, required=True)
  parser.add_argument('--lr', type=float, required=True)
  parser.add_argument('--warmup', type=int, required=True)
  parser.add_argument('--dead_feature_window', type=int, required=True, help='in steps')
  parser.add_argument('--hook_name', default=None, help='metadata.hook_name of the saved SAE')
  args = parser.parse_args()
  rows = peers_data.load_rows(args.rows)
  order = torch.from_numpy(np.fromfile(args.order, np.int32).astype(np.int64))
  steps = len(order) // args.batch
  batches = (rows[order[i * args.batch:(i + 1) * args.batch]] for i in range(steps))
  torch.manual_seed(args.seed)
  sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=rows.shape[1], d_sae=args.d_sae, k=args.k))
  cfg = SAETrainerConfig(total_training_samples=steps * args.batch,
                         train_batch_size_samples=args.batch, lr=args.lr, lr_end=args.lr,
                         lr_scheduler_name='constant', lr_warm_up_steps=args.warmup,
                         lr_decay_steps=steps - args.warmup,
                         dead_feature_window=args.dead_feature_window)
  print(f'SAELens SAETrainer: {steps} steps of {args.batch} rows')
  SAETrainer(cfg=cfg, sae=sae, data_provider=batches).fit()
  sae.cfg.metadata.hook_name = args.hook_name
  sae.save_inference_model(os.path.join(args.out, 'sae'))


if __name__ == '__main__':
  main()
