"""Reads generated MNIST digits with a small CNN classifier: the share of samples it labels with
confidence above 0.9, how those spread over the ten classes (mode coverage), and the Frechet
distance between the classifier's 128 penultimate features of the samples and of 5000 MNIST
test images (an "FID" with an MNIST network instead of Inception; lower is better).

Not part of the test suite: it needs PyTorch (`pip install torch numpy pillow`), which the
project does not otherwise use. The classifier trains on the MNIST training set in about a
minute on two cores (98.5% test accuracy here) and is cached next to this script.

    python3 tools/digit_score.py --data ../shared/data/mnist runs/mnist/images/
    (the folder from `prism sample --model runs/mnist/model.prism -n 1000 --folder runs/mnist/images`)
"""
import argparse, gzip, os, sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def idx_images(path):
    with gzip.open(path) as g:
        return np.frombuffer(g.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255


def idx_labels(path):
    with gzip.open(path) as g:
        return np.frombuffer(g.read(), np.uint8, offset=8).astype(np.int64)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to the rows of a and b (float64, numpy only)."""
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c1)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # trace sqrt(c1 c2) = trace sqrt(s1 c2 s1), the latter symmetric positive semi-definite.
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ c2 @ s1), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.f1 = nn.Linear(64 * 7 * 7, 128)
        self.f2 = nn.Linear(128, 10)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return F.relu(self.f1(x.flatten(1)))

    def forward(self, x):
        return self.f2(self.features(x))


def classifier(data, cache):
    net = Net()
    if os.path.exists(cache):
        net.load_state_dict(torch.load(cache))
        return net.eval()
    torch.manual_seed(0)
    x = torch.tensor(idx_images(os.path.join(data, "train-images-idx3-ubyte.gz")))
    y = torch.tensor(idx_labels(os.path.join(data, "train-labels-idx1-ubyte.gz")))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt = torch.tensor(idx_images(os.path.join(data, "t10k-images-idx3-ubyte.gz")))
    yt = torch.tensor(idx_labels(os.path.join(data, "t10k-labels-idx1-ubyte.gz")))
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    print(f"classifier trained: test accuracy {acc * 100:.1f}%", file=sys.stderr)
    torch.save(net.state_dict(), cache)
    return net.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", help="a folder of 28x28 PNGs, or 'real' for 1000 MNIST test images")
    ap.add_argument("--data", default="data/mnist", help="folder with MNIST's IDX files")
    ap.add_argument("--confidence", type=float, default=0.9)
    a = ap.parse_args()
    torch.set_num_threads(2)
    net = classifier(a.data, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".digit_classifier.pt"))
    test = idx_images(os.path.join(a.data, "t10k-images-idx3-ubyte.gz"))
    if a.images == "real":
        x = test[:1000]
    else:
        files = sorted(f for f in os.listdir(a.images) if f.endswith(".png"))
        x = np.stack([np.asarray(Image.open(os.path.join(a.images, f)).convert("L"), np.float32) / 255 for f in files])
    with torch.no_grad():
        feats = net.features(torch.tensor(x).reshape(-1, 1, 28, 28))
        conf, cls = torch.softmax(net.f2(feats), 1).max(1)
        reference = net.features(torch.tensor(test[5000:])).double().numpy()
    sure = conf > a.confidence
    share = [((cls == c) & sure).float().mean().item() * 100 for c in range(10)]
    print(f"{len(x)} images; {sure.float().mean().item() * 100:.1f}% classified with confidence > {a.confidence}")
    print("per class (% of all images): " + " ".join(f"{c}:{s:.1f}" for c, s in enumerate(share)))
    fd = frechet_distance(feats.double().numpy(), reference)
    print(f"Frechet distance in the classifier's features to 5000 test images: {fd:.1f}")


if __name__ == "__main__":
    main()
