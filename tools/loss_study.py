"""PyTorch study of losses and encoders for the mlp28-up masked generator, one client training
alone (README, Encoders: the replica rows). Not part of the project's code path: a study tool
for choosing the default, like tools/replica.py. Scores its samples with nothing: run
tools/digit_score.py on the folder it writes. Encoders it trains (--enc-kind ae|clf) are its own
networks, never tools/digit_score.py's classifier, and are cached in --cache."""
import argparse, gzip, math, os, sys, time, json
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from digit_score import idx_images, idx_labels  # this script's folder is on the module path

D = os.environ.get("PRISM_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


class Bern(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return torch.bernoulli(p)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return g * p


class MaskedLinear(nn.Module):
    def __init__(self, i, o, dense=False):
        super().__init__()
        self.dense = dense
        if dense:
            self.w = nn.Parameter(nn.init.kaiming_normal_(torch.empty(o, i)))
        else:
            sign = torch.randint(0, 2, (o, i)).float() * 2 - 1
            self.register_buffer("w", sign * (2.0 / i) ** 0.5)
            self.s = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        w = self.w if self.dense else self.w * Bern.apply(torch.sigmoid(self.s))
        return x @ w.t()


class Gen(nn.Module):
    def __init__(self, latent=32, widths=(256, 512, 1024), side=14, dense=False):
        super().__init__()
        ws = [latent] + list(widths)
        layers = []
        for i, o in zip(ws[:-1], ws[1:]):
            layers += [MaskedLinear(i, o, dense), nn.BatchNorm1d(o, affine=False), nn.ReLU()]
        self.net = nn.Sequential(*layers, MaskedLinear(ws[-1], side * side, dense))
        self.side = side
        self.latent = latent
        self.register_buffer("blur", torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]).view(1, 1, 3, 3) / 16)

    def forward(self, n):
        h = self.net(torch.randn(n, self.latent)).view(-1, 1, self.side, self.side)
        h = F.interpolate(h, size=(28, 28), mode="nearest")
        h = F.conv2d(h, self.blur, padding=1)
        return torch.tanh(h)  # [-1, 1]


class Trunk(nn.Module):
    """conv 32-64-128 stride 2 (BN, ReLU) -> linear code: the encoder both study encoders share.
    `code_relu` says whether the code passes a ReLU (the classifier's) or not (the AE's)."""

    def __init__(self, code, ch, code_relu):
        super().__init__()
        c1, c2, c3 = ch
        self.enc = nn.ModuleList([
            nn.Conv2d(1, c1, 4, 2, 1), nn.BatchNorm2d(c1),   # 14
            nn.Conv2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2),  # 7
            nn.Conv2d(c2, c3, 3, 2, 1), nn.BatchNorm2d(c3),  # 4
        ])
        self.fc = nn.Linear(c3 * 16, code)
        self.code_relu = code_relu

    def features(self, x):
        """ReLU outputs of the three conv stages and the code."""
        out = []
        h = x
        for i in range(0, 6, 2):
            h = F.relu(self.enc[i + 1](self.enc[i](h)))
            out.append(h)
        code = self.fc(h.flatten(1))
        out.append(F.relu(code) if self.code_relu else code)
        return out


class AE(Trunk):
    """The trunk's linear code; mirrored decoder."""

    def __init__(self, code=32, ch=(32, 64, 128)):
        super().__init__(code, ch, code_relu=False)
        c1, c2, c3 = ch
        self.dfc = nn.Linear(code, c3 * 16)
        self.dec = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(c3, c2, 3, 2, 1), nn.BatchNorm2d(c2), nn.ReLU(),  # 7
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),  # 14
            nn.ConvTranspose2d(c1, 1, 4, 2, 1), nn.Tanh())
        self.c3 = c3

    def forward(self, x):
        z = self.features(x)[-1]
        return self.dec(self.dfc(z).view(-1, self.c3, 4, 4))


class Clf(Trunk):
    """The same trunk trained with labels; 'code' = penultimate (ReLU) features."""

    def __init__(self, code=32, ch=(32, 64, 128)):
        super().__init__(code, ch, code_relu=True)
        self.out = nn.Linear(code, 10)

    def forward(self, x):
        return self.out(self.features(x)[-1])


