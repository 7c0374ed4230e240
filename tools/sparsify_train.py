"""Train a sparsify SAE with sparsify's own Trainer on stored activations (peers' python).

    /work/peers-venv/bin/python tools/sparsify_train.py ROWS.npy ORDER.bin OUT_DIR \
        --num_latents 4096 --k 32 --batch 1024 --lr 1e-3 --warmup 50 --optimizer adam \
        --auxk_alpha 0.03125 --dead_feature_threshold 200000 [--seq 32]

sparsify trains from a Hugging Face model's forward hooks over token ids; it has no
path that reads activations from disk. So this script hands its `Trainer` (with
everything it builds: the optimizer and its learning rate, the linear warmup and
decay schedule, b_dec set to the first batch's mean, unit decoder rows, the AuxK
loss, dead-latent counting) a stand-in model: the "token ids" are row numbers of
ROWS.npy (raw activations, memory-mapped), read through sparsify's own
`MemmapDataset` over ORDER.bin (int32 row numbers in training order, one
shuffled pass per epoch, made by tools/bench_quality.py), and the model's one
layer, `layers.0`, outputs those rows. One step is `batch` rows (`batch / seq`
sequences of `seq`). The SAE is saved by sparsify in OUT_DIR/run/layers.0.
"""
import argparse
import os

os.environ.setdefault('SPARSIFY_DISABLE_TRITON', '1')

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from sparsify import SparseCoderConfig, Trainer, TrainConfig  # noqa: E402
from sparsify.data import MemmapDataset  # noqa: E402

import peers_data  # noqa: E402


class RowsConfig(PretrainedConfig):
  model_type = 'stored_rows'

  def __init__(self, num_hidden_layers=1, **kwargs):
    super().__init__(num_hidden_layers=num_hidden_layers, **kwargs)


class RowsModel(PreTrainedModel):
  """A 'model' whose layer 0 outputs the stored activation rows its token ids name."""
  config_class = RowsConfig

  def __init__(self, config, rows):
    super().__init__(config)
    self.rows = nn.Embedding.from_pretrained(rows, freeze=True)
    self.layers = nn.ModuleList([nn.Identity()])

  def forward(self, input_ids, **_):
    return BaseModelOutput(last_hidden_state=self.layers[0](self.rows(input_ids)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  peers_data.add_arguments(parser)
  parser.add_argument('--num_latents', type=int, required=True)
  parser.add_argument('--seq', type=int, default=32, help='rows per sequence')
  parser.add_argument('--optimizer', default='adam', choices=('adam', 'signum', 'muon'))
  parser.add_argument('--lr', type=float, default=None, help="None: sparsify's own choice")
  parser.add_argument('--warmup', type=int, default=1000)
  parser.add_argument('--auxk_alpha', type=float, default=0.0)
  parser.add_argument('--dead_feature_threshold', type=int, default=10_000_000)
  args = parser.parse_args()
  if args.batch % args.seq:
    parser.error(f'--batch {args.batch} must be a multiple of --seq {args.seq}')
  rows = peers_data.load_rows(args.rows)
  dataset = MemmapDataset(args.order, args.seq, dtype=np.int32)
  model = RowsModel(RowsConfig(), rows)
  cfg = TrainConfig(
      SparseCoderConfig(num_latents=args.num_latents, k=args.k),
      batch_size=args.batch // args.seq, optimizer=args.optimizer, lr=args.lr,
      lr_warmup_steps=args.warmup, auxk_alpha=args.auxk_alpha,
      dead_feature_threshold=args.dead_feature_threshold, hookpoints=['layers.0'],
      init_seeds=[args.seed], save_every=10**9, log_to_wandb=False, run_name='run',
      save_dir=args.out)
  print(f'sparsify Trainer: {len(dataset) // cfg.batch_size} steps of {args.batch} rows')
  Trainer(cfg, dataset, model).fit()


if __name__ == '__main__':
  main()
