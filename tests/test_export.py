"""Export: folded BatchNorms, .tflite and .onnx files whose logits are the JAX model's, int8, latency."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet.data import fashion_mnist_offline
from mobilenet.errors import UserError
from mobilenet.export import export_run, fold_batch_norm, latency, onnx, runtime, tflite
from mobilenet.models import architectures
from mobilenet.models.mobilenet import MobileNet

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHITECTURES = ('mobilenet_v1', 'mobilenet_v2', 'mobilenet_v3_large', 'mobilenet_v3_small',
                 'mobilenet_v3_large_minimalistic', 'mobilenet_v3_small_minimalistic')
# One architecture's conversions run in the default tier (a few seconds); the others are slow.
FAST_ONE = {'mobilenet_v1'}
IMAGE_SHAPE = (28, 28, 1)  # Fashion-MNIST's, as the exported runs see it.

needs_data = pytest.mark.skipif(not fashion_mnist_offline.debian_files_available(),
                                reason='needs the Debian package dataset-fashion-mnist')


def _tiered(names):
  return [pytest.param(name, marks=() if name in FAST_ONE else pytest.mark.slow) for name in names]


def small_model(name: str) -> MobileNet:
  plan = architectures.plan(name, width_multiplier=0.25, form='cifar',
                            input_channels=IMAGE_SHAPE[-1])
  return MobileNet(plan=plan, num_classes=10)


def trained_looking_variables(model: MobileNet, seed: int = 0) -> dict:
  """Random variables of the model's shapes: He-scaled kernels, BatchNorms away from 1, 0, 0, 1.

  Drawn with numpy from the shapes alone (Flax's init, op by op or jitted, takes tens of seconds
  on a busy 2-core machine), and off the initial statistics, which would fold almost nothing.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    name = path[-1].key
    if name == 'kernel':
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(spec.shape[:-1])), spec.shape)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, spec.shape)
    else:  # BatchNorm and dense biases, means.
      value = rng.normal(0.0, 0.3, spec.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(count: int = 4, seed: int = 1) -> np.ndarray:
  return np.asarray(jax.random.normal(jax.random.key(seed), (count, *IMAGE_SHAPE)), np.float32)


def reference_logits(model, variables, x) -> np.ndarray:
  """The JAX model's inference logits (jitted: op by op, each layer would compile on its own)."""
  return np.asarray(jax.jit(lambda v, images: model.apply(v, images, train=False))(variables, x))


def folded_apply(model, variables):
  folded_model, folded_params = fold_batch_norm.fold(model, variables)
  return lambda x: folded_model.apply({'params': folded_params}, x)


def write(tmp_path, name, model_bytes) -> str:
  path = str(tmp_path / name)
  with open(path, 'wb') as f:
    f.write(model_bytes)
  return path


@pytest.mark.parametrize('name,ops', [
    pytest.param(name, 'plain', marks=() if name in FAST_ONE else pytest.mark.slow)
    for name in ARCHITECTURES] + [('mobilenet_v3_small', 'fast')])  # SE, hard-swish, residuals.
def test_folded_model_computes_the_models_inference_function(name, ops):
  """Folding reads only parameters, so the op set the model trained with does not matter."""
  model = small_model(name).clone(ops=ops)
  variables = trained_looking_variables(model)
  folded_model, folded_params = fold_batch_norm.fold(model, variables)
  assert 'batch_stats' not in folded_params and not any(
      key.endswith('bn') for path, _ in jax.tree_util.tree_leaves_with_path(folded_params)
      for key in (str(p.key) for p in path))
  x = images()
  want = reference_logits(model, variables, x)
  have = np.asarray(jax.jit(folded_model.apply)({'params': folded_params}, x))
  # Float32 rounding in another order through up to 17 blocks: ~1e-5 for V2.
  assert export_run.relative_error(have, want) < 1e-4
  # The folded kernels are the trained ones scaled per output channel, plus a bias.
  stem = folded_params['stem']['conv']
  assert stem['kernel'].shape == variables['params']['stem']['conv']['kernel'].shape
  assert stem['bias'].shape == (stem['kernel'].shape[-1],)


def test_folding_refuses_the_training_mode():
  with pytest.raises(ValueError, match='inference only'):
    model = small_model('mobilenet_v1').clone(ops='folded')
    model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), train=True)


