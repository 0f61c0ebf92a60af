"""TFDS builder for the shapes world: ``array_record`` files with tensor features only.

Works without TensorFlow: prepare with ``builder.download_and_prepare()`` and read with
``builder.as_data_source()`` or ``tfds.data_source("jaxdiff_shapes/<config>",
data_dir=...)`` (named configs only). ``tfds.load`` / ``as_dataset`` need TensorFlow.

Splits: ``train`` holds training scenes from ``config.seed``; ``test`` is the fixed
held-out set, identical to ``shapes.held_out_examples(spec, num_test)``.

``config.world`` names the world (``shapes.WORLDS``: "v1", "v2", "v2_terse"). A config of
any world but v1 has the world in its name (``"32px"`` with ``world="v2"`` becomes
``"32px_v2"``), so prepared files of different worlds never share a directory.

Since 1.2.0 every record also holds the control conditions made from its ground-truth
masks (``jaxdiff.data.conditions``): ``segmentation`` (per-pixel shape class as an RGB
image) and ``edges`` (mask boundaries, white on black), both uint8 [H, W, 3]. TFDS keeps
each version in its own directory (``<data_dir>/jaxdiff_shapes/<config>/<version>``):
files prepared by an older version are never rewritten; the new version is prepared
beside them (same images and captions) the first time it is asked for.

Since 1.3.0 every record also holds GLIGEN grounding from its ground truth
(``jaxdiff.data.grounding``): ``phrases`` (the objects' noun phrases as the caption says
them, "" for empty slots; a sequence of ``MAX_OBJECTS`` texts) and ``boxes`` (float32
[MAX_OBJECTS, 4], each object's tight mask box as x0, y0, x1, y1 fractions of the image).

Example::

    builder = ShapesWorld(config=ShapesConfig(name="tiny", num_train=64, num_test=16),
                          data_dir="/tmp/tfds")
    builder.download_and_prepare()
    train = builder.as_data_source()["train"]   # random access: train[i] -> dict of arrays
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxdiff.data.conditions import conditions
from jaxdiff.data.grounding import grounding
from jaxdiff.data.shapes import (MAX_OBJECTS, WorldSpec, held_out_examples, iterate, world)

ARRAY_KEYS = ("image", "masks", "num_objects", "shape", "colour", "size", "position",
              "background", "mention_size", "mention_position", "mention_background",
              "rgb", "mention_colour", "mention_shape")


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Size and sampling of a prepared shapes-world dataset.

    Attributes:
      image_size: image side in pixels.
      num_train / num_test: examples per split.
      seed: seed of the train stream (the test split always uses the held-out seed).
      p_two_objects, jitter: as in ``WorldSpec``.
      world: ``shapes.WORLDS`` name; the other fields override its spec.
    """
    image_size: int = 32
    num_train: int = 20_000
    num_test: int = 1_000
    seed: int = 0
    p_two_objects: float = 0.5
    jitter: float = 0.0
    world: str = "v1"

    def __post_init__(self):
        world(self.world)  # validates the name
        if self.world != "v1" and not self.name.endswith("_" + self.world):
            self.name = f"{self.name}_{self.world}"

    def spec(self) -> WorldSpec:
        return world(self.world, image_size=self.image_size,
                     p_two_objects=self.p_two_objects, jitter=self.jitter)


def features(spec: WorldSpec) -> tfds.features.FeaturesDict:
    """Tensor-only features (``tfds.features.Image`` would need TensorFlow)."""
    n, k = spec.image_size, MAX_OBJECTS
    ids = tfds.features.Tensor(shape=(k,), dtype=np.int32)
    flag = tfds.features.Scalar(dtype=np.bool_)
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(n, n, 3), dtype=np.uint8),
        "caption": tfds.features.Text(),
        "masks": tfds.features.Tensor(shape=(k, n, n), dtype=np.bool_),
        "num_objects": tfds.features.Scalar(dtype=np.int32),
        "shape": ids, "colour": ids, "size": ids, "position": ids,
        "background": tfds.features.Scalar(dtype=np.int32),
        "mention_size": flag, "mention_position": flag, "mention_background": flag,
        "rgb": tfds.features.Tensor(shape=(k, 3), dtype=np.uint8),
        "mention_colour": tfds.features.Tensor(shape=(k,), dtype=np.bool_),
        "mention_shape": tfds.features.Tensor(shape=(k,), dtype=np.bool_),
        "segmentation": tfds.features.Tensor(shape=(n, n, 3), dtype=np.uint8),
        "edges": tfds.features.Tensor(shape=(n, n, 3), dtype=np.uint8),
        "phrases": tfds.features.Sequence(tfds.features.Text(), length=k),
        "boxes": tfds.features.Tensor(shape=(k, 4), dtype=np.float32),
    })


def to_record(example: dict) -> dict:
    """A ``shapes.sample_example`` dict -> the feature dict (drops the Python objects; adds
    the control conditions made from its masks and the GLIGEN grounding)."""
    return {"caption": example["caption"], **{k: example[k] for k in ARRAY_KEYS},
            **conditions(example["masks"], example["shape"], example["num_objects"]),
            **grounding(example)}


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The jaxdiff shapes world: captioned images of coloured shapes with ground truth."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "Worlds (config.world: v1, v2); rgb, mention_colour and "
                              "mention_shape features. v1 images and captions unchanged.",
                     "1.2.0": "Control conditions from the ground-truth masks: segmentation "
                              "and edges features (jaxdiff.data.conditions). Existing "
                              "features, images and captions unchanged.",
                     "1.3.0": "GLIGEN grounding from the ground truth: phrases (each "
                              "object's noun phrase as the caption says it) and boxes (its "
                              "mask's tight box, x0, y0, x1, y1 fractions; "
                              "jaxdiff.data.grounding). Existing features unchanged."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="32px", description="32x32 images, 20k train / 1k test"),
        ShapesConfig(name="64px", image_size=64,
                     description="64x64 images, 20k train / 1k test"),
        ShapesConfig(name="32px", world="v2",
                     description="world v2, 32x32 images, 20k train / 1k test"),
    ]
    DEFAULT_CONFIG_NAME = "32px"
    name = "jaxdiff_shapes"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup touches the optional `importlib_resources` package for
        # classes inside packages; this file is the answer it would find.
        return epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec()
        return self.dataset_info_from_configs(
            features=features(spec), homepage="https://github.com/jaxdiff",
            disable_shuffling=True,  # record i is the i-th generated example
            metadata=tfds.core.MetadataDict(
                world=self.builder_config.world, shapes=list(spec.shapes), colours=list(spec.colour_names),
                backgrounds=list(spec.background_names), sizes=list(spec.size_names),
                positions=list(spec.position_names)))

    def _split_generators(self, dl_manager):
        del dl_manager  # procedural: nothing to download
        return {"train": self._generate_examples("train"),
                "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        spec = cfg.spec()
        if split == "train":
            examples = itertools.islice(iterate(cfg.seed, spec, "train"), cfg.num_train)
        else:
            examples = held_out_examples(spec, cfg.num_test)
        for i, ex in enumerate(examples):
            yield i, to_record(ex)


def prepare(data_dir: str, config: Optional[ShapesConfig] = None) -> ShapesWorld:
    """Builds (once; later calls reuse the files) and returns the prepared builder."""
    builder = ShapesWorld(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def decode_caption(caption) -> str:
    """Data sources return ``Text`` features as bytes; -> str."""
    return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
