"""Every accelerator experiment compiles for its hardware and fits its memory, checked here.

Each config's state is built abstractly and its train step lowered and compiled
for the config's mesh on as many fake CPU devices as the target has (one
subprocess: XLA_FLAGS is read when jax is imported); XLA's memory analysis of
one device must fit the target device's memory (`throughput.DEVICES`) with 10%
to spare for the runtime. A CPU compilation is not the TPU's or the GPU's (other
fusions and layouts), so the figure is an estimate; it is exact for the state.
"""
import json
import math
import os
import runpy
import subprocess
import sys

import jax
import pytest

from dictlearn import sharding as sharding_lib
from dictlearn.sae import make_sae
from dictlearn.train import schedules
from dictlearn.train import state as state_lib
from dictlearn.train import throughput
from dictlearn.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'accelerator_compile_worker.py')
EXPERIMENTS = ('gemma_scope_131k_tpu.py', 'topk_1m_h100.py', 'scaling_monosemanticity.py')
HEADROOM = 0.9  # of a device's memory the step may use
# The check must be able to fail: the 1M TopK on one H100 instead of eight.
TOO_BIG = (os.path.join(REPO, 'experiments', 'topk_1m_h100.py') + '@1x1', 'H100', 1)


def targets():
  """(spec, device kind, device count) of every variant of every accelerator experiment."""
  out = []
  for name in EXPERIMENTS:
    path = os.path.join(REPO, 'experiments', name)
    for arg, (kind, count) in runpy.run_path(path)['TARGETS'].items():
      out.append((f'{path}:{arg}' if arg else path, kind, count))
  return out


@pytest.fixture(scope='module')
def compiled():
  specs = [spec for spec, _, _ in targets()] + [TOO_BIG[0]]
  n = max(count for _, _, count in targets())
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, WORKER, str(n), *specs], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return {r['spec']: r for r in map(json.loads, result.stdout.splitlines())}


def fits(memory: dict, spec: str, kind: str, count: int) -> tuple[bool, str]:
  """Whether the compiled step fits the device, and the figures that say so."""
  have = throughput.DEVICES[kind].memory_bytes
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  figures = (f'{spec} on {count} x {kind}: peak {gib(memory["peak"])} per device (arguments '
             f'{gib(memory["arguments"])}, outputs {gib(memory["outputs"])}, donated '
             f'{gib(memory["aliased"])}, temporaries {gib(memory["temporaries"])}; train state '
             f'{gib(memory["state"])}) against {gib(have)} x {HEADROOM}')
  return memory['peak'] <= HEADROOM * have, figures


@pytest.mark.slow
@pytest.mark.parametrize('spec,kind,count', targets(), ids=lambda v: str(v).split('/')[-1])
def test_train_step_compiles_and_fits(compiled, spec, kind, count):
  memory = compiled[spec]
  assert memory['mesh']['data'] * memory['mesh']['model'] == count
  ok, figures = fits(memory, spec, kind, count)
  print(figures)
  assert memory['state'] <= memory['arguments'] <= memory['peak'], figures
  assert ok, 'does not fit: ' + figures


@pytest.mark.slow
def test_a_config_too_big_for_its_device_fails_the_check(compiled):
  ok, figures = fits(compiled[TOO_BIG[0]], *TOO_BIG)
  assert not ok, figures
  assert compiled[TOO_BIG[0]]['state'] > 90 * 2**30  # 96 GiB of parameters and moments


def test_a_state_too_big_for_the_devices_is_refused_before_anything_is_written(tmp_path):
  """On a backend that reports its memory (GPU, TPU; given here, a CPU does not)."""
  config = runpy.run_path(os.path.join(REPO, 'experiments', 'tiny.py'))['get_config']()
  mesh = sharding_lib.make_mesh((1, 8), ('data', 'model'))
  sae = make_sae(config.sae, 16)
  tx = schedules.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(sae, tx, 0, mesh, config.mesh.logical_axis_rules)
  need = state_lib.per_device_bytes(abstract, shardings)
  total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  assert total / 8 < need < total / 4  # the latent axis split 8 ways, b_dec and scalars not
  trainer.check_state_fits(abstract, shardings, mesh, str(tmp_path), device_bytes=need)
  with pytest.raises(ValueError, match=r'needs 0\.00 GiB per device on mesh '
                     r"\{'data': 1, 'model': 8\}; a cpu holds 0\.00 GiB"):
    trainer.check_state_fits(abstract, shardings, mesh, str(tmp_path), device_bytes=need - 1)
  assert not list(tmp_path.iterdir())
