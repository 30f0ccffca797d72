"""A PyTorch replica of prism's default generator and loss, trained by one client alone, for
quick studies of what limits sample quality (the loss, the masking, the batch) apart from the
federated mechanics. Not part of the test suite; needs PyTorch (`pip install torch numpy pillow`).

The replica follows PRISM.md sections 1 to 3 as prism implements them for `mlp28-deep`: latent 32,
Linear-BatchNorm(no affine)-ReLU at 256, 512 and 1024, Linear to 784, a fixed 3x3 binomial blur
of the pre-activations, tanh; frozen signed-constant weights with scores s ~ N(0, 1), a fresh
Bernoulli(sigmoid(s)) mask each step and the p-scaled estimator; Adam(lr, betas (0.5, 0.999)) on
the scores; sqrt of the biased MMD^2 with GMMN's bandwidths on pixels in [0, 1]. `--side 14` is
the default `mlp28-up` (the output layer draws 14x14, upsampled 2x before the blur). `--dense` trains
ordinary Kaiming-normal weights of the same network instead (Adam lr 1e-3), the baseline that
shows what masking costs. `--arch resnet32` is prism's `resnet32` instead (the paper's ResNet,
PRISM.md section 6: latent 128, transposed conv to 512 x 4 x 4, three residual blocks
BN-ReLU-up-conv3-BN-ReLU-conv3 with a conv1-up skip to 256, 128 and 64 channels, BN-ReLU-conv3 to
one channel, tanh, 32 x 32; MNIST zero-padded to 32 x 32 as prism resizes it; no blur), for
timing it beside prism at the paper's batch of 64. Its random numbers are PyTorch's, so it matches prism in distribution,
not bit for bit.

    python3 tools/replica.py --data ../shared/data/mnist --steps 1000 --out /tmp/replica
    python3 tools/digit_score.py --data ../shared/data/mnist /tmp/replica
"""
import argparse, math, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from digit_score import idx_images  # this script's folder is on the module path
from loss_study import Bern


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/mnist", help="folder with MNIST's IDX files")
    ap.add_argument("--out", required=True, help="folder for 1000 samples as 28x28 PNGs")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128, help="latents and real images per step")
    ap.add_argument("--lr", type=float, default=None, help="default 0.3 (scores) or 1e-3 (--dense)")
    ap.add_argument("--bandwidths", default="2,5,10,20,40,80")
    ap.add_argument("--features", type=int, default=0, choices=[0, 1, 2],
                    help="also match MMD on 1 or 2 stages of a frozen random conv encoder "
                         "(prism's random-patches / random-conv), median-heuristic bandwidths")
    ap.add_argument("--dense", action="store_true", help="train dense weights instead of masks")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--widths", default="256,512,1024", help="hidden widths")
    ap.add_argument("--side", type=int, default=28, choices=[7, 14, 28],
                    help="the output layer draws side x side images, upsampled 2x (nearest) to "
                         "28x28 (14: prism's mlp28-up)")
    ap.add_argument("--no-blur", action="store_true", help="drop the output smoothing")
    ap.add_argument("--beta1", type=float, default=0.5, help="Adam's beta1")
    ap.add_argument("--gen-batch", type=int, default=0, help="latents per step (default --batch)")
    ap.add_argument("--cosine-lr", action="store_true", help="decay lr to 0 on a cosine")
    ap.add_argument("--device", default="cpu",
                    help="torch device: cpu (the side-by-side) or cuda (tools/gpu_check.sh)")
    ap.add_argument("--arch", default="mlp", choices=["mlp", "resnet32"],
                    help="mlp: the MLP of --widths and --side (default); resnet32: prism's resnet32")
    a = ap.parse_args()
    if a.arch == "resnet32" and a.features:
        ap.error("--features encodes 28x28 images; it does not go with --arch resnet32")
    torch.manual_seed(a.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    lr = a.lr if a.lr is not None else (1e-3 if a.dense else 0.3)
    real = idx_images(os.path.join(a.data, "train-images-idx3-ubyte.gz")).reshape(-1, 784)
    dev = torch.device(a.device)
    real = torch.tensor(real * 2 - 1)  # tanh range, as prism feeds the loss
    if a.arch == "resnet32":
        # prism pads 28x28 to 32x32 with black (-1 in tanh range)
        real = F.pad(real.view(-1, 1, 28, 28), (2, 2, 2, 2), value=-1.0).reshape(-1, 1024)
        a.latent = 128

    # m ~ Bernoulli(p); backward dm/dp = p (the reference code's p-scaled estimator).
    Bernoulli = Bern

    class MaskedLinear(nn.Module):
        def __init__(self, inputs, outputs):
            super().__init__()
            if a.dense:
                self.w = nn.Parameter(nn.init.kaiming_normal_(torch.empty(outputs, inputs)))
            else:
                sign = torch.randint(0, 2, (outputs, inputs)).float() * 2 - 1
                self.register_buffer("w", sign * (2.0 / inputs) ** 0.5)
                self.s = nn.Parameter(torch.randn(outputs, inputs))

        def forward(self, x):
            w = self.w if a.dense else self.w * Bernoulli.apply(torch.sigmoid(self.s))
            return x @ w.t()

    class MaskedConv(nn.Module):
        """A masked conv (or transposed conv) without bias; fan-in out*k*k for transposed."""

        def __init__(self, cin, cout, k, pad, transposed=False):
            super().__init__()
            self.pad, self.transposed = pad, transposed
            shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
            fan_in = (cout if transposed else cin) * k * k
            if a.dense:
                self.w = nn.Parameter(torch.randn(shape) * (2.0 / fan_in) ** 0.5)
            else:
                sign = torch.randint(0, 2, shape).float() * 2 - 1
                self.register_buffer("w", sign * (2.0 / fan_in) ** 0.5)
                self.s = nn.Parameter(torch.randn(shape))

        def forward(self, x):
            w = self.w if a.dense else self.w * Bernoulli.apply(torch.sigmoid(self.s))
            if self.transposed:
                return F.conv_transpose2d(x, w, padding=self.pad)
            return F.conv2d(x, w, padding=self.pad)

    class ResBlock(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.main = nn.Sequential(
                nn.BatchNorm2d(cin, affine=False), nn.ReLU(), nn.Upsample(scale_factor=2),
                MaskedConv(cin, cout, 3, 1), nn.BatchNorm2d(cout, affine=False), nn.ReLU(),
                MaskedConv(cout, cout, 3, 1))
            self.skip = nn.Sequential(MaskedConv(cin, cout, 1, 0), nn.Upsample(scale_factor=2))

        def forward(self, x):
            return self.main(x) + self.skip(x)

    if a.arch == "resnet32":
        side = 32
        net = nn.Sequential(
            nn.Unflatten(1, (a.latent, 1, 1)), MaskedConv(a.latent, 512, 4, 0, transposed=True),
            ResBlock(512, 256), ResBlock(256, 128), ResBlock(128, 64),
            nn.BatchNorm2d(64, affine=False), nn.ReLU(), MaskedConv(64, 1, 3, 1))
    else:
        side = 28
        widths = [a.latent] + [int(w) for w in a.widths.split(",")]
        layers = []
        for i, o in zip(widths[:-1], widths[1:]):
            layers += [MaskedLinear(i, o), nn.BatchNorm1d(o, affine=False), nn.ReLU()]
        net = nn.Sequential(*layers, MaskedLinear(widths[-1], a.side * a.side))
    net = net.to(dev)
    real = real.to(dev)
    blur = (torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]).view(1, 1, 3, 3) / 16).to(dev)

    def generate(n):
        if a.arch == "resnet32":
            return torch.tanh(net(torch.randn(n, a.latent, device=dev))).view(n, side * side)
        h = net(torch.randn(n, a.latent, device=dev)).view(-1, 1, a.side, a.side)
        h = F.interpolate(h, size=(28, 28), mode="nearest")
        if not a.no_blur:
            h = F.conv2d(h, blur, padding=1)
        return torch.tanh(h).view(n, 784)

    def mmd(x, y, sigmas):
        z = torch.cat([x, y])
        sq = (z * z).sum(1)
        d = (sq[:, None] + sq[None] - 2 * z @ z.t()).clamp(min=0)
        k = sum(torch.exp(-d / (2 * s * s)) for s in sigmas)
        n = len(x)
        return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).clamp(min=1e-12).sqrt()

    sigmas = [float(s) for s in a.bandwidths.split(",")]
    gen = torch.Generator().manual_seed(a.seed + 1000)
    enc = [torch.randint(0, 2, (32, 1, 4, 4), generator=gen).float() * 2 - 1,
           torch.randint(0, 2, (64, 32, 4, 4), generator=gen).float() * 2 - 1]
    enc = [(enc[0] * (2 / 16) ** 0.5).to(dev), (enc[1] * (2 / 512) ** 0.5).to(dev)]

    def encode(x):
        h = x.view(-1, 1, 28, 28)
        for w in enc[: a.features]:
            h = F.relu(F.conv2d(h, w, stride=2, padding=1))
        return h.flatten(1)

    if a.features:
        with torch.no_grad():
            f = encode(real[:128])
            med = torch.cdist(f, f).median().item()
        feature_sigmas = [m * med for m in (0.25, 0.5, 1, 2, 4)]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(a.beta1, 0.999), eps=1e-8)
    start = time.time()
    for step in range(a.steps):
        if a.cosine_lr:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        x = generate(a.gen_batch or a.batch)
        y = real[torch.randint(0, len(real), (a.batch,)).to(dev)]
        loss = mmd(x * 0.5, y * 0.5, sigmas)  # distances between pixels in [0, 1]
        if a.features:
            loss = loss + mmd(encode(x), encode(y), feature_sigmas)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    loop = time.time() - start
    print(f"training loop: {loop:.2f} s, {1000 * loop / a.steps:.1f} ms a step on {dev}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with torch.no_grad():
        images = torch.cat([generate(250) for _ in range(4)])
    for i, im in enumerate(((images.cpu() + 1) * 127.5).round().clamp(0, 255).byte().view(-1, side, side)):
        Image.fromarray(im.numpy(), "L").save(os.path.join(a.out, f"{i:04}.png"))
    print(f"{a.steps} steps in {time.time() - start:.0f} s; 1000 samples in {a.out}")


if __name__ == "__main__":
    main()