def fit_encoder(net, n, steps, batch_loss, name):
    """Adam at 1e-3 on batches of 128 indices drawn from range(n); batch_loss(indices) gives the
    loss. Returns the network frozen, in eval mode."""
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    t = time.time()
    for s in range(steps):
        loss = batch_loss(torch.randint(0, n, (128,)))
        opt.zero_grad(); loss.backward(); opt.step()
        if s % 500 == 0:
            print(f"  {name} step {s} loss {loss.item():.4f} ({time.time()-t:.0f}s)", flush=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def train_clf(x, y, steps, seed=0, code=32, ch=(32, 64, 128)):
    torch.manual_seed(seed)
    net = Clf(code, ch)
    return fit_encoder(net, len(x), steps, lambda i: F.cross_entropy(net(x[i]), y[i]), "clf")


class ELM(nn.Module):
    """Frozen random conv features (signed-constant, as prism's random-conv encoder) and a
    linear readout solved in closed form: ridge regression to one-hot labels ('lda') or the top
    principal directions ('pca'). Exactly aggregatable from per-client sufficient statistics."""

    def __init__(self, x, y, kind="lda", ch=(32, 64), code=10, ridge=1e-2, seed=0, relu_code=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c1, c2 = ch
        self.w1 = (torch.randint(0, 2, (c1, 1, 4, 4), generator=g).float() * 2 - 1) * (2 / 16) ** .5
        self.w2 = (torch.randint(0, 2, (c2, c1, 4, 4), generator=g).float() * 2 - 1) * (2 / (16 * c1)) ** .5
        with torch.no_grad():
            F_ = torch.cat([self.raw(x[i:i + 2000]) for i in range(0, len(x), 2000)]).double()
            self.mu = F_.mean(0)
            Fc = F_ - self.mu
            G = Fc.t() @ Fc
            d = G.shape[0]
            if kind == "lda":
                Y = F.one_hot(y, 10).double()
                Y = Y - Y.mean(0)
                B = Fc.t() @ Y
                W = torch.linalg.solve(G + ridge * G.trace() / d * torch.eye(d, dtype=G.dtype), B)
            else:
                ev, V = torch.linalg.eigh(G / len(F_))
                W = V[:, -code:] / ev[-code:].sqrt()  # whitened top components
            self.W = W.float()
            self.mu = self.mu.float()
        self.relu_code = relu_code

    def raw(self, x):
        h = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        h = F.relu(F.conv2d(h, self.w2, stride=2, padding=1))
        return h.flatten(1)

    def features(self, x):
        h1 = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        h2 = F.relu(F.conv2d(h1, self.w2, stride=2, padding=1))
        code = (h2.flatten(1) - self.mu) @ self.W
        return [h1, h2, code]


def train_ae(x, steps, seed=0, code=32, ch=(32, 64, 128), denoise=0.0):
    torch.manual_seed(seed)
    ae = AE(code, ch)

    def batch_loss(i):
        b = x[i]
        inp = b if denoise == 0 else b + denoise * torch.randn_like(b)
        return F.mse_loss(ae(inp), b)

    return fit_encoder(ae, len(x), steps, batch_loss, "ae")


def mmd(x, y, sig2s=None, kind="gauss", scale=1.0):
    z = torch.cat([x, y])
    sq = (z * z).sum(1)
    d = (sq[:, None] + sq[None] - 2 * z @ z.t()).clamp(min=0) * scale
    if kind == "gauss":
        k = sum(torch.exp(-d / (2 * s)) for s in sig2s)
    else:  # imq
        k = sum(c / (c + d) for c in sig2s)
    n = len(x)
    return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).clamp(min=1e-12).sqrt()


class MovingMoments:
    """GFMN's estimator: Adam-tracked mean and variance differences, per layer."""

    def __init__(self, real_means, real_vars, lr=1e-5, beta1=0.5):
        self.rm = real_means; self.rv = real_vars
        self.vm = [torch.zeros_like(m, requires_grad=True) for m in real_means]
        self.vv = [torch.zeros_like(v, requires_grad=True) for v in real_vars]
        self.opt = torch.optim.Adam(self.vm + self.vv, lr=lr, betas=(beta1, 0.999))

    def loss(self, feats):
        total = 0
        self.opt.zero_grad()
        fm = [f.mean(0) for f in feats]
        fv = [f.var(0) for f in feats]
        l = 0
        for i in range(len(feats)):
            l = l + ((self.vm[i] - (self.rm[i] - fm[i].detach())) ** 2).mean() + ((self.vv[i] - (self.rv[i] - fv[i].detach())) ** 2).mean()
        l.backward()
        self.opt.step()
        for i in range(len(feats)):
            total = total + (self.vm[i].detach() * (self.rm[i] - fm[i])).sum() + (self.vv[i].detach() * (self.rv[i] - fv[i])).sum()
        return total


def real_stats(fn, x, bs=1000):
    s = None
    with torch.no_grad():
        for i in range(0, len(x), bs):
            f = [t.flatten(1).double() for t in fn(x[i:i + bs])]
            if s is None:
                s = [[t.sum(0), (t * t).sum(0)] for t in f]
            else:
                for a, t in zip(s, f):
                    a[0] += t.sum(0); a[1] += (t * t).sum(0)
    n = len(x)
    means = [a[0] / n for a in s]
    vars_ = [(a[1] - a[0] ** 2 / n) / (n - 1) for a in s]
    return [m.float() for m in means], [v.float() for v in vars_]


def save_samples(gen, out):
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    with torch.no_grad():
        images = torch.cat([gen(250) for _ in range(4)])
    for i, im in enumerate(((images + 1) * 127.5).round().clamp(0, 255).byte().view(-1, 28, 28)):
        Image.fromarray(im.numpy(), "L").save(os.path.join(out, f"{i:04}.png"))


# The federated studies (fed_study.py, fed_encoder_study.py) share these: the run's flags, the
# data, the non-IID split and one server step.

def federation_args(ap, rounds, local, lr):
    """The flags every federated study takes, with its own defaults."""
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--local", type=int, default=local)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)


def federation_setup(a):
    """Seeds torch and numpy from --seed; returns the MNIST train images (in [-1, 1]), labels and
    the numpy generator."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    x = torch.tensor(idx_images(f"{D}/mnist/train-images-idx3-ubyte.gz")) * 2 - 1
    y = idx_labels(f"{D}/mnist/train-labels-idx1-ubyte.gz")
    return x, y, rng


def non_iid_parts(y, clients, rng):
    """The reference's split: images sorted by label, cut into 4 shards per client, each client
    given 4 shards at random (index arrays)."""
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, 4 * clients)
    sp = rng.permutation(4 * clients)
    return [np.concatenate([shards[j] for j in sp[4 * k:4 * k + 4]]) for k in range(clients)]


def server_step(glob, masks, mada=True):
    """Averages the clients' mask samples into scores (probabilities clipped to [0.01, 0.99])
    and, with MADA, moves the global scores toward them by the share of weights whose sampled
    masks differ. Returns the new scores and lambda."""
    s_hat = []
    for li in range(len(glob)):
        th = torch.stack([m[li] for m in masks]).mul(0.98).add(0.01).mean(0)
        s_hat.append(torch.log(th / (1 - th)))
    if not mada:
        return s_hat, 1.0
    diff = 0; tot = 0
    for g, sh in zip(glob, s_hat):
        A = torch.bernoulli(torch.sigmoid(g)); B = torch.bernoulli(torch.sigmoid(sh))
        diff += (A != B).sum().item(); tot += A.numel()
    lam = diff / tot
    return [lam * sh + (1 - lam) * g for g, sh in zip(glob, s_hat)], lam


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loss", default="pixel", help="comma list: pixel, code, codeimq, moments, dm, pixmom")
    ap.add_argument("--weights", default="", help="comma list of loss weights")
    ap.add_argument("--sigmas", default="2,5,10,20,40,80", help="pixel MMD variances (GMMN)")
    ap.add_argument("--enc-data", default="mnist", help="mnist or fashion-mnist")
    ap.add_argument("--enc-steps", type=int, default=2000)
    ap.add_argument("--enc-kind", default="ae", help="ae or clf")
    ap.add_argument("--enc-code", type=int, default=32)
    ap.add_argument("--enc-ch", default="32,64,128")
    ap.add_argument("--layers", default="0,1,2,3", help="encoder layers for moments")
    ap.add_argument("--mm-lr", type=float, default=1e-5)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--out", default="study-out")
    ap.add_argument("--cache", default=".", help="folder of trained study encoders")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", type=int, default=14)
    ap.add_argument("--widths", default="256,512,1024")
    ap.add_argument("--dm-width", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x = torch.tensor(idx_images(f"{D}/mnist/train-images-idx3-ubyte.gz")) * 2 - 1
    losses = a.loss.split(",")
    wts = [float(w) for w in a.weights.split(",")] if a.weights else [1.0] * len(losses)
    ae = None
    if any(l in ("code", "codeimq", "moments") for l in losses):
        ex = x if a.enc_data == "mnist" else torch.tensor(idx_images(f"{D}/fashion-mnist/train-images-idx3-ubyte.gz")) * 2 - 1
        cache = f"{a.cache}/{a.enc_kind}-{a.enc_data}-{a.enc_steps}-{a.enc_code}-{a.enc_ch}.pt"
        ch = tuple(int(c) for c in a.enc_ch.split(","))
        if a.enc_kind in ("lda", "pca"):
            ey = torch.tensor(idx_labels(f"{D}/{a.enc_data}/train-labels-idx1-ubyte.gz"))
            t = time.time()
            ae = ELM(ex, ey, kind=a.enc_kind, ch=tuple(int(c) for c in a.enc_ch.split(","))[:2], code=a.enc_code)
            print(f"ELM {a.enc_kind} in {time.time()-t:.0f}s")
        elif a.enc_kind == "clf":
            if os.path.exists(cache):
                ae = Clf(a.enc_code, ch); ae.load_state_dict(torch.load(cache)); ae.eval()
                for p in ae.parameters():
                    p.requires_grad_(False)
            else:
                ey = torch.tensor(idx_labels(f"{D}/{a.enc_data}/train-labels-idx1-ubyte.gz"))
                ae = train_clf(ex, ey, a.enc_steps, code=a.enc_code, ch=ch)
                torch.save(ae.state_dict(), cache)
        elif os.path.exists(cache):
            ae = AE(a.enc_code, tuple(int(c) for c in a.enc_ch.split(",")))
            ae.load_state_dict(torch.load(cache)); ae.eval()
            for p in ae.parameters():
                p.requires_grad_(False)
        else:
            ae = train_ae(ex, a.enc_steps, code=a.enc_code, ch=tuple(int(c) for c in a.enc_ch.split(",")))
            torch.save(ae.state_dict(), cache)
        torch.manual_seed(a.seed)
    gen = Gen(side=a.side, widths=tuple(int(w) for w in a.widths.split(",")), dense=a.dense)
    opt = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=a.lr if not a.dense else 1e-3, betas=(0.5, 0.999))
    sig2 = [float(s) for s in a.sigmas.split(",")]
    layers = [int(l) for l in a.layers.split(",")]
    mm = None
    if "moments" in losses:
        rm, rv = real_stats(lambda b: [ae.features(b)[l] for l in layers], x)
        mm = MovingMoments(rm, rv, lr=a.mm_lr)
    if "pixmom" in losses:
        rm, rv = real_stats(lambda b: [b], x)
        pmm = MovingMoments(rm, rv, lr=a.mm_lr)
    if "code" in losses or "codeimq" in losses:
        with torch.no_grad():
            c = ae.features(x[:1000])[-1]
            med2 = (torch.cdist(c, c) ** 2).median().item()
        code_sig = [med2 * f for f in (0.0625, 0.25, 1, 4, 16)]
        print(f"code median sq dist {med2:.3f}")
    t0 = time.time()
    for step in range(a.steps):
        fake = gen(a.batch)
        total = 0
        parts = []
        for l, w in zip(losses, wts):
            if l == "pixel":
                y = x[torch.randint(0, len(x), (a.batch,))]
                v = mmd(fake.flatten(1), y.flatten(1), sig2, scale=0.25)
            elif l in ("code", "codeimq"):
                y = x[torch.randint(0, len(x), (a.batch,))]
                v = mmd(ae.features(fake)[-1], ae.features(y)[-1], code_sig, kind="gauss" if l == "code" else "imq")
            elif l == "moments":
                f = ae.features(fake)
                v = mm.loss([f[i].flatten(1) for i in layers])
            elif l == "pixmom":
                v = pmm.loss([fake.flatten(1)])
            elif l == "dm":
                # DM: random conv net drawn each step, match mean embeddings (and vars)
                y = x[torch.randint(0, len(x), (a.batch,))]
                wd = a.dm_width
                ws = [torch.randn(wd, 1, 3, 3) * (2 / 9) ** .5, torch.randn(wd, wd, 3, 3) * (2 / (9 * wd)) ** .5, torch.randn(wd, wd, 3, 3) * (2 / (9 * wd)) ** .5]
                def emb(b):
                    h = b
                    for wgt in ws:
                        h = F.conv2d(h, wgt, padding=1)
                        h = F.group_norm(h, wd)  # instance norm
                        h = F.avg_pool2d(F.relu(h), 2)
                    return h.flatten(1)
                ef, er = emb(fake), emb(y)
                v = ((ef.mean(0) - er.mean(0)) ** 2).sum()
            total = total + w * v
            parts.append(v.item())
        opt.zero_grad(); total.backward(); opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step}: " + " ".join(f"{p:.4f}" for p in parts) + f" ({time.time()-t0:.0f}s)", flush=True)
    print(f"train time {time.time()-t0:.0f}s")
    save_samples(gen, a.out)


if __name__ == "__main__":
    main()
