"""A tfds builder for FGVC-Aircraft (tfds ships none), reading the official archive layout.

Importing this module registers ``fgvc_aircraft/variant``, ``fgvc_aircraft/family`` and
``fgvc_aircraft/manufacturer`` with tfds. Preparing needs no TensorFlow::

    builder = tfds.builder("fgvc_aircraft/variant", data_dir=..., file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="<holds fgvc-aircraft-2013b/>"))

Splits: ``train``, ``val``, ``test`` (the paper's training set is ``train+val``). The
20-pixel copyright banner is cropped and the image re-encoded as JPEG (quality 95).
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from . import aircraft

_SPLITS = ("train", "val", "test")


class FgvcAircraft(tfds.core.GeneratorBasedBuilder):
    """FGVC-Aircraft 2013b (Maji et al.), from the manually downloaded archive."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (banner cropped)."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=level, description=f"Classes at the {level} level.")
        for level in aircraft.CLASS_LEVELS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {aircraft.ARCHIVE_FILE} from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/
    and extract it into manual_dir, so that manual_dir/{aircraft.ARCHIVE_DIR}/data/ holds
    images/*.jpg, variants.txt, families.txt, manufacturers.txt and the
    images_<level>_<split>.txt lists.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds derives this from the package's resources, which on Python >= 3.9 imports
        # the (undeclared) importlib_resources backport; the answer is simply this file.
        # It only locates an optional checksums.tsv: this builder downloads nothing.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(),  # names set from <level>s.txt
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        )

    def _split_generators(self, dl_manager):
        level = self.builder_config.name
        data_dir = aircraft.find_data_dir(str(dl_manager.manual_dir), level, _SPLITS)
        names = aircraft.read_classes(data_dir, level)
        self.info.features["label"].names = names
        return {s: self._generate_examples(data_dir, level, s, names) for s in _SPLITS}

    def _generate_examples(self, data_dir, level, split, names):
        for image_id, path, label in aircraft.examples(data_dir, level, split, names):
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                img = img.crop((0, 0, w, h - aircraft.BANNER_PIXELS))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
            yield image_id, {"image": buf.getvalue(), "label": np.int64(label), "id": image_id}
