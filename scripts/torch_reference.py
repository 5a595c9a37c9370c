r"""The PyTorch yardstick: the project's MobileNets in PyTorch eager, train and eval images/second.

  .venv-torch/bin/python scripts/torch_reference.py --architecture mobilenet_v2 --width_multiplier 0.5
  .venv-torch/bin/python scripts/torch_reference.py --architecture mobilenet_v3_small --form imagenet \
      --resolution 224 --batch_size 16 --num_classes 1000 --threads 2
  .venv-torch/bin/python scripts/torch_reference.py --architecture mobilenet_v1 --counts_only
  .venv-torch/bin/python scripts/torch_reference.py --architecture mobilenet_v2 --steps 3 --profile

Runs in its own virtual environment (`bash scripts/setup_torch_reference.sh` makes .venv-torch) and
imports torch alone: neither this project nor torchvision. `python3 scripts/compare_with_pytorch.py`
runs it beside scripts/benchmark.py, rounds interleaved, and checks first that both sides count the
same parameters and BatchNorm statistics.

The networks are torchvision's MobileNetV2 and MobileNetV3 definitions written out (torchvision's
registry wheels are built against torch's CUDA build and do not import next to its CPU build):
Conv2dNormActivation, InvertedResidual, SqueezeExcitation, the classifier heads, with one change
each where the project follows keras.applications, whose channel counts it reproduces exactly:
  - V2: outputs make_divisible(int(c * alpha)), as Keras (torchvision: make_divisible(c * alpha)).
  - V3: the stem's 16 and the pre-logits' 1280/1024 channels stay unscaled unless alpha > 1, and
    expansions are make_divisible(input channels * ratio) (torchvision scales all of them by alpha).
  - MobileNetV1 (not in torchvision): Table 1 of the paper, max(int(c * alpha), 8) channels.
The 'cifar' form keeps the stem at stride 1. Each convolution is followed by BatchNorm and its
activation (none after the projection), the tensors are channels-last, the step is cross-entropy,
backward and the project's optimizer (SGD + Nesterov, or RMSprop), with weight decay on the
kernels except the depthwise ones, as the project's mask. Prints one JSON line; with --profile it
also holds the training step's milliseconds per kind of layer under torch.profiler, in
scripts/profile_step.py's kinds (`compare_with_pytorch.py --profile` puts the two side by side).
"""
import argparse
import json
import statistics
import time

ARCHITECTURES = ('mobilenet_v1', 'mobilenet_v2', 'mobilenet_v3_large', 'mobilenet_v3_small')
STEM_STRIDES = {'imagenet': 2, 'cifar': 1}

# MobileNetV1, Table 1: the pointwise layers' channels and the depthwise layers' strides.
V1_CHANNELS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
V1_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
# MobileNetV2 (torchvision's inverted_residual_setting): expansion t, channels c, repeats n, stride s.
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1))
# MobileNetV3 (torchvision's _mobilenet_v3_conf): kernel, expanded, out, SE, activation, stride.
V3_LARGE = (
    (3, 16, 16, False, 'RE', 1), (3, 64, 24, False, 'RE', 2), (3, 72, 24, False, 'RE', 1),
    (5, 72, 40, True, 'RE', 2), (5, 120, 40, True, 'RE', 1), (5, 120, 40, True, 'RE', 1),
    (3, 240, 80, False, 'HS', 2), (3, 200, 80, False, 'HS', 1), (3, 184, 80, False, 'HS', 1),
    (3, 184, 80, False, 'HS', 1), (3, 480, 112, True, 'HS', 1), (3, 672, 112, True, 'HS', 1),
    (5, 672, 160, True, 'HS', 2), (5, 960, 160, True, 'HS', 1), (5, 960, 160, True, 'HS', 1))
V3_SMALL = (
    (3, 16, 16, True, 'RE', 2), (3, 72, 24, False, 'RE', 2), (3, 88, 24, False, 'RE', 1),
    (5, 96, 40, True, 'HS', 2), (5, 240, 40, True, 'HS', 1), (5, 240, 40, True, 'HS', 1),
    (5, 120, 48, True, 'HS', 1), (5, 144, 48, True, 'HS', 1), (5, 288, 96, True, 'HS', 2),
    (5, 576, 96, True, 'HS', 1), (5, 576, 96, True, 'HS', 1))
