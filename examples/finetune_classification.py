"""Fine-tune an ECAMP encoder on your own labelled images, in your own training loop.

    python examples/finetune_classification.py MODEL LIST_FILE IMAGE_ROOT NUM_CLASSES
    e.g. python examples/finetune_classification.py cxr-vit-b train_list.txt /data/nih 14

LIST_FILE lines: "<relative image path> <label_1> ... <label_C>" (multi-label, as the authors' lists).
"""

import sys

import torch

import ecamp
from ecamp.finetune import layer_decay_param_groups

name, list_file, root, num_classes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [line.split() for line in open(list_file) if line.strip()]
model = ecamp.load(name, num_classes=num_classes, drop_path_rate=0.1)   # fresh head; the trunk's weights verified
tf = ecamp.get_transform(model, train=True)                             # the authors' augmentation
opt = torch.optim.AdamW(layer_decay_param_groups(model, lr=1e-3, layer_decay=0.65))
loss_fn = torch.nn.BCEWithLogitsLoss()
model.train()
for epoch in range(3):
    perm = torch.randperm(len(rows)).tolist()
    for start in range(0, len(rows), 16):
        batch = [rows[i] for i in perm[start:start + 16]]
        x = tf([f"{root}/{r[0]}" for r in batch])                       # DICOM, PNG or JPEG paths
        y = torch.tensor([[float(v) for v in r[1:]] for r in batch])
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
ecamp.save_pretrained(model, "finetuned/")                              # timm format, loads with ecamp.load
