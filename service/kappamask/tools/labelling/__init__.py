"""People correct the model where it is least sure (the paper's active learning, §2 and
Figure 1): sub-tiles ranked by ``kappamask review`` go to a labelling tool with the
model's mask as a pre-annotation, the corrected masks come back as label rasters next to
their band stacks, and ``kappamask train --labels labelled:DIR`` fine-tunes on them.

- ``subtiles``: a review folder, its sub-tiles and their label rasters;
- ``rle``: Label Studio's brush-mask encoding;
- ``labelstudio``: push to and pull from a Label Studio server over its HTTP API;
- ``cvat``: a CVAT "Segmentation mask 1.1" dataset, out and back;
- ``finetune``: the labelled sub-tiles as training data, the parent model's weights as
  the start, and the before/after report on sub-tiles kept out of training.
"""