V3_PRE_LOGITS = {'mobilenet_v3_large': 1280, 'mobilenet_v3_small': 1024}


def make_divisible(value, divisor=8):
  """Nearest multiple of `divisor`, at least `divisor`, never 10% below `value` (torchvision, Keras)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def build_model(architecture, width_multiplier, form, num_classes, activation='relu',
                min_channels=8, dropout_rate=0.0):
  """The torch.nn.Module of one variant (torch is imported here: --help works without it)."""
  import torch
  from torch import nn

  activations = {'relu': nn.ReLU, 'relu6': nn.ReLU6, 'RE': nn.ReLU, 'HS': nn.Hardswish}

  class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv (no bias) -> BatchNorm -> activation."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, act=None):
      layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout, eps=1e-3)]
      if act is not None:
        layers.append(act(inplace=True))
      super().__init__(*layers)

  class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's ReLU and hard sigmoid."""

    def __init__(self, channels, squeeze):
      super().__init__()
      self.fc1 = nn.Conv2d(channels, squeeze, 1)
      self.fc2 = nn.Conv2d(squeeze, channels, 1)
      self.relu = nn.ReLU(inplace=True)
      self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x):
      scale = self.gate(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
      return x * scale

  class InvertedResidual(nn.Module):
    """torchvision's V2/V3 block: [expand 1x1] -> depthwise k x k -> [SE] -> linear 1x1 [+ input]."""

    def __init__(self, cin, expanded, cout, kernel, stride, act, se_channels=0):
      super().__init__()
      layers = []
      if expanded:  # 0: no expansion layer (the first block).
        layers.append(Conv2dNormActivation(cin, expanded, 1, act=act))
      expanded = expanded or cin
      layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                         act=act))
      if se_channels:
        layers.append(SqueezeExcitation(expanded, se_channels))
      layers.append(Conv2dNormActivation(expanded, cout, 1))
      self.block = nn.Sequential(*layers)
      self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
      return x + self.block(x) if self.use_res_connect else self.block(x)

  class MobileNet(nn.Module):
    """features -> global average pool -> classifier, as torchvision's MobileNetV2/V3."""

    def __init__(self, features, classifier):
      super().__init__()
      self.features = nn.Sequential(*features)
      self.classifier = nn.Sequential(*classifier)

    def forward(self, x):
      return self.classifier(torch.flatten(self.features(x).mean((2, 3)), 1))

  alpha = width_multiplier
  stem_stride = STEM_STRIDES[form]
  if architecture == 'mobilenet_v1':
    act = activations[activation]
    channels = max(int(32 * alpha), min_channels)
    features = [Conv2dNormActivation(3, channels, 3, stem_stride, act=act)]
    for out, stride in zip(V1_CHANNELS, V1_STRIDES):
      out = max(int(out * alpha), min_channels)
      features += [Conv2dNormActivation(channels, channels, 3, stride, groups=channels, act=act),
                   Conv2dNormActivation(channels, out, 1, act=act)]
      channels = out
    classifier = [nn.Dropout(dropout_rate), nn.Linear(channels, num_classes)]
  elif architecture == 'mobilenet_v2':
    channels = make_divisible(int(32 * alpha))
    features = [Conv2dNormActivation(3, channels, 3, stem_stride, act=nn.ReLU6)]
    for t, c, n, s in V2_SETTING:
      for repeat in range(n):
        out = make_divisible(int(c * alpha))
        features.append(InvertedResidual(channels, int(t * channels) if t != 1 else 0, out, 3,
                                         s if repeat == 0 else 1, nn.ReLU6))
        channels = out
    last = make_divisible(1280 * alpha) if alpha > 1 else 1280
    features.append(Conv2dNormActivation(channels, last, 1, act=nn.ReLU6))
    classifier = [nn.Dropout(dropout_rate), nn.Linear(last, num_classes)]
  else:
    rows = V3_LARGE if architecture == 'mobilenet_v3_large' else V3_SMALL
    channels = table_channels = 16
    features = [Conv2dNormActivation(3, channels, 3, stem_stride, act=nn.Hardswish)]
    for kernel, expanded, out, squeeze_excite, act, stride in rows:
      ratio = expanded / table_channels
      expanded = 0 if ratio == 1 else make_divisible(channels * ratio)
      scaled_out = make_divisible(out * alpha)
      features.append(InvertedResidual(
          channels, expanded, scaled_out, kernel, stride, activations[act],
          make_divisible((expanded or channels) * 0.25) if squeeze_excite else 0))
      channels, table_channels = scaled_out, out
    last = make_divisible(6 * channels)
    features.append(Conv2dNormActivation(channels, last, 1, act=nn.Hardswish))
    pre_logits = V3_PRE_LOGITS[architecture]
    pre_logits = make_divisible(pre_logits * alpha) if alpha > 1 else pre_logits
    classifier = [nn.Linear(last, pre_logits), nn.Hardswish(inplace=True), nn.Dropout(dropout_rate),
                  nn.Linear(pre_logits, num_classes)]
  return MobileNet(features, classifier)


