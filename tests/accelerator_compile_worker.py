"""Compiles accelerator experiments' train steps with fake CPU devices; prints JSON lines.

    python tests/accelerator_compile_worker.py N experiments/a.py:ARG[@DATAxMODEL] [...]

Started by tests/test_accelerator_configs.py with N fake devices (XLA reads the
count when jax is imported, so this runs in its own process); each config's step
is compiled for its own device count (the first devices) and its mesh, or the
mesh after '@'.
"""
import json
import os
import sys
import time


def main(argv):
  n_devices, specs = int(argv[1]), argv[2:]
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n_devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=import-outside-toplevel
  from dictlearn import cli  # pylint: disable=import-outside-toplevel
  from dictlearn import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from dictlearn.train import trainer  # pylint: disable=import-outside-toplevel
  for spec in specs:
    start = time.perf_counter()
    path, _, mesh_shape = spec.partition('@')
    config = cli.load_config_file(path)
    if mesh_shape:
      with config.unlocked():
        config.mesh.shape = tuple(int(n) for n in mesh_shape.split('x'))
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axis_names,
                                  devices=jax.devices())
    memory = trainer.compiled_step_memory(config, config.data.d_model, mesh)
    print(json.dumps({'spec': spec, 'mesh': dict(mesh.shape), **memory,
                      'seconds': time.perf_counter() - start}), flush=True)


if __name__ == '__main__':
  main(sys.argv)
