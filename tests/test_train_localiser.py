"""The localiser recipe's data stream: several loader workers (a GPU machine's cores) give the same
batches in the same order as one, so a run's data depends only on its seed, not on its machine."""

from __future__ import annotations

import numpy as np
import torch
from skimage import data

from finetune.synth import Synthesiser
from finetune.train_localiser import (
    LocaliserConfig,
    TrainingData,
    batch_loader,
    new_model,
    validation_outputs,
)


def small_training_data() -> TrainingData:
    photos = [np.ascontiguousarray(data.astronaut()[::4, ::4]), np.ascontiguousarray(data.coffee()[::4, ::4])]
    mask = np.zeros(photos[0].shape[:2], bool)
    mask[40:90, 30:100] = True
    return TrainingData([(photos[0], mask)], [photos[1]], Synthesiser(photos))


def test_loader_workers_share_out_the_steps_in_order():
    import cv2

    threads = cv2.getNumThreads()  # the loader sets OpenCV to one thread before its workers fork
    training = small_training_data()
    config = LocaliserConfig(batch=2, crop=64, steps=7, workers=0)
    alone = list(batch_loader(training, config, first_step=2))
    shared = list(batch_loader(training, LocaliserConfig(batch=2, crop=64, steps=7, workers=3), first_step=2))
    assert len(alone) == len(shared) == 5
    for (images, masks), (other_images, other_masks) in zip(alone, shared, strict=True):
        assert torch.equal(images, other_images) and torch.equal(masks, other_masks)
    assert not torch.equal(alone[0][0], alone[1][0])  # consecutive steps differ
    cv2.setNumThreads(threads)


def test_validation_outputs_are_numpy_at_image_size():
    from experts.manipulation import LocaliserNet

    torch.manual_seed(0)
    model = LocaliserNet(pretrained=False)
    image = np.ascontiguousarray(data.coffee()[::4, ::4])
    ((logits, image_logit),) = validation_outputs(model, [(image, False, None)])
    assert isinstance(logits, np.ndarray) and logits.shape == image.shape[:2]
    assert isinstance(image_logit, float)
    assert model.training  # handed back in training mode


def test_a_run_can_start_from_shipped_weights():
    from experts.learned import load_weights, weights_file
    from experts.manipulation import WEIGHTS_NAME

    model = new_model(LocaliserConfig(init=str(weights_file(WEIGHTS_NAME))))
    stored = load_weights(WEIGHTS_NAME)
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name].to(value.dtype)), name
