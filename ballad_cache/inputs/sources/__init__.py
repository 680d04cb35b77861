"""Dataset sources: each module turns one kind of spec into an `LTDataset` and registers itself on import.

    fmnist        fmnist-lt[:IF]   Fashion-MNIST made long-tailed (the embedded default)
    cifar         cifar100-lt:IF   CIFAR-100-LT from $BALLAD_DATA
    folder        folder:ROOT      ROOT/{train,val,test}/<class>/<image>
    description   PATH.yaml        a dataset description file; its default `format: list` (OLTR list files)
    webdataset    wds:DIR          tar shards DIR/{train,val,test}/*.tar; also `format: webdataset` in a description

A new random-access source is one module: build an `LTDataset` of `ImageSplit`s (`files`, `pixels` or tar
`members`), then `DATASETS.register("kind", loader)` for `kind:ARG` specs and/or
`DATASET_FORMATS.register("name", loader)` for `format: name` descriptions (both in `..splits`), and import it
below. A source imports `..splits` and nothing of the other sources.
"""

# registration order is the order `list_datasets` and an unknown format's message show: the default first
# isort: off
from . import fmnist, cifar, folder, description, webdataset
# isort: on

__all__ = ["cifar", "description", "fmnist", "folder", "webdataset"]
