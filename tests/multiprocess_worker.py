"""One process of tests/test_multiprocess.py: the test starts it twice, on localhost.

    python tests/multiprocess_worker.py --process P --processes 2 --port PORT --dir DIR

Each process gets 4 fake CPU devices, joins the run through `dictlearn.distributed`
(the `distributed` config section, as the command-line entry points do), and then,
in DIR, with a (2, 4) mesh that spans both processes:

    full/       the tiny config trained for 20 steps
    resumed/    the same run stopped at step 10 and resumed (stopped/ is a copy
                taken at the stop, for the test to resume in one process)
    refused.<p>.json  the errors of bad meshes and batches
    restore.<p>.json  what `checkpoint.restore_arrays` gave this process
    harvest/    the tiny harvest of DIR/tiny.gguf over both processes
    done.<p>.json  written when all of that is done
    long/       a run with no end, for the test to kill one process in

The processes are real and the imports slow, so everything shares one start.
"""
import argparse
import json
import os
import shutil
import sys


TRAIN = {'train.num_steps': 20, 'train.log_every': 1, 'mesh.shape': (2, 4)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--process', type=int, required=True)
  p.add_argument('--processes', type=int, required=True)
  p.add_argument('--port', type=int, required=True)
  p.add_argument('--dir', required=True)
  p.add_argument('--heartbeat', type=int, default=10)
  args = p.parse_args()
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=import-outside-toplevel
  from dictlearn import distributed  # pylint: disable=import-outside-toplevel
  from dictlearn import harvest as harvest_lib  # pylint: disable=import-outside-toplevel
  from dictlearn import logs  # pylint: disable=import-outside-toplevel
  from dictlearn.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from dictlearn.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from experiments import base, harvest_smollm2  # pylint: disable=import-outside-toplevel
  from test_train import tiny_config  # pylint: disable=import-outside-toplevel

  d = base.distributed_config()
  d.coordinator_address = f'localhost:{args.port}'
  d.num_processes, d.process_id = args.processes, args.process
  d.initialization_timeout_s, d.heartbeat_timeout_s, d.shutdown_timeout_s = 60, args.heartbeat, 10
  distributed.initialize(d)
  logs.setup(args.dir, process=args.process)
  assert jax.process_count() == args.processes and jax.device_count() == 4 * args.processes
  out = args.dir

  # Bad input, refused before anything is written: a mesh the processes cannot hold,
  # one that leaves a process out, a global batch the processes do not divide.
  refused = {}
  for name, overrides in (('mesh_too_big', {'mesh.shape': (4, 4)}),
                          ('mesh_partial', {'mesh.shape': (1, 4)}),
                          ('batch', {'mesh.shape': (1, 8), 'train.batch_size': 63})):
    workdir = os.path.join(out, 'bad', name)
    try:
      train_and_evaluate(tiny_config(**dict(TRAIN, **overrides)), workdir)
      refused[name] = None
    except ValueError as e:
      refused[name] = str(e)
    refused[name + ' wrote'] = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  with open(os.path.join(out, f'refused.{args.process}.json'), 'w', encoding='utf-8') as f:
    json.dump(refused, f)

  train_and_evaluate(tiny_config(**TRAIN), os.path.join(out, 'full'))

  resumed = os.path.join(out, 'resumed')
  train_and_evaluate(tiny_config(**TRAIN), resumed, stop_at=10)
  if distributed.is_primary():
    shutil.copytree(resumed, os.path.join(out, 'stopped'))
  distributed.barrier('stopped copied')
  train_and_evaluate(tiny_config(**TRAIN), resumed)

  step, state = ckpt_lib.restore_arrays(ckpt_lib.checkpoint_dir(os.path.join(out, 'full')))
  w_enc = state['params']['W_enc']
  with open(os.path.join(out, f'restore.{args.process}.json'), 'w', encoding='utf-8') as f:
    json.dump({'step': step, 'devices': len(w_enc.sharding.device_set),
               'addressable': len(w_enc.addressable_shards),
               'spec': str(w_enc.sharding.spec)}, f)

  config = harvest_smollm2.get_config('tiny')
  with config.unlocked():
    config.model = os.path.join(out, 'tiny.gguf')
    config.sites = ('blocks.0.hook_resid_post', 'blocks.1.hook_resid_post')
  harvest_lib.harvest(config, os.path.join(out, 'harvest'))

  with open(os.path.join(out, f'done.{args.process}.json'), 'w', encoding='utf-8') as f:
    json.dump({'process': args.process}, f)
  distributed.barrier('scenarios done')
  # Runs until the test kills a process: the other must then stop on its own.
  train_and_evaluate(tiny_config(**dict(TRAIN, **{'train.num_steps': 10 ** 6,
                                                 'train.checkpoint_every': 10 ** 9})),
                     os.path.join(out, 'long'))
  return 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
