"""Throughput accounting: tokens/s, model FLOPs per token, and MFU against the devices' peak.

    mfu = tokens_per_second * flops_per_token / peak_flops_per_second

`flops_per_token` is `dictlearn.sae.flops.model_flops_per_token`, the formula the
scaling sweep counts compute with. The peak is the sum over the mesh's devices
of the table below (dense matmul peak per JAX device, by the compute dtype), or,
on a CPU, a matmul measured once per process (`cpu_peak_flops`): the fake CPU
devices of a test share the same cores, so a CPU host's peak is counted once
per process, not once per device.

Per-device memory, beside the peak, is what `tests/test_accelerator_configs.py`
checks each accelerator experiment's compiled step against.
"""
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp

from dictlearn.sae.flops import model_flops_per_token

log = logging.getLogger(__name__)

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Peak dense matmul FLOP/s and memory of one JAX device of a kind."""
  peak_bfloat16: float
  peak_float32: float  # what a float32 matmul runs at by default (TPU: bf16 passes; GPU: TF32)
  memory_bytes: int
  note: str


# Keyed by a substring of `jax.Device.device_kind`. A TPU v2/v3 chip holds two
# cores and JAX sees each core as a device, so their figures are half a chip's;
# v4 and v5p chips (megacore) are one device each. GPU figures are the SXM
# parts' dense (no 2:4 sparsity) tensor-core peaks.
DEVICES = {
    'TPU v3': DeviceSpec(61.5e12, 61.5e12, 16 * GiB, 'per core; 123 TFLOP/s and 32 GiB per chip'),
    'TPU v4': DeviceSpec(275e12, 275e12, 32 * GiB, 'per chip (megacore)'),
    'TPU v5 lite': DeviceSpec(197e12, 197e12, 16 * GiB, 'v5e, per chip'),
    'TPU v5p': DeviceSpec(459e12, 459e12, 95 * GiB, 'per chip (megacore)'),
    'TPU v5': DeviceSpec(459e12, 459e12, 95 * GiB, 'v5p as JAX names it (after v5 lite)'),
    'TPU v6 lite': DeviceSpec(918e12, 918e12, 32 * GiB, 'v6e (Trillium), per chip'),
    'H100': DeviceSpec(989e12, 494e12, 80 * GiB, 'SXM; float32 matmuls on TF32 tensor cores'),
    'H200': DeviceSpec(989e12, 494e12, 141 * GiB, 'SXM; float32 matmuls on TF32 tensor cores'),
    'A100': DeviceSpec(312e12, 156e12, 80 * GiB, 'SXM 80GB; float32 matmuls on TF32'),
}


def device_spec(device_kind: str) -> DeviceSpec | None:
  """The table's entry for a `jax.Device.device_kind`, or None (a CPU, an unknown kind)."""
  for key, spec in DEVICES.items():
    if key.lower() in device_kind.lower():
      return spec
  return None


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype: str = 'float32', size: int = 1024, repeats: int = 5) -> float:
  """This host's matmul FLOP/s in `dtype`, measured once per process (best of `repeats`).

  A [size, size] @ [size, size] product on the first CPU device, inputs in `dtype` and
  float32 accumulation as the SAE's products take them (a bfloat16 product with a
  bfloat16 output takes a much slower path on CPUs with AMX). On a loaded machine the
  figure is low, and the MFU it gives high.
  """
  cpu = jax.local_devices(backend='cpu')[0]
  a = jax.device_put(jnp.ones((size, size), dtype), cpu)
  matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  jax.block_until_ready(matmul(a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  peak = 2.0 * size ** 3 / best
  log.info('CPU peak measured by a %dx%d %s matmul: %.3g FLOP/s', size, size, dtype, peak)
  return peak


def peak_flops(devices, dtype: str) -> float:
  """Peak FLOP/s of `devices` together for matmuls in `dtype` ('float32' or 'bfloat16').

  CPU devices count the measured host peak once per process that holds some.
  """
  total, cpu_processes = 0.0, set()
  for device in devices:
    spec = device_spec(device.device_kind) if device.platform != 'cpu' else None
    if spec is None:
      cpu_processes.add(device.process_index)
      continue
    total += spec.peak_bfloat16 if dtype == 'bfloat16' else spec.peak_float32
  if cpu_processes:
    if any(d.platform != 'cpu' for d in devices):
      log.warning('no peak FLOP/s known for device kind %r; MFU counts the CPU peak for it',
                  next(d.device_kind for d in devices if d.platform != 'cpu'))
    total += cpu_peak_flops(dtype) * len(cpu_processes)
  return total


class Accounting:
  """tokens/s -> {'tokens_per_second', 'flops_per_token', 'mfu'} for one run's mesh."""

  def __init__(self, config, d_model: int, mesh):
    self._sae, self._d_model = config.sae, d_model
    self.peak = peak_flops(list(mesh.devices.flat), config.sae.dtype)

  def flops_per_token(self, metrics: dict) -> float:
    s = self._sae
    return model_flops_per_token(s.architecture, s.n_latents, self._d_model, s.k,
                                 sparse_kernels=s.sparse_capacity > 0, l0=metrics.get('l0'))

  def record(self, tokens_per_second: float, metrics: dict) -> dict:
    """The throughput fields of a metrics record (`metrics`: the step's, for L0)."""
    flops = self.flops_per_token(metrics)
    return {'tokens_per_second': tokens_per_second, 'flops_per_token': flops,
            'mfu': tokens_per_second * flops / self.peak}