@pytest.mark.parametrize('name', _tiered(ARCHITECTURES))
def test_tflite_float_logits_equal_the_jax_models(name, tmp_path):
  model = small_model(name)
  variables = trained_looking_variables(model)
  path = write(tmp_path, 'model.tflite', tflite.convert(folded_apply(model, variables),
                                                        IMAGE_SHAPE))
  x = images()
  have = runtime.load(path)(x)
  assert have.shape == (len(x), 10)
  assert export_run.relative_error(have, reference_logits(model, variables, x)) <= 1e-4


@pytest.mark.parametrize('name', _tiered(ARCHITECTURES))
def test_onnx_float_logits_equal_the_jax_models(name, tmp_path):
  model = small_model(name)
  variables = trained_looking_variables(model)
  float_tflite = tflite.convert(folded_apply(model, variables), IMAGE_SHAPE)
  path = write(tmp_path, 'model.onnx', onnx.from_tflite(float_tflite))
  x = images()
  have = runtime.load(path)(x)
  assert export_run.relative_error(have, reference_logits(model, variables, x)) <= 1e-4


def _calibration(count=64):
  return list(images(count, seed=2))


@pytest.mark.parametrize('name', _tiered(['mobilenet_v1', 'mobilenet_v3_small']))
def test_tflite_int8_has_per_channel_int8_weights_and_close_logits(name, tmp_path):
  from ai_edge_litert import interpreter  # pylint: disable=import-outside-toplevel
  model = small_model(name)
  variables = trained_looking_variables(model)
  path = write(tmp_path, 'int8.tflite', tflite.convert(folded_apply(model, variables),
                                                       IMAGE_SHAPE, _calibration()))
  details = interpreter.Interpreter(model_path=path).get_tensor_details()
  conv_weights = [d for d in details if d['dtype'] == np.int8 and len(d['shape']) == 4
                  and len(d['quantization_parameters']['scales']) > 1]
  # Every convolution's kernel (stem, depthwise, pointwise / expand / project) is int8 with one
  # scale per output channel.
  convs = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(variables['params'])
              if p[-1].key == 'kernel' and _.ndim == 4)
  assert len(conv_weights) == convs
  for d in conv_weights:
    channel_axis = d['quantization_parameters']['quantized_dimension']
    assert len(d['quantization_parameters']['scales']) == d['shape'][channel_axis]
  assert os.path.getsize(path) < 0.5 * len(tflite.convert(folded_apply(model, variables),
                                                          IMAGE_SHAPE))
  x = images(16, seed=2)  # Calibrated on these: the ranges cover them.
  assert export_run.relative_error(runtime.load(path)(x),
                                   reference_logits(model, variables, x)) < 0.15


@pytest.mark.slow
def test_onnx_int8_is_quantized_and_close(tmp_path):
  import onnx as onnx_lib  # pylint: disable=import-outside-toplevel
  model = small_model('mobilenet_v1')
  variables = trained_looking_variables(model)
  float_onnx = onnx.from_tflite(tflite.convert(folded_apply(model, variables), IMAGE_SHAPE))
  path = write(tmp_path, 'int8.onnx', onnx.quantize_int8(float_onnx, _calibration()))
  graph = onnx_lib.load(path).graph
  assert sum(node.op_type == 'DequantizeLinear' for node in graph.node) > 0
  assert os.path.getsize(path) < 0.5 * len(float_onnx)
  x = images(16, seed=2)
  assert export_run.relative_error(runtime.load(path)(x),
                                   reference_logits(model, variables, x)) < 0.15


def test_latency_reports_sensible_single_image_times(tmp_path):
  model = small_model('mobilenet_v1')
  float_tflite = tflite.convert(folded_apply(model, trained_looking_variables(model)),
                                IMAGE_SHAPE)
  paths = [write(tmp_path, 'model.tflite', float_tflite),
           write(tmp_path, 'model.onnx', onnx.from_tflite(float_tflite))]
  for path in paths:
    results = latency.measure(path, runs=30, warmup=3)
    assert [r.threads for r in results] == sorted({1, os.cpu_count()})
    for r in results:
      # A 3 M mult-add network: well above a microsecond, well below a second per image.
      assert 1e-3 < r.p10_ms <= r.median_ms <= r.p90_ms < 1000, r
      assert r.runs == 30 and r.path == path


