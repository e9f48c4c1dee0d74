"""Augmented views' pixels: TensorFlow's stateless random crop, flip and brightness (see `retrain.augment`)."""

import tensorflow as tf

from retrain.params import AugmentParams

ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def augment_image(image, seed, params: AugmentParams):
    """uint8 [H, W, 3] → uint8 [h, w, 3]: random crop, flip and brightness, deterministic in `seed`.

    seed: int32 Tensor [2] (see `view_seed`). Runs before `resize_image`, like training's decode.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        tf.zeros([1, 0, 4], tf.float32),
        seed=seeds[0],
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=(params.crop_area_min, 1.0),
        max_attempts=20,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    if params.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if params.brightness:
        image = tf.image.stateless_random_brightness(image, params.brightness, seeds[2])  # saturates
    return image


def augmenter(params: AugmentParams):
    """`augment_image` with these params as `retrain.features.image_batches`' transform:
    (uint8 ndarray [H, W, 3], int32 [2] seed) → uint8 ndarray, run eagerly."""

    def transform(image, seed):
        return augment_image(tf.constant(image), tf.constant(seed, tf.int32), params).numpy()

    return transform
