"""The step profile gives every operation of the real training or eval step to a kind of layer."""
import os

import pytest

from mobilenet.bench import step_profile
from mobilenet.training import config_base


@pytest.mark.parametrize('op_name,kind', [
    ('jit(train_step)/jvp(MobileNet)/block_03/depthwise/ffi_call', 'depthwise'),
    ('jit(train_step)/transpose(jvp(MobileNet))/block_03/depthwise/ffi_call', 'depthwise'),
    ('jit(train_step)/jvp(MobileNet)/block_03/expand/...c,cd->...d/dot_general', 'pointwise'),
    ('jit(train_step)/transpose(jvp(MobileNet))/block_03/project/ffi_call', 'pointwise'),
    ('jit(train_step)/jvp(MobileNet)/block_03/depthwise_bn/ffi_call', 'batch_norm_activation'),
    ('jit(eval_step)/block_03/depthwise_project/ffi_call', 'depthwise_pointwise'),
    ('jit(eval_step)/block_01/depthwise_pointwise/ffi_call', 'depthwise_pointwise'),
    ('jit(eval_step)/block_05/expand_depthwise_project/ffi_call', 'depthwise_pointwise'),
    ('jit(eval_step)/block_06/expand_depthwise/ffi_call', 'depthwise_pointwise'),
    ('jit(eval_step)/block_01/stem_depthwise_project/ffi_call', 'depthwise_pointwise'),
    ('jit(train_step)/jvp(MobileNet)/stem/bn/ffi_call', 'batch_norm_activation'),
    ('jit(train_step)/jvp(MobileNet)/stem/conv/ffi_call', 'standard'),
    ('jit(train_step)/jvp(MobileNet)/block_03/se/squeeze/dot_general', 'squeeze_excite'),
    ('jit(train_step)/jvp(MobileNet)/block_03/se/mul', 'squeeze_excite'),
    ('jit(train_step)/jvp(MobileNet)/block_03/add', 'residual_and_glue'),
    ('jit(train_step)/jvp(MobileNet)/head/dot_general', 'dense'),
    ('jit(train_step)/optax/mul', 'loss_optimizer_other'),
])
def test_operations_go_to_the_layer_kind_that_emitted_them(op_name, kind):
  config = config_base.base_config()
  config.model.name = 'mobilenet_v3_small'
  config.model.resolution = 32
  kinds = step_profile._operation_kinds(f'  %op.1 = f32[2]{{0}} add(%a, %b), '
                                         f'metadata={{op_name="{op_name}" stack_frame_id=3}}',
                                         config)
  assert kinds == {'op.1': kind}


def test_the_one_kernel_counts_the_arithmetic_of_the_layers_it_computes():
  hlo = ('metadata={op_name="jit(eval_step)/block_01/stem_depthwise/ffi_call"}\n'
         'metadata={op_name="jit(eval_step)/block_02/expand_depthwise_project/ffi_call"}\n'
         'metadata={op_name="jit(eval_step)/block_04/depthwise/ffi_call"}')
  assert step_profile._separable_layers(hlo) == {
      'stem': {'conv'}, 'block_01': {'depthwise'},
      'block_02': {'expand', 'depthwise', 'project'}}


def test_idle_time_is_the_span_of_the_operations_less_the_time_any_of_them_ran():
  event = lambda name, start, duration: {'name': name, 'ts': start, 'dur': duration}
  events = [event('op.1', 10, 5), event('wrapper', 0, 100), event('op.2', 12, 6),  # 10-18 covered
            event('op.3', 20, 2), event('op.1', 30, 10), event('op.4', 32, 3)]  # 20-22, 30-40
  operations = {'op.1', 'op.2', 'op.3', 'op.4'}
  assert step_profile._idle_microseconds(events, operations) == 30 - 8 - 2 - 10  # pylint: disable=protected-access
  assert step_profile._idle_microseconds(events, {'missing'}) == 0  # pylint: disable=protected-access


def _small_v3_config():
  """V3-Small alpha 0.25 at 32x32, batch 8: every kind of layer, quickly."""
  config = config_base.base_config()
  config.model.name = 'mobilenet_v3_small'
  config.model.width_multiplier = 0.25
  config.model.resolution = 32
  config.batch_size = 8
  return config


@pytest.mark.slow
def test_a_profiled_v3_step_has_time_in_every_kind_of_layer():
  profile = step_profile.profile_train_step(_small_v3_config(), warmup=1, steps=2)
  by_kind = {row['kind']: row for row in profile['kinds']}
  assert set(by_kind) == set(step_profile.KINDS)
  for kind in ('depthwise', 'pointwise', 'standard', 'dense', 'batch_norm_activation',
               'squeeze_excite', 'residual_and_glue', 'loss_optimizer_other'):
    assert by_kind[kind]['ms_per_step'] > 0, kind
  assert sum(row['share'] for row in profile['kinds']) == pytest.approx(1.0, abs=0.01)
  assert by_kind['pointwise']['gflop_s'] > 0 and by_kind['batch_norm_activation']['gflop_s'] is None
  # Operations can overlap on the cores but cannot take longer than the cores had.
  assert 0 < profile['operations_ms'] < 1.5 * profile['step_ms'] * os.cpu_count()
  assert profile['operations_per_step'] > 100 and 0 < profile['idle_ms'] < profile['step_ms']
  table = step_profile.format_profile(profile, ceiling_gflop_s=100.0)
  assert 'of the 100 GFLOP/s matrix-product ceiling' in table and 'squeeze_excite' in table


@pytest.mark.slow
def test_a_profiled_fused_eval_step_gives_its_kernels_to_their_layers():
  """The fused inference names its operations after the model's layers (models/fused_inference.py)."""
  config = _small_v3_config()
  assert config.model.fused_inference
  profile = step_profile.profile_train_step(config, warmup=1, steps=2, step='eval')
  by_kind = {row['kind']: row for row in profile['kinds']}
  for kind in ('depthwise', 'pointwise', 'depthwise_pointwise', 'dense',
               'batch_norm_activation', 'squeeze_excite'):
    assert by_kind[kind]['ms_per_step'] > 0, kind
  # V3-Small's blocks 2 and 3 (no squeeze-and-excitation) on the one-kernel depthwise + projection,
  # their arithmetic with them; the stem inside block 1's kernel, no standard convolution left.
  assert by_kind['depthwise_pointwise']['gflop_s'] > 0 and by_kind['depthwise']['gflop_s'] > 0
  assert by_kind['standard']['ms_per_step'] == 0
  # Only the eval's own sums (loss, top-k, pooling) are left unattributed.
  assert by_kind['loss_optimizer_other']['share'] < 0.2
  assert profile['step'] == 'eval' and profile['eval_img_s'] > 0
  assert 'eval step' in step_profile.format_profile(profile)
