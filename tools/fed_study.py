"""Federated PRISM simulation (10 non-IID clients, mask uploads, MADA) of the mlp28-up masked
generator with a choice of losses and encoders (README, Encoders: the federated replica rows)."""
import argparse, os, time, math
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
import loss_study as proto
from loss_study import Gen, mmd, MovingMoments, real_stats, AE, Clf


def main():
    ap = argparse.ArgumentParser()
    proto.federation_args(ap, rounds=12, local=50, lr=0.3)
    ap.add_argument("--loss", default="pixel")
    ap.add_argument("--weights", default="")
    ap.add_argument("--sigmas", default="2,5,10,20,40,80")
    ap.add_argument("--enc", default="ae-mnist-2000-32-32,64,128.pt")
    ap.add_argument("--enc-kind", default="ae")
    ap.add_argument("--layers", default="0,1,2")
    ap.add_argument("--mm-lr", type=float, default=1e-5)
    ap.add_argument("--iid", action="store_true")
    ap.add_argument("--no-mada", action="store_true")
    ap.add_argument("--out", default="fed-study-out")
    ap.add_argument("--cache", default=".", help="folder of the study encoders loss_study.py trained")
    ap.add_argument("--widths", default="256,512,1024")
    ap.add_argument("--side", type=int, default=14)
    ap.add_argument("--final", default="sample", help="sample or threshold")
    ap.add_argument("--save-at", default="", help="rounds after which to also write samples")
    a = ap.parse_args()
    x, y, rng = proto.federation_setup(a)
    K = a.clients
    if a.iid:
        perm = rng.permutation(len(x))
        parts = np.array_split(perm, K)
    else:
        parts = proto.non_iid_parts(y, K, rng)
    losses = a.loss.split(",")
    wts = [float(w) for w in a.weights.split(",")] if a.weights else [1.0] * len(losses)
    layers = [int(l) for l in a.layers.split(",")]
    enc = None
    if any(l in ("moments", "code") for l in losses):
        ch = (32, 64, 128)
        if a.enc_kind in ("lda", "pca"):
            # Fitted from every client's sufficient statistics: the same as from the union.
            enc = proto.ELM(x, torch.tensor(y), kind=a.enc_kind, ch=(32, 64), code=10)
        elif a.enc_kind == "mclf":
            import enc_fed, __main__
            for n in ("MClf", "MConv", "MLin"):
                setattr(__main__, n, getattr(enc_fed, n))
            enc = torch.load(os.path.join(a.cache, a.enc), weights_only=False)
        else:
            enc = (AE if a.enc_kind == "ae" else Clf)(32, ch)
            enc.load_state_dict(torch.load(os.path.join(a.cache, a.enc)))
            enc.eval()
        for p in enc.parameters():
            p.requires_grad_(False)
    gen = Gen(side=a.side, widths=tuple(int(w) for w in a.widths.split(",")))
    params = [p for p in gen.parameters() if p.requires_grad]
    glob = [p.detach().clone() for p in params]
    clients = []
    t0 = time.time()
    for k in range(K):
        c = {"x": x[torch.tensor(parts[k])]}
        c["opt"] = torch.optim.Adam(params, lr=a.lr, betas=(0.5, 0.999))
        c["opt_state"] = None
        if "moments" in losses:
            rm, rv = real_stats(lambda b: [enc.features(b)[l] for l in layers], c["x"])
            c["mm"] = MovingMoments(rm, rv, lr=a.mm_lr)
        clients.append(c)
    print(f"client setup {time.time()-t0:.0f}s")
    sig2 = [float(s) for s in a.sigmas.split(",")]
    for r in range(a.rounds):
        masks = []
        tr = time.time()
        for k, c in enumerate(clients):
            with torch.no_grad():
                for p, g in zip(params, glob):
                    p.copy_(g)
            opt = c["opt"]
            for step in range(a.local):
                fake = gen(a.batch)
                total = 0
                for l, w in zip(losses, wts):
                    if l == "pixel":
                        yb = c["x"][torch.randint(0, len(c["x"]), (a.batch,))]
                        v = mmd(fake.flatten(1), yb.flatten(1), sig2, scale=0.25)
                    elif l == "moments":
                        f = enc.features(fake)
                        v = c["mm"].loss([f[i].flatten(1) for i in layers])
                    elif l == "code":
                        yb = c["x"][torch.randint(0, len(c["x"]), (a.batch,))]
                        cf, cr = enc.features(fake)[-1], enc.features(yb)[-1]
                        with torch.no_grad():
                            med2 = (torch.cdist(cr, cr) ** 2).median().item()
                        v = mmd(cf, cr, [med2 * f for f in (0.0625, 0.25, 1, 4, 16)])
                    total = total + w * v
                opt.zero_grad(); total.backward(); opt.step()
            with torch.no_grad():
                masks.append([torch.bernoulli(torch.sigmoid(p)) for p in params])
        with torch.no_grad():
            glob, lam = proto.server_step(glob, masks, mada=not a.no_mada)
        if str(r + 1) in a.save_at.split(","):
            write_samples(gen, params, glob, f"{a.out}_r{r+1}")
        print(f"round {r+1}: loss {total.item():.4f} lambda {lam:.3f} ({time.time()-tr:.0f}s, total {time.time()-t0:.0f}s)", flush=True)
    torch.save(glob, a.out + ".scores.pt")
    print(f"train time {time.time()-t0:.0f}s")
    write_samples(gen, params, glob, a.out)


def write_samples(gen, params, glob, out):
    """The model as one mask sample (to out) and as the threshold mask (to out + "_thr")."""
    masked = [m for m in gen.modules() if isinstance(m, proto.MaskedLinear)]
    w0 = [m.w.clone() for m in masked]
    saved = [p.detach().clone() for p in params]
    for kind, o in (("sample", out), ("threshold", out + "_thr")):
        with torch.no_grad():
            for p, g in zip(params, glob):
                p.copy_(g)
            fixed = [torch.bernoulli(torch.sigmoid(m.s)) if kind == "sample" else (m.s > 0).float() for m in masked]
            for m, f in zip(masked, fixed):
                m.w.mul_(f)
                m.s.fill_(100.0)  # keep prob 1: the fixed mask
        proto.save_samples(gen, o)
        with torch.no_grad():
            for m, w in zip(masked, w0):
                m.w.copy_(w)
            for p, s in zip(params, saved):
                p.copy_(s)


if __name__ == "__main__":
    main()