def counts(model):
  """(trainable parameters, BatchNorm running mean and variance entries): the project's two counts."""
  import torch
  params = sum(p.numel() for p in model.parameters())
  batch_stats = sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
                    if isinstance(m, torch.nn.BatchNorm2d))
  return params, batch_stats


def optimizer_for(model, args):
  """The project's optimizer, weight decay on the kernels (convolutions, dense) but not depthwise ones."""
  import torch
  decayed, other = [], []
  for module in model.modules():
    for name, param in module.named_parameters(recurse=False):
      depthwise = isinstance(module, torch.nn.Conv2d) and module.groups > 1
      is_kernel = name == 'weight' and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
      (decayed if is_kernel and not depthwise else other).append(param)
  groups = [{'params': decayed, 'weight_decay': args.weight_decay},
            {'params': other, 'weight_decay': 0.0}]
  if args.optimizer == 'rmsprop':
    return torch.optim.RMSprop(groups, lr=args.learning_rate, alpha=0.9, eps=1.0, momentum=0.9)
  return torch.optim.SGD(groups, lr=args.learning_rate, momentum=0.9, nesterov=True)


def median_seconds(run, warmup, steps):
  """Median wall time of `run()` after `warmup` untimed calls (scripts/benchmark.py's rule)."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# The kinds of layer of the project's step profile (mobilenet/bench/step_profile.py), so the two
# sides' profiles compare row by row.
KINDS = ('depthwise', 'pointwise', 'standard', 'dense', 'batch_norm_activation', 'squeeze_excite',
         'residual_and_glue', 'loss_optimizer_other')
_NORM_ACTIVATION_OPS = ('batch_norm', 'relu', 'hardswish', 'hardtanh', 'threshold', 'clamp')


def _convolution_kind(event):
  """The kind of a convolution (forward or backward) from its input and weight shapes."""
  shapes = [shape for shape in event.input_shapes if len(shape) == 4]
  if len(shapes) < 2:
    return 'loss_optimizer_other'
  # Forward: (input, weight, ...); backward: (output gradient, input, weight, ...).
  inputs, weight = (shapes[0], shapes[1]) if 'backward' not in event.name else (shapes[1], shapes[2])
  if inputs[2] == inputs[3] == 1:
    return 'squeeze_excite'  # V3's squeeze-excite layers are 1x1 convolutions on pooled maps.
  if weight[1] == 1 and weight[0] == inputs[1] > 1:
    return 'depthwise'
  return 'pointwise' if weight[2] == weight[3] == 1 else 'standard'


def _event_kind(event, has_squeeze_excite):
  """The kind of layer a profiled operation belongs to: by its enclosing range and operation."""
  node = event
  while node is not None:
    name = node.name
    if name.startswith('Optimizer.'):  # torch.optim's own range around step() and zero_grad().
      return 'loss_optimizer_other'
    if name in ('aten::convolution', 'aten::convolution_backward'):
      return _convolution_kind(node)
    if 'hardsigmoid' in name:
      return 'squeeze_excite'
    if any(op in name for op in _NORM_ACTIVATION_OPS) and name.startswith('aten::'):
      return 'batch_norm_activation'
    if name in ('aten::addmm', 'aten::mm', 'aten::linear'):
      return 'dense'
    if has_squeeze_excite and name in ('aten::mul', 'aten::mean', 'aten::sum'):
      return 'squeeze_excite'  # Its rescale and pooling (the head's one pooling is a sliver).
    if name in ('aten::add', 'aten::add_') and node.cpu_parent is not None and \
        node.cpu_parent.name.startswith('model_forward'):
      return 'residual_and_glue'
    node = node.cpu_parent
  return 'loss_optimizer_other'


def profile_kinds(train_step, steps, has_squeeze_excite):
  """Milliseconds per step by kind of layer (every operation's own time, under torch.profiler),
  and the profiled steps' wall time per step under 'step'."""
  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True) as profiler:
    start = time.perf_counter()
    for _ in range(steps):
      train_step()
    wall_s = time.perf_counter() - start
  totals = dict.fromkeys(KINDS, 0.0)
  for event in profiler.events():
    if event.self_cpu_time_total > 0:
      totals[_event_kind(event, has_squeeze_excite)] += event.self_cpu_time_total / 1e3 / steps
  return {'step': round(1e3 * wall_s / steps, 2), **{kind: round(ms, 2) for kind, ms in totals.items()}}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--architecture', choices=ARCHITECTURES, default='mobilenet_v1')
  parser.add_argument('--width_multiplier', type=float, default=1.0)
  parser.add_argument('--form', choices=tuple(STEM_STRIDES), default='cifar',
                      help="'imagenet': stem stride 2; 'cifar': stem stride 1")
  parser.add_argument('--resolution', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--activation', choices=('relu', 'relu6'), default='relu',
                      help="MobileNetV1's activation (V2 and V3 have their own)")
  parser.add_argument('--min_channels', type=int, default=8, help="MobileNetV1's channel floor")
  parser.add_argument('--dropout_rate', type=float, default=0.0)
  parser.add_argument('--optimizer', choices=('sgd', 'rmsprop'), default='sgd')
  parser.add_argument('--learning_rate', type=float, default=0.1)
  parser.add_argument('--weight_decay', type=float, default=5e-4)
  parser.add_argument('--label_smoothing', type=float, default=0.0)
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps')
  parser.add_argument('--steps', type=int, default=10, help='timed steps; the median is reported')
  parser.add_argument('--profile', action='store_true',
                      help='also profile the training step (torch.profiler) and add its operations\' '
                      'milliseconds per step by kind of layer (scripts/profile_step.py\'s kinds)')
  parser.add_argument('--counts_only', action='store_true',
                      help='print the parameter counts and exit (no timing)')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = build_model(args.architecture, args.width_multiplier, args.form, args.num_classes,
                      args.activation, args.min_channels, args.dropout_rate)
  params, batch_stats = counts(model)
  row = {'framework': f'torch {torch.__version__}', 'threads': torch.get_num_threads(),
         'architecture': args.architecture, 'width_multiplier': args.width_multiplier,
         'form': args.form, 'params': params, 'batch_stats': batch_stats}
  if args.counts_only:
    print(json.dumps(row), flush=True)
    return
  model = model.to(memory_format=torch.channels_last)
  images = torch.randn(args.batch_size, 3, args.resolution, args.resolution).to(
      memory_format=torch.channels_last)
  labels = torch.randint(0, args.num_classes, (args.batch_size,))
  optimizer = optimizer_for(model, args)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.profiler.record_function('model_forward'):  # A no-op unless profiled.
      logits = model(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
    loss.backward()
    optimizer.step()
    # The project's step returns these metrics too.
    return loss.item(), (logits.argmax(-1) == labels).float().mean().item()

  def eval_step():
    with torch.inference_mode():
      logits = model(images)
      return (F.cross_entropy(logits, labels).item(),
              (logits.argmax(-1) == labels).float().mean().item())

  model.train()
  start = time.perf_counter()
  train_step()
  first_step_s = time.perf_counter() - start
  train_s = median_seconds(train_step, max(args.warmup - 1, 0), args.steps)
  model.eval()
  eval_s = median_seconds(eval_step, args.warmup, args.steps)
  row.update(batch_size=args.batch_size, resolution=args.resolution,
             train_img_s=round(args.batch_size / train_s, 1),
             eval_img_s=round(args.batch_size / eval_s, 1),
             train_step_ms=round(1e3 * train_s, 2), eval_step_ms=round(1e3 * eval_s, 2),
             first_train_step_s=round(first_step_s, 2))
  if args.profile:
    model.train()
    row['profile_ms_per_step'] = profile_kinds(train_step, args.steps,
                                               args.architecture.startswith('mobilenet_v3'))
  print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
