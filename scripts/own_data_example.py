"""Example "own data" for docs/own_data.md: real Fashion-MNIST images (Debian's dataset-fashion-mnist) written in
the three layouts a user brings, with the dataset's class names:

- ``<out>/fashion/{train,test}/<class>/*.png``: an ImageFolder (1,000 train, 500 test; no val/: it is carved);
- ``<out>/fashion_flat/<class>/*.png``: one folder of class folders (the same 1,500 images);
- ``<out>/fashion_hf/data/{train,test}-*.parquet``: the ImageFolder's images as an HF dataset (ClassLabel names).

Usage: python scripts/own_data_example.py OUT   (apt-get install -y dataset-fashion-mnist first)
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from offline_data import debian_fashion_mnist

CLASSES = ['t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle-boot']


def write_layouts(out: Path, train: int = 1000, test: int = 500, seed: int = 0) -> None:
    images, labels = debian_fashion_mnist()
    order = np.random.default_rng(seed).permutation(len(images))[:train + test]
    for k, i in enumerate(order):
        name = CLASSES[int(labels[i])]
        for folder in (out / 'fashion' / ('train' if k < train else 'test') / name, out / 'fashion_flat' / name):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f'{i:05d}.png')
    import datasets
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    classes, class_to_idx = find_classes(str(out / 'fashion' / 'train'))
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
    (out / 'fashion_hf' / 'data').mkdir(parents=True, exist_ok=True)
    for split in ('train', 'test'):
        items = make_dataset(str(out / 'fashion' / split), class_to_idx, extensions=IMG_EXTENSIONS)
        ds = datasets.Dataset.from_dict({'image': [p for p, _ in items], 'label': [y for _, y in items]},
                                        features=features)
        ds.to_parquet(str(out / 'fashion_hf' / 'data' / f'{split}-00000-of-00001.parquet'))


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__.split('Usage: ')[1].split('\n')[0])
    write_layouts(Path(sys.argv[1]))
    print(f'wrote {sys.argv[1]}/fashion, fashion_flat, fashion_hf')