def test_runtime_names_unknown_and_missing_files(tmp_path):
  with pytest.raises(UserError, match=r'\*\.tflite or \*\.onnx'):
    runtime.load(str(tmp_path / 'model.pb'))
  with pytest.raises(UserError, match='no such model file'):
    runtime.load(str(tmp_path / 'model.tflite'))


def test_export_checks_its_arguments_before_restoring(tmp_path):
  with pytest.raises(UserError, match='does not end in .onnx'):
    export_run.export_run(str(tmp_path), str(tmp_path / 'model.tflite'), 'onnx')
  with pytest.raises(UserError, match='no folder'):
    export_run.export_run(str(tmp_path), str(tmp_path / 'missing' / 'm.tflite'), 'tflite')
  with pytest.raises(UserError, match='no config.json'):
    export_run.export_run(str(tmp_path), str(tmp_path / 'm.tflite'), 'tflite')


@pytest.mark.slow
@needs_data
def test_export_script_end_to_end(fashion_mnist_data_dir, tmp_path):
  """A 4-step run with EMA, exported to int8 .tflite by the script from its EMA weights."""
  workdir = tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS='--xla_backend_optimization_level=0')  # 4 steps need only a fast compile.
  subprocess.run([sys.executable, str(ROOT / 'scripts' / 'train.py'), '--config',
                  str(ROOT / 'configs' / 'default.py'), '--workdir', str(workdir),
                  f'--config.data_dir={fashion_mnist_data_dir}', '--config.num_train_steps=4',
                  '--config.batch_size=32', '--config.eval_batch_size=1000',
                  '--config.ema_decay=0.9'],
                 check=True, env=env, capture_output=True)
  output = tmp_path / 'model_int8.tflite'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'export.py'), '--workdir', str(workdir),
       '--format', 'tflite', '--quantize', 'int8', '--calibration_batches', '2',
       '--output', str(output), '--evaluate'],
      env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert output.is_file() and not (tmp_path / 'model_int8.tflite.partial').exists()
  assert 'tflite int8' in result.stdout and 'test top-1: exported' in result.stdout
  assert 'step 4 (EMA weights)' in result.stdout
  predictor = runtime.load(str(output))
  assert predictor.input_shape == (1, *IMAGE_SHAPE)


def test_eval_times_a_runs_exported_model_and_plots_accuracy_against_latency(tmp_path):
  """experiments/evaluate.py: the export found in a run folder, its latency in the table and plot."""
  from matplotlib import image as mpimg  # pylint: disable=import-outside-toplevel
  from mobilenet.experiments import evaluate  # pylint: disable=import-outside-toplevel
  model = small_model('mobilenet_v1')
  float_tflite = tflite.convert(folded_apply(model, trained_looking_variables(model)), IMAGE_SHAPE)
  timed, untimed = tmp_path / 'timed', tmp_path / 'untimed'
  timed.mkdir()
  untimed.mkdir()
  write(timed, 'model_int8.tflite', b'not timed: int8 files are skipped')
  path = write(timed, 'v1.tflite', float_tflite)
  assert evaluate.exported_model(str(timed)) == path
  assert evaluate.exported_model(str(untimed)) is None
  results = [evaluate.RunResult(str(folder), architecture='mobilenet_v1', width_multiplier=0.25,
                                resolution=28, conv_type='separable', params=params,
                                mult_adds=10 * params, top1=0.9, top5=0.99)
             for folder, params in ((timed, 2_000), (untimed, 1_000))]
  for result in results:
    evaluate.measure_latency(result, always=False)  # The untimed run has nothing to time.
  assert results[0].latency_model == path and 0 < results[0].latency_ms < 1000
  assert results[0].latency_ms_all_threads > 0 and results[1].latency_ms is None
  table = evaluate.format_table(results).splitlines()
  assert 'latency ms (1 thread)' in table[0]
  assert f'| {results[0].latency_ms:.3f} |' in table[3] and table[2].endswith('|  |  | ok |')
  evaluate.plot_accuracy(results[:1], 'latency_ms', 'latency', tmp_path / 'plot.png')
  assert mpimg.imread(tmp_path / 'plot.png').ndim == 3
