"""Top-1 of an exported model on a run's test split, through the run's own eval pipeline."""
import ml_collections
import numpy as np

from mobilenet.export.runtime import Predictor


def top1(predictor: Predictor, config: ml_collections.ConfigDict) -> tuple[float, int]:
  """(top-1 accuracy, examples) over the whole test split, each example once (padding masked)."""
  from mobilenet.data import input_pipeline  # pylint: disable=import-outside-toplevel
  hits = count = 0
  for batch in input_pipeline.create_eval_iterator(config):
    mask = np.asarray(batch['mask'], bool)
    logits = predictor(np.asarray(batch['image'])[mask])
    hits += int(np.sum(np.argmax(logits, -1) == np.asarray(batch['label'])[mask]))
    count += int(mask.sum())
  return hits / count, count
