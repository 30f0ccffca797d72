"""Candidate (a): an encoder the federation learns first, by masks: a masked CNN classifier
(or autoencoder) over frozen random weights, trained by PRISM's rounds (non-IID clients,
mask uploads, MADA), saved with its final mask. Study tool (README, Encoders); tools/fed_study.py --enc-kind mclf --enc FILE uses its output."""
import argparse, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from loss_study import D, idx_images, idx_labels, Bern, federation_args, federation_setup, non_iid_parts, server_step


class Masked(nn.Module):
    """Frozen signed weights w and scores s: the weights in use are w * m with m a fresh
    Bernoulli(sigmoid(s)) sample, or w * fixed once a final mask is fixed."""

    def weight(self):
        if self.fixed is not None:
            return self.w * self.fixed
        return self.w * Bern.apply(torch.sigmoid(self.s))


class MConv(Masked):
    def __init__(self, cin, cout, k, s, p):
        super().__init__()
        fan = cin * k * k
        sign = torch.randint(0, 2, (cout, cin, k, k)).float() * 2 - 1
        self.register_buffer("w", sign * (2.0 / fan) ** 0.5)
        self.s = nn.Parameter(torch.randn(cout, cin, k, k))
        self.stride, self.pad = s, p
        self.fixed = None


    def forward(self, x):
        return F.conv2d(x, self.weight(), stride=self.stride, padding=self.pad)


class MLin(Masked):
    def __init__(self, i, o):
        super().__init__()
        sign = torch.randint(0, 2, (o, i)).float() * 2 - 1
        self.register_buffer("w", sign * (2.0 / i) ** 0.5)
        self.s = nn.Parameter(torch.randn(o, i))
        self.fixed = None


    def forward(self, x):
        return x @ self.weight().t()


class MClf(nn.Module):
    def __init__(self, ch=(32, 64, 128), code=32):
        super().__init__()
        c1, c2, c3 = ch
        self.convs = nn.ModuleList([MConv(1, c1, 4, 2, 1), MConv(c1, c2, 4, 2, 1), MConv(c2, c3, 3, 2, 1)])
        self.fc = MLin(c3 * 16, code)
        self.out = MLin(code, 10)
        self.chs = ch

    def features(self, x):
        out = []
        h = x
        for c in self.convs:
            h = F.relu(F.batch_norm(c(h), None, None, training=True))
            out.append(h)
        out.append(F.relu(F.batch_norm(self.fc(h.flatten(1)), None, None, training=True)))
        return out

    def forward(self, x):
        return self.out(self.features(x)[-1])

    def masked(self):
        return list(self.convs) + [self.fc, self.out]


def main():
    ap = argparse.ArgumentParser()
    federation_args(ap, rounds=3, local=20, lr=0.1)
    ap.add_argument("--ch", default="32,64,128")
    ap.add_argument("--out", required=True)
    ap.add_argument("--final", default="threshold")
    a = ap.parse_args()
    x, y, rng = federation_setup(a)
    yt = torch.tensor(y)
    K = a.clients
    parts = [torch.tensor(p) for p in non_iid_parts(y, K, rng)]
    net = MClf(tuple(int(c) for c in a.ch.split(",")))
    params = [m.s for m in net.masked()]
    glob = [p.detach().clone() for p in params]
    opts = [torch.optim.Adam(params, lr=a.lr, betas=(0.5, 0.999)) for _ in range(K)]
    t0 = time.time()
    for r in range(a.rounds):
        masks = []
        for k in range(K):
            with torch.no_grad():
                for p, g in zip(params, glob):
                    p.copy_(g)
            for _ in range(a.local):
                i = parts[k][torch.randint(0, len(parts[k]), (a.batch,))]
                loss = F.cross_entropy(net(x[i]), yt[i])
                opts[k].zero_grad(); loss.backward(); opts[k].step()
            with torch.no_grad():
                masks.append([torch.bernoulli(torch.sigmoid(p)) for p in params])
        with torch.no_grad():
            glob, lam = server_step(glob, masks)
        # accuracy of the global threshold mask on test
        with torch.no_grad():
            for m, g in zip(net.masked(), glob):
                m.fixed = (g > 0).float()
            xt = torch.tensor(idx_images(f"{D}/mnist/t10k-images-idx3-ubyte.gz")) * 2 - 1
            ytt = torch.tensor(idx_labels(f"{D}/mnist/t10k-labels-idx1-ubyte.gz"))
            acc = (net(xt[:2000]).argmax(1) == ytt[:2000]).float().mean().item()
            for m in net.masked():
                m.fixed = None
        print(f"round {r+1}: loss {loss.item():.3f} lambda {lam:.3f} test acc (threshold) {acc:.3f} ({time.time()-t0:.0f}s)", flush=True)
    with torch.no_grad():
        for m, g in zip(net.masked(), glob):
            m.fixed = (g > 0).float() if a.final == "threshold" else torch.bernoulli(torch.sigmoid(g))
    for p in net.parameters():
        p.requires_grad_(False)
    torch.save(net, a.out)
    print(f"encoder time {time.time()-t0:.0f}s; saved {a.out}")


if __name__ == "__main__":
    main()
