"""Data: where images come from and how they become batches.

folder.py      ImageFolder scanning and decoding (the file rules swin-predict shares)
transforms.py  timm's train recipe and the eval resize/crop (`Preprocess`, stored in checkpoints)
decode.py      data.fast_decode: the crop chosen on the header, then decoded and resized once
jpeg.py        which library decodes JPEGs (TorchCodec, else torchvision, else Pillow): the same pixels
augment_draws.py  aug.on_device, the workers' half: timm's flip/RandAugment draws recorded as numbers
device_augment.py aug.on_device, the device's half: a batch's draws applied in order, a pass per position
pillow_ops.py  Pillow's RandAugment ops on uint8 tensor batches (bitwise Pillow's on CPU)
device_decode.py  data.decode: cuda: the workers hand over files and draws, the device decodes a batch
samplers.py    a train order that resumes mid-epoch bitwise; an eval split that never pads
loader.py      DataLoaders whose output does not depend on workers
seeding.py     seeds derived from (seed, rank, epoch, index) keys
prefetch.py    batches to the device; uint8 normalisation and seeded erasing there
erasing.py     timm's random erasing seeded per batch, a masked write per box slot
host_arrays.py a batch's host-side numbers sent to the device in one copy
synthetic.py   random tensors (benchmarks); shapes.py: the generated quick-start set
shards.py      webdataset shards (folders, brace patterns, pipe: URLs): exact eval, resumable order
tar_stream.py  the files of a tar stream, read faster than tarfile does
pack.py        `swin-data pack`: ImageFolder or the official zip layout -> shards
hf_dataset.py  Hugging Face datasets (save_to_disk folders, parquet), map-style
build.py       all of the above for a run, from a Config
"""
