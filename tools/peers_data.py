"""What the peers' training scripts share (tools/sparsify_train.py, tools/saelens_train.py,
run with the peers' python): the stored rows and the order to train on them."""
import numpy as np
import torch


def add_arguments(parser):
  """ROWS.npy ORDER.bin OUT_DIR and the shape flags both trainers take."""
  parser.add_argument('rows', help='raw activations [n, d_model] float32 (.npy)')
  parser.add_argument('order', help='int32 row numbers in training order (.bin)')
  parser.add_argument('out', help='output directory')
  parser.add_argument('--k', type=int, required=True)
  parser.add_argument('--batch', type=int, required=True, help='rows (tokens) per step')
  parser.add_argument('--seed', type=int, default=0)


def load_rows(path: str) -> torch.Tensor:
  """The rows of a .npy as one float32 tensor in memory."""
  return torch.from_numpy(np.load(path, mmap_mode='r')[:].astype(np.float32))
